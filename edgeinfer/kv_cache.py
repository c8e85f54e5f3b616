"""The KV cache: keys and values of up to `n_seq` sequences, and the record of which tokens each one holds.

A static pool (gpt-fast's static cache with a batch axis; llama.cpp's per-slot cells): k (n_layers, n_seq, n_ctx,
n_kv_heads, head_dim) and v likewise with value_dim, allocated once. Sequence s holds positions 0..length(s)-1; its
token ids are kept here, beside the keys and values they produced, so whoever reuses a prefix (prompt caching,
shared system prompts, speculative rollback) asks the cache, not a second list elsewhere. Each sequence's positions
lie contiguously, which the attention kernels stream through.

Operations: `allocate` / `free` a sequence, `truncate` it, `copy_prefix` from one sequence to another (a shared
system prompt, a fork of a conversation), and `record` what a forward pass stored.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig
from edgeinfer.errors import EdgeInferError


class ContextFull(EdgeInferError):
    """The tokens to evaluate do not fit in a sequence's remaining positions."""


class KVCache:
    """Keys and values of `n_seq` sequences of up to `n_ctx` positions each (float32)."""

    def __init__(self, cfg: DecoderConfig, n_ctx: int, n_seq: int = 1):
        if n_ctx < 1 or n_seq < 1:
            raise ValueError(f"a KV cache needs n_ctx >= 1 and n_seq >= 1, got {n_ctx} and {n_seq}")
        self.n_ctx, self.n_seq = int(n_ctx), int(n_seq)
        self.k = np.zeros((cfg.n_layers, n_seq, n_ctx, cfg.n_kv_heads, cfg.head_dim), dtype=np.float32)
        self.v = np.zeros((cfg.n_layers, n_seq, n_ctx, cfg.n_kv_heads, cfg.value_dim), dtype=np.float32)
        self._tokens: list[list[int]] = [[] for _ in range(n_seq)]
        self._in_use = [False] * n_seq
        self._in_use[0] = True  # sequence 0 is the single-stream API's, always there

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @staticmethod
    def nbytes_for(cfg: DecoderConfig, n_ctx: int, n_seq: int = 1) -> int:
        """Bytes a cache of n_seq sequences of n_ctx positions allocates for this model (the budget plans with it)."""
        return n_seq * n_ctx * cfg.kv_bytes_per_token(np.dtype(np.float32).itemsize)

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
        if src != dst:
            self.k[:, dst, :n] = self.k[:, src, :n]
            self.v[:, dst, :n] = self.v[:, src, :n]
        self._tokens[dst] = self._tokens[src][:n]

    def _check(self, seq: int) -> int:
        if not 0 <= seq < self.n_seq or not self._in_use[seq]:
            raise ValueError(f"sequence {seq} is not allocated in this KV cache (n_seq={self.n_seq})")
        return seq

    # -- saving a sequence -----------------------------------------------------------------------------------
    def export(self, seq: int = 0) -> tuple[list[int], np.ndarray, np.ndarray]:
        """(tokens, k, v) of sequence seq: k (n_layers, length, n_kv_heads, head_dim), v likewise (copies)."""
        n = self.length(seq)
        return self.tokens(seq), self.k[:, seq, :n].copy(), self.v[:, seq, :n].copy()

    def restore(self, seq: int, tokens: Sequence[int], k: np.ndarray, v: np.ndarray) -> bool:
        """Make sequence seq hold what `export` gave; False (nothing changed) if the arrays do not fit this cache."""
        n = len(tokens)
        shape_k = (self.k.shape[0], n) + self.k.shape[3:]
        shape_v = (self.v.shape[0], n) + self.v.shape[3:]
        if n > self.n_ctx or k.shape != shape_k or v.shape != shape_v:
            return False
        self._check(seq)
        self.k[:, seq, :n], self.v[:, seq, :n] = k, v
        self._tokens[seq] = [int(t) for t in tokens]
        return True
