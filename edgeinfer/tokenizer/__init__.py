"""Tokenizers built from GGUF metadata, matching llama.cpp token for token.

    tok = Tokenizer.from_metadata(GGUFFile(path).metadata)
    ids = tok.encode("Hello", add_special=True, parse_special=False)
    text = tok.decode(ids)
    dec = IncrementalDecoder(tok); pieces = [dec.add(i) for i in ids] + [dec.flush()]

Layout: vocab.py reads the metadata (special ids, token attributes, end-of-generation set); special.py splits text
on special tokens; spm.py (SentencePiece, "llama") and bpe.py (byte-level BPE, "gpt2") tokenize the rest;
detok.py turns ids back into bytes and text; tokenizer.py ties them together.
"""
from edgeinfer.tokenizer.detok import IncrementalDecoder
from edgeinfer.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer", "IncrementalDecoder"]
