"""y = W @ x with x quantized to int8 blocks of 32 (activations_q8), integer dot products per block: the decode path.

FIGURES

W is raw ggml blocks, uint8[n_rows, row_bytes] (layouts in dequant.py); x comes as xq int8[n], xd float32[n // 32],
xs int32[n // 32] (quantize_activations). Result: out[r] = sum over blocks b of the exact dot of row r's dequantized
weights with xd[b] * xq[32b : 32b + 32], up to float32 rounding.

How the kernels are built (simd.py has the instructions): rows go in groups of 4 so that one load of x serves four
rows and four independent accumulators hide the latency of the float adds; a group past the last row repeats the last
row (the same value is written twice). Per 32-element block the integer dot leaves 8 int32 lanes; they are converted
and multiplied by the block's scale d_w * xd[b] into a float accumulator vector, summed once per row. Formats with an
offset (Q4_0: q - 8, Q5_0: q - 16, Q6_K: q - 32, Q3_K: q - 4) start the integer dot at -offset * lane_sums(x);
formats with a minimum (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K) add m * xd * xs per (sub-)block. K-quants work on 64 elements
(two 32-blocks of x) per dot, whose 16 lanes take their scales by pick_pairs (32-wide sub-blocks) or pick_quads
(16-wide sub-blocks).
"""
import numpy as np
from numba import literally, njit, prange

from kernels_cpu._fp16 import f16_at
from kernels_cpu.formats import (BF16, BLOCK_SIZES, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK,
                                 check_out, check_raw)
from kernels_cpu.matvec import dot_row_bf16, dot_row_f16, dot_row_f32
from kernels_cpu.simd import (bits_i8x32, bits_i8x64, bitfields_i8x64, bytes_or, crumbs_i8x64, dot_i8, dot_i8_biased,
                              dot_u8, fma_lanes, fma_splat, iadd, splat4_i8x64, splat_i32x16, store_f32x16, vsub,
                              halves_f32x16, halves_pair_splat, high_nibbles, hsum, int8s_f32x16, join, k4_scales_f32x16, uint8s_f32x16, lane_sums,
                              load_f32x8, load_f32x16, load_i8x32, load_i8x64, low_nibbles, nibble_scales_f32x16, nibbles_i8x32,
                              pair_splat, pick_pairs, pick_quads, q3k_scales_f32x16, scaled, spread_pairs, times, to_float,
                              upper_half, vadd, vfma, vmul, zero_f32x8, zero_f32x16, zero_i32x8, zero_i32x16)

FASTMATH = {"reassoc", "contract", "nsz"}
ROWS = 4  # rows per group
REPACKED = 1000  # type id of a repacked layout (see repack) = REPACKED + ggml type
Q4_0_R, Q4_1_R, Q5_0_R, Q5_1_R, Q8_0_R, Q4_K_R, Q5_K_R, Q6_K_R = (REPACKED + t for t in (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0,
                                                                                     Q4_K, Q5_K, Q6_K))


@njit(cache=True)
def _group_rows(g, n_rows):
    """Rows of group g, the last row repeated past the end."""
    r = ROWS * g
    last = n_rows - 1
    return min(r, last), min(r + 1, last), min(r + 2, last), min(r + 3, last)


@njit(cache=True, fastmath=FASTMATH)
def _x_sums(xd, xs):
    """xd * xs as float32: the x side of a minimum term."""
    out = np.empty(xd.shape[0], np.float32)
    for b in range(xd.shape[0]):
        out[b] = xd[b] * np.float32(xs[b])
    return out


# ---------------------------------------------------------------- 32-element block formats, one block per step
# block(acc, row, o, xv, ...) adds one block of one row (o: its byte offset) to the f32x8 accumulator


@njit(cache=True, fastmath=FASTMATH)
def _block_q8_0(acc, row, o, xv, x_sums, xdb):
    return fma_splat(acc, dot_i8(zero_i32x8(), load_i8x32(row, o + 2), xv, x_sums), f16_at(row, o) * xdb)


@njit(cache=True, fastmath=FASTMATH)
def _block_q4_0(acc, row, o, xv, init, xdb):
    return fma_splat(acc, dot_u8(init, nibbles_i8x32(row, o + 2), xv), f16_at(row, o) * xdb)


@njit(cache=True, fastmath=FASTMATH)
def _block_q4_1(acc, row, o, xv, xdb):
    return fma_splat(acc, dot_u8(zero_i32x8(), nibbles_i8x32(row, o + 4), xv), f16_at(row, o) * xdb)


@njit(cache=True, fastmath=FASTMATH)
def _block_q5_0(acc, row, o, xv, init, xdb):
    q = bytes_or(nibbles_i8x32(row, o + 6), bits_i8x32(row, o + 2, 16))
    return fma_splat(acc, dot_u8(init, q, xv), f16_at(row, o) * xdb)


@njit(cache=True, fastmath=FASTMATH)
def _block_q5_1(acc, row, o, xv, xdb):
    q = bytes_or(nibbles_i8x32(row, o + 8), bits_i8x32(row, o + 4, 16))
    return fma_splat(acc, dot_u8(zero_i32x8(), q, xv), f16_at(row, o) * xdb)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q8_0(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x8()
        for b in range(xd.shape[0]):
            o, xv, xdb = 34 * b, load_i8x32(xq, QK * b), xd[b]
            sums = lane_sums(xv)
            a0 = _block_q8_0(a0, w0, o, xv, sums, xdb)
            a1 = _block_q8_0(a1, w1, o, xv, sums, xdb)
            a2 = _block_q8_0(a2, w2, o, xv, sums, xdb)
            a3 = _block_q8_0(a3, w3, o, xv, sums, xdb)
        out[r0], out[r1], out[r2], out[r3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q4_0(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x8()
        for b in range(xd.shape[0]):
            o, xv, xdb = 18 * b, load_i8x32(xq, QK * b), xd[b]
            init = times(lane_sums(xv), -8)
            a0 = _block_q4_0(a0, w0, o, xv, init, xdb)
            a1 = _block_q4_0(a1, w1, o, xv, init, xdb)
            a2 = _block_q4_0(a2, w2, o, xv, init, xdb)
            a3 = _block_q4_0(a3, w3, o, xv, init, xdb)
        out[r0], out[r1], out[r2], out[r3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q4_1(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    xds = _x_sums(xd, xs)
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x8()
        m0 = m1 = m2 = m3 = np.float32(0.0)
        for b in range(xd.shape[0]):
            o, xv, xdb, xsb = 20 * b, load_i8x32(xq, QK * b), xd[b], xds[b]
            a0 = _block_q4_1(a0, w0, o, xv, xdb)
            a1 = _block_q4_1(a1, w1, o, xv, xdb)
            a2 = _block_q4_1(a2, w2, o, xv, xdb)
            a3 = _block_q4_1(a3, w3, o, xv, xdb)
            m0 += f16_at(w0, o + 2) * xsb
            m1 += f16_at(w1, o + 2) * xsb
            m2 += f16_at(w2, o + 2) * xsb
            m3 += f16_at(w3, o + 2) * xsb
        out[r0], out[r1], out[r2], out[r3] = hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q5_0(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x8()
        for b in range(xd.shape[0]):
            o, xv, xdb = 22 * b, load_i8x32(xq, QK * b), xd[b]
            init = times(lane_sums(xv), -16)
            a0 = _block_q5_0(a0, w0, o, xv, init, xdb)
            a1 = _block_q5_0(a1, w1, o, xv, init, xdb)
            a2 = _block_q5_0(a2, w2, o, xv, init, xdb)
            a3 = _block_q5_0(a3, w3, o, xv, init, xdb)
        out[r0], out[r1], out[r2], out[r3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q5_1(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    xds = _x_sums(xd, xs)
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x8()
        m0 = m1 = m2 = m3 = np.float32(0.0)
        for b in range(xd.shape[0]):
            o, xv, xdb, xsb = 24 * b, load_i8x32(xq, QK * b), xd[b], xds[b]
            a0 = _block_q5_1(a0, w0, o, xv, xdb)
            a1 = _block_q5_1(a1, w1, o, xv, xdb)
            a2 = _block_q5_1(a2, w2, o, xv, xdb)
            a3 = _block_q5_1(a3, w3, o, xv, xdb)
            m0 += f16_at(w0, o + 2) * xsb
            m1 += f16_at(w1, o + 2) * xsb
            m2 += f16_at(w2, o + 2) * xsb
            m3 += f16_at(w3, o + 2) * xsb
        out[r0], out[r1], out[r2], out[r3] = hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3


# ---------------------------------------------------------------- K-quants: 256-element super-blocks, 64 elements per dot
# super(acc, ..., row, o, x-side) adds one super-block of one row; x0..x3 are the 4 x 64 int8 of x it covers, xp0..xp3
# their pair scales [xd[2k] x 8, xd[2k + 1] x 8]


@njit(cache=True, fastmath=FASTMATH)
def _super_q6_k(acc, row, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16):
    # s: d * scale_j * xd of sub-block j (16 elements); i0..i3 = -32 * lane_sums(x_k)
    s = vmul(int8s_f32x16(row, o + 192), scaled(xd16, f16_at(row, o + 208)))
    low, high = load_i8x64(row, o), load_i8x64(row, o + 64)
    q0 = bytes_or(low_nibbles(low), bitfields_i8x64(row, o + 128, 0, 2, 3, 4))
    q1 = bytes_or(high_nibbles(low), bitfields_i8x64(row, o + 128, 4, 2, 3, 4))
    q2 = bytes_or(low_nibbles(high), bitfields_i8x64(row, o + 160, 0, 2, 3, 4))
    q3 = bytes_or(high_nibbles(high), bitfields_i8x64(row, o + 160, 4, 2, 3, 4))
    acc = fma_lanes(acc, dot_u8(i0, q0, x0), pick_quads(s, 0))
    acc = fma_lanes(acc, dot_u8(i1, q1, x1), pick_quads(s, 4))
    acc = fma_lanes(acc, dot_u8(i2, q2, x2), pick_quads(s, 8))
    return fma_lanes(acc, dot_u8(i3, q3, x3), pick_quads(s, 12))


@njit(cache=True, fastmath=FASTMATH)
def _q3_k_pair(row, o, h, p):
    return bytes_or(bitfields_i8x64(row, o + 32 + 32 * h, 4 * p, 2, 3, 0), bitfields_i8x64(row, o, 4 * h + 2 * p, 1, 1, 2))


@njit(cache=True, fastmath=FASTMATH)
def _super_q3_k(acc, row, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16):
    s = vmul(q3k_scales_f32x16(row, o + 96), scaled(xd16, f16_at(row, o + 108)))
    acc = fma_lanes(acc, dot_u8(i0, _q3_k_pair(row, o, 0, 0), x0), pick_quads(s, 0))
    acc = fma_lanes(acc, dot_u8(i1, _q3_k_pair(row, o, 0, 1), x1), pick_quads(s, 4))
    acc = fma_lanes(acc, dot_u8(i2, _q3_k_pair(row, o, 1, 0), x2), pick_quads(s, 8))
    return fma_lanes(acc, dot_u8(i3, _q3_k_pair(row, o, 1, 1), x3), pick_quads(s, 12))


@njit(cache=True, fastmath=FASTMATH)
def _super_q2_k(acc, mins, row, o, x0, x1, x2, x3, s0, s1, s2, s3, xd16):
    # s0..s3: float(lane_sums(x_k)) * (xd per lane), the x side of the 16-wide minimum terms
    s = vmul(nibble_scales_f32x16(row, o, 0), scaled(xd16, f16_at(row, o + 80)))
    m = scaled(nibble_scales_f32x16(row, o, 1), f16_at(row, o + 82))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), bitfields_i8x64(row, o + 16, 0, 2, 3, 0), x0), pick_quads(s, 0))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), bitfields_i8x64(row, o + 16, 4, 2, 3, 0), x1), pick_quads(s, 4))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), bitfields_i8x64(row, o + 48, 0, 2, 3, 0), x2), pick_quads(s, 8))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), bitfields_i8x64(row, o + 48, 4, 2, 3, 0), x3), pick_quads(s, 12))
    mins = vfma(pick_quads(m, 0), s0, mins)
    mins = vfma(pick_quads(m, 4), s1, mins)
    mins = vfma(pick_quads(m, 8), s2, mins)
    return acc, vfma(pick_quads(m, 12), s3, mins)


@njit(cache=True, fastmath=FASTMATH)
def _k4_pair(row, o, k, ggml_type):
    """Quants of sub-blocks 2k, 2k + 1 (64 bytes) of the Q4_K/Q5_K super-block at row[o:]."""
    if ggml_type == Q4_K:
        return bitfields_i8x64(row, o + 16 + 32 * k, 0, 4, 15, 0)
    return bytes_or(bitfields_i8x64(row, o + 48 + 32 * k, 0, 4, 15, 0), bitfields_i8x64(row, o + 16, 2 * k, 1, 1, 4))


@njit(cache=True, fastmath=FASTMATH)
def _super_k4(acc, mins, row, o, xx, x0, x1, x2, x3, ggml_type):
    # t = [d * scale_j * xd_j | dmin * min_j * xd_j * xs_j], j < 8
    t = vmul(vmul(k4_scales_f32x16(row, o + 4), halves_pair_splat(row, o)), xx)
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 0, ggml_type), x0), pick_pairs(t, 0))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 1, ggml_type), x1), pick_pairs(t, 1))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 2, ggml_type), x2), pick_pairs(t, 2))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 3, ggml_type), x3), pick_pairs(t, 3))
    return acc, vadd(mins, t)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec_k4(raw, xq, xd, xs, out, ggml_type):
    """Q4_K and Q5_K: sub-blocks of 32 with a scale and a minimum."""
    literally(ggml_type)
    n_rows = raw.shape[0]
    stride = 144 if ggml_type == Q4_K else 176
    xds = _x_sums(xd, xs)
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = m0 = m1 = m2 = m3 = zero_f32x16()
        for sb in range(xd.shape[0] // 8):
            o, e = stride * sb, 256 * sb
            xx = join(load_f32x8(xd, 8 * sb), load_f32x8(xds, 8 * sb))
            x0, x1, x2, x3 = load_i8x64(xq, e), load_i8x64(xq, e + 64), load_i8x64(xq, e + 128), load_i8x64(xq, e + 192)
            a0, m0 = _super_k4(a0, m0, w0, o, xx, x0, x1, x2, x3, ggml_type)
            a1, m1 = _super_k4(a1, m1, w1, o, xx, x0, x1, x2, x3, ggml_type)
            a2, m2 = _super_k4(a2, m2, w2, o, xx, x0, x1, x2, x3, ggml_type)
            a3, m3 = _super_k4(a3, m3, w3, o, xx, x0, x1, x2, x3, ggml_type)
        out[r0] = hsum(a0) - hsum(upper_half(m0))
        out[r1] = hsum(a1) - hsum(upper_half(m1))
        out[r2] = hsum(a2) - hsum(upper_half(m2))
        out[r3] = hsum(a3) - hsum(upper_half(m3))


@njit(cache=True)
def matvec_q4_k(raw, xq, xd, xs, out):
    _matvec_k4(raw, xq, xd, xs, out, Q4_K)


@njit(cache=True)
def matvec_q5_k(raw, xq, xd, xs, out):
    _matvec_k4(raw, xq, xd, xs, out, Q5_K)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q6_k(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x16()
        for sb in range(xd.shape[0] // 8):
            o, e, b = 210 * sb, 256 * sb, 8 * sb
            x0, x1, x2, x3 = load_i8x64(xq, e), load_i8x64(xq, e + 64), load_i8x64(xq, e + 128), load_i8x64(xq, e + 192)
            i0, i1, i2, i3 = (times(lane_sums(x0), -32), times(lane_sums(x1), -32), times(lane_sums(x2), -32),
                              times(lane_sums(x3), -32))
            xd16 = spread_pairs(xd, b)
            a0 = _super_q6_k(a0, w0, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
            a1 = _super_q6_k(a1, w1, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
            a2 = _super_q6_k(a2, w2, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
            a3 = _super_q6_k(a3, w3, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
        out[r0], out[r1], out[r2], out[r3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q3_k(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = zero_f32x16()
        for sb in range(xd.shape[0] // 8):
            o, e, b = 110 * sb, 256 * sb, 8 * sb
            x0, x1, x2, x3 = load_i8x64(xq, e), load_i8x64(xq, e + 64), load_i8x64(xq, e + 128), load_i8x64(xq, e + 192)
            i0, i1, i2, i3 = (times(lane_sums(x0), -4), times(lane_sums(x1), -4), times(lane_sums(x2), -4),
                              times(lane_sums(x3), -4))
            xd16 = spread_pairs(xd, b)
            a0 = _super_q3_k(a0, w0, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
            a1 = _super_q3_k(a1, w1, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
            a2 = _super_q3_k(a2, w2, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
            a3 = _super_q3_k(a3, w3, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16)
        out[r0], out[r1], out[r2], out[r3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q2_k(raw, xq, xd, xs, out):
    n_rows = raw.shape[0]
    for g in prange((n_rows + ROWS - 1) // ROWS):
        r0, r1, r2, r3 = _group_rows(g, n_rows)
        w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
        a0 = a1 = a2 = a3 = m0 = m1 = m2 = m3 = zero_f32x16()
        for sb in range(xd.shape[0] // 8):
            o, e, b = 84 * sb, 256 * sb, 8 * sb
            x0, x1, x2, x3 = load_i8x64(xq, e), load_i8x64(xq, e + 64), load_i8x64(xq, e + 128), load_i8x64(xq, e + 192)
            p0, p1, p2, p3 = pair_splat(xd, b), pair_splat(xd, b + 2), pair_splat(xd, b + 4), pair_splat(xd, b + 6)
            s0, s1 = vmul(to_float(lane_sums(x0)), p0), vmul(to_float(lane_sums(x1)), p1)
            s2, s3 = vmul(to_float(lane_sums(x2)), p2), vmul(to_float(lane_sums(x3)), p3)
            xd16 = spread_pairs(xd, b)
            a0, m0 = _super_q2_k(a0, m0, w0, o, x0, x1, x2, x3, s0, s1, s2, s3, xd16)
            a1, m1 = _super_q2_k(a1, m1, w1, o, x0, x1, x2, x3, s0, s1, s2, s3, xd16)
            a2, m2 = _super_q2_k(a2, m2, w2, o, x0, x1, x2, x3, s0, s1, s2, s3, xd16)
            a3, m3 = _super_q2_k(a3, m3, w3, o, x0, x1, x2, x3, s0, s1, s2, s3, xd16)
        out[r0], out[r1] = hsum(a0) - hsum(m0), hsum(a1) - hsum(m1)
        out[r2], out[r3] = hsum(a2) - hsum(m2), hsum(a3) - hsum(m3)


# ---------------------------------------------------------------- repacked layouts: 16 rows interleaved
# Built once when a model loads (repack). A 16-row group is one array row; per 32-block of x it holds the 16 rows'
# quants in 8 steps of 4 elements: step t unpacks to 64 bytes, byte k = row k // 4, element 4t + k % 4. So one
# 64-byte dot with x[4t:4t + 4] repeated (splat4) advances all 16 rows, 8 dots sum the block in int32 lanes = rows,
# and one convert + FMA with the 16 rows' scales per block finishes it: no horizontal sums, about 2 vector
# instructions per row and block where the row-by-row kernels above need 5 to 8. Per block (bytes):
#   Q4_0 / Q4_1  quants 8 x 32 (byte i: step byte i | byte i + 32 << 4), d 16 halves (, m 16 halves)
#   Q5_0 / Q5_1  as Q4 plus the 5th bits, 8 x 8 (bit k of step t: byte k), after the quants
#   Q8_0         quants 8 x 64, d
#   Q4_K / Q5_K  per super-block d, dmin (16 halves each), then per sub-block quants (, 5th bits), 16 scales, 16 mins
#   Q6_K         per super-block d, then per block low nibbles 8 x 32, high 2 bits 8 x 16 (byte i: bits 2f of
#                step byte 16f + i), scales of elements 0-15 and 16-31 (16 int8 each)
# Sizes equal the raw ones (Q4_K/Q5_K: 4 bytes more per row and super-block).
_GROUP = 16
_BLOCK_BYTES = {Q4_0: 288, Q4_1: 320, Q5_0: 352, Q5_1: 384, Q8_0: 544}  # per 16-row block
_SUPER_BYTES = {Q4_K: 64 + 8 * 288, Q5_K: 64 + 8 * 352, Q6_K: 32 + 8 * 416}  # per 16-row super-block


@njit(cache=True, fastmath=FASTMATH)
def _step4(acc, w, o, xq, xo):
    """acc + 16 rows' 4-bit quants of one step (32 bytes at w[o:]) times x[xo:xo + 4]."""
    return dot_u8(acc, bitfields_i8x64(w, o, 0, 4, 15, 0), splat4_i8x64(xq, xo))


@njit(cache=True, fastmath=FASTMATH)
def _step5(acc, w, o, qh, xq, xo):
    """As _step4 with the 5th bits (8 bytes at w[qh:])."""
    return dot_u8(acc, bytes_or(bitfields_i8x64(w, o, 0, 4, 15, 0), bits_i8x64(w, qh, 16)), splat4_i8x64(xq, xo))


@njit(cache=True, fastmath=FASTMATH)
def _step6(acc, w, o, qh, xq, xo):
    """acc + 16 rows' 6-bit quants of one step (low nibbles at w[o:], high bits at w[qh:]) times x[xo:xo + 4]."""
    return dot_u8(acc, bytes_or(bitfields_i8x64(w, o, 0, 4, 15, 0), crumbs_i8x64(w, qh)), splat4_i8x64(xq, xo))


@njit(cache=True, fastmath=FASTMATH)
def _block16(w, o, xq, xo, init, ggml_type):
    """int32 dots of the 16 rows' block at w[o:] with x[xo:xo + 32], starting from init; two chains for latency."""
    if ggml_type == Q8_0:
        a = dot_i8_biased(init, load_i8x64(w, o), splat4_i8x64(xq, xo))
        c = dot_i8_biased(zero_i32x16(), load_i8x64(w, o + 64), splat4_i8x64(xq, xo + 4))
        for t in range(2, 8, 2):
            a = dot_i8_biased(a, load_i8x64(w, o + 64 * t), splat4_i8x64(xq, xo + 4 * t))
            c = dot_i8_biased(c, load_i8x64(w, o + 64 * t + 64), splat4_i8x64(xq, xo + 4 * t + 4))
    elif ggml_type == Q4_0 or ggml_type == Q4_1 or ggml_type == Q4_K:
        a = _step4(init, w, o, xq, xo)
        c = _step4(zero_i32x16(), w, o + 32, xq, xo + 4)
        for t in range(2, 8, 2):
            a = _step4(a, w, o + 32 * t, xq, xo + 4 * t)
            c = _step4(c, w, o + 32 * t + 32, xq, xo + 4 * t + 4)
    else:  # Q5_0, Q5_1, Q5_K: 5th bits after the quants
        a = _step5(init, w, o, o + 256, xq, xo)
        c = _step5(zero_i32x16(), w, o + 32, o + 264, xq, xo + 4)
        for t in range(2, 8, 2):
            a = _step5(a, w, o + 32 * t, o + 256 + 8 * t, xq, xo + 4 * t)
            c = _step5(c, w, o + 32 * t + 32, o + 264 + 8 * t, xq, xo + 4 * t + 4)
    return iadd(a, c)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec16(packed, xq, xd, xs, out, ggml_type):
    """Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 in 16-row groups."""
    literally(ggml_type)  # one specialization per format; the branches on it fold away
    stride = 288 if ggml_type == Q4_0 else 320 if ggml_type == Q4_1 else 352 if ggml_type == Q5_0 else (
        384 if ggml_type == Q5_1 else 544)
    quants = 512 if ggml_type == Q8_0 else 320 if ggml_type == Q5_0 or ggml_type == Q5_1 else 256
    offset = -128 if ggml_type == Q8_0 else -8 if ggml_type == Q4_0 else -16 if ggml_type == Q5_0 else 0
    for g in prange(packed.shape[0]):
        w = packed[g]
        acc = zero_f32x16()
        for b in range(xd.shape[0]):
            o = stride * b
            dots = _block16(w, o, xq, QK * b, splat_i32x16(offset * xs[b]), ggml_type)
            acc = fma_lanes(acc, dots, scaled(halves_f32x16(w, o + quants), xd[b]))
            if ggml_type == Q4_1 or ggml_type == Q5_1:
                acc = vadd(acc, scaled(halves_f32x16(w, o + quants + 32), xd[b] * np.float32(xs[b])))
        store_f32x16(out, _GROUP * g, acc)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec16_k4(packed, xq, xd, xs, out, ggml_type):
    """Q4_K, Q5_K in 16-row groups: per sub-block scale * d and min * dmin."""
    literally(ggml_type)
    block = 288 if ggml_type == Q4_K else 352
    scales = block - 32
    for g in prange(packed.shape[0]):
        w = packed[g]
        acc = zero_f32x16()
        for sb in range(xd.shape[0] // 8):
            o = (64 + 8 * block) * sb
            d, dmin = halves_f32x16(w, o), halves_f32x16(w, o + 32)
            for j in range(8):
                ob, b = o + 64 + block * j, 8 * sb + j
                dots = _block16(w, ob, xq, QK * b, zero_i32x16(), ggml_type)
                acc = fma_lanes(acc, dots, vmul(uint8s_f32x16(w, ob + scales), scaled(d, xd[b])))
                acc = vsub(acc, vmul(uint8s_f32x16(w, ob + scales + 16), scaled(dmin, xd[b] * np.float32(xs[b]))))
        store_f32x16(out, _GROUP * g, acc)


@njit(cache=True)
def _half_block_sums(xq):
    """Sums of xq over each 16 elements (int32): the x side of Q6_K's offset per 16-element sub-block."""
    sums = np.zeros(xq.shape[0] // 16, np.int32)
    for i in range(xq.shape[0]):
        sums[i // 16] += xq[i]
    return sums


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def _matvec16_q6_k(packed, xq, xd, xs, out):
    halves = _half_block_sums(xq)
    for g in prange(packed.shape[0]):
        w = packed[g]
        acc = zero_f32x16()
        for sb in range(xd.shape[0] // 8):
            o = 3360 * sb  # _SUPER_BYTES[Q6_K]
            d = halves_f32x16(w, o)
            for j in range(8):
                ob, b = o + 32 + 416 * j, 8 * sb + j
                xo = QK * b
                low = _step6(splat_i32x16(-32 * halves[2 * b]), w, ob, ob + 256, xq, xo)
                high = _step6(splat_i32x16(-32 * halves[2 * b + 1]), w, ob + 128, ob + 320, xq, xo + 16)
                for t in range(1, 4):
                    low = _step6(low, w, ob + 32 * t, ob + 256 + 16 * t, xq, xo + 4 * t)
                    high = _step6(high, w, ob + 128 + 32 * t, ob + 320 + 16 * t, xq, xo + 16 + 4 * t)
                dx = scaled(d, xd[b])
                acc = fma_lanes(acc, low, vmul(int8s_f32x16(w, ob + 384), dx))
                acc = fma_lanes(acc, high, vmul(int8s_f32x16(w, ob + 400), dx))
        store_f32x16(out, _GROUP * g, acc)


@njit(cache=True)
def matvec_q4_0_repacked(packed, xq, xd, xs, out):
    _matvec16(packed, xq, xd, xs, out, Q4_0)


@njit(cache=True)
def matvec_q4_1_repacked(packed, xq, xd, xs, out):
    _matvec16(packed, xq, xd, xs, out, Q4_1)


@njit(cache=True)
def matvec_q5_0_repacked(packed, xq, xd, xs, out):
    _matvec16(packed, xq, xd, xs, out, Q5_0)


@njit(cache=True)
def matvec_q5_1_repacked(packed, xq, xd, xs, out):
    _matvec16(packed, xq, xd, xs, out, Q5_1)


@njit(cache=True)
def matvec_q8_0_repacked(packed, xq, xd, xs, out):
    _matvec16(packed, xq, xd, xs, out, Q8_0)


@njit(cache=True)
def matvec_q4_k_repacked(packed, xq, xd, xs, out):
    _matvec16_k4(packed, xq, xd, xs, out, Q4_K)


@njit(cache=True)
def matvec_q5_k_repacked(packed, xq, xd, xs, out):
    _matvec16_k4(packed, xq, xd, xs, out, Q5_K)


@njit(cache=True)
def matvec_q6_k_repacked(packed, xq, xd, xs, out):
    _matvec16_q6_k(packed, xq, xd, xs, out)


def repacked_row_bytes(ggml_type: int, n_cols: int) -> int:
    """Bytes per array row (a group of 16 weight rows) of the repacked layout of a type; 0 if it has none for
    rows of n_cols elements."""
    ggml_type = int(ggml_type)
    if ggml_type in _BLOCK_BYTES and n_cols % QK == 0:
        return n_cols // QK * _BLOCK_BYTES[ggml_type]
    if ggml_type in _SUPER_BYTES and n_cols % 256 == 0:
        return n_cols // 256 * _SUPER_BYTES[ggml_type]
    return 0


def _steps(q):
    """(..., 16 rows, n_blocks, 32) per-element values -> (..., n_blocks, 8 steps, 64): byte k of step t is row k // 4,
    element 4t + k % 4."""
    shape = q.shape
    q = q.reshape(shape[:-3] + (16, shape[-2], 8, 4))
    return np.moveaxis(q, -4, -2).reshape(shape[:-3] + (shape[-2], 8, 64))


def _per_row(v):
    """(..., 16 rows, n_blocks, k) -> (..., n_blocks, 16 rows * k): a per-row field of each block, rows together."""
    return np.moveaxis(v, -3, -2).reshape(v.shape[:-3] + (v.shape[-2], 16 * v.shape[-1]))


def _nibble_steps(q):
    u = _steps(q)
    return u[..., :32] | (u[..., 32:] << 4)


def _bit_steps(bits):
    return np.packbits(_steps(bits).astype(np.uint8), axis=-1, bitorder="little")


def _crumb_steps(crumbs):
    u = _steps(crumbs).reshape(crumbs.shape[:-3] + (crumbs.shape[-2], 8, 4, 16))
    return u[..., 0, :] | (u[..., 1, :] << 2) | (u[..., 2, :] << 4) | (u[..., 3, :] << 6)


def _quants(ggml_type, blocks):
    """Per-element quants (..., n_blocks, 32) of legacy blocks (..., n_blocks, block_bytes), as stored (unsigned,
    offset included; Q8_0 int8)."""
    if ggml_type == Q8_0:
        return blocks[..., 2:34].view(np.int8)
    nibbles = blocks[..., -16:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], axis=-1)
    if ggml_type in (Q5_0, Q5_1):
        first = 2 if ggml_type == Q5_0 else 4
        qh = blocks[..., first:first + 4].copy().view(np.uint32)
        q |= (((qh >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
    return q


def _k_quants(ggml_type, supers):
    """Per-element quants (..., 8 sub-blocks, 32) of Q4_K/Q5_K/Q6_K super-blocks (..., block_bytes), unsigned."""
    if ggml_type == Q6_K:
        ql, qh = supers[..., 0:128].reshape(supers.shape[:-1] + (2, 2, 32)), supers[..., 128:192]
        low = np.stack([ql[..., 0, :] & 15, ql[..., 1, :] & 15, ql[..., 0, :] >> 4, ql[..., 1, :] >> 4], axis=-2)
        qh = qh.reshape(supers.shape[:-1] + (2, 1, 32))
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # (..., half, s, 32)
        return (low | (high << 4)).reshape(supers.shape[:-1] + (8, 32))
    quants = supers[..., -128:].reshape(supers.shape[:-1] + (4, 1, 32))
    q = np.concatenate([quants & 15, quants >> 4], axis=-2).reshape(supers.shape[:-1] + (8, 32))
    if ggml_type == Q5_K:
        qh = supers[..., 16:48]
        q |= (((qh[..., None, :] >> np.arange(8, dtype=np.uint8)[:, None]) & 1) << 4)
    return q


def _k4_scales_numpy(packed):
    """(..., 12) packed 6-bit Q4_K/Q5_K scale bytes -> scales, mins (..., 8) uint8 (dequant.scale_min_k4)."""
    p = packed.astype(np.uint8)
    scales = np.concatenate([p[..., 0:4] & 63, (p[..., 8:12] & 15) | ((p[..., 0:4] >> 6) << 4)], axis=-1)
    mins = np.concatenate([p[..., 4:8] & 63, (p[..., 8:12] >> 4) | ((p[..., 4:8] >> 6) << 4)], axis=-1)
    return scales, mins


def repack(ggml_type: int, raw: np.ndarray) -> tuple:
    """(type id, array) of the fastest layout for matvec_q8: the 16-row interleaved one, type id REPACKED +
    ggml_type, a new uint8 array (n_rows // 16, row_bytes) of the raw size, if this type and shape have one
    (n_rows a multiple of 16); else (ggml_type, raw) unchanged. Done once when a model loads (numpy, about 0.1 s per
    100 MB); raw: ggml blocks uint8[n_rows, row_bytes]."""
    ggml_type = int(ggml_type)
    n_rows, row_bytes = raw.shape
    elements, block_bytes = BLOCK_SIZES[ggml_type]
    n_cols = row_bytes // block_bytes * elements
    packed_bytes = repacked_row_bytes(ggml_type, n_cols)
    if not packed_bytes or n_rows % _GROUP:
        return ggml_type, raw
    groups = n_rows // _GROUP
    blocks = np.asarray(raw).reshape(groups, _GROUP, n_cols // elements, block_bytes)
    halves = lambda first: _per_row(blocks[..., first:first + 2])  # noqa: E731  (one half per row and block)
    if ggml_type in _BLOCK_BYTES:
        q = _quants(ggml_type, blocks)
        parts = [_steps(q).reshape(groups, -1, 512) if ggml_type == Q8_0 else
                 _nibble_steps(q & 15).reshape(groups, -1, 256)]
        if ggml_type in (Q5_0, Q5_1):
            parts.append(_bit_steps(q >> 4).reshape(groups, -1, 64))
        parts.append(halves(0))
        if ggml_type in (Q4_1, Q5_1):
            parts.append(halves(2))
        packed = np.concatenate([p.view(np.uint8) for p in parts], axis=-1)
    else:
        q = _k_quants(ggml_type, blocks).reshape(groups, _GROUP, -1, 32)  # (groups, 16, blocks, 32)
        n_super = n_cols // 256
        if ggml_type == Q6_K:
            scales = blocks[..., 192:208].reshape(groups, _GROUP, -1, 2)  # int8 per 16 elements
            body = [_nibble_steps(q & 15).reshape(groups, -1, 256), _crumb_steps(q >> 4).reshape(groups, -1, 128),
                    _per_row(scales[..., 0:1]), _per_row(scales[..., 1:2])]
            head = [halves(208)]
        else:
            scales, mins = _k4_scales_numpy(blocks[..., 4:16])
            body = [_nibble_steps(q & 15).reshape(groups, -1, 256)]
            if ggml_type == Q5_K:
                body.append(_bit_steps(q >> 4).reshape(groups, -1, 64))
            body += [_per_row(scales.reshape(groups, _GROUP, -1, 1)), _per_row(mins.reshape(groups, _GROUP, -1, 1))]
            head = [halves(0), halves(2)]
        body = np.concatenate(body, axis=-1).reshape(groups, n_super, -1)
        packed = np.concatenate([h.reshape(groups, n_super, -1) for h in head] + [body], axis=-1)
    packed = np.ascontiguousarray(packed).reshape(groups, packed_bytes)
    packed.flags.writeable = False  # as raw views are: one Numba specialization for both
    return REPACKED + ggml_type, packed


# ---------------------------------------------------------------- float weights: x dequantized back to float32


@njit(cache=True)
def _dequantized_x(xq, xd):
    x = np.empty(xq.shape[0], np.float32)
    for i in range(xq.shape[0]):
        x[i] = np.float32(xq[i]) * xd[i // QK]
    return x


@njit(cache=True, parallel=True)
def matvec_f32_q8(raw, xq, xd, xs, out):
    x = _dequantized_x(xq, xd)
    for r in prange(raw.shape[0]):
        out[r] = dot_row_f32(raw[r], x)


@njit(cache=True, parallel=True)
def matvec_f16_q8(raw, xq, xd, xs, out):
    x = _dequantized_x(xq, xd)
    for r in prange(raw.shape[0]):
        out[r] = dot_row_f16(raw[r], x)


@njit(cache=True, parallel=True)
def matvec_bf16_q8(raw, xq, xd, xs, out):
    x = _dequantized_x(xq, xd)
    for r in prange(raw.shape[0]):
        out[r] = dot_row_bf16(raw[r], x)


# ---------------------------------------------------------------- entry points


@njit(cache=True)
def matvec_q8_dispatch(ggml_type, raw, xq, xd, xs, out):
    """matvec_q8 for compiled callers (no checks): an if-chain on the ggml type id. Unknown types leave out as is."""
    if ggml_type == Q4_1_R:
        matvec_q4_1_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q5_0_R:
        matvec_q5_0_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q8_0_R:
        matvec_q8_0_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q4_K_R:
        matvec_q4_k_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q6_K_R:
        matvec_q6_k_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q6_K:
        matvec_q6_k(raw, xq, xd, xs, out)
    elif ggml_type == Q4_1:
        matvec_q4_1(raw, xq, xd, xs, out)
    elif ggml_type == Q8_0:
        matvec_q8_0(raw, xq, xd, xs, out)
    elif ggml_type == Q5_0:
        matvec_q5_0(raw, xq, xd, xs, out)
    elif ggml_type == Q4_K:
        matvec_q4_k(raw, xq, xd, xs, out)
    elif ggml_type == Q4_0:
        matvec_q4_0(raw, xq, xd, xs, out)
    elif ggml_type == Q5_1:
        matvec_q5_1(raw, xq, xd, xs, out)
    elif ggml_type == Q5_K:
        matvec_q5_k(raw, xq, xd, xs, out)
    elif ggml_type == Q3_K:
        matvec_q3_k(raw, xq, xd, xs, out)
    elif ggml_type == Q2_K:
        matvec_q2_k(raw, xq, xd, xs, out)
    elif ggml_type == F32:
        matvec_f32_q8(raw, xq, xd, xs, out)
    elif ggml_type == F16:
        matvec_f16_q8(raw, xq, xd, xs, out)
    elif ggml_type == BF16:
        matvec_bf16_q8(raw, xq, xd, xs, out)
    elif ggml_type == Q4_0_R:
        matvec_q4_0_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q5_1_R:
        matvec_q5_1_repacked(raw, xq, xd, xs, out)
    elif ggml_type == Q5_K_R:
        matvec_q5_k_repacked(raw, xq, xd, xs, out)


MATVEC_Q8_KERNELS = {
    Q4_0: matvec_q4_0, Q4_1: matvec_q4_1, Q5_0: matvec_q5_0, Q5_1: matvec_q5_1, Q8_0: matvec_q8_0,
    Q2_K: matvec_q2_k, Q3_K: matvec_q3_k, Q4_K: matvec_q4_k, Q5_K: matvec_q5_k, Q6_K: matvec_q6_k,
    F32: matvec_f32_q8, F16: matvec_f16_q8, BF16: matvec_bf16_q8,
    Q4_0_R: matvec_q4_0_repacked, Q4_1_R: matvec_q4_1_repacked, Q5_0_R: matvec_q5_0_repacked,
    Q5_1_R: matvec_q5_1_repacked, Q8_0_R: matvec_q8_0_repacked, Q4_K_R: matvec_q4_k_repacked,
    Q5_K_R: matvec_q5_k_repacked, Q6_K_R: matvec_q6_k_repacked,
}


def check_activations(xq: np.ndarray, xd: np.ndarray, xs: np.ndarray) -> int:
    """Validate quantized activations (int8[n], float32[n // 32], int32[n // 32], C-contiguous); returns n."""
    for name, a, dtype in (("xq", xq, np.int8), ("xd", xd, np.float32), ("xs", xs, np.int32)):
        if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1 or not a.flags.c_contiguous:
            raise ValueError(f"{name} must be a C-contiguous 1-D {np.dtype(dtype).name} array")
    n = xq.shape[0]
    if n % QK or xd.shape[0] != n // QK or xs.shape[0] != n // QK:
        raise ValueError(f"xq has {n} elements: need a multiple of {QK} and {n // QK} block scales and sums, "
                         f"got {xd.shape[0]} and {xs.shape[0]}")
    return n


def matvec_q8(ggml_type: int, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray, xs: np.ndarray,
              out: np.ndarray | None = None) -> np.ndarray:
    """y = W @ x for x quantized by quantize_activations (xq int8[n], xd float32[n // 32], xs int32[n // 32]) and W
    either raw ggml blocks uint8[n_rows, row_bytes] (ggml_type a ggml type id) or a repacked layout from repack()
    (ggml_type = REPACKED + the ggml type).

    Returns float32[n_rows] (into `out` if given). Raises ValueError for an unsupported type or mismatched shapes.
    """
    n = check_activations(xq, xd, xs)
    ggml_type = int(ggml_type)
    if ggml_type >= REPACKED:
        expected = repacked_row_bytes(ggml_type - REPACKED, n)
        if not (expected and ggml_type in MATVEC_Q8_KERNELS and isinstance(raw, np.ndarray) and raw.dtype == np.uint8
                and raw.ndim == 2 and raw.shape[1] == expected and raw.flags.c_contiguous):
            raise ValueError(f"type {ggml_type}: not a repacked layout of rows of {n} elements")
        n_rows = _GROUP * raw.shape[0]
    else:
        raw = check_raw(ggml_type, raw, n)
        n_rows = raw.shape[0]
    out = check_out(out, (n_rows,))
    MATVEC_Q8_KERNELS[int(ggml_type)](raw, xq, xd, xs, out)
    return out
