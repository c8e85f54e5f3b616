"""The machine's memory read rate at a number of threads: the wall a decode step's GB/s is measured against.

Decode reads every weight once per step, so its speed is bounded by how fast the cores can read memory. That rate is
a property of the machine at the moment of measuring, not a constant: on a shared VM it moved between 46 and 88 GB/s
at 2 threads within an hour (Zen 5, 2 vCPUs), so `edgeinfer bench` reads it in the same run as the tests it compares.
The probe XORs a buffer much larger than the last-level cache, each thread a contiguous share (as the matvec kernels
split a matrix) read as two streams, as 64-bit words: integer XOR vectorizes, does no arithmetic the cores could be
short of, and has an exact numpy reference. The probe is plain reads with the hardware's prefetching; a kernel whose
own prefetching keeps more misses in flight can read faster than it (a tg row above 100%).
"""
import time

import numba
import numpy as np
from numba import njit, prange

from kernels_cpu.kernel_thread import call_with_threads

PARTS_PER_THREAD = 16  # contiguous parts of the buffer; static scheduling gives each thread consecutive ones


@njit(cache=True, parallel=True)
def xor_parts(words):
    """XOR of every uint64 in words (n_parts, n): each part reduced by one thread, its two halves side by side, the
    parts' results combined."""
    results = np.zeros(words.shape[0], np.uint64)
    for p in prange(words.shape[0]):
        row = words[p]
        half = row.shape[0] // 2
        first = second = np.uint64(0)
        for i in range(half):  # two streams at once: more misses in flight (5-15% more than one, Zen 5)
            first ^= row[i]
            second ^= row[half + i]
        for i in range(2 * half, row.shape[0]):
            first ^= row[i]
        results[p] = first ^ second
    total = np.uint64(0)
    for p in range(results.shape[0]):
        total ^= results[p]
    return total


def read_buffer(n_bytes: int) -> np.ndarray:
    """A uint64 buffer of about n_bytes, its pages written so that reading it reads memory (untouched pages would all
    map the kernel's one zero page, read from cache)."""
    words = max(PARTS_PER_THREAD, n_bytes // 8)
    buffer = np.arange(words, dtype=np.uint64)
    buffer *= np.uint64(0x9E3779B97F4A7C15)  # (in place: no second buffer of this size)
    return buffer


def read_rate(buffer: np.ndarray, n_threads: int, reps: int = 3) -> float:
    """GB/s (1e9 bytes) at which n_threads threads read `buffer` (from read_buffer; all but the few words past the
    last whole part of n_threads x PARTS_PER_THREAD), the best of reps reads after a first one. Runs where the
    process's kernel calls run (kernels_cpu.kernel_thread)."""
    n_parts = int(n_threads) * PARTS_PER_THREAD
    if not 1 <= n_threads <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"n_threads={n_threads}: this machine runs 1 to {numba.config.NUMBA_NUM_THREADS} threads")
    if buffer.size < n_parts:
        raise ValueError(f"{n_threads} threads cannot split a buffer of {buffer.size} words")
    parts = buffer[:buffer.size // n_parts * n_parts].reshape(n_parts, -1)
    return call_with_threads(n_threads, _timed_reads, parts, int(reps))


def _timed_reads(parts: np.ndarray, reps: int) -> float:
    xor_parts(parts)  # compiled or loaded, and the threads awake
    best = float("inf")
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        xor_parts(parts)
        best = min(best, time.perf_counter() - start)
    return parts.nbytes / best / 1e9
