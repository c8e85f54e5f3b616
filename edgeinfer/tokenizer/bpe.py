"""Byte-level BPE (tokenizer.ggml.model = "gpt2") encoding through the `tokenizers` library.

llama.cpp splits the text with a list of regexes chosen by tokenizer.ggml.pre (each regex splits every piece the
previous ones left, keeping matches and the text between them), maps each piece's UTF-8 bytes to GPT-2's printable
byte alphabet, and merges by rank. Here the same regexes run as a `tokenizers` Sequence of Split(isolated)
pre-tokenizers, ByteLevel does the byte mapping, and BPE the merges; regexes copied from llama-vocab.cpp's
`llm_tokenizer_bpe` (LLAMA_VOCAB_PRE_TYPE_*).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

from tokenizers import Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from edgeinfer.tokenizer.detok import gpt2_byte_alphabet
from edgeinfer.tokenizer.vocab import K_MERGES, K_PRE, Vocab, fail

GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
         r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """One LLAMA_VOCAB_PRE_TYPE: its regexes and the flags llama.cpp sets with it."""

    regexes: tuple[str, ...]
    clean_spaces: bool = True  # detokenize removes " ," " ." " 's" ... (llama.cpp's clean_spaces)
    ignore_merges: bool = False  # a word that is itself a token is emitted whole
    add_bos: bool = False  # default of tokenizer.ggml.add_bos_token


_DEFAULT = PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = PreTokenizer((GPT2,))
_LLAMA3 = PreTokenizer((LLAMA3,), ignore_merges=True, add_bos=True)
_STARCODER = PreTokenizer((r"\p{N}", GPT2))  # digits one by one, then GPT-2
_QWEN2 = PreTokenizer((QWEN2,))

# tokenizer.ggml.pre -> pre-tokenizer; the families whose regexes llama.cpp and `tokenizers` read alike
PRE_TOKENIZERS = {
    "default": _DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
                     "mellum", "modern-bert", "mpt", "olmo", "jais", "exaone4"), _GPT2),
    "trillion": PreTokenizer((GPT2,), clean_spaces=False),
    "granite-docling": PreTokenizer((GPT2,), clean_spaces=False),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), PreTokenizer((LLAMA3,))),
    **dict.fromkeys(("starcoder", "refact", "codeshell", "exaone", "minerva-7b", "mellum2"), _STARCODER),
    **dict.fromkeys(("smollm", "command-r"), PreTokenizer(_STARCODER.regexes, clean_spaces=False)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2"), PreTokenizer((QWEN2,), clean_spaces=False)),
    **dict.fromkeys(("stablelm2", "megrez"), _QWEN2),
    **dict.fromkeys(("hunyuan", "solar-open"), PreTokenizer((QWEN2,), clean_spaces=False)),
    "falcon": PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", GPT2, r"[0-9][0-9][0-9]")),
}


def pre_tokenizer_for(pre: str | None) -> tuple[str, PreTokenizer]:
    """The pre-tokenizer llama.cpp uses for tokenizer.ggml.pre = `pre`.

    A missing name is "default" with a warning, as in llama.cpp; an unknown one is an error (llama.cpp refuses to
    load such a file too), since a wrong guess silently changes every tokenization."""
    if not pre:
        warnings.warn(f"{K_PRE} missing: using the 'default' pre-tokenizer (generation quality may be degraded)",
                      stacklevel=3)
        return "default", _DEFAULT
    if pre not in PRE_TOKENIZERS:
        raise fail(K_PRE, f"unsupported pre-tokenizer {pre!r} (supported: {', '.join(sorted(PRE_TOKENIZERS))})")
    return pre, PRE_TOKENIZERS[pre]


def _merge_pairs(merges) -> list[tuple[str, str]]:
    """(left, right) of each merge in rank order, a repeated merge keeping its first rank (llama.cpp's bpe_ranks)."""
    if merges is None:
        raise fail(K_MERGES, "missing: a gpt2 (BPE) tokenizer needs its merges")
    if isinstance(merges, (str, bytes)) or not all(isinstance(m, str) for m in merges):
        raise fail(K_MERGES, "expected an array of strings")
    parts = [m.partition(" ") for m in merges]
    if any(not left for left, _, _ in parts):  # llama.cpp splits at the first space *after* the first character
        parts = [(m[:c], " ", m[c + 1:]) if (c := m.find(" ", 1)) >= 0 else ("", "", "") for m in merges]
    # an entry without a space is malformed; llama.cpp keeps it as a merge of two empty strings, which never applies
    return list(dict.fromkeys((left, right) for left, sep, right in parts if sep))


class BpeEncoder:
    """Encodes raw text (no special tokens in it) with llama.cpp's byte-level BPE rules for one pre-tokenizer."""

    def __init__(self, vocab: Vocab, pre: PreTokenizer, merges):
        self.n_vocab = vocab.n_vocab
        self._token_to_id = vocab.token_to_id
        pairs = _merge_pairs(merges)
        # `tokenizers` only knows symbols that are tokens. llama.cpp also has symbols that are not: a byte whose
        # character is no token (SmolLM2 lacks some control bytes), or the result of a merge that is no token. They
        # still stand between their neighbours during merges, so they get ids past the vocabulary here, replaced in
        # the output as llama.cpp does (`_replacement`).
        self._extra: dict[int, tuple[int, ...]] = {}
        alphabet = gpt2_byte_alphabet().values()
        hf_vocab = self._with_extra(vocab.token_to_id, [c for c in alphabet if c not in vocab.token_to_id])
        try:
            bpe = models.BPE(vocab=hf_vocab, merges=pairs, ignore_merges=pre.ignore_merges)
        except Exception:  # tokenizers raises plain Exceptions, here for a merge of or into a string that is no token
            strings = dict.fromkeys(x for a, b in pairs for x in (a, b, a + b) if x not in hf_vocab)
            hf_vocab = self._with_extra(hf_vocab, list(strings))
            try:
                bpe = models.BPE(vocab=hf_vocab, merges=pairs, ignore_merges=pre.ignore_merges)
            except Exception as e:
                raise fail(K_MERGES, f"tokenizers rejected the vocabulary/merges: {e}") from None
        tok = HFTokenizer(bpe)
        splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        self._tok = tok

    def _with_extra(self, hf_vocab: dict[str, int], strings: list[str]) -> dict[str, int]:
        if not strings:
            return hf_vocab
        hf_vocab = dict(hf_vocab)
        for text in strings:
            extra_id = self.n_vocab + len(self._extra)
            hf_vocab[text] = extra_id
            self._extra[extra_id] = self._replacement(text)
        return hf_vocab

    def _replacement(self, text: str) -> tuple[int, ...]:
        """What llama.cpp emits for a final symbol that is no token: each byte of its (byte-level) text looked up as
        a one-byte string, skipping misses, so only ASCII bytes can yield anything."""
        ids = (self._token_to_id.get(chr(b)) for b in text.encode("utf-8") if b < 0x80)
        return tuple(i for i in ids if i is not None)

    def words(self, text: str) -> list[str]:
        """The pieces the pre-tokenizer cuts `text` into, before byte mapping and merges (for tests and debugging)."""
        return [text[a:b] for _, (a, b) in self._tok.pre_tokenizer.pre_tokenize_str(text)]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self._extra:
            n, extra = self.n_vocab, self._extra
            ids = [j for i in ids for j in ((i,) if i < n else extra[i])]
        return ids
