"""Splitting text on special tokens before the model's own tokenizer sees it (llama.cpp's tokenizer_st_partition).

llama.cpp walks its special tokens longest text first; each token is searched in every raw-text fragment left so
far, and each occurrence becomes a token fragment. So a longer token wins over a shorter one anywhere in the text,
not only at the same position (this is not a leftmost-longest regex). User-defined tokens are always split out;
control and unknown tokens only with parse_special.
"""
from __future__ import annotations

from collections.abc import Sequence

Fragment = str | int  # raw text still to tokenize, or a token id


def partition(text: str, specials: Sequence[tuple[str, int]]) -> list[Fragment]:
    """`text` cut into raw-text and token-id fragments, in order. `specials` are (text, id) pairs, longest first."""
    if not text:
        return []
    fragments: list[Fragment] = [text]
    # fragments are pieces of `text`, so a token absent from it is absent from all of them (Gemma has 6k specials)
    for needle, token_id in [(n, i) for n, i in specials if n in text]:
        out: list[Fragment] = []
        for f in fragments:
            if isinstance(f, int) or needle not in f:
                out.append(f)
                continue
            for k, piece in enumerate(f.split(needle)):
                if k:
                    out.append(token_id)
                if piece:
                    out.append(piece)
        fragments = out
    return fragments
