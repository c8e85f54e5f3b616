"""The vocabulary as llama.cpp loads it from GGUF metadata: token texts, scores, attributes and special ids.

Mirrors `llama_vocab::impl::load` in llama.cpp's src/llama-vocab.cpp: the same per-model defaults (SPM adds BOS, BPE
does not; BPE's default BOS/EOS id is 11), the same key overrides, the same text-based detection of end-of-turn and
fill-in-the-middle tokens (which also forces those tokens to CONTROL), and the same end-of-generation set.
"""
from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from edgeinfer.errors import TokenizerError

K_MODEL = "tokenizer.ggml.model"
K_PRE = "tokenizer.ggml.pre"
K_TOKENS = "tokenizer.ggml.tokens"
K_SCORES = "tokenizer.ggml.scores"
K_TOKEN_TYPE = "tokenizer.ggml.token_type"
K_MERGES = "tokenizer.ggml.merges"
K_ADD_BOS = "tokenizer.ggml.add_bos_token"
K_ADD_EOS = "tokenizer.ggml.add_eos_token"
K_ADD_PREFIX = "tokenizer.ggml.add_space_prefix"


class Attr(enum.IntFlag):
    """llama.cpp's `llama_token_attr` bits."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5


# GGUF tokenizer.ggml.token_type value -> attribute (anything else is UNDEFINED)
_TYPE_TO_ATTR = {1: Attr.NORMAL, 2: Attr.UNKNOWN, 3: Attr.CONTROL, 4: Attr.USER_DEFINED, 5: Attr.UNUSED,
                 6: Attr.BYTE}

# special-id keys in llama.cpp's order; the deprecated prefix/suffix/middle keys come last and win
_SPECIAL_ID_KEYS = (
    ("bos", "tokenizer.ggml.bos_token_id"), ("eos", "tokenizer.ggml.eos_token_id"),
    ("eot", "tokenizer.ggml.eot_token_id"), ("eom", "tokenizer.ggml.eom_token_id"),
    ("unk", "tokenizer.ggml.unknown_token_id"), ("sep", "tokenizer.ggml.seperator_token_id"),
    ("pad", "tokenizer.ggml.padding_token_id"), ("mask", "tokenizer.ggml.mask_token_id"),
    ("fim_pre", "tokenizer.ggml.fim_pre_token_id"), ("fim_suf", "tokenizer.ggml.fim_suf_token_id"),
    ("fim_mid", "tokenizer.ggml.fim_mid_token_id"), ("fim_pad", "tokenizer.ggml.fim_pad_token_id"),
    ("fim_rep", "tokenizer.ggml.fim_rep_token_id"), ("fim_sep", "tokenizer.ggml.fim_sep_token_id"),
    ("fim_pre", "tokenizer.ggml.prefix_token_id"), ("fim_suf", "tokenizer.ggml.suffix_token_id"),
    ("fim_mid", "tokenizer.ggml.middle_token_id"),
)

# Texts llama.cpp recognises when the file names no id for that role (llama-vocab.cpp, "auto-detect special tokens").
_DETECT_BY_TEXT = {
    "eot": ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>", "<EOT>",
            "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>", "<end_of_utterance>"),
    "eom": ("<|eom_id|>",),
    "fim_pre": ("<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
                "<|code_prefix|>", "<|prefix|>"),
    "fim_suf": ("<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
                "<|code_suffix|>", "<|suffix|>"),
    "fim_mid": ("<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
                "<|code_middle|>", "<|middle|>"),
    "fim_pad": ("<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"),
    "fim_rep": ("<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"),
    "fim_sep": ("<|file_sep|>",),
}

# Token texts that end generation whatever the file says (llama-vocab.cpp, "maintain a list of tokens that cause
# end-of-generation").
EOG_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
             "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
             "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
             "<｜end▁of▁sentence｜>", "[e~[")


def fail(key: str, problem: str) -> TokenizerError:
    """A TokenizerError whose message starts with the offending metadata key (also kept as `.key`)."""
    err = TokenizerError(f"{key}: {problem}")
    err.key = key
    return err


def _number_array(meta: Mapping, key: str, n: int, kind) -> np.ndarray | None:
    value = meta.get(key)
    if value is None:
        return None
    try:
        arr = np.asarray(value, dtype=kind)
    except (TypeError, ValueError) as e:
        raise fail(key, f"not an array of numbers ({e})") from None
    if arr.ndim != 1:
        raise fail(key, f"expected a 1-D array, got shape {arr.shape}")
    if len(arr) < n:
        raise fail(key, f"has {len(arr)} entries for {n} tokens")
    return arr[:n]


def _flag(meta: Mapping, key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if isinstance(value, (bool, np.bool_)) or (isinstance(value, (int, np.integer)) and value in (0, 1)):
        return bool(value)
    raise fail(key, f"expected a bool, got {value!r}")


@dataclass
class Vocab:
    """Token texts, scores and attributes plus the special ids and flags llama.cpp derives from metadata.

    `attrs[i]` holds `Attr` bits; `special_ids` are the tokens `tokenizer_st_partition` looks for (control,
    user-defined, unknown), longest text first.
    """

    model: str  # "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str  # pre-tokenizer name; "default" for SPM
    tokens: list[str]
    scores: np.ndarray  # float32 (n_vocab,)
    attrs: np.ndarray  # int32 (n_vocab,) of Attr bits
    token_to_id: dict[str, int]
    ids: dict[str, int | None]  # role ("bos", "eos", "eot", "unk", "fim_pre", ...) -> id or None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    eog_ids: frozenset[int]
    special_ids: tuple[int, ...]

    @property
    def n_vocab(self) -> int:
        return len(self.tokens)

    def has(self, token_id: int, attr: Attr) -> bool:
        return bool(int(self.attrs[token_id]) & attr)


def _token_list(meta: Mapping) -> list[str]:
    tokens = meta.get(K_TOKENS)
    if tokens is None:
        raise fail(K_TOKENS, "missing: the file has no vocabulary")
    if isinstance(tokens, np.ndarray):
        tokens = tokens.tolist()
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence) or len(tokens) == 0:
        raise fail(K_TOKENS, "expected a non-empty array of strings")
    tokens = list(tokens)
    if not all(isinstance(t, str) for t in tokens):
        raise fail(K_TOKENS, "expected an array of strings")
    for i, t in enumerate(tokens):
        if not t:  # llama.cpp renames empty tokens the same way
            tokens[i] = f"[EMPTY_{i}]"
    return tokens


def load_vocab(meta: Mapping, model: str, pre: str, defaults: dict) -> Vocab:
    """Reads tokens, scores, types and special ids; `defaults` holds the model's add_bos/add_eos/add_space_prefix
    and default special ids (llama.cpp's per-model defaults)."""
    tokens = _token_list(meta)
    n = len(tokens)
    token_to_id = {t: i for i, t in enumerate(tokens)}
    if len(token_to_id) != n:
        seen: dict[str, int] = {}
        for i, t in enumerate(tokens):
            if t in seen:
                raise fail(K_TOKENS, f"duplicate token {t!r} at ids {seen[t]} and {i}")
            seen[t] = i
    scores = _number_array(meta, K_SCORES, n, np.float32)
    scores = np.zeros(n, np.float32) if scores is None else np.ascontiguousarray(scores)
    types = _number_array(meta, K_TOKEN_TYPE, n, np.int64)
    if types is None:
        attrs = np.full(n, int(Attr.NORMAL), np.int32)
    else:
        lut = np.zeros(8, np.int32)  # 0 and 7, like anything out of range (clipped to them), are UNDEFINED
        for t, a in _TYPE_TO_ATTR.items():
            lut[t] = int(a)
        attrs = lut[np.clip(types, 0, 7)]

    ids: dict[str, int | None] = {role: None for role, _ in _SPECIAL_ID_KEYS}
    for role, default in defaults.get("ids", {}).items():
        ids[role] = default
    for role, key in _SPECIAL_ID_KEYS:
        if ids[role] is not None and ids[role] >= n:  # a default outside the vocabulary is disabled
            ids[role] = None
        value = meta.get(key)
        if value is None:
            continue
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise fail(key, f"expected a token id, got {value!r}")
        if not 0 <= int(value) < n:  # llama.cpp warns and keeps the default; a damaged file is refused here
            raise fail(key, f"{value} is outside the vocabulary of {n} tokens")
        ids[role] = int(value)

    add_bos = _flag(meta, K_ADD_BOS, defaults["add_bos"])
    add_eos = _flag(meta, K_ADD_EOS, defaults["add_eos"])
    add_space_prefix = _flag(meta, K_ADD_PREFIX, defaults["add_space_prefix"])
    if add_bos and ids["bos"] is None:
        raise fail(K_ADD_BOS, "is true, but tokenizer.ggml.bos_token_id is not set")
    if add_eos and ids["eos"] is None:
        raise fail(K_ADD_EOS, "is true, but tokenizer.ggml.eos_token_id is not set")

    eog = _resolve_special_roles(tokens, token_to_id, attrs, ids)
    special = [i for i in np.nonzero(attrs & int(Attr.CONTROL | Attr.USER_DEFINED | Attr.UNKNOWN))[0].tolist()]
    # longest UTF-8 text first, as llama.cpp sorts its cache (ties by id: its std::sort leaves them unspecified)
    special.sort(key=lambda i: (-len(tokens[i].encode("utf-8")), i))
    return Vocab(model=model, pre=pre, tokens=tokens, scores=scores, attrs=attrs, token_to_id=token_to_id, ids=ids,
                 add_bos=add_bos, add_eos=add_eos, add_space_prefix=add_space_prefix, eog_ids=frozenset(eog),
                 special_ids=tuple(special))


def _resolve_special_roles(tokens, token_to_id, attrs, ids) -> set[int]:
    """Detects unnamed EOT/EOM/FIM tokens by text, marks them CONTROL, and returns the end-of-generation set."""
    control, unused = int(Attr.CONTROL), int(Attr.UNUSED)
    for role, texts in _DETECT_BY_TEXT.items():
        if ids[role] is not None:
            continue
        # llama.cpp takes the first match in hash order; the lowest id is the deterministic stand-in
        found = sorted(token_to_id[t] for t in texts if t in token_to_id)
        if found:
            ids[role] = found[0]
            attrs[found[0]] |= control
    # control tokens named "unused" are unused
    for i in np.nonzero(attrs & control)[0].tolist():
        if "unused" in tokens[i]:
            attrs[i] |= unused

    eog = {ids[r] for r in ("fim_pad", "fim_rep", "fim_sep") if ids[r] is not None}
    for text in EOG_TEXTS:
        i = token_to_id.get(text)
        if i is not None:
            eog.add(i)
            attrs[i] |= control
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):  # gpt-oss: always rendered
        if text in token_to_id:
            attrs[token_to_id[text]] = int(Attr.USER_DEFINED)
    eog.update(ids[r] for r in ("eos", "eot", "eom") if ids[r] is not None)

    texts = {tokens[i]: i for i in eog}
    if "<|end|>" in texts and (("<|return|>" in texts and ("<|call|>" in texts or "<|calls|>" in texts))
                               or (("<|call|>" in texts or "<|calls|>" in texts) and "<|flush|>" in texts)):
        eog.discard(texts["<|end|>"])  # o200k_harmony / solar-open: <|end|> closes a message, not the generation
        attrs[texts["<|end|>"]] = int(Attr.USER_DEFINED)
    if "</s>" in texts and ("<|tool_response>" in texts or "<|plamo:eos|>" in texts):  # gemma4, PLaMo: "</s>" is text
        eog.discard(texts["</s>"])
        attrs[texts["</s>"]] = int(Attr.NORMAL)
    return eog
