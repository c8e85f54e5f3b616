"""Quantize float32 rows into raw ggml blocks, one Numba kernel per format: the inverse of dequant.py.

The block layouts are described in dequant.py. Every format rounds as ggml's reference quantizers do
(`quantize_row_*_ref` in ggml-quants.c, which is what llama-quantize runs when no importance matrix is given):
  - F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 are bit-identical to gguf-py's `gguf.quants.quantize`;
  - Q4_K / Q5_K search each 32-element sub-block's (scale, min) with ggml's make_qkx2_quants, Q6_K each 16-element
    sub-block's signed scale with make_qx_quants; the super-block scales are then quantized to 6 / 8 bits and every
    weight re-rounded against them.
All arithmetic is float32 in C's evaluation order with no fused multiply-add (Numba does not contract without
fastmath), so the K-quants equal a C build of ggml-quants.c without FMA contraction bit for bit.
"""
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from kernels_cpu._fp16 import bits_to_f32, f16_at
from kernels_cpu.dequant import scale_min_k4
from kernels_cpu.formats import (BF16, BLOCK_SIZES, F16, F32, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK,
                                 QK_K, row_bytes, type_name)

GROUP_MAX_EPS = np.float32(1e-15)  # ggml: a group whose largest |x| is below this is all zeros
F32_ZERO = np.float32(0.0)


# ---------------------------------------------------------------- scalar helpers


@intrinsic
def f32_bits(typingctx, x):
    """The IEEE bits of a float32 as an int32 (no conversion)."""
    if not (isinstance(x, types.Float) and x.bitwidth == 32):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(x), codegen


@njit(cache=True)
def nearest_int(x):
    """ggml's nearest_int: x rounded half to even by adding 1.5 * 2**23 (12582912) and reading the mantissa;
    exact for |x| <= 4194303 (ggml asserts this), NaN gives 0 as in C."""
    bits = np.int64(f32_bits(np.float32(np.float32(x) + np.float32(12582912.0))))
    return (bits & 0x7FFFFF) - 0x400000


@njit(cache=True)
def f32_to_half_bits(x):
    """float32 -> IEEE half bits, round to nearest even (as F16C's vcvtps2ph, ggml and numpy do)."""
    u = np.int64(f32_bits(np.float32(x))) & 0xFFFFFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:  # NaN: keep the top payload bits and stay a NaN (numpy's rule)
        h = 0x7C00 + ((a & 0x7FFFFF) >> 13)
        return sign | (h + 1 if h == 0x7C00 else h)
    if a >= 0x477FF000:  # >= 65520 rounds to infinity
        return sign | 0x7C00
    if a < 0x38800000:  # below 2**-14: a half subnormal, x / 2**-24 rounded (the scaling is exact)
        return sign | np.int64(np.rint(bits_to_f32(a) * np.float32(16777216.0)))
    a -= 0x38000000  # rebias the exponent from 127 to 15 (112 << 23), then round 23 mantissa bits to 10
    return sign | ((a + 0xFFF + ((a >> 13) & 1)) >> 13)


@njit(cache=True)
def f32_to_bf16_bits(x):
    """float32 -> bfloat16 bits, round to nearest even, NaNs made quiet (ggml_compute_fp32_to_bf16)."""
    u = np.int64(f32_bits(np.float32(x))) & 0xFFFFFFFF
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return ((u & 0xFFFF0000) | (64 << 16)) >> 16
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF


@njit(cache=True)
def put_half(out, offset, x):
    """Store float32 x as a little-endian IEEE half at out[offset:offset + 2]; returns the stored value."""
    h = f32_to_half_bits(x)
    out[offset] = h & 0xFF
    out[offset + 1] = (h >> 8) & 0xFF
    return f16_at(out, offset)


@njit(cache=True)
def fill(a, start, stop, value):
    """a[start:stop] = value as a loop (Numba's slice assignment costs seconds of compile time per use)."""
    for i in range(start, stop):
        a[i] = value


@njit(cache=True)
def round_away(x):
    """C's roundf (half away from zero) on float32, exactly: floor(a) + floor(2 * frac(a)) as gguf-py does."""
    a = abs(x)
    fl = np.floor(a)
    r = fl + np.floor(np.float32(2.0) * (a - fl))
    return -r if x < 0 else r


# ---------------------------------------------------------------- legacy 32-element blocks: x[32] -> out[o:o + bytes]


@njit(cache=True)
def quant_block_q8_0(x, out, o):
    amax = F32_ZERO
    for j in range(QK):
        amax = max(amax, abs(x[j]))
    d = amax / np.float32(127.0)
    inv = np.float32(1.0) / d if d != 0 else F32_ZERO
    put_half(out, o, d)
    for j in range(QK):
        out[o + 2 + j] = np.int64(round_away(x[j] * inv)) & 0xFF


@njit(cache=True)
def signed_absmax(x):
    """The element of largest magnitude (the first one on ties), keeping its sign."""
    amax, mx = F32_ZERO, F32_ZERO
    for j in range(x.shape[0]):
        if amax < abs(x[j]):
            amax, mx = abs(x[j]), x[j]
    return mx


@njit(cache=True)
def quant_block_q4_0(x, out, o):
    d = signed_absmax(x) / np.float32(-8.0)
    inv = np.float32(1.0) / d if d != 0 else F32_ZERO
    put_half(out, o, d)
    for j in range(QK // 2):
        lo = min(15, np.int64(x[j] * inv + np.float32(8.5)))
        hi = min(15, np.int64(x[j + 16] * inv + np.float32(8.5)))
        out[o + 2 + j] = lo | (hi << 4)


@njit(cache=True)
def quant_block_q5_0(x, out, o):
    d = signed_absmax(x) / np.float32(-16.0)
    inv = np.float32(1.0) / d if d != 0 else F32_ZERO
    put_half(out, o, d)
    qh = 0
    for j in range(QK // 2):
        lo = min(31, np.int64(x[j] * inv + np.float32(16.5)))
        hi = min(31, np.int64(x[j + 16] * inv + np.float32(16.5)))
        out[o + 6 + j] = (lo & 0xF) | ((hi & 0xF) << 4)
        qh |= ((lo >> 4) & 1) << j
        qh |= ((hi >> 4) & 1) << (j + 16)
    for b in range(4):
        out[o + 2 + b] = (qh >> (8 * b)) & 0xFF


@njit(cache=True)
def min_max(x):
    lo, hi = x[0], x[0]
    for j in range(1, x.shape[0]):
        lo, hi = min(lo, x[j]), max(hi, x[j])
    return lo, hi


@njit(cache=True)
def quant_block_q4_1(x, out, o):
    lo, hi = min_max(x)
    d = (hi - lo) / np.float32(15.0)
    inv = np.float32(1.0) / d if d != 0 else F32_ZERO
    put_half(out, o, d)
    put_half(out, o + 2, lo)
    for j in range(QK // 2):
        q0 = min(15, np.int64((x[j] - lo) * inv + np.float32(0.5)))
        q1 = min(15, np.int64((x[j + 16] - lo) * inv + np.float32(0.5)))
        out[o + 4 + j] = q0 | (q1 << 4)


@njit(cache=True)
def quant_block_q5_1(x, out, o):
    lo, hi = min_max(x)
    d = (hi - lo) / np.float32(31.0)
    inv = np.float32(1.0) / d if d != 0 else F32_ZERO
    put_half(out, o, d)
    put_half(out, o + 2, lo)
    qh = 0
    for j in range(QK // 2):
        q0 = min(31, np.int64((x[j] - lo) * inv + np.float32(0.5)))
        q1 = min(31, np.int64((x[j + 16] - lo) * inv + np.float32(0.5)))
        out[o + 8 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
        qh |= ((q0 >> 4) & 1) << j
        qh |= ((q1 >> 4) & 1) << (j + 16)
    for b in range(4):
        out[o + 4 + b] = (qh >> (8 * b)) & 0xFF


# ---------------------------------------------------------------- the K-quant searches (ggml-quants.c)


@njit(cache=True)
def make_qkx2_quants(x, weights, nmax, rmin, rdelta, nstep, levels, aux):
    """Asymmetric n-bit levels for one sub-block: the (scale, min) minimizing the weighted squared error over
    nstep + 1 candidate scales. Writes levels[i] in [0, nmax]; returns (scale, -min) with -min >= 0."""
    n = x.shape[0]
    lo, hi = x[0], x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        lo, hi = min(lo, x[i]), max(hi, x[i])
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if lo > 0:
        lo = F32_ZERO
    if hi == lo:
        fill(levels, 0, n, 0)
        return F32_ZERO, -lo
    fmax = np.float32(nmax)
    iscale = fmax / (hi - lo)
    scale = np.float32(1.0) / iscale
    best_error = F32_ZERO
    for i in range(n):
        levels[i] = max(0, min(nmax, nearest_int(iscale * (x[i] - lo))))
        diff = scale * np.float32(levels[i]) + lo - x[i]
        best_error += weights[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * np.float32(step) + fmax) / (hi - lo)
        sum_l, sum_l2, sum_xl = F32_ZERO, F32_ZERO, F32_ZERO
        for i in range(n):
            lv = max(0, min(nmax, nearest_int(iscale * (x[i] - lo))))
            aux[i] = lv
            wl = weights[i] * np.float32(lv)
            sum_l += wl
            sum_l2 += wl * np.float32(lv)
            sum_xl += wl * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = F32_ZERO
                this_scale = sum_xl / sum_l2
            cur_error = F32_ZERO
            for i in range(n):
                diff = this_scale * np.float32(aux[i]) + this_min - x[i]
                cur_error += weights[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    levels[i] = aux[i]
                best_error, scale, lo = cur_error, this_scale, this_min
    return scale, -lo


@njit(cache=True)
def make_qx_quants_rmse1(x, nmax, levels):
    """Symmetric levels for one sub-block (ggml's make_qx_quants with rmse_type 1 and no importance weights, so
    weights are x**2): tries 19 scales around -nmax / max. Writes levels[i] in [0, 2 nmax); returns the scale."""
    n = x.shape[0]
    mx = signed_absmax(x)
    if abs(mx) < GROUP_MAX_EPS:
        fill(levels, 0, n, 0)
        return F32_ZERO
    fmax = np.float32(nmax)
    iscale = -fmax / mx
    sumlx, suml2 = F32_ZERO, F32_ZERO
    for i in range(n):
        lv = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        levels[i] = lv + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * np.float32(lv)
        suml2 += w * np.float32(lv) * np.float32(lv)
    scale = sumlx / suml2 if suml2 != 0 else F32_ZERO
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(fmax + np.float32(0.1) * np.float32(step)) / mx
        sumlx, suml2 = F32_ZERO, F32_ZERO
        for i in range(n):
            lv = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            sumlx += w * x[i] * np.float32(lv)
            suml2 += w * np.float32(lv) * np.float32(lv)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                levels[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True)
def pack_scales_k4(scales, mins, out, o):
    """Pack 8 (scale, min) 6-bit pairs into Q4_K/Q5_K's 12 bytes at out[o] (the inverse of scale_min_k4)."""
    for j in range(8):
        ls, lm = scales[j], mins[j]
        if j < 4:
            out[o + j] = ls
            out[o + j + 4] = lm
        else:
            out[o + j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            out[o + j - 4] |= (ls >> 4) << 6
            out[o + j] |= (lm >> 4) << 6


@njit(cache=True)
def quant_super_block_qk_asym(x, out, o, nmax, rmin, rdelta, nstep, levels):
    """The part Q4_K and Q5_K share: search 8 sub-blocks, write d, dmin and the packed 6-bit scales at out[o:o + 16],
    and leave each weight's level (0..nmax) re-rounded against the stored scales in levels[256]."""
    weights = np.empty(32, dtype=np.float32)
    aux = np.empty(32, dtype=np.uint8)
    scales = np.empty(8, dtype=np.float32)
    mins = np.empty(8, dtype=np.float32)
    max_scale, max_min = F32_ZERO, F32_ZERO
    for j in range(8):
        xs = x[32 * j:32 * j + 32]
        sum_x2 = F32_ZERO
        for lane in range(32):
            sum_x2 += xs[lane] * xs[lane]
        av_x = np.sqrt(sum_x2 / np.float32(32.0))
        for lane in range(32):
            weights[lane] = av_x + abs(xs[lane])
        scales[j], mins[j] = make_qkx2_quants(xs, weights, nmax, rmin, rdelta, nstep, levels[32 * j:32 * j + 32], aux)
        max_scale, max_min = max(max_scale, scales[j]), max(max_min, mins[j])
    inv_scale = np.float32(63.0) / max_scale if max_scale > 0 else F32_ZERO
    inv_min = np.float32(63.0) / max_min if max_min > 0 else F32_ZERO
    ls = np.empty(8, dtype=np.int64)
    lm = np.empty(8, dtype=np.int64)
    for j in range(8):  # C stores nearest_int() in a uint8_t before taking min(63, .)
        ls[j] = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)
        lm[j] = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
    fill(out, o + 4, o + 16, 0)
    pack_scales_k4(ls, lm, out, o + 4)
    d = put_half(out, o, max_scale / np.float32(63.0))
    dmin = put_half(out, o + 2, max_min / np.float32(63.0))
    for j in range(8):
        sc, m = scale_min_k4(out, o + 4, j)
        dl = d * np.float32(sc)
        if dl == 0:
            continue  # keep the search's levels, as ggml does
        dm = dmin * np.float32(m)
        for lane in range(32):
            levels[32 * j + lane] = max(0, min(nmax, nearest_int((x[32 * j + lane] + dm) / dl)))


@njit(cache=True)
def quant_block_q4_k(x, out, o, levels):
    quant_super_block_qk_asym(x, out, o, 15, np.float32(-1.0), np.float32(0.1), 20, levels)
    for k in range(4):  # 64 weights per 32 bytes: sub-block 2k in the low nibbles, 2k + 1 in the high ones
        for lane in range(32):
            out[o + 16 + 32 * k + lane] = levels[64 * k + lane] | (levels[64 * k + 32 + lane] << 4)


@njit(cache=True)
def quant_block_q5_k(x, out, o, levels):
    quant_super_block_qk_asym(x, out, o, 31, np.float32(-0.5), np.float32(0.1), 15, levels)
    fill(out, o + 16, o + 48, 0)
    for k in range(4):
        for lane in range(32):
            l1, l2 = levels[64 * k + lane], levels[64 * k + 32 + lane]
            out[o + 16 + lane] |= ((l1 >> 4) << (2 * k)) | ((l2 >> 4) << (2 * k + 1))
            out[o + 48 + 32 * k + lane] = (l1 & 0xF) | ((l2 & 0xF) << 4)


@njit(cache=True)
def quant_block_q6_k(x, out, o, levels):
    scales = np.empty(16, dtype=np.float32)
    max_scale, max_abs_scale = F32_ZERO, F32_ZERO
    for ib in range(16):
        scales[ib] = make_qx_quants_rmse1(x[16 * ib:16 * ib + 16], 32, levels[16 * ib:16 * ib + 16])
        if abs(scales[ib]) > max_abs_scale:
            max_abs_scale, max_scale = abs(scales[ib]), scales[ib]
    if max_abs_scale < GROUP_MAX_EPS:
        fill(out, o, o + 210, 0)
        return
    iscale = np.float32(-128.0) / max_scale
    d = put_half(out, o + 208, np.float32(1.0) / iscale)
    for ib in range(16):
        out[o + 192 + ib] = min(127, nearest_int(iscale * scales[ib])) & 0xFF
    for j in range(16):
        sc = np.int64(out[o + 192 + j])
        dl = d * np.float32(sc - 256 if sc > 127 else sc)  # the stored int8
        if dl == 0:
            continue
        for lane in range(16):
            levels[16 * j + lane] = max(-32, min(31, nearest_int(x[16 * j + lane] / dl))) + 32
    for half in range(2):
        base, ql, qh = 128 * half, o + 64 * half, o + 128 + 32 * half
        for lane in range(32):
            q1, q2 = levels[base + lane], levels[base + lane + 32]
            q3, q4 = levels[base + lane + 64], levels[base + lane + 96]
            out[ql + lane] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[ql + lane + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[qh + lane] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


# ---------------------------------------------------------------- whole matrices: x[n_rows, n_cols] -> out[n_rows, row_bytes]
# One serial kernel per format over a range of rows, releasing the GIL so that `quantize` runs row ranges on threads.
# (A prange kernel compiles 3-6 s longer per format, for the same speed.)


@njit(nogil=True, cache=True)
def quantize_f16(x, out, start, stop):
    for r in range(start, stop):
        for i in range(x.shape[1]):
            h = f32_to_half_bits(x[r, i])
            out[r, 2 * i] = h & 0xFF
            out[r, 2 * i + 1] = h >> 8


@njit(nogil=True, cache=True)
def quantize_bf16(x, out, start, stop):
    for r in range(start, stop):
        for i in range(x.shape[1]):
            h = f32_to_bf16_bits(x[r, i])
            out[r, 2 * i] = h & 0xFF
            out[r, 2 * i + 1] = h >> 8


@njit(nogil=True, cache=True)
def quantize_q8_0(x, out, start, stop):
    for r in range(start, stop):
        for b in range(x.shape[1] // QK):
            quant_block_q8_0(x[r, QK * b:QK * b + QK], out[r], 34 * b)


@njit(nogil=True, cache=True)
def quantize_q4_0(x, out, start, stop):
    for r in range(start, stop):
        for b in range(x.shape[1] // QK):
            quant_block_q4_0(x[r, QK * b:QK * b + QK], out[r], 18 * b)


@njit(nogil=True, cache=True)
def quantize_q4_1(x, out, start, stop):
    for r in range(start, stop):
        for b in range(x.shape[1] // QK):
            quant_block_q4_1(x[r, QK * b:QK * b + QK], out[r], 20 * b)


@njit(nogil=True, cache=True)
def quantize_q5_0(x, out, start, stop):
    for r in range(start, stop):
        for b in range(x.shape[1] // QK):
            quant_block_q5_0(x[r, QK * b:QK * b + QK], out[r], 22 * b)


@njit(nogil=True, cache=True)
def quantize_q5_1(x, out, start, stop):
    for r in range(start, stop):
        for b in range(x.shape[1] // QK):
            quant_block_q5_1(x[r, QK * b:QK * b + QK], out[r], 24 * b)


@njit(nogil=True, cache=True)
def quantize_q4_k(x, out, start, stop):
    levels = np.zeros(QK_K, dtype=np.int64)
    for r in range(start, stop):
        for b in range(x.shape[1] // QK_K):
            quant_block_q4_k(x[r, QK_K * b:QK_K * b + QK_K], out[r], 144 * b, levels)


@njit(nogil=True, cache=True)
def quantize_q5_k(x, out, start, stop):
    levels = np.zeros(QK_K, dtype=np.int64)
    for r in range(start, stop):
        for b in range(x.shape[1] // QK_K):
            quant_block_q5_k(x[r, QK_K * b:QK_K * b + QK_K], out[r], 176 * b, levels)


@njit(nogil=True, cache=True)
def quantize_q6_k(x, out, start, stop):
    levels = np.zeros(QK_K, dtype=np.int64)
    for r in range(start, stop):
        for b in range(x.shape[1] // QK_K):
            quant_block_q6_k(x[r, QK_K * b:QK_K * b + QK_K], out[r], 210 * b, levels)


QUANTIZE_KERNELS = {
    F16: quantize_f16, BF16: quantize_bf16, Q8_0: quantize_q8_0, Q4_0: quantize_q4_0, Q4_1: quantize_q4_1,
    Q5_0: quantize_q5_0, Q5_1: quantize_q5_1, Q4_K: quantize_q4_k, Q5_K: quantize_q5_k, Q6_K: quantize_q6_k,
}
QUANTIZABLE_TYPES = frozenset(QUANTIZE_KERNELS) | {F32}


def quantize(ggml_type: int, x: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """Quantize a 2-D float32 weight into raw ggml blocks.

    x: float32[n_rows, n_cols] with n_cols a multiple of the type's block size (32, or 256 for K-quants).
    Returns uint8[n_rows, row_bytes] (row_bytes from formats.row_bytes); rows are split over n_threads threads. Raises ValueError for a type without a
    quantizer (Q2_K, Q3_K) or a row length the type cannot hold.
    """
    ggml_type = int(ggml_type)
    if ggml_type not in QUANTIZABLE_TYPES:
        names = ", ".join(type_name(t) for t in sorted(QUANTIZABLE_TYPES))
        raise ValueError(f"no quantizer for {type_name(ggml_type)} (available: {names})")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"quantize needs a 2-D array (n_rows, n_cols), got shape {x.shape}")
    nbytes = row_bytes(ggml_type, x.shape[1])  # raises for a row length that is not a multiple of the block
    if ggml_type == F32:
        return x.view(np.uint8).reshape(x.shape[0], nbytes).copy()
    out = np.empty((x.shape[0], nbytes), dtype=np.uint8)
    run_on_threads(QUANTIZE_KERNELS[ggml_type], x, out, n_threads)
    return out


def run_on_threads(kernel, x: np.ndarray, out: np.ndarray, n_threads: int | None = None) -> None:
    """kernel(x, out, start, stop) over all rows, in contiguous row ranges on n_threads threads (default: the
    threads Numba would use)."""
    n_rows = x.shape[0]
    n_threads = max(1, min(int(n_threads or numba.config.NUMBA_NUM_THREADS), n_rows))
    if n_threads == 1:
        if n_rows:
            kernel(x, out, 0, n_rows)
        return
    bounds = np.linspace(0, n_rows, 4 * n_threads + 1).astype(np.int64)  # a few ranges per thread evens out the load
    with ThreadPoolExecutor(n_threads) as pool:
        for future in [pool.submit(kernel, x, out, int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]:
            future.result()


def quantized_nbytes(ggml_type: int, shape: tuple[int, ...]) -> int:
    """Bytes a tensor of numpy shape `shape` takes in `ggml_type` (rows along the last axis)."""
    elements, nbytes = BLOCK_SIZES[int(ggml_type)]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    return n_rows * (shape[-1] // elements) * nbytes
