"""The KV cache: keys and values of up to `n_seq` sequences, and the record of which tokens each one holds.

A static pool (gpt-fast's static cache with a batch axis; llama.cpp's per-slot cells): v (n_layers, n_seq,
n_kv_heads, n_ctx, value_dim) and k in blocks of KEY_BLOCK positions, each block transposed (n_layers, n_seq,
n_kv_heads, n_ctx / KEY_BLOCK, head_dim, KEY_BLOCK: the attention kernels score 16 keys per SIMD vector; a backend
whose kernels want rows sets `key_block = None`), allocated once, in one of three element types (`KV_TYPES`,
llama.cpp's `-ctk/-ctv`): f32, f16 (IEEE half bits in uint16) or q8_0 (int8 values with a float32 scale per 32, the
scale rounded to a half as ggml's block_q8_0 stores it). Compiled code receives each of k and v as a pair (values,
scales); f32 and f16 caches carry a one-element dummy scale array. Sequence s holds positions 0..length(s)-1; its
token ids are kept here, beside the keys and values they produced, so whoever reuses a prefix (prompt caching,
shared system prompts, speculative rollback) asks the cache, not a second list elsewhere. Each (layer, sequence, KV
head)'s positions lie contiguously, which the attention kernels stream through (one head's keys at a stride of all
heads reached a third of the read rate on a 2-core EPYC: the prefetchers lose the stream).

Operations: `allocate` / `free` a sequence, `truncate` it, `copy_prefix` from one sequence to another (a shared
system prompt, a fork of a conversation), and `record` what a forward pass stored.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig
from edgeinfer.errors import EdgeInferError, InvalidArgument

# element types of the cache: (values dtype, bytes per value counted with its scale)
KV_TYPES = {"f32": (np.float32, 4.0), "f16": (np.uint16, 2.0), "q8_0": (np.int8, 1.0 + 4.0 / 32)}
DEFAULT_KV_TYPE = "f16"
QK = 32  # values per q8_0 block (along a head's dimension)
KEY_BLOCK = 16  # positions per block of the CPU cache's keys (kernels_cpu.kv_types.KEY_BLOCK)


class ContextFull(EdgeInferError):
    """The tokens to evaluate do not fit in a sequence's remaining positions."""


def check_kv_type(kv_type: str, cfg: DecoderConfig | None = None) -> str:
    """kv_type if it is one of KV_TYPES (and q8_0 fits this model's head sizes); InvalidArgument naming it else."""
    if not isinstance(kv_type, str) or kv_type not in KV_TYPES:
        raise InvalidArgument(f"kv_type={kv_type!r}: expected one of {', '.join(KV_TYPES)}")
    if kv_type == "q8_0" and cfg is not None and (cfg.head_dim % QK or cfg.value_dim % QK):
        raise InvalidArgument(f"kv_type='q8_0' needs head sizes that are multiples of {QK} (this model's: "
                              f"{cfg.head_dim} and {cfg.value_dim}); use f16")
    return kv_type


def encode(kv_type: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows (..., dim) -> (values, scales) as the cache stores them (the compiled forward does the same)."""
    x = np.asarray(x, dtype=np.float32)
    if kv_type == "f32":
        return x.copy(), np.zeros(x.shape[:-1] + (0,), np.float32)
    if kv_type == "f16":
        return x.astype(np.float16).view(np.uint16), np.zeros(x.shape[:-1] + (0,), np.float32)
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // QK, QK))
    d = np.abs(blocks).max(axis=-1) / np.float32(127)  # ggml's quantize_row_q8_0: x * (1/d), d stored as a half
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    q = (blocks * inverse[..., None]).astype(np.float64)  # the float32 product, then rounded exactly:
    q = np.sign(q) * np.floor(np.abs(q) + 0.5)  # roundf, halves away from zero
    return q.astype(np.int8).reshape(x.shape), d.astype(np.float16).astype(np.float32)


def decode(kv_type: str, values: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """(values, scales) of a cache -> float32 rows (..., dim)."""
    if kv_type == "f32":
        return np.array(values, dtype=np.float32)
    if kv_type == "f16":
        return values.view(np.float16).astype(np.float32)
    blocks = values.reshape(values.shape[:-1] + (values.shape[-1] // QK, QK)).astype(np.float32)
    return (blocks * scales[..., None]).reshape(values.shape)


def to_key_blocks(x: np.ndarray, block: int | None = KEY_BLOCK) -> np.ndarray:
    """Rows (..., n, dim) -> key blocks (..., ceil(n / block), dim, block), the positions past n zero; block None:
    the rows themselves."""
    if block is None:
        return x
    n, dim = x.shape[-2:]
    n_blocks = -(-n // block)
    padded = np.zeros(x.shape[:-2] + (n_blocks * block, dim), x.dtype)
    padded[..., :n, :] = x
    return np.ascontiguousarray(padded.reshape(x.shape[:-2] + (n_blocks, block, dim)).swapaxes(-1, -2))


def from_key_blocks(blocks: np.ndarray, n: int, block: int | None = KEY_BLOCK) -> np.ndarray:
    """Key blocks (..., n_blocks, dim, block) -> their first n rows (..., n, dim); block None: rows already."""
    if block is None:
        return blocks[..., :n, :]
    rows = blocks.swapaxes(-1, -2)
    return rows.reshape(rows.shape[:-3] + (-1, rows.shape[-1]))[..., :n, :]


class KVCache:
    """Keys and values of `n_seq` sequences of up to `n_ctx` positions each, in kv_type."""

    key_block: int | None = KEY_BLOCK  # positions per block of keys (the module docstring); None: keys by rows

    def __init__(self, cfg: DecoderConfig, n_ctx: int, n_seq: int = 1, kv_type: str = DEFAULT_KV_TYPE):
        if n_ctx < 1 or n_seq < 1:
            raise ValueError(f"a KV cache needs n_ctx >= 1 and n_seq >= 1, got {n_ctx} and {n_seq}")
        self.kv_type = check_kv_type(kv_type, cfg)
        self.n_ctx, self.n_seq = int(n_ctx), int(n_seq)
        q8 = self.kv_type == "q8_0"
        heads = (cfg.n_layers, n_seq, cfg.n_kv_heads)
        if self.key_block is None:
            key_shape = heads + (n_ctx, cfg.head_dim)
            key_scales = heads + (n_ctx, cfg.head_dim // QK)
        else:
            n_blocks = -(-n_ctx // self.key_block)
            key_shape = heads + (n_blocks, cfg.head_dim, self.key_block)
            key_scales = heads + (n_blocks, cfg.head_dim // QK, self.key_block)
        self.k = self._allocate(key_shape, key_scales if q8 else (1,) * len(key_shape))
        value_shape = heads + (n_ctx, cfg.value_dim)
        self.v = self._allocate(value_shape, heads + (n_ctx, cfg.value_dim // QK) if q8 else (1,) * 5)
        self._tokens: list[list[int]] = [[] for _ in range(n_seq)]
        self._in_use = [False] * n_seq
        self._in_use[0] = True  # sequence 0 is the single-stream API's, always there

    def _allocate(self, shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """(values, scales) zeroed (f32 and f16 caches' scales: a stand-in, one element)."""
        return np.zeros(shape, dtype=KV_TYPES[self.kv_type][0]), np.zeros(scale_shape, dtype=np.float32)

    def map_pages(self, n_threads: int = 1) -> None:
        """Have the OS map every page of this (empty) cache now rather than at first use (kernels_cpu.memory_pages:
        a server's first burst of requests otherwise maps gigabytes while its clients wait). ValueError while a
        sequence holds positions: the pages are written with zeros."""
        if any(self._tokens):
            raise ValueError("map_pages writes zeros into the cache: call it before any sequence holds positions")
        from kernels_cpu.memory_pages import zero_pages
        for array in self._stored_arrays():
            zero_pages(array, n_threads)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._stored_arrays())

    @staticmethod
    def nbytes_for(cfg: DecoderConfig, n_ctx: int, n_seq: int = 1, kv_type: str = DEFAULT_KV_TYPE) -> int:
        """Bytes a cache of n_seq sequences of n_ctx positions holds for this model (the budget plans with it; the
        key blocks round n_ctx up to a multiple of KEY_BLOCK, at most 15 positions' keys more)."""
        values = n_seq * n_ctx * cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + cfg.value_dim)
        return int(values * KV_TYPES[check_kv_type(kv_type)][1])

    # -- what each sequence holds ----------------------------------------------------------------------------
    def length(self, seq: int = 0) -> int:
        """Positions sequence `seq` holds."""
        return len(self._tokens[self._check(seq)])

    def tokens(self, seq: int = 0) -> list[int]:
        """The token ids sequence `seq` holds, by position (a copy)."""
        return list(self._tokens[self._check(seq)])

    def holds(self, seq: int, tokens: Sequence[int]) -> bool:
        """Whether sequence seq holds exactly `tokens` (without copying its record)."""
        return self._tokens[self._check(seq)] == list(tokens)

    def holds_prefix(self, seq: int, tokens: Sequence[int]) -> bool:
        """Whether sequence seq's first positions hold exactly `tokens` (it may hold more after them)."""
        held = self._tokens[self._check(seq)]
        return len(held) >= len(tokens) and held[:len(tokens)] == list(tokens)

    def room(self, seq: int = 0) -> int:
        """Positions still free in sequence `seq`."""
        return self.n_ctx - self.length(seq)

    def check_room(self, seq: int, n: int) -> None:
        if self.length(seq) + n > self.n_ctx:
            raise ContextFull(f"{n} more tokens do not fit: {self.length(seq)} of {self.n_ctx} context positions "
                              f"are used")

    def record(self, seq: int, tokens: Sequence[int]) -> None:
        """Note that a forward pass stored `tokens` at sequence seq's next positions."""
        self._tokens[self._check(seq)].extend(int(t) for t in tokens)

    # -- sequences -------------------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A free sequence id (empty); BudgetError-like EdgeInferError when all n_seq are in use."""
        for seq, used in enumerate(self._in_use):
            if not used:
                self._in_use[seq] = True
                self._tokens[seq] = []
                return seq
        raise EdgeInferError(f"all {self.n_seq} sequences of the KV cache are in use")

    def free(self, seq: int) -> None:
        """Forget sequence seq and give its id back (sequence 0 is only emptied)."""
        self._tokens[self._check(seq)] = []
        if seq != 0:
            self._in_use[seq] = False

    def truncate(self, seq: int, n: int) -> None:
        """Keep only the first n positions of sequence seq (the rest is overwritten by the next evaluation)."""
        del self._tokens[self._check(seq)][max(0, n):]

    def copy_prefix(self, src: int, dst: int, n: int | None = None) -> None:
        """Make sequence dst hold the first n positions of sequence src (all of them if n is None)."""
        n = self.length(src) if n is None else min(int(n), self.length(src))
        self._check(dst)
        if src != dst and n > 0:
            for a in self._stored_arrays():  # whole key blocks: positions past n are overwritten before use
                self._copy_positions(a, src, dst, n if a.ndim == 5 else -(-n // self.key_block))
        self._tokens[dst] = self._tokens[src][:n]

    # -- where the arrays live: host memory here; a backend's cache (edgeinfer.backends.cuda_cache) overrides these
    def _copy_positions(self, a, src: int, dst: int, n: int) -> None:
        """a[:, dst, :, :n] = a[:, src, :, :n] (n rows, or n key blocks)."""
        a[:, dst, :, :n] = a[:, src, :, :n]

    def _write_positions(self, a, seq: int, host: np.ndarray) -> None:
        """a[:, seq, :, :n] = host (n_layers, n_kv_heads, n, ...), as the host cache stores it (f16: half bits; keys
        in blocks)."""
        a[:, seq, :, :host.shape[2]] = host

    def _host_arrays(self, pair) -> tuple[np.ndarray, np.ndarray]:
        """(values, scales) of a K or V pair as host arrays the host cache's types (f16: half bits in uint16)."""
        return pair

    def _stored_arrays(self) -> tuple[np.ndarray, ...]:
        """The arrays that hold the cache's data: values, and scales for q8_0 (the others' are stand-ins)."""
        return self.k + self.v if self.kv_type == "q8_0" else (self.k[0], self.v[0])

    def _check(self, seq: int) -> int:
        if not 0 <= seq < self.n_seq or not self._in_use[seq]:
            raise ValueError(f"sequence {seq} is not allocated in this KV cache (n_seq={self.n_seq})")
        return seq

    # -- saving a sequence -----------------------------------------------------------------------------------
    def export(self, seq: int = 0) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(tokens, k, v) of sequence seq as float32 (so a saved conversation loads into a cache of any type):
        k (n_layers, length, n_kv_heads, head_dim), v likewise."""
        n = self.length(seq)
        return self.tokens(seq), self._read(self.k, seq, n, self.key_block), self._read(self.v, seq, n, None)

    def _read(self, pair, seq: int, n: int, block: int | None) -> np.ndarray:
        values, scales = self._host_arrays(pair)
        if self.kv_type == "q8_0":
            scales = from_key_blocks(scales[:, seq], n, block)
        x = decode(self.kv_type, from_key_blocks(values[:, seq], n, block), scales)
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))  # (n_layers, length, n_kv_heads, dim)

    def restore(self, seq: int, tokens: Sequence[int], k: np.ndarray, v: np.ndarray) -> bool:
        """Make sequence seq hold what `export` gave; False (nothing changed) if the arrays do not fit this cache."""
        n = len(tokens)
        shape_k = (self.k[0].shape[0], n, self.k[0].shape[2], self.k[0].shape[4])  # head_dim: axis 4 in both layouts
        shape_v = (self.v[0].shape[0], n, self.v[0].shape[2], self.v[0].shape[4])
        if n > self.n_ctx or k.shape != shape_k or v.shape != shape_v:
            return False
        self._check(seq)
        for pair, x, block in ((self.k, k, self.key_block), (self.v, v, None)):
            values, scales = encode(self.kv_type, x.transpose(0, 2, 1, 3))
            self._write_positions(pair[0], seq, to_key_blocks(values, block))
            if self.kv_type == "q8_0":
                self._write_positions(pair[1], seq, to_key_blocks(scales, block))
        self._tokens[seq] = [int(t) for t in tokens]
        return True
