"""y = W @ x straight from raw ggml blocks (decode path), one Numba kernel per format, threaded over rows.

Each `dot_row_<fmt>(row, x)` dequantizes one row on the fly, weight by weight with the expressions of dequant.py
(where the block layouts are described), into 32 lane accumulators summed at the end. Why lanes: with one scalar sum
per block, LLVM fully unrolls the 32-element inner loop and vectorizes the *block* loop with AVX-512 gathers, 2.6x
slower (Q8_0 and Q4_K, 1 thread); the store/load dependency on `lanes` keeps the vectorizer on the inner loop.
The faster next step is an int8-quantized x with integer dots per block (see shared/notes/numba-kernels.md).
FASTMATH lets LLVM reassociate and fuse the float sums; results differ from a sequential sum by rounding only.
"""
import numpy as np
from numba import njit, prange

from kernels_cpu._fp16 import bf16_bits_to_f32, f16_at, half_bits_to_f32
from kernels_cpu.dequant import q3_k_scale, scale_min_k4, u32_at
from kernels_cpu.formats import (BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK,
                                 QK_K, check_out, check_raw, check_x)
from kernels_cpu.kernel_thread import call_parallel

FASTMATH = {"reassoc", "contract", "nsz"}

# ---------------------------------------------------------------- one row: raw blocks (uint8[row_bytes]) . x -> float32


@njit(cache=True, fastmath=FASTMATH)
def dot_row_f32(row, x):
    w = row.view(np.float32)
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += w[i] * x[i]
    return acc


@njit(cache=True, fastmath=FASTMATH)
def dot_row_f16(row, x):
    bits = row.view(np.uint16)
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += half_bits_to_f32(bits[i]) * x[i]
    return acc


@njit(cache=True, fastmath=FASTMATH)
def dot_row_bf16(row, x):
    bits = row.view(np.uint16)
    acc = np.float32(0.0)
    for i in range(x.shape[0]):
        acc += bf16_bits_to_f32(bits[i]) * x[i]
    return acc


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q8_0(row, x):
    qs = row.view(np.int8)
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK):
        o, y = b * 34, b * QK
        d = f16_at(row, o)
        for l in range(QK):
            lanes[l] += np.float32(qs[o + 2 + l]) * d * x[y + l]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q4_0(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK):
        o, y = b * 18, b * QK
        d = f16_at(row, o)
        for l in range(QK // 2):
            q = np.int64(row[o + 2 + l])
            lanes[l] += d * np.float32((q & 0xF) - 8) * x[y + l]
            lanes[l + 16] += d * np.float32((q >> 4) - 8) * x[y + l + 16]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q4_1(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK):
        o, y = b * 20, b * QK
        d, m = f16_at(row, o), f16_at(row, o + 2)
        for l in range(QK // 2):
            q = np.int64(row[o + 4 + l])
            lanes[l] += (d * np.float32(q & 0xF) + m) * x[y + l]
            lanes[l + 16] += (d * np.float32(q >> 4) + m) * x[y + l + 16]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q5_0(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK):
        o, y = b * 22, b * QK
        d, qh = f16_at(row, o), u32_at(row, o + 2)
        for l in range(QK // 2):
            q = np.int64(row[o + 6 + l])
            lanes[l] += d * np.float32(((q & 0xF) | (((qh >> l) & 1) << 4)) - 16) * x[y + l]
            lanes[l + 16] += d * np.float32(((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) - 16) * x[y + l + 16]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q5_1(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK):
        o, y = b * 24, b * QK
        d, m, qh = f16_at(row, o), f16_at(row, o + 2), u32_at(row, o + 4)
        for l in range(QK // 2):
            q = np.int64(row[o + 8 + l])
            lanes[l] += (d * np.float32((q & 0xF) | (((qh >> l) & 1) << 4)) + m) * x[y + l]
            lanes[l + 16] += (d * np.float32((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) + m) * x[y + l + 16]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q2_k(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK_K):
        o, y = b * 84, b * QK_K
        d, dmin = f16_at(row, o + 80), f16_at(row, o + 82)
        for half in range(2):
            for s in range(4):
                xo = y + 128 * half + 32 * s
                for k in range(2):
                    sc = np.int64(row[o + 8 * half + 2 * s + k])
                    dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
                    for l in range(16 * k, 16 * k + 16):
                        q = (np.int64(row[o + 16 + 32 * half + l]) >> (2 * s)) & 3
                        lanes[l] += (dl * np.float32(q) - ml) * x[xo + l]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q3_k(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK_K):
        o, y = b * 110, b * QK_K
        d = f16_at(row, o + 108)
        for half in range(2):
            for s in range(4):
                xo = y + 128 * half + 32 * s
                for k in range(2):
                    dl = d * np.float32(q3_k_scale(row, o + 96, 8 * half + 2 * s + k))
                    for l in range(16 * k, 16 * k + 16):
                        q = (np.int64(row[o + 32 + 32 * half + l]) >> (2 * s)) & 3
                        high = (np.int64(row[o + l]) >> (4 * half + s)) & 1
                        lanes[l] += dl * np.float32(q - 4 + 4 * high) * x[xo + l]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q4_k(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK_K):
        o, y = b * 144, b * QK_K
        d, dmin = f16_at(row, o), f16_at(row, o + 2)
        for j in range(8):
            sc, mn = scale_min_k4(row, o + 4, j)
            dl, ml = d * np.float32(sc), dmin * np.float32(mn)
            qo, shift, xo = o + 16 + 32 * (j >> 1), 4 * (j & 1), y + 32 * j
            for l in range(32):
                lanes[l] += (dl * np.float32((np.int64(row[qo + l]) >> shift) & 0xF) - ml) * x[xo + l]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q5_k(row, x):
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK_K):
        o, y = b * 176, b * QK_K
        d, dmin = f16_at(row, o), f16_at(row, o + 2)
        for j in range(8):
            sc, mn = scale_min_k4(row, o + 4, j)
            dl, ml = d * np.float32(sc), dmin * np.float32(mn)
            qo, shift, xo = o + 48 + 32 * (j >> 1), 4 * (j & 1), y + 32 * j
            for l in range(32):
                q = ((np.int64(row[qo + l]) >> shift) & 0xF) | (((np.int64(row[o + 16 + l]) >> j) & 1) << 4)
                lanes[l] += (dl * np.float32(q) - ml) * x[xo + l]
    return lanes.sum()


@njit(cache=True, fastmath=FASTMATH)
def dot_row_q6_k(row, x):
    scales = row.view(np.int8)
    lanes = np.zeros(QK, np.float32)
    for b in range(x.shape[0] // QK_K):
        o, y = b * 210, b * QK_K
        d = f16_at(row, o + 208)
        for half in range(2):
            for s in range(4):
                lo_o, lo_shift, xo = o + 64 * half + 32 * (s & 1), 4 * (s >> 1), y + 128 * half + 32 * s
                for k in range(2):
                    dl = d * np.float32(scales[o + 192 + 8 * half + 2 * s + k])
                    for l in range(16 * k, 16 * k + 16):
                        lo = (np.int64(row[lo_o + l]) >> lo_shift) & 0xF
                        hi = (np.int64(row[o + 128 + 32 * half + l]) >> (2 * s)) & 3
                        lanes[l] += dl * np.float32((lo | (hi << 4)) - 32) * x[xo + l]
    return lanes.sum()


# ------------------------------------------------------- whole matrices: out[r] = dot(raw[r], x), rows in parallel
# Written out per format for the reason given above dequant.py's dequantize_<fmt> kernels.


@njit(parallel=True, cache=True)
def matvec_f32(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_f32(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_f16(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_f16(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_bf16(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_bf16(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q8_0(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q8_0(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q4_0(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q4_0(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q4_1(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q4_1(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q5_0(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q5_0(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q5_1(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q5_1(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q2_k(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q2_k(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q3_k(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q3_k(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q4_k(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q4_k(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q5_k(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q5_k(raw[r], x)


@njit(parallel=True, cache=True)
def matvec_q6_k(raw, x, out):
    for r in prange(raw.shape[0]):
        out[r] = dot_row_q6_k(raw[r], x)


MATVEC_KERNELS = {
    F32: matvec_f32, F16: matvec_f16, BF16: matvec_bf16, Q8_0: matvec_q8_0, Q4_0: matvec_q4_0, Q4_1: matvec_q4_1,
    Q5_0: matvec_q5_0, Q5_1: matvec_q5_1, Q2_K: matvec_q2_k, Q3_K: matvec_q3_k, Q4_K: matvec_q4_k,
    Q5_K: matvec_q5_k, Q6_K: matvec_q6_k,
}


def matvec(ggml_type: int, raw: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """y = W @ x for a weight W stored as raw ggml blocks, dequantized on the fly.

    raw: uint8[n_rows, row_bytes] (read only); x: float32[n_cols]. Returns float32[n_rows] (into `out` if given).
    Raises ValueError for an unsupported type or mismatched shapes.
    """
    x = check_x(x, 1)
    raw = check_raw(ggml_type, raw, x.shape[0])
    out = check_out(out, (raw.shape[0],))
    call_parallel(MATVEC_KERNELS[int(ggml_type)], raw, x, out)
    return out
