"""Dequantize raw ggml blocks to float32, one Numba kernel per format, bit-for-bit as ggml / gguf-py do it.

Block layouts (byte offsets inside one block; d, m, dmin are little-endian IEEE halves; "q[e]" is element e):
  Q8_0  34 B: d@0, int8 q[32]@2                                   w = q * d
  Q4_0  18 B: d@0, qs[16]@2: q[l] = qs[l] & 15, q[l+16] = qs[l] >> 4   w = (q - 8) * d
  Q4_1  20 B: d@0, m@2, qs[16]@4 (as Q4_0)                        w = q * d + m
  Q5_0  22 B: d@0, qh u32@2 (bit e = 5th bit of q[e]), qs[16]@6   w = (q - 16) * d
  Q5_1  24 B: d@0, m@2, qh u32@4, qs[16]@8                        w = q * d + m
  K-quants, 256 elements as 2 halves x 4 "shifts" s x 32 lanes l: e = 128 * half + 32 * s + l
  Q2_K  84 B: scales[16]@0 (lo nibble scale, hi nibble min, per 16 elements), qs[64]@16: q = qs[32 half + l] >> 2s & 3,
        d@80, dmin@82                                           w = d * sc * q - dmin * mn
  Q3_K 110 B: hmask[32]@0: bit (4 half + s) of hmask[l] set -> q += 0 else q -= 4; qs[64]@32 as Q2_K; 16 6-bit scales
        @96 (see _q3_k_scale); d@108                             w = d * (sc - 32) * q
  Q4_K 144 B: d@0, dmin@2, 8 6-bit (scale, min) pairs @4 (see _scale_min_k4), qs[128]@16: sub-block j of 32 elements
        is q = qs[32 (j // 2) + l] >> 4 (j % 2) & 15              w = d * sc * q - dmin * mn
  Q5_K 176 B: as Q4_K with qh[32]@16 (bit j of qh[l] = 5th bit of q in sub-block j) and qs[128]@48
  Q6_K 210 B: ql[128]@0: low 4 bits = ql[64 half + 32 (s % 2) + l] >> 4 (s // 2); qh[64]@128: high 2 bits =
        qh[32 half + l] >> 2s & 3; int8 scales[16]@192 per 16 elements; d@208          w = d * sc * (q - 32)
  F32 / F16 / BF16: plain little-endian arrays (BF16 = upper 16 bits of a float32).
The arithmetic order (scale products first) follows gguf-py's reference so results are bit-identical.
Kernels in other modules (matvec, matmul, ...) compile these helpers into their own cached code, and Numba checks
only the timestamp of the file that defines a cached function: after editing this file, clear the Numba cache.
"""
import numpy as np
from numba import njit, prange

from kernels_cpu._fp16 import bf16_bits_to_f32, f16_at, half_bits_to_f32
from kernels_cpu.formats import (BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK,
                                 QK_K, check_out, check_raw)
from kernels_cpu.kernel_thread import call_parallel

# ---------------------------------------------------------------- shared block-field decoders (used by matvec too)


@njit(cache=True)
def u32_at(buf, offset):
    """Little-endian uint32 at buf[offset:offset + 4], as int64."""
    return (np.int64(buf[offset]) | (np.int64(buf[offset + 1]) << 8) | (np.int64(buf[offset + 2]) << 16)
            | (np.int64(buf[offset + 3]) << 24))


@njit(cache=True)
def scale_min_k4(buf, offset, j):
    """(scale, min) of sub-block j (0..7) from the 12 packed 6-bit bytes of Q4_K/Q5_K at buf[offset] (ggml's
    get_scale_min_k4): bytes 0-3 hold scales 0-3, 4-7 mins 0-3, 8-11 the low 4 bits of scale/min 4-7 whose high
    2 bits are the top bits of bytes 0-3 / 4-7."""
    if j < 4:
        return np.int64(buf[offset + j]) & 63, np.int64(buf[offset + j + 4]) & 63
    packed = np.int64(buf[offset + j + 4])
    scale = (packed & 0xF) | ((np.int64(buf[offset + j - 4]) >> 6) << 4)
    minimum = (packed >> 4) | ((np.int64(buf[offset + j]) >> 6) << 4)
    return scale, minimum


@njit(cache=True)
def q3_k_scale(buf, offset, j):
    """Signed scale of sub-block j (0..15) from Q3_K's 12 scale bytes at buf[offset]: low 4 bits are the low (j < 8)
    or high nibble of byte j % 8, high 2 bits are bits 2 (j // 4) of byte 8 + j % 4; stored with a bias of 32."""
    low = (np.int64(buf[offset + j]) & 0xF) if j < 8 else (np.int64(buf[offset + j - 8]) >> 4)
    high = (np.int64(buf[offset + 8 + (j & 3)]) >> (2 * (j >> 2))) & 3
    return (low | (high << 4)) - 32


# ---------------------------------------------------------------- one row: raw blocks (uint8[row_bytes]) -> out[n_cols]


@njit(cache=True)
def dequant_row_f32(row, out):
    out[:] = row.view(np.float32)


@njit(cache=True)
def dequant_row_f16(row, out):
    bits = row.view(np.uint16)
    for i in range(out.shape[0]):
        out[i] = half_bits_to_f32(bits[i])


@njit(cache=True)
def dequant_row_bf16(row, out):
    bits = row.view(np.uint16)
    for i in range(out.shape[0]):
        out[i] = bf16_bits_to_f32(bits[i])


@njit(cache=True)
def dequant_row_q8_0(row, out):
    qs = row.view(np.int8)
    for b in range(out.shape[0] // QK):
        o, y = b * 34, b * QK
        d = f16_at(row, o)
        for l in range(QK):
            out[y + l] = np.float32(qs[o + 2 + l]) * d


@njit(cache=True)
def dequant_row_q4_0(row, out):
    for b in range(out.shape[0] // QK):
        o, y = b * 18, b * QK
        d = f16_at(row, o)
        for l in range(QK // 2):
            q = np.int64(row[o + 2 + l])
            out[y + l] = d * np.float32((q & 0xF) - 8)
            out[y + l + 16] = d * np.float32((q >> 4) - 8)


@njit(cache=True)
def dequant_row_q4_1(row, out):
    for b in range(out.shape[0] // QK):
        o, y = b * 20, b * QK
        d, m = f16_at(row, o), f16_at(row, o + 2)
        for l in range(QK // 2):
            q = np.int64(row[o + 4 + l])
            out[y + l] = d * np.float32(q & 0xF) + m
            out[y + l + 16] = d * np.float32(q >> 4) + m


@njit(cache=True)
def dequant_row_q5_0(row, out):
    for b in range(out.shape[0] // QK):
        o, y = b * 22, b * QK
        d, qh = f16_at(row, o), u32_at(row, o + 2)
        for l in range(QK // 2):
            q = np.int64(row[o + 6 + l])
            out[y + l] = d * np.float32(((q & 0xF) | (((qh >> l) & 1) << 4)) - 16)
            out[y + l + 16] = d * np.float32(((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) - 16)


@njit(cache=True)
def dequant_row_q5_1(row, out):
    for b in range(out.shape[0] // QK):
        o, y = b * 24, b * QK
        d, m, qh = f16_at(row, o), f16_at(row, o + 2), u32_at(row, o + 4)
        for l in range(QK // 2):
            q = np.int64(row[o + 8 + l])
            out[y + l] = d * np.float32((q & 0xF) | (((qh >> l) & 1) << 4)) + m
            out[y + l + 16] = d * np.float32((q >> 4) | (((qh >> (l + 16)) & 1) << 4)) + m


@njit(cache=True)
def dequant_row_q2_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o, y = b * 84, b * QK_K
        d, dmin = f16_at(row, o + 80), f16_at(row, o + 82)
        for half in range(2):
            for s in range(4):
                for k in range(2):
                    sc = np.int64(row[o + 8 * half + 2 * s + k])
                    dl, ml = d * np.float32(sc & 0xF), dmin * np.float32(sc >> 4)
                    for l in range(16 * k, 16 * k + 16):
                        q = (np.int64(row[o + 16 + 32 * half + l]) >> (2 * s)) & 3
                        out[y + 128 * half + 32 * s + l] = dl * np.float32(q) - ml


@njit(cache=True)
def dequant_row_q3_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o, y = b * 110, b * QK_K
        d = f16_at(row, o + 108)
        for half in range(2):
            for s in range(4):
                for k in range(2):
                    dl = d * np.float32(q3_k_scale(row, o + 96, 8 * half + 2 * s + k))
                    for l in range(16 * k, 16 * k + 16):
                        q = (np.int64(row[o + 32 + 32 * half + l]) >> (2 * s)) & 3
                        high = (np.int64(row[o + l]) >> (4 * half + s)) & 1
                        out[y + 128 * half + 32 * s + l] = dl * np.float32(q - 4 + 4 * high)


@njit(cache=True)
def dequant_row_q4_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o, y = b * 144, b * QK_K
        d, dmin = f16_at(row, o), f16_at(row, o + 2)
        for j in range(8):
            sc, mn = scale_min_k4(row, o + 4, j)
            dl, ml = d * np.float32(sc), dmin * np.float32(mn)
            qo, shift = o + 16 + 32 * (j >> 1), 4 * (j & 1)
            for l in range(32):
                out[y + 32 * j + l] = dl * np.float32((np.int64(row[qo + l]) >> shift) & 0xF) - ml


@njit(cache=True)
def dequant_row_q5_k(row, out):
    for b in range(out.shape[0] // QK_K):
        o, y = b * 176, b * QK_K
        d, dmin = f16_at(row, o), f16_at(row, o + 2)
        for j in range(8):
            sc, mn = scale_min_k4(row, o + 4, j)
            dl, ml = d * np.float32(sc), dmin * np.float32(mn)
            qo, shift = o + 48 + 32 * (j >> 1), 4 * (j & 1)
            for l in range(32):
                q = ((np.int64(row[qo + l]) >> shift) & 0xF) | (((np.int64(row[o + 16 + l]) >> j) & 1) << 4)
                out[y + 32 * j + l] = dl * np.float32(q) - ml


@njit(cache=True)
def dequant_row_q6_k(row, out):
    scales = row.view(np.int8)
    for b in range(out.shape[0] // QK_K):
        o, y = b * 210, b * QK_K
        d = f16_at(row, o + 208)
        for half in range(2):
            for s in range(4):
                lo_o, lo_shift = o + 64 * half + 32 * (s & 1), 4 * (s >> 1)
                for k in range(2):
                    dl = d * np.float32(scales[o + 192 + 8 * half + 2 * s + k])
                    for l in range(16 * k, 16 * k + 16):
                        lo = (np.int64(row[lo_o + l]) >> lo_shift) & 0xF
                        hi = (np.int64(row[o + 128 + 32 * half + l]) >> (2 * s)) & 3
                        out[y + 128 * half + 32 * s + l] = dl * np.float32((lo | (hi << 4)) - 32)


@njit(cache=True)
def dequant_row(ggml_type, row, out):
    """Dequantize one row of any supported type (for compiled callers that hold the type as a run-time value)."""
    if ggml_type == Q4_0:
        dequant_row_q4_0(row, out)
    elif ggml_type == Q4_1:
        dequant_row_q4_1(row, out)
    elif ggml_type == Q5_0:
        dequant_row_q5_0(row, out)
    elif ggml_type == Q5_1:
        dequant_row_q5_1(row, out)
    elif ggml_type == Q8_0:
        dequant_row_q8_0(row, out)
    elif ggml_type == Q2_K:
        dequant_row_q2_k(row, out)
    elif ggml_type == Q3_K:
        dequant_row_q3_k(row, out)
    elif ggml_type == Q4_K:
        dequant_row_q4_k(row, out)
    elif ggml_type == Q5_K:
        dequant_row_q5_k(row, out)
    elif ggml_type == Q6_K:
        dequant_row_q6_k(row, out)
    elif ggml_type == F32:
        dequant_row_f32(row, out)
    elif ggml_type == F16:
        dequant_row_f16(row, out)
    elif ggml_type == BF16:
        dequant_row_bf16(row, out)
    else:
        raise ValueError("unsupported ggml type")


# ------------------------------------------------------- whole matrices: raw[n_rows, row_bytes] -> out[n_rows, n_cols]
# One thin parallel kernel per format so each compiles (and caches) on its own; rows are independent. They are
# written out because kernels made by a factory closure never hit Numba's cache (the closed-over dispatcher pickles
# with a per-process id, so the cache key changes every run).


@njit(parallel=True, cache=True)
def dequantize_f32(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_f32(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_f16(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_f16(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_bf16(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_bf16(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q8_0(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q8_0(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q4_0(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q4_0(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q4_1(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q4_1(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q5_0(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q5_0(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q5_1(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q5_1(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q2_k(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q2_k(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q3_k(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q3_k(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q4_k(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q4_k(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q5_k(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q5_k(raw[r], out[r])


@njit(parallel=True, cache=True)
def dequantize_q6_k(raw, out):
    for r in prange(raw.shape[0]):
        dequant_row_q6_k(raw[r], out[r])


DEQUANTIZE_KERNELS = {
    F32: dequantize_f32, F16: dequantize_f16, BF16: dequantize_bf16, Q8_0: dequantize_q8_0, Q4_0: dequantize_q4_0,
    Q4_1: dequantize_q4_1, Q5_0: dequantize_q5_0, Q5_1: dequantize_q5_1, Q2_K: dequantize_q2_k,
    Q3_K: dequantize_q3_k, Q4_K: dequantize_q4_k, Q5_K: dequantize_q5_k, Q6_K: dequantize_q6_k,
}


def dequantize(ggml_type: int, raw: np.ndarray, n_cols: int, out: np.ndarray | None = None) -> np.ndarray:
    """Dequantize a 2-D weight stored as raw ggml blocks.

    raw: uint8[n_rows, row_bytes] (read only, e.g. a view into a memory map); n_cols: elements per row.
    Returns float32[n_rows, n_cols] (written into `out` if given). Raises ValueError for an unsupported type or
    mismatched shapes.
    """
    raw = check_raw(ggml_type, raw, n_cols)
    out = check_out(out, (raw.shape[0], n_cols))
    call_parallel(DEQUANTIZE_KERNELS[int(ggml_type)], raw, out)
    return out
