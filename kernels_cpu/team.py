"""A persistent team of threads for one forward pass: one parallel region, the ops in it shared out by atomic claims.

A forward pass as a parallel region per op started ~180 regions for a SmolLM2 decode step (0.8 us each) and ran the
small ops between them (norms, quantizing x, RoPE, the SiLU) on the calling thread while the worker waited: the
worker spent 31% of an 8-row step waiting in libgomp. Here the whole pass is one region (`for tid in
prange(threads)`), as llama.cpp's graph runs on its thread pool, and each op is a *phase*: a number of items (a
run of a matrix's rows, a block of rows of a norm, a run of attention jobs) that the threads claim one at a time from
the phase's counter (llama.cpp's `current_chunk`), then wait until all of them are done before the next phase
starts (kernels_cpu.forward sizes the items).

Claiming, not a fixed share per thread id, for two reasons:
- a thread that the OS preempts (a server's event loop, a client, another guest on the same host) holds up only
  the items it has claimed: one it has not reached yet is taken by the others;
- it cannot deadlock: a thread waits only for items that a running thread has claimed. Where the threads of the
  region do not run at once (a runtime that runs the iterations one after another), the first claims every item
  and the others find every phase done.

The counters live in a `sync` array of int64, one cache line (8 int64) per phase: [phase, 0] items claimed,
[phase, 1] items done. The caller zeroes the phases a pass uses before the region starts. Phases are numbered in
program order, which is the same on every thread.
"""
import ctypes
import sys

import numpy as np
from llvmlite import binding as llvm_binding
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from kernels_cpu.simd import prefetch_l2

# spins (atomic reads of a shared line, ~20-50 ns each) before a waiting thread yields its CPU at each further spin:
# where other threads want the CPUs (a server's event loop and clients), one that holds a claimed item may be
# waiting for a CPU while the other spins on it
SPINS_BEFORE_YIELD = 1000
LINE = 8  # int64 per cache line: each phase's counters on a line of their own


def make_sync(n_phases: int) -> np.ndarray:
    """The counters of n_phases phases, zeroed."""
    return np.zeros((n_phases, LINE), np.int64)


def _element_pointer(context, builder, array_type, array, index):
    view = context.make_array(array_type)(context, builder, value=array)
    return cgutils.get_item_pointer(context, builder, array_type, view, [index], wraparound=False)


@intrinsic
def atomic_add(typingctx, array, index, value):
    """array[index] += value as one atomic step (sequentially consistent); the value before. array: a contiguous
    1-D int64 array."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, array, args[0], args[1])
        added = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", pointer, added, "seq_cst")
    return types.int64(array, index, value), codegen


@intrinsic
def atomic_load(typingctx, array, index):
    """array[index] read with acquire order: what other threads wrote before they released it is visible after.
    array: a contiguous 1-D int64 array."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64 and array.ndim == 1):
        return None

    def codegen(context, builder, signature, args):
        pointer = _element_pointer(context, builder, array, args[0], args[1])
        return builder.load_atomic(pointer, "acquire", 8)
    return types.int64(array, index), codegen


@intrinsic
def yield_cpu(typingctx):
    """sched_yield(): let another thread that waits for this CPU run (a preempted team thread, the event loop).
    Nothing where the C library has no sched_yield (Windows): the wait stays a spin there."""
    def codegen(context, builder, signature, args):
        if _SCHED_YIELD:
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "sched_yield")
            builder.call(fn, [])
        return context.get_dummy_value()
    return types.void(), codegen


def _find_sched_yield() -> bool:
    """Whether POSIX's sched_yield is there, its address made known to the JIT's linker (it resolves the symbol
    from the process on Linux and macOS anyway; this makes sure)."""
    if sys.platform == "win32":
        return False
    try:
        libc = ctypes.CDLL(None)
        address = ctypes.cast(libc.sched_yield, ctypes.c_void_p).value
    except (OSError, AttributeError):
        return False
    llvm_binding.add_symbol("sched_yield", address)
    return True


_SCHED_YIELD = _find_sched_yield()


@njit(cache=True, inline="always")
def claim(sync, phase):
    """The next unclaimed item of a phase (>= its item count once all are claimed)."""
    return atomic_add(sync[phase], 0, 1)


@njit(cache=True, inline="always")
def done_and_claim(sync, phase):
    """Mark an item of the phase done (its writes visible to whoever sees the count) and claim the next."""
    atomic_add(sync[phase], 1, 1)
    return atomic_add(sync[phase], 0, 1)


@njit(cache=True, inline="always")
def wait_done(sync, phase, n_items):
    """Wait until all n_items of the phase are done; then their writes are visible to this thread."""
    counters = sync[phase]
    spins = 0
    while atomic_load(counters, 1) < n_items:
        spins += 1
        if spins > SPINS_BEFORE_YIELD:
            yield_cpu()
    return phase + 1


@njit(cache=True, inline="always")
def wait_warming(sync, phase, n_items, ahead):
    """wait_done, first hinting the lines of `ahead` (uint8, 1-D: the first bytes of the next matrix) into L2, one
    per check of the count while the phase is unfinished: a thread with no item left waits on the others, and the
    memory bus would idle."""
    counters = sync[phase]
    e = 0
    while e < ahead.shape[0] and atomic_load(counters, 1) < n_items:
        prefetch_l2(ahead, e)
        e += 64
    return wait_done(sync, phase, n_items)


@njit(cache=True, inline="always")
def chunks(n, threads, per_thread, least):
    """How many items to cut n units into for `threads` claimers: about per_thread each, but items of at least
    `least` units (where claiming would cost more than the imbalance saves), and at least one."""
    return max(1, min(threads * per_thread, n // max(least, 1)))


@njit(cache=True, inline="always")
def item_range(i, items, n):
    """[lo, hi) of item i of n units cut into `items` items as evenly as they go."""
    return i * n // items, (i + 1) * n // items
