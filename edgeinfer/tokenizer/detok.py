"""Token ids back to bytes and text: llama.cpp's token_to_piece and detokenize, and a streaming decoder.

A token's piece depends on its attributes (llama-vocab.cpp `token_to_piece`):
- control and unknown tokens: nothing, unless `special`; then their text;
- user-defined tokens: their text as is;
- byte tokens <0xAB>: the byte 0xAB;
- normal tokens: SPM replaces '▁' with ' '; byte-level BPE maps each character of GPT-2's byte alphabet back to
  its byte;
- anything else (unused, undefined): nothing.
"""
from __future__ import annotations

import codecs
import re
from typing import TYPE_CHECKING

import numpy as np

from edgeinfer.tokenizer.vocab import Attr, Vocab

if TYPE_CHECKING:
    from edgeinfer.tokenizer import Tokenizer


def gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: printable Latin-1 bytes stand for themselves, the other 68 bytes
    take the characters from U+0100 on, in byte order."""
    keep = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_CHAR_TO_BYTE = {c: b for b, c in gpt2_byte_alphabet().items()}
# str.translate's table: each alphabet character to the Latin-1 character of its byte (then .encode("latin-1") gives
# the bytes in C), every Latin-1 character outside the alphabet to one that Latin-1 cannot encode (so such a token,
# like one with characters past U+00FF, takes the exact path)
_TO_LATIN1 = {**{ord(c): chr(b) for c, b in _CHAR_TO_BYTE.items()},
              **{b: "\uffff" for b in range(256) if chr(b) not in _CHAR_TO_BYTE}}


def byte_level_to_bytes(text: str) -> bytes:
    """A byte-level BPE token's bytes; characters outside the alphabet become llama.cpp's [UNK_BYTE_0x..] marker."""
    try:
        return text.translate(_TO_LATIN1).encode("latin-1")
    except UnicodeEncodeError:
        out = bytearray()
        for c in text:
            b = _CHAR_TO_BYTE.get(c)
            if b is None:
                out += f"[UNK_BYTE_0x{c.encode('utf-8').hex()}{text}]".encode("utf-8")
            else:
                out.append(b)
        return bytes(out)


_NORMAL, _BYTE = int(Attr.NORMAL), int(Attr.BYTE)  # plain ints: IntFlag arithmetic is slow per token


class PieceTable:
    """Bytes of every token, computed on first use (building all 262k pieces up front would cost ~0.2 s)."""

    def __init__(self, vocab: Vocab, byte_level: bool):
        self.vocab, self.byte_level = vocab, byte_level
        self._normal: list[bytes | None] = [None] * vocab.n_vocab

    def all_pieces(self) -> list[bytes]:
        """Every token's piece (special=False) in one pass: what `piece` gives each, without a call per token
        (prompt lookup's word classes read the whole vocabulary: 0.6 -> 0.1 s at Qwen2.5's 151k tokens)."""
        hidden, user = int(Attr.CONTROL | Attr.UNKNOWN), int(Attr.USER_DEFINED)
        out = []
        for token_id, (text, attr) in enumerate(zip(self.vocab.tokens, np.asarray(self.vocab.attrs).tolist())):
            if attr & hidden:
                out.append(b"")
            elif attr & user:
                out.append(text.encode("utf-8"))
            else:
                piece = self._normal[token_id]
                if piece is None:
                    piece = self._normal[token_id] = self._normal_piece(text, attr)
                out.append(piece)
        return out

    def piece(self, token_id: int, special: bool) -> bytes:
        attr = int(self.vocab.attrs[token_id])
        if attr & (Attr.CONTROL | Attr.UNKNOWN):
            return self.vocab.tokens[token_id].encode("utf-8") if special else b""
        if attr & Attr.USER_DEFINED:
            return self.vocab.tokens[token_id].encode("utf-8")
        cached = self._normal[token_id]
        if cached is not None:
            return cached
        piece = self._normal[token_id] = self._normal_piece(self.vocab.tokens[token_id], attr)
        return piece

    def _normal_piece(self, text: str, attr: int) -> bytes:
        """The piece of a token that is neither control, unknown nor user-defined."""
        if attr & _NORMAL:
            return byte_level_to_bytes(text) if self.byte_level else text.replace("▁", " ").encode("utf-8")
        if attr & _BYTE:
            return bytes((int(text[3:5], 16),))
        return b""  # unused or undefined


_SPACE_BEFORE_PUNCT = re.compile(rb" ([?!.,])")
_QUOTE_BETWEEN_SPACES = re.compile(rb" ' ")
_SPACE_BEFORE_CONTRACTION = re.compile(rb" '(?=[sm]|re|ve)")


def clean_spaces(text: bytes) -> bytes:
    """llama.cpp's detokenize clean-up for BPE vocabularies with clean_spaces: " ?" " !" " ." " ," lose the space,
    " ' " becomes "'", and " 's" " 'm" " 're" " 've" lose the space (three passes, in this order)."""
    text = _SPACE_BEFORE_PUNCT.sub(rb"\1", text)
    text = _QUOTE_BETWEEN_SPACES.sub(b"'", text)
    return _SPACE_BEFORE_CONTRACTION.sub(b"'", text)


class IncrementalDecoder:
    """Streams text token by token: `add` returns only complete UTF-8 characters and holds back a partial
    multi-byte sequence until its last byte arrives; `flush` returns what is left (invalid bytes as U+FFFD).

    Pieces are concatenated as llama.cpp streams them (token_to_piece per token): no leading-space removal and no
    clean_spaces pass, so for vocabularies with those rules the stream may differ from `Tokenizer.decode`."""

    def __init__(self, tokenizer: "Tokenizer", special: bool = False):
        self.tokenizer, self.special = tokenizer, special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._utf8.decode(self.tokenizer.token_to_bytes(token_id, special=self.special))

    def flush(self) -> str:
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text
