"""y = W @ x (x as int8 blocks, as in matvec_q8) for W in ggml's own block layouts: the types and shapes without a
repacked layout (kernels_cpu.repack), and float weights.

Raw kernels (simd.py has the instructions) take rows in groups of 4: one load of x serves four rows and four
accumulators hide the float latency; a group past the last row repeats it (the same value is written twice). A
32-element block's integer dot leaves 8 int32 lanes, converted and scaled by d_w * xd[b] into a float vector summed
once per row. Offsets (Q4_0 q - 8, Q5_0 q - 16, Q6_K q - 32, Q3_K q - 4) start the integer dot at
-offset * lane_sums(x); minimums (Q4_1, Q5_1, Q4_K, Q5_K, Q2_K) add m * xd * xs per (sub-)block. K-quants take 64
elements (two x blocks) per dot; its 16 lanes get their scales by pick_pairs (32-wide sub-blocks) or pick_quads
(16-wide sub-blocks).
"""
import numpy as np
from numba import literally, njit, prange

from kernels_cpu._fp16 import f16_at
from kernels_cpu.formats import F16, F32, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0, QK
from kernels_cpu.matvec import dot_row_bf16, dot_row_f16, dot_row_f32
from kernels_cpu.q8_layouts import FASTMATH, block_layout, half_block_sums
from kernels_cpu.simd import (bits_i8x32, bitfields_i8x64, bytes_or, dot_i8, dot_u8, fields_i8x64, fma_lanes, fma_splat,
                              halves_pair_splat, hsum, int8s_f32x16, join, k4_scales_f32x16, lane_sums, load_f32x8,
                              load_i8x32, load_i8x64, load_i32x16, nibble_scales_f32x16, nibbles_i8x32, pick_pairs,
                              pick_quads, prefetch, q3k_scales_f32x16, scaled, spread_pairs, times, to_float,
                              upper_half, vadd, vmul, vsub, zero_f32x8, zero_f32x16, zero_i32x8, zero_i32x16)


@njit(cache=True)
def _group_rows(g, n_rows):
    """Rows 4g .. 4g + 3, the last row repeated past the end."""
    last = n_rows - 1
    return min(4 * g, last), min(4 * g + 1, last), min(4 * g + 2, last), min(4 * g + 3, last)


@njit(cache=True, fastmath=FASTMATH)
def _x_sums(xd, xs):
    """xd * xs as float32: the x side of a minimum term."""
    out = np.empty(xd.shape[0], np.float32)
    for b in range(xd.shape[0]):
        out[b] = xd[b] * np.float32(xs[b])
    return out


# ---------------------------------------------------------------- raw 32-element block formats


@njit(cache=True, fastmath=FASTMATH)
def _block(acc, row, o, xv, sums, xdb, ggml_type):
    """acc + one block of one row (at row[o:]) times x (32 int8 xv, lane_sums sums, scale xdb), minimum left out."""
    if ggml_type == Q8_0:
        dots = dot_i8(zero_i32x8(), load_i8x32(row, o + 2), xv, sums)
    elif ggml_type == Q4_0:
        dots = dot_u8(times(sums, -8), nibbles_i8x32(row, o + 2), xv)
    elif ggml_type == Q4_1:
        dots = dot_u8(zero_i32x8(), nibbles_i8x32(row, o + 4), xv)
    elif ggml_type == Q5_0:
        dots = dot_u8(times(sums, -16), bytes_or(nibbles_i8x32(row, o + 6), bits_i8x32(row, o + 2, 16)), xv)
    else:  # Q5_1
        dots = dot_u8(zero_i32x8(), bytes_or(nibbles_i8x32(row, o + 8), bits_i8x32(row, o + 4, 16)), xv)
    return fma_splat(acc, dots, f16_at(row, o) * xdb)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_blocks(raw, xq, xd, xs, out, ggml_type):
    """Raw Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml_type a constant)."""
    literally(ggml_type)
    xds = _x_sums(xd, xs)
    for g in prange((raw.shape[0] + 3) // 4):
        _blocks_group(raw, g, xq, xd, xs, xds, out, ggml_type)


@njit(cache=True, fastmath=FASTMATH)
def matvec_blocks_part(raw, xq, xd, xs, out, ggml_type, g0, g1):
    """matvec_blocks' row groups (of 4) g0..g1-1 on the calling thread: a share of a team's matvec."""
    literally(ggml_type)
    xds = _x_sums(xd, xs)
    for g in range(g0, g1):
        _blocks_group(raw, g, xq, xd, xs, xds, out, ggml_type)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _blocks_group(raw, g, xq, xd, xs, xds, out, ggml_type):
    n_rows = raw.shape[0]
    stride, _, _, has_min = block_layout(ggml_type)
    r0, r1, r2, r3 = _group_rows(g, n_rows)
    w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
    a0 = a1 = a2 = a3 = zero_f32x8()
    m0 = m1 = m2 = m3 = np.float32(0.0)
    ahead = raw[min(r3 + 1, n_rows - 1)]  # the next group's first row: its lines reach the cache meanwhile
    for b in range(xd.shape[0]):
        o, xv, xdb = stride * b, load_i8x32(xq, QK * b), xd[b]
        prefetch(ahead, 4 * o)
        prefetch(ahead, 4 * o + 64)
        sums = lane_sums(xv)
        a0 = _block(a0, w0, o, xv, sums, xdb, ggml_type)
        a1 = _block(a1, w1, o, xv, sums, xdb, ggml_type)
        a2 = _block(a2, w2, o, xv, sums, xdb, ggml_type)
        a3 = _block(a3, w3, o, xv, sums, xdb, ggml_type)
        if has_min:
            m0 += f16_at(w0, o + 2) * xds[b]
            m1 += f16_at(w1, o + 2) * xds[b]
            m2 += f16_at(w2, o + 2) * xds[b]
            m3 += f16_at(w3, o + 2) * xds[b]
    out[r0], out[r1], out[r2], out[r3] = hsum(a0) + m0, hsum(a1) + m1, hsum(a2) + m2, hsum(a3) + m3


# ---------------------------------------------------------------- raw K-quants: 256-element super-blocks
# x0..x3: the 4 x 64 int8 of x under a super-block; one dot covers sub-blocks (of 32) 2k, 2k + 1


@njit(cache=True, fastmath=FASTMATH)
def _k4_pair(row, o, k, ggml_type):
    """Quants of sub-blocks 2k, 2k + 1 (64 bytes) of the Q4_K/Q5_K super-block at row[o:]."""
    if ggml_type == Q4_K:
        return bitfields_i8x64(row, o + 16 + 32 * k, 0, 4, 15, 0)
    return bytes_or(bitfields_i8x64(row, o + 48 + 32 * k, 0, 4, 15, 0), bitfields_i8x64(row, o + 16, 2 * k, 1, 1, 4))


@njit(cache=True, fastmath=FASTMATH)
def _super_k4(acc, mins, row, o, xx, x0, x1, x2, x3, ggml_type):
    # t = [d * scale_j * xd_j | dmin * min_j * xd_j * xs_j], j < 8 (xx = [xd_j | xd_j * xs_j])
    t = vmul(vmul(k4_scales_f32x16(row, o + 4), halves_pair_splat(row, o)), xx)
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 0, ggml_type), x0), pick_pairs(t, 0))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 1, ggml_type), x1), pick_pairs(t, 1))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 2, ggml_type), x2), pick_pairs(t, 2))
    acc = fma_lanes(acc, dot_u8(zero_i32x16(), _k4_pair(row, o, 3, ggml_type), x3), pick_pairs(t, 3))
    return acc, vadd(mins, t)


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_k4(raw, xq, xd, xs, out, ggml_type):
    """Raw Q4_K, Q5_K (ggml_type a constant): sub-blocks of 32 with a 6-bit scale and minimum."""
    literally(ggml_type)
    xds = _x_sums(xd, xs)
    for g in prange((raw.shape[0] + 3) // 4):
        _k4_group(raw, g, xq, xd, xds, out, ggml_type)


@njit(cache=True, fastmath=FASTMATH)
def matvec_k4_part(raw, xq, xd, xs, out, ggml_type, g0, g1):
    """matvec_k4's row groups (of 4) g0..g1-1 on the calling thread."""
    literally(ggml_type)
    xds = _x_sums(xd, xs)
    for g in range(g0, g1):
        _k4_group(raw, g, xq, xd, xds, out, ggml_type)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _k4_group(raw, g, xq, xd, xds, out, ggml_type):
    n_rows = raw.shape[0]
    stride = block_layout(ggml_type)[0]
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
    out[r0], out[r1] = hsum(a0) - hsum(upper_half(m0)), hsum(a1) - hsum(upper_half(m1))
    out[r2], out[r3] = hsum(a2) - hsum(upper_half(m2)), hsum(a3) - hsum(upper_half(m3))


@njit(cache=True, fastmath=FASTMATH)
def _k16_pair(row, o, h, p, ggml_type):
    """Quants (unsigned) of 32-blocks 4h + 2p, 4h + 2p + 1 (64 bytes) of the Q6_K/Q3_K/Q2_K super-block at row[o:]."""
    if ggml_type == Q6_K:
        return bytes_or(fields_i8x64(load_i8x64(row, o + 64 * h), 4 * p, 15),
                        bitfields_i8x64(row, o + 128 + 32 * h, 4 * p, 2, 3, 4))
    if ggml_type == Q3_K:
        return bytes_or(bitfields_i8x64(row, o + 32 + 32 * h, 4 * p, 2, 3, 0),
                        bitfields_i8x64(row, o, 4 * h + 2 * p, 1, 1, 2))
    return bitfields_i8x64(row, o + 16 + 32 * h, 4 * p, 2, 3, 0)


@njit(cache=True, fastmath=FASTMATH)
def _super_k16(acc, row, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16, xs16, ggml_type):
    """acc + one Q6_K/Q3_K/Q2_K super-block of one row; i0..i3 start the dots (-offset * lane_sums), xd16 = the x scale
    of each 16-element sub-block, xs16 = xd16 * its x sum (for Q2_K's minimums)."""
    if ggml_type == Q6_K:
        s = vmul(int8s_f32x16(row, o + 192), scaled(xd16, f16_at(row, o + 208)))
    elif ggml_type == Q3_K:
        s = vmul(q3k_scales_f32x16(row, o + 96), scaled(xd16, f16_at(row, o + 108)))
    else:
        s = vmul(nibble_scales_f32x16(row, o, 0), scaled(xd16, f16_at(row, o + 80)))
        acc = vsub(acc, vmul(nibble_scales_f32x16(row, o, 1), scaled(xs16, f16_at(row, o + 82))))
    acc = fma_lanes(acc, dot_u8(i0, _k16_pair(row, o, 0, 0, ggml_type), x0), pick_quads(s, 0))
    acc = fma_lanes(acc, dot_u8(i1, _k16_pair(row, o, 0, 1, ggml_type), x1), pick_quads(s, 4))
    acc = fma_lanes(acc, dot_u8(i2, _k16_pair(row, o, 1, 0, ggml_type), x2), pick_quads(s, 8))
    return fma_lanes(acc, dot_u8(i3, _k16_pair(row, o, 1, 1, ggml_type), x3), pick_quads(s, 12))


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_k16(raw, xq, xd, xs, out, ggml_type):
    """Raw Q6_K, Q3_K, Q2_K (ggml_type a constant): sub-blocks of 16 elements."""
    literally(ggml_type)
    sums16 = half_block_sums(xq)
    for g in prange((raw.shape[0] + 3) // 4):
        _k16_group(raw, g, xq, xd, sums16, out, ggml_type)


@njit(cache=True, fastmath=FASTMATH)
def matvec_k16_part(raw, xq, xd, xs, out, ggml_type, g0, g1):
    """matvec_k16's row groups (of 4) g0..g1-1 on the calling thread."""
    literally(ggml_type)
    sums16 = half_block_sums(xq)
    for g in range(g0, g1):
        _k16_group(raw, g, xq, xd, sums16, out, ggml_type)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _k16_group(raw, g, xq, xd, sums16, out, ggml_type):
    n_rows = raw.shape[0]
    stride, _, offset, _ = block_layout(ggml_type)
    r0, r1, r2, r3 = _group_rows(g, n_rows)
    w0, w1, w2, w3 = raw[r0], raw[r1], raw[r2], raw[r3]
    a0 = a1 = a2 = a3 = zero_f32x16()
    for sb in range(xd.shape[0] // 8):
        o, e = stride * sb, 256 * sb
        x0, x1, x2, x3 = load_i8x64(xq, e), load_i8x64(xq, e + 64), load_i8x64(xq, e + 128), load_i8x64(xq, e + 192)
        i0, i1 = times(lane_sums(x0), offset), times(lane_sums(x1), offset)
        i2, i3 = times(lane_sums(x2), offset), times(lane_sums(x3), offset)
        xd16 = spread_pairs(xd, 8 * sb)
        xs16 = vmul(xd16, to_float(load_i32x16(sums16, 16 * sb)))
        a0 = _super_k16(a0, w0, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16, xs16, ggml_type)
        a1 = _super_k16(a1, w1, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16, xs16, ggml_type)
        a2 = _super_k16(a2, w2, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16, xs16, ggml_type)
        a3 = _super_k16(a3, w3, o, x0, x1, x2, x3, i0, i1, i2, i3, xd16, xs16, ggml_type)
    out[r0], out[r1], out[r2], out[r3] = hsum(a0), hsum(a1), hsum(a2), hsum(a3)


# ---------------------------------------------------------------- raw float weights: x dequantized back to float32


@njit(cache=True)
def _dequantized_x(xq, xd):
    x = np.empty(xq.shape[0], np.float32)
    for i in range(xq.shape[0]):
        x[i] = np.float32(xq[i]) * xd[i // QK]
    return x


@njit(cache=True, parallel=True)
def matvec_float(raw, xq, xd, xs, out, ggml_type):
    """Raw F32, F16, BF16 (ggml_type a constant): float dots (kernels_cpu.matvec) with x = xd * xq."""
    literally(ggml_type)
    x = _dequantized_x(xq, xd)
    for r in prange(raw.shape[0]):
        _float_row(raw, r, x, out, ggml_type)


@njit(cache=True)
def matvec_float_part(raw, xq, xd, xs, out, ggml_type, r0, r1):
    """matvec_float's rows r0..r1-1 on the calling thread."""
    literally(ggml_type)
    x = _dequantized_x(xq, xd)
    for r in range(r0, r1):
        _float_row(raw, r, x, out, ggml_type)


@njit(cache=True, inline="always")
def _float_row(raw, r, x, out, ggml_type):
    if ggml_type == F32:
        out[r] = dot_row_f32(raw[r], x)
    elif ggml_type == F16:
        out[r] = dot_row_f16(raw[r], x)
    else:
        out[r] = dot_row_bf16(raw[r], x)
