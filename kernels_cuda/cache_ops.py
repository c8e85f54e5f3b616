"""Storage operations on device KV-cache arrays (n_layers, n_seq, n_kv_heads, n_ctx, dim): zero-filled allocation,
a copy of one sequence's first positions to another, and an upload of one sequence's positions from the host."""
from __future__ import annotations

import numpy as np
from numba import cuda

THREADS = 256


@cuda.jit
def _fill_zero(flat):
    i = cuda.grid(1)
    if i < flat.shape[0]:
        flat[i] = 0


@cuda.jit
def _copy_positions(dst, dst_seq, src, src_seq, n):
    """dst[:, dst_seq, :, :n] = src[:, src_seq, :, :n]; one thread per element."""
    n_layers, n_heads, dim = dst.shape[0], dst.shape[2], dst.shape[4]
    i = cuda.grid(1)
    if i >= n_layers * n_heads * n * dim:
        return
    c = i % dim
    p = (i // dim) % n
    h = (i // (dim * n)) % n_heads
    layer = i // (dim * n * n_heads)
    dst[layer, dst_seq, h, p, c] = src[layer, src_seq, h, p, c]


def _grid(n: int) -> int:
    return max(1, (n + THREADS - 1) // THREADS)


def zeros(shape: tuple[int, ...], dtype) -> cuda.devicearray.DeviceNDArray:
    """A zeroed device array, filled there (no host array of a cache's size is made); in the simulator, where the
    fill would be a Python loop over every element, uploaded from the host."""
    from kernels_cuda.launch import simulated

    if simulated():
        return cuda.to_device(np.zeros(shape, dtype))
    a = cuda.device_array(shape, dtype=dtype)
    fill_zero(a)
    return a


def fill_zero(a) -> None:
    """a[...] = 0 on the device (a C-contiguous device array)."""
    _fill_zero[_grid(a.size), THREADS](a.reshape(a.size))


def copy_positions(a, src: int, dst: int, n: int) -> None:
    size = a.shape[0] * a.shape[2] * n * a.shape[4]
    _copy_positions[_grid(size), THREADS](a, dst, a, src, n)


def write_positions(a, seq: int, host: np.ndarray) -> None:
    """a[:, seq, :, :n] = host (n_layers, n_heads, n, dim), through a staging device array and the copy kernel's
    indexing (a strided slice of a device array cannot be assigned from the host directly)."""
    n = host.shape[2]
    if n == 0:
        return
    staging = cuda.to_device(host.reshape(host.shape[0], 1, host.shape[1], n, host.shape[3]))
    size = host.size
    _copy_positions[_grid(size), THREADS](a, seq, staging, 0, n)
