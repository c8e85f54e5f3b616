"""SentencePiece (tokenizer.ggml.model = "llama") encoding through the `sentencepiece` library.

llama.cpp's SPM tokenizer is SentencePiece's BPE algorithm with these differences, all handled here:
- no normalization: llama.cpp only replaces ' ' with '▁' (and prepends ' ' itself when add_space_prefix is set),
  so the model built here has an identity normalizer and the caller passes text that is already escaped;
- every vocabulary entry, whatever its type, can be the result of a merge (llama.cpp looks merges up in its full
  text -> id map), so control, user-defined and unused tokens become NORMAL pieces here; user-defined tokens are
  split out of the text beforehand (special.partition), exactly as llama.cpp does;
- characters that form no token fall back to byte tokens <0xXX>.
The model is a hand-serialized ModelProto (the protobuf package is not needed): field numbers from sentencepiece's
sentencepiece_model.proto.
"""
from __future__ import annotations

import re

import numpy as np
import sentencepiece

from edgeinfer.tokenizer.vocab import K_TOKEN_TYPE, Vocab, fail

_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_BYTE = 1, 2, 6
_MODEL_TYPE_BPE = 2


def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # protobuf encodes negative int32 as 10-byte two's complement
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint(number << 3 | wire_type)


def _len_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _varint_field(number: int, value: int) -> bytes:
    return _field(number, 0) + _varint(value)


def _scatter(out: np.ndarray, starts: np.ndarray, lengths: np.ndarray, data: bytes) -> None:
    """Writes consecutive chunks of `data` (chunk i has lengths[i] bytes) to out[starts[i]:starts[i] + lengths[i]]."""
    src = np.frombuffer(data, np.uint8)
    chunk_starts = np.cumsum(lengths) - lengths
    out[np.repeat(starts - chunk_starts, lengths) + np.arange(len(src))] = src


def model_proto(tokens: list[str], scores: np.ndarray, piece_types: list[int], unk_id: int) -> bytes:
    """A serialized sentencepiece ModelProto: BPE, byte fallback, identity normalizer, no dummy prefix.

    Each piece is `0x0a len SentencePiece{0x0a len piece, 0x15 float score, 0x18 type}`; the 262k pieces of a large
    vocabulary are laid out with numpy, since a Python loop over them would take most of a second.
    """
    encoded = [t.encode("utf-8") for t in tokens]
    n = np.fromiter(map(len, encoded), np.int64, len(encoded))
    heads_by_len = {}
    for k in np.unique(n).tolist():
        inner = b"\x0a" + _varint(k)
        heads_by_len[k] = b"\x0a" + _varint(len(inner) + k + 7) + inner  # 7 = score (1 + 4) and type (1 + 1)
    heads = [heads_by_len[k] for k in n.tolist()]
    head_len = np.fromiter(map(len, heads), np.int64, len(heads))
    tails = np.empty((len(tokens), 7), np.uint8)
    tails[:, 0] = 0x15
    tails[:, 1:5] = np.asarray(scores, dtype="<f4").view(np.uint8).reshape(-1, 4)
    tails[:, 5] = 0x18
    tails[:, 6] = piece_types
    record = head_len + n + 7
    starts = np.cumsum(record) - record
    pieces = np.empty(int(record.sum()), np.uint8)
    _scatter(pieces, starts, head_len, b"".join(heads))
    _scatter(pieces, starts + head_len, n, b"".join(encoded))
    pieces[(starts + head_len + n)[:, None] + np.arange(7)] = tails

    trainer = b"".join((
        _varint_field(3, _MODEL_TYPE_BPE),  # model_type
        _varint_field(35, 1),  # byte_fallback
        _varint_field(40, unk_id), _varint_field(41, -1), _varint_field(42, -1), _varint_field(43, -1),
    ))
    normalizer = b"".join((
        _len_field(1, b"identity"),  # name
        _varint_field(3, 0),  # add_dummy_prefix
        _varint_field(4, 0),  # remove_extra_whitespaces
        _varint_field(5, 0),  # escape_whitespaces
    ))
    # ModelProto: pieces = 1, trainer_spec = 2, normalizer_spec = 3
    return pieces.tobytes() + _len_field(2, trainer) + _len_field(3, normalizer)


class SpmEncoder:
    """Encodes whitespace-escaped text with llama.cpp's SPM merge rules (highest score first, leftmost on ties)."""

    def __init__(self, vocab: Vocab):
        tokens = vocab.tokens
        is_byte = [len(t) == 6 and _BYTE_TOKEN.fullmatch(t) is not None for t in tokens]
        n_bytes = sum(is_byte)
        if n_bytes != 256:
            raise fail(K_TOKEN_TYPE, f"SentencePiece vocabulary has {n_bytes} of the 256 byte tokens <0x00>..<0xFF>; "
                                     "byte fallback needs all of them")
        piece_types = [_PIECE_BYTE if b else _PIECE_NORMAL for b in is_byte]
        # SentencePiece needs one UNKNOWN piece; with byte fallback it is never produced, so it is an extra entry past
        # the vocabulary (UNKNOWN pieces never take part in merges; the file's own <unk> stays mergeable, as in
        # llama.cpp)
        self.n_vocab = len(tokens)
        unk_text = "<edgeinfer-unk>"
        while unk_text in vocab.token_to_id:
            unk_text += "_"
        blob = model_proto(tokens + [unk_text], np.append(vocab.scores, np.float32(0)), piece_types + [_PIECE_UNKNOWN],
                           unk_id=self.n_vocab)
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(blob)
        except (RuntimeError, OSError) as e:
            raise fail("tokenizer.ggml.tokens", f"SentencePiece rejected the vocabulary: {e}") from None

    def encode(self, escaped: str) -> list[int]:
        """Token ids of `escaped` (spaces already replaced by '▁')."""
        return self._sp.EncodeAsIds(escaped)
