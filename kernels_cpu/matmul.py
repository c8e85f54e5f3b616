"""Y = X @ W.T for prompt prefill, W stored as raw ggml blocks: one parallel Numba kernel for every format.

Each thread dequantizes a tile of rows of W (about 256 KB of float32, so it stays in L2) with dequant.py's row
kernels and multiplies it by X with a 2-row x 4-token register micro-kernel.

Measured with 64 tokens on this 2-core Xeon (shared with other jobs, so best of 15-25 runs), in ms:
                                        tile kernel       dequantized tiles + numpy `x @ tile.T`    64 matvec
                                        1 / 2 threads     1 thread    2 threads (workqueue / OpenMP)  calls
  SmolLM2 ffn_up Q4_1, 1536 rows x 576   2.6-3.0 / 2.05    2.3-2.7     2.3-4.0 / 44-192                8.8
  Qwen2.5 ffn_up Q5_0, 4864 rows x 896   10.8-12.3 / 7.1   12.2-17.5   8.0-15  / 16-612                50
With one thread the two are within ~15% (numpy ahead on Q4_1, the tile kernel on Q5_0); with two, Numba's OpenMP
layer (the one available here) keeps spinning workers that stall each OpenBLAS call by ~8 ms. The tile kernel is
kept: one parallel region per call and no BLAS threads to fight with.
"""
import numpy as np
from numba import njit, prange

from kernels_cpu.dequant import dequant_row
from kernels_cpu.formats import check_out, check_raw, check_x
from kernels_cpu.kernel_thread import call_parallel
from kernels_cpu.matvec import FASTMATH

TILE_FLOATS = 64 * 1024  # float32 elements of W dequantized per tile (256 KB)
MAX_TILE_ROWS = 64


@njit(cache=True, fastmath=FASTMATH)
def _dot_1x1(w, x):
    s = np.float32(0.0)
    for i in range(w.shape[0]):
        s += w[i] * x[i]
    return s


@njit(cache=True, fastmath=FASTMATH)
def _dot_1x4(w, x0, x1, x2, x3):
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(w.shape[0]):
        v = w[i]
        s0 += v * x0[i]
        s1 += v * x1[i]
        s2 += v * x2[i]
        s3 += v * x3[i]
    return s0, s1, s2, s3


@njit(cache=True, fastmath=FASTMATH)
def _dot_2x4(w0, w1, x0, x1, x2, x3):
    a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = np.float32(0.0)
    for i in range(w0.shape[0]):
        u, v = w0[i], w1[i]
        c0, c1, c2, c3 = x0[i], x1[i], x2[i], x3[i]
        a0 += u * c0
        a1 += u * c1
        a2 += u * c2
        a3 += u * c3
        b0 += v * c0
        b1 += v * c1
        b2 += v * c2
        b3 += v * c3
    return a0, a1, a2, a3, b0, b1, b2, b3


@njit(cache=True)
def multiply_tile(w, x, out, r0):
    """out[:, r0:r0 + n] = x @ w.T for a dequantized tile w: float32[n, n_cols] and x: float32[n_tokens, n_cols]."""
    n, n_tokens = w.shape[0], x.shape[0]
    t = 0
    while t + 4 <= n_tokens:
        x0, x1, x2, x3 = x[t], x[t + 1], x[t + 2], x[t + 3]
        i = 0
        while i + 2 <= n:
            a0, a1, a2, a3, b0, b1, b2, b3 = _dot_2x4(w[i], w[i + 1], x0, x1, x2, x3)
            out[t, r0 + i], out[t + 1, r0 + i], out[t + 2, r0 + i], out[t + 3, r0 + i] = a0, a1, a2, a3
            out[t, r0 + i + 1], out[t + 1, r0 + i + 1], out[t + 2, r0 + i + 1], out[t + 3, r0 + i + 1] = b0, b1, b2, b3
            i += 2
        if i < n:
            out[t, r0 + i], out[t + 1, r0 + i], out[t + 2, r0 + i], out[t + 3, r0 + i] = _dot_1x4(w[i], x0, x1, x2, x3)
        t += 4
    for tt in range(t, n_tokens):
        for i in range(n):
            out[tt, r0 + i] = _dot_1x1(w[i], x[tt])


@njit(parallel=True, cache=True)
def matmul_kernel(ggml_type, raw, x, out, tile_rows):
    """out = x @ W.T; each parallel task dequantizes `tile_rows` rows of W and multiplies them."""
    n_rows, n_cols = raw.shape[0], x.shape[1]
    n_tiles = (n_rows + tile_rows - 1) // tile_rows
    for tile in prange(n_tiles):
        r0 = tile * tile_rows
        n = min(tile_rows, n_rows - r0)
        w = np.empty((n, n_cols), np.float32)
        for i in range(n):
            dequant_row(ggml_type, raw[r0 + i], w[i])
        multiply_tile(w, x, out, r0)


def tile_rows_for(n_cols: int) -> int:
    """Rows per tile: an even count whose float32 tile fits TILE_FLOATS, between 2 and MAX_TILE_ROWS."""
    return max(2, min(MAX_TILE_ROWS, TILE_FLOATS // n_cols) // 2 * 2)


def matmul(ggml_type: int, raw: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Y = X @ W.T for a weight W stored as raw ggml blocks (prompt prefill: many tokens at once).

    raw: uint8[n_rows, row_bytes] (read only); x: float32[n_tokens, n_cols]. Returns float32[n_tokens, n_rows]
    (into `out` if given). Raises ValueError for an unsupported type or mismatched shapes.
    """
    x = check_x(x, 2)
    raw = check_raw(ggml_type, raw, x.shape[1])
    out = check_out(out, (x.shape[0], raw.shape[0]))
    call_parallel(matmul_kernel, int(ggml_type), raw, x, out, tile_rows_for(x.shape[1]))
    return out
