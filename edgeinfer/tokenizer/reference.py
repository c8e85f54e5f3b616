"""Slow, line-by-line Python ports of llama.cpp's tokenizer sessions, the reference the fast encoders are tested
against on random text (tests/test_tokenizer.py). Not used at run time.

Ported from llama.cpp src/llama-vocab.cpp (llm_tokenizer_spm_session, llm_tokenizer_bpe_session) and src/unicode.cpp
(unicode_regex_split: the hand-written GPT-2 splitter, and the "collapsed" std::regex fallback that maps every
non-ASCII character to one byte standing for its Unicode category). Character classes come from `unicodedata` as
llama.cpp's tables come from Python's `regex` module; the two agree except on characters added in newer Unicode.
"""
from __future__ import annotations

import heapq
import re
import unicodedata

from edgeinfer.tokenizer.detok import gpt2_byte_alphabet

# the Unicode White_Space property (llama.cpp's unicode_set_whitespace)
WHITESPACE = frozenset(map(chr, [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028,
                                 0x2029, 0x202F, 0x205F, 0x3000]))
_COLLAPSED_CATEGORY = {"N": 0xD1, "L": 0xD2, "P": 0xD3, "M": 0xD4, "S": 0xD5}  # anything else: 0xD0
_CLASS_BYTES = {"N": rb"\xd10-9", "L": rb"\xd2A-Za-z", "P": rb"\xd3!-#%-*,-/:-;?-@\[-\]_\{\}",
                "M": rb"\xd4", "S": rb"\xd5\$\+<->\^`\|"}
_BYTE_ALPHABET = gpt2_byte_alphabet()


def _category(c: str) -> str:
    return unicodedata.category(c)[0]


def _is_letter(c):
    return c is not None and _category(c) == "L"


def _is_number(c):
    return c is not None and _category(c) == "N"


def _is_space(c):
    return c is not None and c in WHITESPACE


def collapse_text(text: str) -> bytes:
    """One byte per character: ASCII as is, non-ASCII whitespace as \\v, others as their category byte."""
    out = bytearray()
    for c in text:
        o = ord(c)
        if o < 128:
            out.append(o)
        elif c in WHITESPACE:
            out.append(0x0B)
        else:
            out.append(_COLLAPSED_CATEGORY.get(_category(c), 0xD0))
    return bytes(out)


def collapse_regex(regex: str) -> bytes:
    r"""llama.cpp's rewrite of \p{X} into a byte class matching the collapsed text (outside [] it adds brackets)."""
    out, inside, i = bytearray(), False, 0
    while i < len(regex):
        ch = regex[i]
        if ch == "[" and (i == 0 or regex[i - 1] != "\\"):
            inside = True
        elif inside and ch == "]" and regex[i - 1] != "\\":
            inside = False
        elif regex.startswith("\\p{", i) and regex[i + 3] in _CLASS_BYTES and regex[i + 4] == "}":
            cls = _CLASS_BYTES[regex[i + 3]]
            out += cls if inside else b"[" + cls + b"]"
            i += 5
            continue
        out += ch.encode("ascii")
        i += 1
    return bytes(out)


def _split_collapsed(text: str, regex: str, chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    pattern = re.compile(collapse_regex(regex))
    collapsed = collapse_text(text)
    out = []
    for start, end in chunks:
        pos = start
        for m in pattern.finditer(collapsed, start, end):
            if m.start() > pos:
                out.append((pos, m.start()))
            out.append((m.start(), m.end()))
            pos = m.end()
        if pos < end:
            out.append((pos, end))
    return out


def _split_gpt2(text: str, chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """unicode_regex_split_custom_gpt2: GPT2_REGEX with a final |\\s+, matching within each chunk."""
    out = []
    for start, end in chunks:
        def cpt(p):
            return text[p] if start <= p < end else None

        def punct(c):  # [^\s\p{L}\p{N}] for a defined character
            return c is not None and not (_is_space(c) or _is_letter(c) or _is_number(c))

        prev, pos = start, start
        while pos < end:
            c = text[pos]
            nxt = cpt(pos + 1)
            if c == "'" and nxt is not None:
                if nxt in "stmd":
                    out.append((prev, pos + 2))
                    prev = pos = pos + 2
                    continue
                if cpt(pos + 2) is not None and nxt + cpt(pos + 2) in ("re", "ve", "ll"):
                    out.append((prev, pos + 3))
                    prev = pos = pos + 3
                    continue
            c2 = nxt if c == " " else c
            for test in (_is_letter, _is_number, punct):
                if test(c2):
                    pos += c == " "
                    while test(cpt(pos)):
                        pos += 1
                    break
            else:
                n_space = 0
                while _is_space(cpt(pos + n_space)):
                    n_space += 1
                if n_space > 1 and cpt(pos + n_space) is not None:
                    pos += n_space - 1
                elif n_space > 0:
                    pos += n_space
                else:
                    pos += 1
            out.append((prev, pos))
            prev = pos
    return out


GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def regex_split(text: str, regexes) -> list[str]:
    """unicode_regex_split without the byte encoding: the words of `text`."""
    chunks = [(0, len(text))] if text else []
    for regex in regexes:
        chunks = _split_gpt2(text, chunks) if regex == GPT2_REGEX else _split_collapsed(text, regex, chunks)
    return [text[a:b] for a, b in chunks if b > a]


def merge_ranks(merges) -> dict[tuple[str, str], int]:
    """llama.cpp's bpe_ranks: (left, right) -> rank of its first appearance; split at the first space after the first
    character."""
    ranks: dict[tuple[str, str], int] = {}
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)
        ranks.setdefault((merge[:cut], merge[cut + 1:]) if cut >= 0 else ("", ""), rank)
    return ranks


def bpe_encode(text: str, regexes, token_to_id: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """llm_tokenizer_bpe_session::tokenize for a byte-level vocabulary (no ignore_merges)."""
    out = []
    for word in regex_split(text, regexes):
        symbols = [_BYTE_ALPHABET[b] for b in word.encode("utf-8")]  # one symbol per byte-level character
        while len(symbols) > 1:
            best = min(((ranks.get((symbols[i], symbols[i + 1])), i) for i in range(len(symbols) - 1)
                        if (symbols[i], symbols[i + 1]) in ranks), default=None)
            if best is None:
                break
            i = best[1]
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        for s in symbols:
            if s in token_to_id:
                out.append(token_to_id[s])
            else:  # llama.cpp looks each raw byte up as a one-byte string
                out.extend(token_to_id[chr(b)] for b in s.encode("utf-8") if b < 0x80 and chr(b) in token_to_id)
    return out


def spm_encode(escaped: str, token_to_id: dict[str, int], scores) -> list[int]:
    """llm_tokenizer_spm_session::tokenize on whitespace-escaped text."""
    symbols = list(escaped)  # text of each live symbol; "" once merged away
    nxt = list(range(1, len(symbols))) + [-1]
    prv = list(range(-1, len(symbols) - 1))
    heap: list[tuple[float, int, int, int]] = []  # (-score, left, right, size); max score, then leftmost

    def try_add(left, right):
        if left == -1 or right == -1:
            return
        text = symbols[left] + symbols[right]
        token = token_to_id.get(text)
        if token is None:
            return
        heapq.heappush(heap, (-float(scores[token]), left, right, len(text.encode("utf-8"))))

    for i in range(1, len(symbols)):
        try_add(i - 1, i)
    while heap:
        _, left, right, size = heapq.heappop(heap)
        if not symbols[left] or not symbols[right] or len((symbols[left] + symbols[right]).encode("utf-8")) != size:
            continue
        symbols[left] += symbols[right]
        symbols[right] = ""
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prv[nxt[right]] = left
        try_add(prv[left], left)
        try_add(left, nxt[left])

    # llama.cpp's resegment: a final symbol is a token, or (never merged, so one character) its bytes as <0xXX>
    # tokens; its rev_merge recursion cannot trigger, since every merge result is a token
    out: list[int] = []
    i = 0 if symbols else -1
    while i != -1:
        token = token_to_id.get(symbols[i])
        if token is not None:
            out.append(token)
        else:
            out.extend(token_to_id[f"<0x{b:02X}>"] for b in symbols[i].encode("utf-8"))
        i = nxt[i]
    return out
