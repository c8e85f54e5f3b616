"""y = W @ x with x quantized to int8 blocks of 32 (activations_q8) and integer dot products: the decode path.

Measured (median us, best of 5 rounds; Intel Xeon with AVX-512 VNNI, 2 vCPUs under KVM, shared with other work, numba
0.68, default threading layer; path avx512vnni). First figure: a busy hour (float path 1.35x its quiet time); in
brackets the best seen in a quiet window. llama.cpp's ggml_mul_mat for comparison:
  tensor                          threads  raw ggml blocks    repacked          llama.cpp
  SmolLM2 ffn_up Q4_1 1536x576    1 / 2    67 / 40 (45/34)    19 / 13 (14/10)   43 / 28
  SmolLM2 output Q8_0 49152x576   1 / 2    2428 / 1323        2363 / 816 (1313/651)  2041 / 1043   (DRAM-bound)
  Gemma ffn_down Q4_K 640x2048    1 / 2    64 / 38 (44/27)    31 / 20 (21/14)   37 / 20
  Gemma ffn_down Q6_K 640x2048    1 / 2    62 / 32 (44/26)    30 / 19 (28/18)   39 / 21
Quantizing x (quantize_activations) adds 1-3 us. avx2 path on the same CPU: repacked Q4_1 / Q4_K / Q6_K 27 / 43 / 50
(1 thread); portable path: 131 / 189 / 194 (the float-x kernels: 253 / 520 / 2100).

x comes as xq int8[n], xd float32[n // 32], xs int32[n // 32] (quantize_activations); out[r] = sum over blocks b of
the exact dot of row r's dequantized weights with xd[b] * xq[32b:32b + 32], up to float32 rounding. W comes in one of
two layouts, named by a type id:
- raw ggml blocks, uint8[n_rows, row_bytes] (layouts in dequant.py; views into the model file), id = ggml type;
- repacked, 16 rows interleaved (kernels_cpu.repack.repack, once at load; same size), id = REPACKED + ggml type:
  about 2-3x faster.
A repacked matrix is a uint8 array (n_rows // 16, repacked_row_bytes(type, n_cols)); weight_rows(type_id, n_rows)
gives its first dimension to compiled code. Kernels of one family share a body specialized per type id
(numba.literally): call them with a constant type id, e.g. matvec_blocks(raw, xq, xd, xs, out, Q8_0), from compiled
code only (from Python each call re-resolves the literal, ~50 ms), or use matvec_q8_dispatch / matvec_q8.
The raw-block kernels are in kernels_cpu.matvec_q8_raw; the type ids and block layouts both share, in
kernels_cpu.q8_layouts.
"""
import numpy as np
from numba import literally, njit, prange

from kernels_cpu.borrow import borrowed
from kernels_cpu.formats import (BF16, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K,
                                 Q8_0, QK, check_out, check_raw)
from kernels_cpu.kernel_thread import call_parallel
from kernels_cpu.matvec_q8_raw import (matvec_blocks, matvec_blocks_part, matvec_float, matvec_float_part, matvec_k4,
                                       matvec_k4_part, matvec_k16, matvec_k16_part)
from kernels_cpu.q8_layouts import (FASTMATH, GROUP, Q4_0_R, Q4_1_R, Q4_K_R, Q5_0_R, Q5_1_R, Q5_K_R, Q6_K_R, Q8_0_R,
                                    REPACKED, block_layout, half_block_sums)
from kernels_cpu.simd import (bits_i8x64, bytes_or, dot_i8_biased, dot_u8, fields_i8x64, fma_lanes, halves_f32x16, iadd,
                              int8s_f32x16, load_i8x64, prefetch, scaled, splat4_i8x64, splat_i32x16, store_f32x16,
                              uint8s_f32x16, vadd, vmul, vsub, zero_f32x16, zero_i32x16)


# ---------------------------------------------------------------- repacked: 16 rows interleaved
# One array row holds a group of 16 weight rows. Per 32-element block the rows' quants come in 8 steps of 4 elements:
# step t unpacks to 64 bytes, byte k = row k // 4, element 4t + k % 4, so one 64-byte dot with x[4t:4t + 4] repeated
# (splat4) advances all 16 rows, 8 dots finish the block with one int32 lane per row, and one convert + FMA with the
# 16 rows' scales adds it to the float lanes = rows: no horizontal sums, about 2 vector instructions per row and
# block where the raw kernels need 5 to 8. Per block of the 16 rows, in bytes:
#   Q4_0, Q4_1  quants 4 x 64 (byte k of chunk i: step 2i byte k | step 2i + 1 byte k << 4), d 16 halves (, m)
#   Q5_0, Q5_1  as Q4 with the 5th bits 8 x 8 (bit k of step t: its byte k) after the quants
#   Q8_0        quants 8 x 64, d
#   Q4_K, Q5_K  per super-block d, dmin (16 halves each); per block as Q4 / Q5, then 16 scales, 16 mins (6-bit, bytes)
#   Q6_K        per super-block d; per block low nibbles as Q4, high 2 bits 2 x 64 (bits 2f of byte k of chunk i:
#               step 4i + f byte k), int8 scales of elements 0-15 (16), 16-31 (16)
# Sizes equal the raw ones, except Q4_K and Q5_K: 4 bytes more per row and super-block.
_BLOCK_BYTES = {Q4_0: 288, Q4_1: 320, Q5_0: 352, Q5_1: 384, Q8_0: 544}  # per 16-row block
_SUPER_BYTES = {Q4_K: 64 + 8 * 288, Q5_K: 64 + 8 * 352, Q6_K: 32 + 8 * 416}  # per 16-row super-block


@njit(cache=True, fastmath=FASTMATH)
def _nibble_steps(a, c, w, o, xq, xo):
    """(a, c) + the 16 rows' 4-bit quants of steps 2i, 2i + 1 (low, high nibbles of the 64 bytes at w[o:]) times
    x[xo:xo + 4], x[xo + 4:xo + 8]."""
    v = load_i8x64(w, o)
    return (dot_u8(a, fields_i8x64(v, 0, 15), splat4_i8x64(xq, xo)),
            dot_u8(c, fields_i8x64(v, 4, 15), splat4_i8x64(xq, xo + 4)))


@njit(cache=True, fastmath=FASTMATH)
def _nibble5_steps(a, c, w, o, qh, xq, xo):
    """As _nibble_steps, with the two steps' 5th bits (8 bytes each at w[qh:])."""
    v = load_i8x64(w, o)
    return (dot_u8(a, bytes_or(fields_i8x64(v, 0, 15), bits_i8x64(w, qh, 16)), splat4_i8x64(xq, xo)),
            dot_u8(c, bytes_or(fields_i8x64(v, 4, 15), bits_i8x64(w, qh + 8, 16)), splat4_i8x64(xq, xo + 4)))


@njit(cache=True, fastmath=FASTMATH)
def _block16(w, o, xq, xo, init, ggml_type):
    """int32 dots (one lane per row) of the 16 rows' block at w[o:] with x[xo:xo + 32], from init; two chains."""
    a, c = init, zero_i32x16()
    if ggml_type == Q8_0_R:
        for t in range(0, 8, 2):
            a = dot_i8_biased(a, load_i8x64(w, o + 64 * t), splat4_i8x64(xq, xo + 4 * t))
            c = dot_i8_biased(c, load_i8x64(w, o + 64 * t + 64), splat4_i8x64(xq, xo + 4 * t + 4))
    elif ggml_type == Q4_0_R or ggml_type == Q4_1_R or ggml_type == Q4_K_R:
        for t in range(0, 8, 2):
            a, c = _nibble_steps(a, c, w, o + 32 * t, xq, xo + 4 * t)
    else:  # Q5_0, Q5_1, Q5_K
        for t in range(0, 8, 2):
            a, c = _nibble5_steps(a, c, w, o + 32 * t, o + 256 + 8 * t, xq, xo + 4 * t)
    return iadd(a, c)


# Decode streams each weight once from DRAM; one core alone keeps too few cache misses in flight to use the memory's
# bandwidth (measured on the SmolLM2 head, 1 thread: 10 GB/s without, 20 GB/s with prefetching 2 groups ahead).
PREFETCH_GROUPS = 2


@njit(cache=True)
def _prefetch_range(buf, start, n_bytes):
    for offset in range(start, start + n_bytes, 64):
        prefetch(buf, offset)


@njit(cache=True, fastmath=FASTMATH)
def add_block16(acc, w, b, xq, xd, xs, ggml_type):
    """acc + block b of the 16 rows in w (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 repacked) times x's block b. matvec and
    the prefill tiles (matmul_q8) both take this step, so a token's result is the same in either."""
    stride, quants, offset, has_min = block_layout(ggml_type)
    o = stride * b
    dots = _block16(w, o, xq, QK * b, splat_i32x16(offset * xs[b]), ggml_type)
    acc = fma_lanes(acc, dots, scaled(halves_f32x16(w, o + quants), xd[b]))
    if has_min:
        acc = vadd(acc, scaled(halves_f32x16(w, o + quants + 32), xd[b] * np.float32(xs[b])))
    return acc


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_blocks16(packed, xq, xd, xs, out, ggml_type):
    """Repacked Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 (ggml_type the repacked id, a constant)."""
    literally(ggml_type)
    # without reference counting (kernels_cpu.borrow): both threads take views of these arrays for every group
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in prange(packed.shape[0]):
        _blocks16_group(packed, g, xq, xd, xs, out, ggml_type)


@njit(cache=True, fastmath=FASTMATH)
def matvec_blocks16_part(packed, xq, xd, xs, out, ggml_type, g0, g1):
    """matvec_blocks16's groups g0..g1-1 on the calling thread: a share of a team's matvec (the caller's arrays
    borrowed: kernels_cpu.borrow)."""
    literally(ggml_type)
    for g in range(g0, g1):
        _blocks16_group(packed, g, xq, xd, xs, out, ggml_type)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _blocks16_group(packed, g, xq, xd, xs, out, ggml_type):
    w, ahead = packed[g], packed[min(g + PREFETCH_GROUPS, packed.shape[0] - 1)]
    stride = block_layout(ggml_type)[0]
    acc = zero_f32x16()
    for b in range(xd.shape[0]):
        _prefetch_range(ahead, stride * b, stride)
        acc = add_block16(acc, w, b, xq, xd, xs, ggml_type)
    store_f32x16(out, GROUP * g, acc)


@njit(cache=True, fastmath=FASTMATH)
def super_k4_16(w, sb, ggml_type):
    """(offset, d, dmin) of super-block sb of the 16 rows in w (Q4_K, Q5_K repacked)."""
    o = (64 + 8 * block_layout(ggml_type)[0]) * sb
    return o, halves_f32x16(w, o), halves_f32x16(w, o + 32)


@njit(cache=True, fastmath=FASTMATH)
def add_block_k4_16(acc, w, o, d, dmin, j, b, xq, xd, xs, ggml_type):
    """acc + block j of the super-block at w[o:] (d, dmin from super_k4_16) times x's block b = 8 sb + j."""
    block = block_layout(ggml_type)[0]
    ob = o + 64 + block * j
    dots = _block16(w, ob, xq, QK * b, zero_i32x16(), ggml_type)
    acc = fma_lanes(acc, dots, vmul(uint8s_f32x16(w, ob + block - 32), scaled(d, xd[b])))
    return vsub(acc, vmul(uint8s_f32x16(w, ob + block - 16), scaled(dmin, xd[b] * np.float32(xs[b]))))


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_k4_16(packed, xq, xd, xs, out, ggml_type):
    """Repacked Q4_K, Q5_K (ggml_type the repacked id, a constant)."""
    literally(ggml_type)
    # without reference counting (kernels_cpu.borrow): both threads take views of these arrays for every group
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in prange(packed.shape[0]):
        _k4_16_group(packed, g, xq, xd, xs, out, ggml_type)


@njit(cache=True, fastmath=FASTMATH)
def matvec_k4_16_part(packed, xq, xd, xs, out, ggml_type, g0, g1):
    """matvec_k4_16's groups g0..g1-1 on the calling thread."""
    literally(ggml_type)
    for g in range(g0, g1):
        _k4_16_group(packed, g, xq, xd, xs, out, ggml_type)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _k4_16_group(packed, g, xq, xd, xs, out, ggml_type):
    w, ahead = packed[g], packed[min(g + PREFETCH_GROUPS, packed.shape[0] - 1)]
    acc = zero_f32x16()
    for sb in range(xd.shape[0] // 8):
        o, d, dmin = super_k4_16(w, sb, ggml_type)
        _prefetch_range(ahead, o, 64 + 8 * block_layout(ggml_type)[0])
        for j in range(8):
            acc = add_block_k4_16(acc, w, o, d, dmin, j, 8 * sb + j, xq, xd, xs, ggml_type)
    store_f32x16(out, GROUP * g, acc)


@njit(cache=True, fastmath=FASTMATH)
def _q6_half16(acc, w, o, oh, xq, xo):
    """acc + the 16 rows' 6-bit quants of 4 steps (low nibbles: 128 bytes at w[o:], high bits: 64 bytes at w[oh:])
    times x[xo:xo + 16]."""
    v0, v1, h = load_i8x64(w, o), load_i8x64(w, o + 64), load_i8x64(w, oh)
    acc = dot_u8(acc, bytes_or(fields_i8x64(v0, 0, 15), fields_i8x64(h, 60, 48)), splat4_i8x64(xq, xo))
    acc = dot_u8(acc, bytes_or(fields_i8x64(v0, 4, 15), fields_i8x64(h, 62, 48)), splat4_i8x64(xq, xo + 4))
    acc = dot_u8(acc, bytes_or(fields_i8x64(v1, 0, 15), fields_i8x64(h, 0, 48)), splat4_i8x64(xq, xo + 8))
    return dot_u8(acc, bytes_or(fields_i8x64(v1, 4, 15), fields_i8x64(h, 2, 48)), splat4_i8x64(xq, xo + 12))


@njit(cache=True, fastmath=FASTMATH)
def add_block_q6_16(acc, w, o, d, j, b, xq, xd, sums16):
    """acc + block j of the Q6_K super-block at w[o:] (d its halves) times x's block b = 8 sb + j."""
    ob = o + 32 + 416 * j
    low = _q6_half16(splat_i32x16(-32 * sums16[2 * b]), w, ob, ob + 256, xq, QK * b)
    high = _q6_half16(splat_i32x16(-32 * sums16[2 * b + 1]), w, ob + 128, ob + 320, xq, QK * b + 16)
    dx = scaled(d, xd[b])
    acc = fma_lanes(acc, low, vmul(int8s_f32x16(w, ob + 384), dx))
    return fma_lanes(acc, high, vmul(int8s_f32x16(w, ob + 400), dx))


Q6_SUPER = 3360  # _SUPER_BYTES[Q6_K]


@njit(cache=True, parallel=True, fastmath=FASTMATH)
def matvec_q6_k16(packed, xq, xd, xs, out):
    """Repacked Q6_K."""
    sums16 = half_block_sums(xq)
    # without reference counting (kernels_cpu.borrow): both threads take views of these arrays for every group
    packed, xq, xd, xs, out = borrowed(packed), borrowed(xq), borrowed(xd), borrowed(xs), borrowed(out)
    for g in prange(packed.shape[0]):
        _q6_k16_group(packed, g, xq, xd, sums16, out)


@njit(cache=True, fastmath=FASTMATH)
def matvec_q6_k16_part(packed, xq, xd, xs, out, g0, g1):
    """matvec_q6_k16's groups g0..g1-1 on the calling thread."""
    sums16 = half_block_sums(xq)
    for g in range(g0, g1):
        _q6_k16_group(packed, g, xq, xd, sums16, out)


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _q6_k16_group(packed, g, xq, xd, sums16, out):
    w, ahead = packed[g], packed[min(g + PREFETCH_GROUPS, packed.shape[0] - 1)]
    acc = zero_f32x16()
    for sb in range(xd.shape[0] // 8):
        o = Q6_SUPER * sb
        _prefetch_range(ahead, o, Q6_SUPER)
        d = halves_f32x16(w, o)
        for j in range(8):
            acc = add_block_q6_16(acc, w, o, d, j, 8 * sb + j, xq, xd, sums16)
    store_f32x16(out, GROUP * g, acc)


def repacked_row_bytes(ggml_type: int, n_cols: int) -> int:
    """Bytes per array row (a group of 16 weight rows) of the repacked layout of a type; 0 if it has none for
    rows of n_cols elements."""
    ggml_type = int(ggml_type)
    if ggml_type in _BLOCK_BYTES and n_cols % QK == 0:
        return n_cols // QK * _BLOCK_BYTES[ggml_type]
    if ggml_type in _SUPER_BYTES and n_cols % 256 == 0:
        return n_cols // 256 * _SUPER_BYTES[ggml_type]
    return 0


# ---------------------------------------------------------------- entry points

TYPE_IDS = frozenset([Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, F32, F16, BF16, Q4_0_R, Q4_1_R,
                      Q5_0_R, Q5_1_R, Q8_0_R, Q4_K_R, Q5_K_R, Q6_K_R])


@njit(cache=True)
def matvec_q8_dispatch(ggml_type, raw, xq, xd, xs, out):
    """matvec_q8 for compiled callers, without checks: an if-chain on the type id (raw ggml type or REPACKED + it).
    An unknown id leaves out as it is. Compiling it compiles every kernel (about a minute, once: cached)."""
    if ggml_type == Q4_1_R:
        matvec_blocks16(raw, xq, xd, xs, out, Q4_1_R)
    elif ggml_type == Q5_0_R:
        matvec_blocks16(raw, xq, xd, xs, out, Q5_0_R)
    elif ggml_type == Q8_0_R:
        matvec_blocks16(raw, xq, xd, xs, out, Q8_0_R)
    elif ggml_type == Q4_K_R:
        matvec_k4_16(raw, xq, xd, xs, out, Q4_K_R)
    elif ggml_type == Q6_K_R:
        matvec_q6_k16(raw, xq, xd, xs, out)
    elif ggml_type == Q4_0_R:
        matvec_blocks16(raw, xq, xd, xs, out, Q4_0_R)
    elif ggml_type == Q5_1_R:
        matvec_blocks16(raw, xq, xd, xs, out, Q5_1_R)
    elif ggml_type == Q5_K_R:
        matvec_k4_16(raw, xq, xd, xs, out, Q5_K_R)
    elif ggml_type == Q4_1:
        matvec_blocks(raw, xq, xd, xs, out, Q4_1)
    elif ggml_type == Q5_0:
        matvec_blocks(raw, xq, xd, xs, out, Q5_0)
    elif ggml_type == Q8_0:
        matvec_blocks(raw, xq, xd, xs, out, Q8_0)
    elif ggml_type == Q4_K:
        matvec_k4(raw, xq, xd, xs, out, Q4_K)
    elif ggml_type == Q6_K:
        matvec_k16(raw, xq, xd, xs, out, Q6_K)
    elif ggml_type == Q4_0:
        matvec_blocks(raw, xq, xd, xs, out, Q4_0)
    elif ggml_type == Q5_1:
        matvec_blocks(raw, xq, xd, xs, out, Q5_1)
    elif ggml_type == Q5_K:
        matvec_k4(raw, xq, xd, xs, out, Q5_K)
    elif ggml_type == Q3_K:
        matvec_k16(raw, xq, xd, xs, out, Q3_K)
    elif ggml_type == Q2_K:
        matvec_k16(raw, xq, xd, xs, out, Q2_K)
    elif ggml_type == F32:
        matvec_float(raw, xq, xd, xs, out, F32)
    elif ggml_type == F16:
        matvec_float(raw, xq, xd, xs, out, F16)
    elif ggml_type == BF16:
        matvec_float(raw, xq, xd, xs, out, BF16)


@njit(cache=True)
def matvec_q8_part(ggml_type, raw, xq, xd, xs, out, u0, u1):
    """matvec_q8_dispatch's units u0..u1-1 on the calling thread (a share of a team's matvec; matvec_units gives
    the count): groups of 16 rows of a repacked layout, of 4 rows of raw blocks, rows of float weights."""
    if ggml_type == Q4_1_R:
        matvec_blocks16_part(raw, xq, xd, xs, out, Q4_1_R, u0, u1)
    elif ggml_type == Q5_0_R:
        matvec_blocks16_part(raw, xq, xd, xs, out, Q5_0_R, u0, u1)
    elif ggml_type == Q8_0_R:
        matvec_blocks16_part(raw, xq, xd, xs, out, Q8_0_R, u0, u1)
    elif ggml_type == Q4_K_R:
        matvec_k4_16_part(raw, xq, xd, xs, out, Q4_K_R, u0, u1)
    elif ggml_type == Q6_K_R:
        matvec_q6_k16_part(raw, xq, xd, xs, out, u0, u1)
    elif ggml_type == Q4_0_R:
        matvec_blocks16_part(raw, xq, xd, xs, out, Q4_0_R, u0, u1)
    elif ggml_type == Q5_1_R:
        matvec_blocks16_part(raw, xq, xd, xs, out, Q5_1_R, u0, u1)
    elif ggml_type == Q5_K_R:
        matvec_k4_16_part(raw, xq, xd, xs, out, Q5_K_R, u0, u1)
    elif ggml_type == Q4_1:
        matvec_blocks_part(raw, xq, xd, xs, out, Q4_1, u0, u1)
    elif ggml_type == Q5_0:
        matvec_blocks_part(raw, xq, xd, xs, out, Q5_0, u0, u1)
    elif ggml_type == Q8_0:
        matvec_blocks_part(raw, xq, xd, xs, out, Q8_0, u0, u1)
    elif ggml_type == Q4_K:
        matvec_k4_part(raw, xq, xd, xs, out, Q4_K, u0, u1)
    elif ggml_type == Q6_K:
        matvec_k16_part(raw, xq, xd, xs, out, Q6_K, u0, u1)
    elif ggml_type == Q4_0:
        matvec_blocks_part(raw, xq, xd, xs, out, Q4_0, u0, u1)
    elif ggml_type == Q5_1:
        matvec_blocks_part(raw, xq, xd, xs, out, Q5_1, u0, u1)
    elif ggml_type == Q5_K:
        matvec_k4_part(raw, xq, xd, xs, out, Q5_K, u0, u1)
    elif ggml_type == Q3_K:
        matvec_k16_part(raw, xq, xd, xs, out, Q3_K, u0, u1)
    elif ggml_type == Q2_K:
        matvec_k16_part(raw, xq, xd, xs, out, Q2_K, u0, u1)
    elif ggml_type == F32:
        matvec_float_part(raw, xq, xd, xs, out, F32, u0, u1)
    elif ggml_type == F16:
        matvec_float_part(raw, xq, xd, xs, out, F16, u0, u1)
    elif ggml_type == BF16:
        matvec_float_part(raw, xq, xd, xs, out, BF16, u0, u1)


@njit(cache=True)
def matvec_units(type_id, n_rows):
    """How many units (the items matvec_q8_part shares out) a matrix of n_rows weight rows has."""
    if type_id >= REPACKED:
        return n_rows // GROUP
    if type_id == F32 or type_id == F16 or type_id == BF16:
        return n_rows
    return (n_rows + 3) // 4


@njit(cache=True)
def weight_rows(type_id, n_rows):
    """How many array rows hold n_rows weight rows in the layout of type_id (one per 16 when repacked)."""
    return n_rows // GROUP if type_id >= REPACKED else n_rows


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
    either raw ggml blocks uint8[n_rows, row_bytes] (ggml_type a ggml type id) or repacked by repack.repack (the type id
    it returned). Returns float32[n_rows] (into `out` if given). Raises ValueError for an unsupported type or
    mismatched shapes."""
    n = check_activations(xq, xd, xs)
    raw, n_rows = check_weights(ggml_type, raw, n)
    out = check_out(out, (n_rows,))
    # (the dispatch: calling a literally() kernel from Python costs ~50 ms)
    call_parallel(matvec_q8_dispatch, int(ggml_type), raw, xq, xd, xs, out)
    return out


def check_weights(type_id: int, w: np.ndarray, n_cols: int) -> tuple[np.ndarray, int]:
    """Validate a weight matrix of rows of n_cols elements in the layout of type_id (raw ggml blocks or repacked);
    returns (the array, n_rows). Raises ValueError naming the mismatch."""
    type_id = int(type_id)
    if type_id < REPACKED:
        w = check_raw(type_id, w, n_cols)
        return w, w.shape[0]
    expected = repacked_row_bytes(type_id - REPACKED, n_cols)
    if not (expected and type_id in TYPE_IDS and isinstance(w, np.ndarray) and w.dtype == np.uint8
            and w.ndim == 2 and w.shape[1] == expected and w.flags.c_contiguous):
        raise ValueError(f"type id {type_id}: not a repacked layout of rows of {n_cols} elements")
    if w.flags.writeable:  # read-only like file views: one Numba specialization
        w = w.view()
        w.flags.writeable = False
    return w, GROUP * w.shape[0]
