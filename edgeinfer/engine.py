"""The engine: which tokens of which sequences go into each forward pass of a backend, over a KV cache of sequences.

`forward(tokens, seqs, positions, logit_rows)` evaluates any batch of tokens, each at its own (sequence, position),
in one call of the backend's runner (edgeinfer.backends: on the CPU, one compiled call runs every layer).
Everything else is a way of filling a batch:
- `prefill(tokens, seq=0)`: a prompt after what sequence seq holds, in chunks of `n_batch`;
- `decode(token, seq=0)`: one generated token;
- `decode_batch(tokens, seqs)`: one generated token for each of several sequences, in one pass.
The cache (`edgeinfer.kv_cache.KVCache`, allocated by the backend) records which tokens each sequence holds;
sequence 0 is the single-stream API's (`n_past`, `truncate`, `reset` act on it). Nothing here knows how a backend
lays out weights or computes: it uses `prepare`'s result, `allocate_cache` and `forward`, nothing else.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgeinfer.arch.decoder import DecoderConfig
from edgeinfer.backends import Backend, Runner, default_backend
from edgeinfer.errors import EdgeInferError
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, ContextFull, KVCache

__all__ = ["ContextFull", "Engine", "KVCache"]


class Engine:
    """Runs a decoder over a static KV cache of n_seq sequences of n_ctx positions.

    runner is what backend.prepare(cfg, weights, ...) returned (backend: the CPU one when None); several engines
    may share one."""

    def __init__(self, cfg: DecoderConfig, runner: Runner, n_ctx: int, n_batch: int = 256,
                 n_threads: int | None = None, n_seq: int = 1, kv_type: str = DEFAULT_KV_TYPE,
                 backend: Backend | None = None):
        self.backend = backend if backend is not None else default_backend()
        self.cfg, self.runner = cfg, runner
        self.n_ctx, self.n_batch = int(n_ctx), max(1, int(n_batch))
        max_threads = self.backend.max_threads
        self.n_threads = int(n_threads or max_threads)
        if not 1 <= self.n_threads <= max_threads:
            raise EdgeInferError(f"n_threads={self.n_threads}: this machine runs 1 to {max_threads} compute threads")
        self.cache = self.backend.allocate_cache(cfg, self.n_ctx, n_seq, kv_type)
        self.max_rows = max(self.n_batch, n_seq)  # of one forward call: a prefill chunk, or a step of every sequence

    # -- sequence 0, the single stream ------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return self.cache.length(0)

    def reset(self) -> None:
        self.cache.truncate(0, 0)

    def truncate(self, n: int) -> None:
        """Keep only the first n cached positions of sequence 0 (the rest is overwritten by the next evaluation)."""
        self.cache.truncate(0, n)

    # -- the forward pass ------------------------------------------------------------------------------------
    def forward(self, tokens, seqs, positions, logit_rows, out: np.ndarray | None = None) -> np.ndarray:
        """Evaluate one batch of at most max(n_batch, n_seq) rows: tokens[i] at positions[i] of sequence seqs[i]
        (its K/V stored there); logits (len(logit_rows), n_vocab) float32 of the rows logit_rows, written into `out`
        if given (a C-contiguous array of that shape a caller reuses step after step: a fresh one of megabytes costs
        page faults every step).

        The caller keeps the cache's record (`KVCache.record`) and guarantees that no two rows share a (sequence,
        position) and that each row's earlier positions are cached or in the batch."""
        tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        n = len(tokens)
        if not 1 <= n <= self.max_rows:
            raise ValueError(f"a forward batch holds 1 to {self.max_rows} rows, got {n}")
        logit_rows = np.ascontiguousarray(logit_rows, dtype=np.int64)
        shape = (len(logit_rows), self.cfg.n_vocab)
        if out is not None and (out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous):
            raise ValueError(f"out must be a C-contiguous float32 array of shape {shape}")
        logits = np.empty(shape, dtype=np.float32) if out is None else out
        self.runner.forward(tokens, np.ascontiguousarray(positions, dtype=np.int64),
                           np.ascontiguousarray(seqs, dtype=np.int64), logit_rows, self.cache, logits, self.n_threads)
        return logits

    def prefill(self, tokens, all_logits: bool = False, seq: int = 0) -> np.ndarray:
        """Evaluate prompt tokens after those sequence seq holds; logits of the last token (n_vocab,), or of all
        (n, n_vocab)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            raise ValueError("prefill needs at least one token")
        self.cache.check_room(seq, len(tokens))
        out = []
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            n, first = len(chunk), self.cache.length(seq)
            last_chunk = start + self.n_batch >= len(tokens)
            rows = np.arange(n) if all_logits else np.array([n - 1] if last_chunk else [], dtype=np.int64)
            out.append(self.forward(chunk, np.full(n, seq), np.arange(first, first + n), rows))
            self.cache.record(seq, chunk)
        return np.concatenate(out) if all_logits else out[-1][0]

    def decode(self, token: int, seq: int = 0, out: np.ndarray | None = None) -> np.ndarray:
        """Evaluate one generated token of sequence seq; its logits (n_vocab,) (in out (1, n_vocab), as forward's)."""
        return self.decode_batch([token], [seq], out)[0]

    def decode_batch(self, tokens: Sequence[int], seqs: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """One generated token for each of several distinct sequences, in one forward pass; logits (B, n_vocab)
        (written into `out` if given, as forward's)."""
        if len(set(int(s) for s in seqs)) != len(seqs) or len(tokens) != len(seqs):
            raise ValueError("decode_batch takes one token for each of distinct sequences")
        for seq in seqs:
            self.cache.check_room(seq, 1)
        positions = [self.cache.length(seq) for seq in seqs]
        logits = self.forward(tokens, seqs, positions, np.arange(len(tokens)), out=out)
        for seq, token in zip(seqs, tokens):
            self.cache.record(seq, [token])
        return logits

    def warm_up(self) -> None:
        """Compile (on a first run: a minute or more) or load from Numba's cache the forward pass, for one row and
        for several, by evaluating throw-away tokens after sequence 0's; the cache is left as it was."""
        n_past = self.n_past
        if n_past + 2 <= self.n_ctx:
            self.prefill([0, 0])
            self.decode(0)
        self.truncate(n_past)
