"""Backends: what runs the decoder family's forward pass on a kind of hardware.

An architecture describes a model (edgeinfer.arch: a `DecoderConfig` and canonical weights, views into the memory
map) and never sees a backend's layouts. The engine (edgeinfer.engine.Engine) decides which tokens of which sequences
go into each forward call and keeps the cache's record; it needs nothing of a backend beyond this seam:

    runner = backend.prepare(cfg, weights, model_path, use_cache=True)   # once per model file
    cache = backend.allocate_cache(cfg, n_ctx, n_seq, kv_type)           # once per engine
    runner.forward(tokens, positions, seqs, logit_rows, cache, logits, n_threads)   # once per batch

- `prepare` puts the weights where and how the backend's kernels want them (the CPU backend repacks them into its
  16-row layouts and caches the result on disk; a GPU backend would upload them) and returns a runner for it,
  read-only from then on and shareable between engines and threads. `model_path` names the file for caches kept
  across runs; `use_cache=False` keeps everything in memory.
- `allocate_cache` returns an `edgeinfer.kv_cache.KVCache` (or a subclass): the engine reads and writes only its
  record of which tokens each sequence holds (length, record, truncate, ...); its K/V storage is the backend's.
- `forward` evaluates one batch of rows: tokens[i] (int64) at positions[i] of sequence seqs[i], each row's K/V
  stored in the cache there, and writes the float32 logits of the rows logit_rows into logits (len(logit_rows),
  n_vocab), a host array the engine allocated. Any mix of sequences and positions is one call: a prompt's chunk,
  one decode step, a decode step of B sequences. n_threads is the host threads it may use (at most
  `backend.max_threads`; a backend computing elsewhere may ignore it).

A backend also has a `name` ("cpu") and `max_threads`; a runner may offer `weight_bytes_per_step()` (the
weight bytes one call reads, which the benchmark reports) and `idle()` (the calling thread's request is over, for
now: give back what that thread holds between requests; the API calls it at the end of each public call) and
`hosting()` (a context manager: the calling thread makes nearly all calls for a while, a server's scheduler; the CPU
runner then runs them on that thread instead of handing each to its kernel thread).
Backends: `cpu` (edgeinfer.backends.cpu: kernels_cpu's compiled Numba forward, whose tables `cpu_tables` builds,
over weights `cpu_repack` repacks).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import os

    import numpy as np

    from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights
    from edgeinfer.kv_cache import KVCache

__all__ = ["Backend", "Runner", "default_backend"]


class Runner(Protocol):
    """One model ready to run on one backend (what `Backend.prepare` returns)."""

    def forward(self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray, logit_rows: np.ndarray,
                cache: KVCache, logits: np.ndarray, n_threads: int) -> None: ...


class Backend(Protocol):
    """What runs the forward pass (see the module docstring)."""

    name: str
    max_threads: int

    def prepare(self, cfg: DecoderConfig, weights: DecoderWeights, model_path: str | os.PathLike,
                use_cache: bool = True) -> Runner: ...

    def allocate_cache(self, cfg: DecoderConfig, n_ctx: int, n_seq: int, kv_type: str) -> KVCache: ...


def default_backend() -> Backend:
    """The backend a model runs on when none is named: the CPU one (the only one so far)."""
    from edgeinfer.backends.cpu import CPUBackend

    return CPUBackend()
