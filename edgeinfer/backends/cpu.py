"""The CPU backend: weights repacked into the int8 kernels' 16-row layouts, one compiled Numba forward per batch.

`CPUBackend.prepare` repacks a model's matrices (cached on disk, memory-mapped: edgeinfer.backends.cpu_repack) and
returns a `CPURunner`, which holds the tables compiled code reads (edgeinfer.backends.cpu_tables) and the forward pass
compiled for that model's weight types (kernels_cpu.specialize). Kept apart from the architectures so that `plan`,
`info` and `convert`, which read only metadata and tensor headers, never repack a model; only what runs it does
(`Model`, the benchmark).
"""
from __future__ import annotations

import os

import numba
import numpy as np

from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights
from edgeinfer.backends.cpu_repack import Repacked, repack_weights
from edgeinfer.backends.cpu_tables import NO_REPACKING, ForwardTables
from edgeinfer.kv_cache import KVCache
from kernels_cpu.forward import Scratch, make_scratch
from kernels_cpu.kernel_thread import call_with_threads, hosting, release_main_team
from kernels_cpu.specialize import forward_for

__all__ = ["CPUBackend", "CPURunner"]


class CPUBackend:
    """Runs the decoder family on this machine's cores (see edgeinfer.backends for the interface)."""

    name = "cpu"

    def __init__(self, repack: bool = True):
        self.repack = repack  # False: the kernels read the file's own ggml blocks (2-3x slower; for comparisons)

    @property
    def max_threads(self) -> int:
        """Numba sizes its thread pool once, at start-up: no call can use more."""
        return numba.config.NUMBA_NUM_THREADS

    def prepare(self, cfg: DecoderConfig, weights: DecoderWeights, model_path: str | os.PathLike,
                use_cache: bool = True) -> CPURunner:
        """The model ready to run: its matrices repacked (made once per model file and cached under
        $EDGEINFER_HOME/repacked, memory-mapped afterwards; in memory without use_cache or a writable home)."""
        repacked = repack_weights(weights, model_path, use_cache=use_cache) if self.repack else NO_REPACKING
        runner = CPURunner(cfg, weights, repacked)
        release_main_team()  # loaded on the main thread and run from another: no second OpenMP team left behind
        return runner

    def allocate_cache(self, cfg: DecoderConfig, n_ctx: int, n_seq: int, kv_type: str) -> KVCache:
        """n_seq sequences sharing n_ctx positions, in host memory, stored as kv_type."""
        return KVCache(cfg, n_ctx, n_seq, kv_type)


class CPURunner:
    """One model ready for the CPU kernels: the architecture's views, where their repacked copies lie, the tables
    compiled code reads and the forward compiled for its weight types. Read-only once made, so engines (and threads)
    may share it: each call borrows scratch arrays of its own."""

    def __init__(self, cfg: DecoderConfig, weights: DecoderWeights, repacked: Repacked = NO_REPACKING):
        self.cfg, self.weights, self.repacked = cfg, weights, repacked
        self.tables = ForwardTables(cfg, weights, repacked)
        # the forward compiled with only this model's kernels (a first run compiles those alone)
        self._compiled = forward_for(self.tables.type_ids, self.tables.embedding_type)
        self._free_scratch: list[Scratch] = []  # returned by finished calls; list.pop/append are atomic

    def idle(self) -> None:
        """The calling thread's request is over: on the main thread, give its OpenMP team back (~70 us, and ~100 us
        to make a new one at its next call), so that threads which run the model afterwards find one team in the
        process (kernels_cpu.kernel_thread: an app that warmed the model up on its main thread and then generated
        from a thread pool ran at half speed). Nothing on other threads."""
        release_main_team()

    def hosting(self):
        """A context in which the calling thread's forwards run on it, not handed to the kernel thread: for a thread
        that makes nearly all of them for a while (a server's scheduler; kernels_cpu.kernel_thread.hosting)."""
        return hosting()

    def forward(self, tokens: np.ndarray, positions: np.ndarray, seqs: np.ndarray, logit_rows: np.ndarray,
                cache: KVCache, logits: np.ndarray, n_threads: int) -> None:
        """Evaluate tokens[i] (int64) at positions[i] of sequence seqs[i], storing each row's K/V in cache; write the
        float32 logits of rows logit_rows into logits (len(logit_rows), n_vocab). Uses n_threads threads."""
        scratch = self._borrow_scratch(len(tokens))
        try:
            scratch.threads[0] = n_threads  # what attention splits its work for
            # where the process keeps its one OpenMP team (kernels_cpu.kernel_thread: the main thread, or the kernel
            # thread for any other), one forward at a time. The compiled forward releases the GIL meanwhile, so a
            # server's event loop, or another model's Python, runs while it computes.
            call_with_threads(n_threads, self._compiled,
                              *self.tables.arguments(tokens, positions, seqs, logit_rows, cache.k, cache.v, scratch,
                                                     logits))
        finally:
            self._free_scratch.append(scratch)

    def weight_bytes_per_step(self) -> int:
        """Bytes of matrices one forward call reads, whatever its batch (what bounds decode speed)."""
        return self.tables.weight_bytes_per_step()

    def _borrow_scratch(self, n_rows: int) -> Scratch:
        """Scratch arrays for a batch of n_rows: a returned set if one is large enough, else a new one."""
        try:
            scratch = self._free_scratch.pop()
        except IndexError:
            scratch = None
        if scratch is None or scratch.x.shape[0] < n_rows:  # a smaller one is dropped (batches stop at n_batch)
            scratch = make_scratch(self.tables.hyper, n_rows)
        return scratch

