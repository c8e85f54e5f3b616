"""The inner loops of attention over one tile of keys: scores and weighted values, register-blocked.

kernels_cpu.attention runs jobs (a block of rows against one KV head's cache) tile by tile; for each tile it calls
`tile_scores` (query vectors . keys), its own online softmax, then `tile_values` (the softmax weights times the
values). Keys arrive in blocks of 16 positions, one SIMD vector per dimension (kernels_cpu.kv_types), so 16 keys are
scored per instruction however few query vectors a job has. f32 and f16 keys and values are float32 (a widened tile)
or the cache's own arrays (a decode row's job, which converts each vector as it loads it): `key_vector` and
`value_vector` read either, and both give the same float32 values. q8_0 keys are scored in int8 against the job's
queries quantized to q8_0 (`_q8_scores_*`): one dot-product instruction takes 4 dimensions of 16 keys, each 32
dimensions' integer sum then times the key's and the query's scales. Each score and each output lane is one chain of
fused multiply-adds in a fixed order (integer sums are exact), so a row's result does not depend on which kernel or
batch computed it.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels_cpu.kv_types import KEY_BLOCK, QK, key_vector, value_vector
from kernels_cpu.simd import (PATH, dot_i8_biased, fma_f32x16, hint_l2_part, hint_share, key_quads_i8x64, load_f32x16,
                              scaled, splat4_i8x64, splat_f32x16, splat_i32x16, store_f32x16, to_float, vmul,
                              zero_f32x16)

TILE = 64  # keys per tile
# 32 vector registers: the weighted values in blocks of 4 vectors x 64 dims, the scores of 4 query vectors x 4 key
# blocks at once
WIDE_VALUES = PATH == "avx512vnni"
# fast float math, but with infinities kept: -inf marks a vector that has seen no key yet
FASTMATH = {"nsz", "arcp", "contract", "afn", "reassoc"}
# `ahead`: the coming tile of a decode job, hinted into L2 spread over the dimensions (scores) or keys (values) of
# the current one; None for prompt blocks, whose tiles are widened first and worked on long enough for the hardware's
# own prefetching. Every 4-vector group and every 64-dim slab of a tile hints the whole coming tile: a decode job has
# one or two of them (four at Gemma's head dim 256), and a line already on its way costs a hint little.


@njit(cache=True, inline="always")
def _fma2(x, v0, v1, a0, a1):
    """(a0 + x * v0, a1 + x * v1): one broadcast value times two vectors, two independent chains."""
    return fma_f32x16(x, v0, a0), fma_f32x16(x, v1, a1)


@njit(cache=True, inline="always")
def _fma4(x, v0, v1, v2, v3, a0, a1, a2, a3):
    """(a0 + x * v0, ..., a3 + x * v3): one broadcast value times four vectors, four independent chains."""
    return fma_f32x16(x, v0, a0), fma_f32x16(x, v1, a1), fma_f32x16(x, v2, a2), fma_f32x16(x, v3, a3)


def tile_scores(queries, keys, key_scales, nv, softcap, scores, ahead):
    """scores[v, j] = the key at position j of the tile . query vector v, for the tile's key blocks keys (n_blocks,
    d_k, 16) and the first nv vectors, with softcap > 0 capped to softcap * tanh(score / softcap) (Gemma 2's
    attention logit soft-capping, as llama.cpp's flash attention). queries: (qs, q8, qd, q_bias), the vectors in
    float32 (rows, d_k), and for q8_0 keys as q8_0 (kernels_cpu.kv_types.quantize_queries). Positions past the
    tile's end get scores too (of whatever the block holds there): the softmax masks them. The query arrays and
    scores have nv rounded up to a multiple of 4 rows (the padding rows zero); a last group of 3 vectors is scored
    without its padding row, and a decode row's group of 7 (f32 and f16 keys) 7 vectors at a time."""


@overload(tile_scores, inline="always")
def _tile_scores(queries, keys, key_scales, nv, softcap, scores, ahead):
    if keys.dtype == types.int8:
        def scores_q8_0(queries, keys, key_scales, nv, softcap, scores, ahead):
            _q8_scores(queries[1], queries[2], queries[3], keys, key_scales, nv, scores, ahead)
            _cap(scores, keys.shape[0], nv, softcap)
        return scores_q8_0

    def scores_f32(queries, keys, key_scales, nv, softcap, scores, ahead):
        _f32_scores(queries[0], keys, key_scales, nv, scores, ahead)
        _cap(scores, keys.shape[0], nv, softcap)
    return scores_f32


@njit(cache=True, fastmath=FASTMATH)
def _cap(scores, n_blocks, nv, softcap):
    if softcap > 0.0:
        cap = np.float32(softcap)
        inverse = np.float32(1.0 / softcap)
        for v in range(nv):
            row_scores = scores[v]
            for j in range(n_blocks * KEY_BLOCK):
                row_scores[j] = cap * np.tanh(row_scores[j] * inverse)


@njit(cache=True, fastmath=FASTMATH)
def _f32_scores(qs, keys, key_scales, nv, scores, ahead):
    """tile_scores for float32 keys (or raw f16 ones): 16 keys per SIMD vector, each score one chain of fused
    multiply-adds over the dimensions in order."""
    n_blocks, d = keys.shape[0], keys.shape[1]
    if WIDE_VALUES and nv == 7 and n_blocks == 4:  # a decode row of a GQA group of 7 (Qwen2.5): see _scores_7x2
        _scores_7x2(qs, keys, key_scales, 0, d, scores, ahead)
        _scores_7x2(qs, keys, key_scales, 2, d, scores, ahead)
        return
    v = 0
    if WIDE_VALUES:  # 4 vectors x 4 blocks: 16 independent chains, each key load shared by 4 vectors. A last group
        # of fewer than 4 takes the zero padding rows along (their scores are never read): a decode row of SmolLM2
        # (3 vectors) ran its third vector alone in 2 chains, as long as the first two together.
        while v < nv:
            if n_blocks == 4 and nv - v == 3:  # a GQA group of 3: no padding vector's work
                _scores_3x4(qs, keys, key_scales, v, d, scores, ahead)
            elif n_blocks == 4:
                _scores_4x4(qs, keys, key_scales, v, d, scores, ahead)
            else:  # the last tile of a range (a prompt block's causal edge): 4 vectors x 2 blocks, then x 1
                for b in range(0, n_blocks - 1, 2):
                    _scores_4x2(qs, keys, key_scales, v, b, d, scores)
                if n_blocks % 2:
                    _scores_4x1(qs, keys, key_scales, v, n_blocks - 1, d, scores)
            v += 4
    while v < nv:
        qv = qs[v]
        b = 0
        while b + 2 <= n_blocks:
            a0 = a1 = zero_f32x16()
            for c in range(d):
                x = splat_f32x16(qv[c])
                a0 = fma_f32x16(x, key_vector(keys, key_scales, b, c), a0)
                a1 = fma_f32x16(x, key_vector(keys, key_scales, b + 1, c), a1)
            store_f32x16(scores, v * TILE + b * KEY_BLOCK, a0)
            store_f32x16(scores, v * TILE + (b + 1) * KEY_BLOCK, a1)
            b += 2
        if b < n_blocks:
            a0 = zero_f32x16()
            for c in range(d):
                a0 = fma_f32x16(splat_f32x16(qv[c]), key_vector(keys, key_scales, b, c), a0)
            store_f32x16(scores, v * TILE + b * KEY_BLOCK, a0)
        v += 1


@njit(cache=True, inline="always")
def _scores_4x4(qs, keys, key_scales, v, d, scores, ahead):
    """Scores of query vectors v..v+3 against a whole tile (4 key blocks): 16 accumulators (AVX-512's 32 registers
    hold them), so a prompt block's many vectors load each key vector once per 4 of them."""
    q0, q1, q2, q3 = qs[v], qs[v + 1], qs[v + 2], qs[v + 3]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = zero_f32x16()
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = zero_f32x16()
    share = hint_share(ahead, d)
    for c in range(d):
        hint_l2_part(ahead, c, share)
        k0, k1 = key_vector(keys, key_scales, 0, c), key_vector(keys, key_scales, 1, c)
        k2, k3 = key_vector(keys, key_scales, 2, c), key_vector(keys, key_scales, 3, c)
        a00, a01, a02, a03 = _fma4(splat_f32x16(q0[c]), k0, k1, k2, k3, a00, a01, a02, a03)
        a10, a11, a12, a13 = _fma4(splat_f32x16(q1[c]), k0, k1, k2, k3, a10, a11, a12, a13)
        a20, a21, a22, a23 = _fma4(splat_f32x16(q2[c]), k0, k1, k2, k3, a20, a21, a22, a23)
        a30, a31, a32, a33 = _fma4(splat_f32x16(q3[c]), k0, k1, k2, k3, a30, a31, a32, a33)
    _store_4x4(scores, v, ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23), (a30, a31, a32, a33)))


@njit(cache=True, inline="always")
def _scores_3x4(qs, keys, key_scales, v, d, scores, ahead):
    """_scores_4x4 for query vectors v..v+2 only: 12 accumulators, each score's chain the same as there."""
    q0, q1, q2 = qs[v], qs[v + 1], qs[v + 2]
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = a20 = a21 = a22 = a23 = zero_f32x16()
    share = hint_share(ahead, d)
    for c in range(d):
        hint_l2_part(ahead, c, share)
        k0, k1 = key_vector(keys, key_scales, 0, c), key_vector(keys, key_scales, 1, c)
        k2, k3 = key_vector(keys, key_scales, 2, c), key_vector(keys, key_scales, 3, c)
        a00, a01, a02, a03 = _fma4(splat_f32x16(q0[c]), k0, k1, k2, k3, a00, a01, a02, a03)
        a10, a11, a12, a13 = _fma4(splat_f32x16(q1[c]), k0, k1, k2, k3, a10, a11, a12, a13)
        a20, a21, a22, a23 = _fma4(splat_f32x16(q2[c]), k0, k1, k2, k3, a20, a21, a22, a23)
    _store_4x4(scores, v, ((a00, a01, a02, a03), (a10, a11, a12, a13), (a20, a21, a22, a23)))


@njit(cache=True, inline="always")
def _scores_7x2(qs, keys, key_scales, b, d, scores, ahead):
    """Scores of query vectors 0..6 (a GQA group of 7, one decode row) against key blocks b, b+1: 14 accumulators,
    so each key vector is converted once for all 7 vectors (as 4 + 3 vectors x 4 blocks it was twice); each
    score's chain the same as there. Called for blocks 0-1, then 2-3: each call hints half the coming tile."""
    q0, q1, q2, q3, q4, q5, q6 = qs[0], qs[1], qs[2], qs[3], qs[4], qs[5], qs[6]
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = a40 = a41 = a50 = a51 = a60 = a61 = zero_f32x16()
    share = hint_share(ahead, 2 * d)
    for c in range(d):
        hint_l2_part(ahead, (b // 2) * d + c, share)
        k0, k1 = key_vector(keys, key_scales, b, c), key_vector(keys, key_scales, b + 1, c)
        a00, a01 = _fma2(splat_f32x16(q0[c]), k0, k1, a00, a01)
        a10, a11 = _fma2(splat_f32x16(q1[c]), k0, k1, a10, a11)
        a20, a21 = _fma2(splat_f32x16(q2[c]), k0, k1, a20, a21)
        a30, a31 = _fma2(splat_f32x16(q3[c]), k0, k1, a30, a31)
        a40, a41 = _fma2(splat_f32x16(q4[c]), k0, k1, a40, a41)
        a50, a51 = _fma2(splat_f32x16(q5[c]), k0, k1, a50, a51)
        a60, a61 = _fma2(splat_f32x16(q6[c]), k0, k1, a60, a61)
    for i, (a, a_next) in enumerate(((a00, a01), (a10, a11), (a20, a21), (a30, a31), (a40, a41), (a50, a51),
                                     (a60, a61))):
        store_f32x16(scores, i * TILE + b * KEY_BLOCK, a)
        store_f32x16(scores, i * TILE + (b + 1) * KEY_BLOCK, a_next)


@njit(cache=True, inline="always")
def _store_4x4(scores, v, rows):
    """The scores of query vectors v..v+3 (rows[i]: vector v + i's 4 key blocks) into their rows of scores."""
    for i, row in enumerate(rows):
        for b, a in enumerate(row):
            store_f32x16(scores, (v + i) * TILE + b * KEY_BLOCK, a)


@njit(cache=True, inline="always")
def _scores_4x2(qs, keys, key_scales, v, b, d, scores):
    """Scores of query vectors v..v+3 against key blocks b, b+1: _scores_4x4 for a tile's last, partial part."""
    q0, q1, q2, q3 = qs[v], qs[v + 1], qs[v + 2], qs[v + 3]
    a00 = a01 = a10 = a11 = a20 = a21 = a30 = a31 = zero_f32x16()
    for c in range(d):
        k0, k1 = key_vector(keys, key_scales, b, c), key_vector(keys, key_scales, b + 1, c)
        x0, x1, x2, x3 = splat_f32x16(q0[c]), splat_f32x16(q1[c]), splat_f32x16(q2[c]), splat_f32x16(q3[c])
        a00, a01, a10, a11 = fma_f32x16(x0, k0, a00), fma_f32x16(x0, k1, a01), fma_f32x16(x1, k0, a10), \
            fma_f32x16(x1, k1, a11)
        a20, a21, a30, a31 = fma_f32x16(x2, k0, a20), fma_f32x16(x2, k1, a21), fma_f32x16(x3, k0, a30), \
            fma_f32x16(x3, k1, a31)
    for i, (a, a_next) in enumerate(((a00, a01), (a10, a11), (a20, a21), (a30, a31))):
        store_f32x16(scores, (v + i) * TILE + b * KEY_BLOCK, a)
        store_f32x16(scores, (v + i) * TILE + (b + 1) * KEY_BLOCK, a_next)


@njit(cache=True, inline="always")
def _scores_4x1(qs, keys, key_scales, v, b, d, scores):
    """Scores of query vectors v..v+3 against key block b."""
    q0, q1, q2, q3 = qs[v], qs[v + 1], qs[v + 2], qs[v + 3]
    a0 = a1 = a2 = a3 = zero_f32x16()
    for c in range(d):
        k = key_vector(keys, key_scales, b, c)
        a0, a1 = fma_f32x16(splat_f32x16(q0[c]), k, a0), fma_f32x16(splat_f32x16(q1[c]), k, a1)
        a2, a3 = fma_f32x16(splat_f32x16(q2[c]), k, a2), fma_f32x16(splat_f32x16(q3[c]), k, a3)
    for i, a in enumerate((a0, a1, a2, a3)):
        store_f32x16(scores, (v + i) * TILE + b * KEY_BLOCK, a)


@njit(cache=True, fastmath=FASTMATH)
def _q8_scores(q8, qd, q_bias, keys, key_scales, nv, scores, ahead):
    """tile_scores for q8_0 keys (n_blocks, d_k, 16) int8 with scales (n_blocks, d_k / 32, 16), against the query
    vectors as q8_0 (q8 (rows, d_k), qd and q_bias (rows, d_k / 32)): per 32 dimensions an exact int32 sum of
    products (dot_i8_biased, from q_bias), then score += float(sum) * (key scale * query scale), one fused
    multiply-add chain over the blocks in order. In groups of 4 vectors (the padding rows are zero)."""
    n_blocks = keys.shape[0]
    for v in range(0, nv, 4):
        if WIDE_VALUES and n_blocks == 4 and nv - v == 3:  # a GQA group of 3: no padding vector's work
            _q8_scores_3x4(q8, qd, q_bias, keys, key_scales, v, scores, ahead)
        elif WIDE_VALUES and n_blocks == 4:
            _q8_scores_4x4(q8, qd, q_bias, keys, key_scales, v, scores, ahead)
        else:
            for b in range(n_blocks):
                _q8_scores_4x1(q8, qd, q_bias, keys, key_scales, v, b, scores)


@njit(cache=True, inline="always")
def _q8_scale(key_scales, b, kb, qd):
    """The 16 keys' scales of block b, dimensions 32 kb.., times the query's (the factor an int32 sum is scored
    with)."""
    return scaled(load_f32x16(key_scales, (b * key_scales.shape[1] + kb) * KEY_BLOCK), qd)


@njit(cache=True, inline="always")
def _q8_scores_4x4(q8, qd, q_bias, keys, key_scales, v, scores, ahead):
    """Scores of query vectors v..v+3 against a whole tile (4 key blocks): 16 int32 sums per 32 dimensions, each key
    load (4 dimensions of 16 keys) shared by the 4 vectors."""
    d = keys.shape[1]
    f00 = f01 = f02 = f03 = f10 = f11 = f12 = f13 = zero_f32x16()
    f20 = f21 = f22 = f23 = f30 = f31 = f32 = f33 = zero_f32x16()
    share = hint_share(ahead, d // 4)
    for kb in range(d // QK):
        i00 = i01 = i02 = i03 = splat_i32x16(q_bias[v, kb])
        i10 = i11 = i12 = i13 = splat_i32x16(q_bias[v + 1, kb])
        i20 = i21 = i22 = i23 = splat_i32x16(q_bias[v + 2, kb])
        i30 = i31 = i32 = i33 = splat_i32x16(q_bias[v + 3, kb])
        for c in range(kb * QK, kb * QK + QK, 4):
            hint_l2_part(ahead, c // 4, share)
            k0, k1 = key_quads_i8x64(keys, c * KEY_BLOCK), key_quads_i8x64(keys, (d + c) * KEY_BLOCK)
            k2, k3 = key_quads_i8x64(keys, (2 * d + c) * KEY_BLOCK), key_quads_i8x64(keys, (3 * d + c) * KEY_BLOCK)
            x = splat4_i8x64(q8, v * d + c)
            i00, i01, i02, i03 = _dot4(x, k0, k1, k2, k3, i00, i01, i02, i03)
            x = splat4_i8x64(q8, (v + 1) * d + c)
            i10, i11, i12, i13 = _dot4(x, k0, k1, k2, k3, i10, i11, i12, i13)
            x = splat4_i8x64(q8, (v + 2) * d + c)
            i20, i21, i22, i23 = _dot4(x, k0, k1, k2, k3, i20, i21, i22, i23)
            x = splat4_i8x64(q8, (v + 3) * d + c)
            i30, i31, i32, i33 = _dot4(x, k0, k1, k2, k3, i30, i31, i32, i33)
        f00, f01, f02, f03 = _scale4(key_scales, kb, qd[v, kb], i00, i01, i02, i03, f00, f01, f02, f03)
        f10, f11, f12, f13 = _scale4(key_scales, kb, qd[v + 1, kb], i10, i11, i12, i13, f10, f11, f12, f13)
        f20, f21, f22, f23 = _scale4(key_scales, kb, qd[v + 2, kb], i20, i21, i22, i23, f20, f21, f22, f23)
        f30, f31, f32, f33 = _scale4(key_scales, kb, qd[v + 3, kb], i30, i31, i32, i33, f30, f31, f32, f33)
    _store_4x4(scores, v, ((f00, f01, f02, f03), (f10, f11, f12, f13), (f20, f21, f22, f23), (f30, f31, f32, f33)))


@njit(cache=True, inline="always")
def _q8_scores_3x4(q8, qd, q_bias, keys, key_scales, v, scores, ahead):
    """_q8_scores_4x4 for query vectors v..v+2 only: 12 int32 sums per 32 dimensions."""
    d = keys.shape[1]
    f00 = f01 = f02 = f03 = f10 = f11 = f12 = f13 = f20 = f21 = f22 = f23 = zero_f32x16()
    share = hint_share(ahead, d // 4)
    for kb in range(d // QK):
        i00 = i01 = i02 = i03 = splat_i32x16(q_bias[v, kb])
        i10 = i11 = i12 = i13 = splat_i32x16(q_bias[v + 1, kb])
        i20 = i21 = i22 = i23 = splat_i32x16(q_bias[v + 2, kb])
        for c in range(kb * QK, kb * QK + QK, 4):
            hint_l2_part(ahead, c // 4, share)
            k0, k1 = key_quads_i8x64(keys, c * KEY_BLOCK), key_quads_i8x64(keys, (d + c) * KEY_BLOCK)
            k2, k3 = key_quads_i8x64(keys, (2 * d + c) * KEY_BLOCK), key_quads_i8x64(keys, (3 * d + c) * KEY_BLOCK)
            x = splat4_i8x64(q8, v * d + c)
            i00, i01, i02, i03 = _dot4(x, k0, k1, k2, k3, i00, i01, i02, i03)
            x = splat4_i8x64(q8, (v + 1) * d + c)
            i10, i11, i12, i13 = _dot4(x, k0, k1, k2, k3, i10, i11, i12, i13)
            x = splat4_i8x64(q8, (v + 2) * d + c)
            i20, i21, i22, i23 = _dot4(x, k0, k1, k2, k3, i20, i21, i22, i23)
        f00, f01, f02, f03 = _scale4(key_scales, kb, qd[v, kb], i00, i01, i02, i03, f00, f01, f02, f03)
        f10, f11, f12, f13 = _scale4(key_scales, kb, qd[v + 1, kb], i10, i11, i12, i13, f10, f11, f12, f13)
        f20, f21, f22, f23 = _scale4(key_scales, kb, qd[v + 2, kb], i20, i21, i22, i23, f20, f21, f22, f23)
    _store_4x4(scores, v, ((f00, f01, f02, f03), (f10, f11, f12, f13), (f20, f21, f22, f23)))


@njit(cache=True, inline="always")
def _dot4(x, k0, k1, k2, k3, a0, a1, a2, a3):
    """One query's 4 bytes (in every lane) against 4 key vectors: four independent int32 sums."""
    return dot_i8_biased(a0, k0, x), dot_i8_biased(a1, k1, x), dot_i8_biased(a2, k2, x), dot_i8_biased(a3, k3, x)


@njit(cache=True, inline="always")
def _scale4(key_scales, kb, qd, i0, i1, i2, i3, f0, f1, f2, f3):
    """f_b + float(i_b) * (key scales of block b x qd), for the 4 key blocks of a tile."""
    return (fma_f32x16(to_float(i0), _q8_scale(key_scales, 0, kb, qd), f0),
            fma_f32x16(to_float(i1), _q8_scale(key_scales, 1, kb, qd), f1),
            fma_f32x16(to_float(i2), _q8_scale(key_scales, 2, kb, qd), f2),
            fma_f32x16(to_float(i3), _q8_scale(key_scales, 3, kb, qd), f3))


@njit(cache=True, inline="always")
def _q8_scores_4x1(q8, qd, q_bias, keys, key_scales, v, b, scores):
    """Scores of query vectors v..v+3 against key block b: _q8_scores_4x4's arithmetic, one block at a time."""
    d = keys.shape[1]
    f0 = f1 = f2 = f3 = zero_f32x16()
    for kb in range(d // QK):
        i0, i1 = splat_i32x16(q_bias[v, kb]), splat_i32x16(q_bias[v + 1, kb])
        i2, i3 = splat_i32x16(q_bias[v + 2, kb]), splat_i32x16(q_bias[v + 3, kb])
        for c in range(kb * QK, kb * QK + QK, 4):
            k = key_quads_i8x64(keys, (b * d + c) * KEY_BLOCK)
            i0 = dot_i8_biased(i0, k, splat4_i8x64(q8, v * d + c))
            i1 = dot_i8_biased(i1, k, splat4_i8x64(q8, (v + 1) * d + c))
            i2 = dot_i8_biased(i2, k, splat4_i8x64(q8, (v + 2) * d + c))
            i3 = dot_i8_biased(i3, k, splat4_i8x64(q8, (v + 3) * d + c))
        f0 = fma_f32x16(to_float(i0), _q8_scale(key_scales, b, kb, qd[v, kb]), f0)
        f1 = fma_f32x16(to_float(i1), _q8_scale(key_scales, b, kb, qd[v + 1, kb]), f1)
        f2 = fma_f32x16(to_float(i2), _q8_scale(key_scales, b, kb, qd[v + 2, kb]), f2)
        f3 = fma_f32x16(to_float(i3), _q8_scale(key_scales, b, kb, qd[v + 3, kb]), f3)
    for i, a in enumerate((f0, f1, f2, f3)):
        store_f32x16(scores, (v + i) * TILE + b * KEY_BLOCK, a)


@njit(cache=True, fastmath=FASTMATH)
def tile_values(weights, values, value_scales, n, nv, correction, acc, ahead):
    """acc[v] = acc[v] * correction[v] + sum over the tile's n keys j of weights[v, j] * values[j], for the first nv
    query vectors (in fours, a last group of 3 alone, a decode row's group of 7 at once: rows past nv are padding):
    each output lane one chain of fused multiply-adds over the keys in order, blocks of 4 vectors x 64 (or x 16) dims
    (7 x 32) held in registers across the tile."""
    d_v = values.shape[1]
    if WIDE_VALUES and nv == 7 and d_v % 32 == 0:  # a decode row of a GQA group of 7 (Qwen2.5): see _values_7x32
        for c0 in range(0, d_v, 32):
            _values_7x32(weights, values, value_scales, n, c0, correction, acc, ahead)
        return
    for v0 in range(0, nv, 4):
        c0 = 0
        if WIDE_VALUES and nv - v0 == 3:  # a GQA group of 3 (SmolLM2; Qwen2.5's 7 = 4 + 3): no padding vector's work
            while c0 + 64 <= d_v:
                _values_3x64(weights, values, value_scales, n, v0, c0, correction, acc, ahead)
                c0 += 64
        elif WIDE_VALUES:
            while c0 + 64 <= d_v:
                _values_4x64(weights, values, value_scales, n, v0, c0, correction, acc, ahead)
                c0 += 64
        while c0 < d_v:
            _values_4x16(weights, values, value_scales, n, v0, c0, correction, acc)
            c0 += 16


@njit(cache=True, inline="always")
def _values_4x16(weights, values, value_scales, n, v0, c0, correction, acc):
    d_v = acc.shape[1]
    a0 = vmul(load_f32x16(acc, v0 * d_v + c0), splat_f32x16(correction[v0]))
    a1 = vmul(load_f32x16(acc, (v0 + 1) * d_v + c0), splat_f32x16(correction[v0 + 1]))
    a2 = vmul(load_f32x16(acc, (v0 + 2) * d_v + c0), splat_f32x16(correction[v0 + 2]))
    a3 = vmul(load_f32x16(acc, (v0 + 3) * d_v + c0), splat_f32x16(correction[v0 + 3]))
    w0, w1, w2, w3 = weights[v0], weights[v0 + 1], weights[v0 + 2], weights[v0 + 3]
    for j in range(n):
        x = value_vector(values, value_scales, j, c0)
        a0 = fma_f32x16(splat_f32x16(w0[j]), x, a0)
        a1 = fma_f32x16(splat_f32x16(w1[j]), x, a1)
        a2 = fma_f32x16(splat_f32x16(w2[j]), x, a2)
        a3 = fma_f32x16(splat_f32x16(w3[j]), x, a3)
    store_f32x16(acc, v0 * d_v + c0, a0)
    store_f32x16(acc, (v0 + 1) * d_v + c0, a1)
    store_f32x16(acc, (v0 + 2) * d_v + c0, a2)
    store_f32x16(acc, (v0 + 3) * d_v + c0, a3)


@njit(cache=True, inline="always")
def _values_4x64(weights, values, value_scales, n, v0, c0, correction, acc, ahead):
    """_values_4x16 over 64 dims at once: 16 accumulators (AVX-512's 32 registers hold them; AVX2's 16 do not)."""
    d_v = acc.shape[1]
    r0, r1, r2, r3 = v0 * d_v + c0, (v0 + 1) * d_v + c0, (v0 + 2) * d_v + c0, (v0 + 3) * d_v + c0
    a00, a01, a02, a03 = _load64_scaled(acc, r0, correction[v0])
    a10, a11, a12, a13 = _load64_scaled(acc, r1, correction[v0 + 1])
    a20, a21, a22, a23 = _load64_scaled(acc, r2, correction[v0 + 2])
    a30, a31, a32, a33 = _load64_scaled(acc, r3, correction[v0 + 3])
    wr0, wr1, wr2, wr3 = weights[v0], weights[v0 + 1], weights[v0 + 2], weights[v0 + 3]
    share = hint_share(ahead, TILE)
    for j in range(n):
        hint_l2_part(ahead, j, share)
        x0, x1 = value_vector(values, value_scales, j, c0), value_vector(values, value_scales, j, c0 + 16)
        x2, x3 = value_vector(values, value_scales, j, c0 + 32), value_vector(values, value_scales, j, c0 + 48)
        a00, a01, a02, a03 = _fma4(splat_f32x16(wr0[j]), x0, x1, x2, x3, a00, a01, a02, a03)
        a10, a11, a12, a13 = _fma4(splat_f32x16(wr1[j]), x0, x1, x2, x3, a10, a11, a12, a13)
        a20, a21, a22, a23 = _fma4(splat_f32x16(wr2[j]), x0, x1, x2, x3, a20, a21, a22, a23)
        a30, a31, a32, a33 = _fma4(splat_f32x16(wr3[j]), x0, x1, x2, x3, a30, a31, a32, a33)
    _store64(acc, r0, a00, a01, a02, a03)
    _store64(acc, r1, a10, a11, a12, a13)
    _store64(acc, r2, a20, a21, a22, a23)
    _store64(acc, r3, a30, a31, a32, a33)


@njit(cache=True, inline="always")
def _values_3x64(weights, values, value_scales, n, v0, c0, correction, acc, ahead):
    """_values_4x64 for vectors v0..v0+2 only: 12 accumulators, each lane's chain the same as there."""
    d_v = acc.shape[1]
    r0, r1, r2 = v0 * d_v + c0, (v0 + 1) * d_v + c0, (v0 + 2) * d_v + c0
    a00, a01, a02, a03 = _load64_scaled(acc, r0, correction[v0])
    a10, a11, a12, a13 = _load64_scaled(acc, r1, correction[v0 + 1])
    a20, a21, a22, a23 = _load64_scaled(acc, r2, correction[v0 + 2])
    wr0, wr1, wr2 = weights[v0], weights[v0 + 1], weights[v0 + 2]
    share = hint_share(ahead, TILE)
    for j in range(n):
        hint_l2_part(ahead, j, share)
        x0, x1 = value_vector(values, value_scales, j, c0), value_vector(values, value_scales, j, c0 + 16)
        x2, x3 = value_vector(values, value_scales, j, c0 + 32), value_vector(values, value_scales, j, c0 + 48)
        a00, a01, a02, a03 = _fma4(splat_f32x16(wr0[j]), x0, x1, x2, x3, a00, a01, a02, a03)
        a10, a11, a12, a13 = _fma4(splat_f32x16(wr1[j]), x0, x1, x2, x3, a10, a11, a12, a13)
        a20, a21, a22, a23 = _fma4(splat_f32x16(wr2[j]), x0, x1, x2, x3, a20, a21, a22, a23)
    _store64(acc, r0, a00, a01, a02, a03)
    _store64(acc, r1, a10, a11, a12, a13)
    _store64(acc, r2, a20, a21, a22, a23)


@njit(cache=True, inline="always")
def _values_7x32(weights, values, value_scales, n, c0, correction, acc, ahead):
    """The weighted values of query vectors 0..6 (a GQA group of 7, one decode row), dims c0..c0+31: 14
    accumulators, so each value vector is loaded (converted, and for q8_0 scaled) once for all 7 vectors (as 4 + 3
    vectors x 64 dims it was twice); each lane's chain the same as there. Each call hints its share of the coming
    tile (d_v / 32 calls)."""
    d_v = acc.shape[1]
    a00, a01 = _load32_scaled(acc, c0, correction[0])
    a10, a11 = _load32_scaled(acc, d_v + c0, correction[1])
    a20, a21 = _load32_scaled(acc, 2 * d_v + c0, correction[2])
    a30, a31 = _load32_scaled(acc, 3 * d_v + c0, correction[3])
    a40, a41 = _load32_scaled(acc, 4 * d_v + c0, correction[4])
    a50, a51 = _load32_scaled(acc, 5 * d_v + c0, correction[5])
    a60, a61 = _load32_scaled(acc, 6 * d_v + c0, correction[6])
    w0, w1, w2, w3, w4, w5, w6 = weights[0], weights[1], weights[2], weights[3], weights[4], weights[5], weights[6]
    share = hint_share(ahead, TILE * (d_v // 32))
    for j in range(n):
        hint_l2_part(ahead, (c0 // 32) * TILE + j, share)
        x0, x1 = value_vector(values, value_scales, j, c0), value_vector(values, value_scales, j, c0 + 16)
        a00, a01 = _fma2(splat_f32x16(w0[j]), x0, x1, a00, a01)
        a10, a11 = _fma2(splat_f32x16(w1[j]), x0, x1, a10, a11)
        a20, a21 = _fma2(splat_f32x16(w2[j]), x0, x1, a20, a21)
        a30, a31 = _fma2(splat_f32x16(w3[j]), x0, x1, a30, a31)
        a40, a41 = _fma2(splat_f32x16(w4[j]), x0, x1, a40, a41)
        a50, a51 = _fma2(splat_f32x16(w5[j]), x0, x1, a50, a51)
        a60, a61 = _fma2(splat_f32x16(w6[j]), x0, x1, a60, a61)
    for i, (a, a_next) in enumerate(((a00, a01), (a10, a11), (a20, a21), (a30, a31), (a40, a41), (a50, a51),
                                     (a60, a61))):
        store_f32x16(acc, i * d_v + c0, a)
        store_f32x16(acc, i * d_v + c0 + 16, a_next)


@njit(cache=True, inline="always")
def _load32_scaled(acc, r, correction):
    """The 32 values at acc[r:] (2 vectors), each times correction."""
    s = splat_f32x16(correction)
    return vmul(load_f32x16(acc, r), s), vmul(load_f32x16(acc, r + 16), s)


@njit(cache=True, inline="always")
def _load64_scaled(acc, r, correction):
    """The 64 values at acc[r:] (4 vectors), each times correction."""
    s = splat_f32x16(correction)
    return (vmul(load_f32x16(acc, r), s), vmul(load_f32x16(acc, r + 16), s), vmul(load_f32x16(acc, r + 32), s),
            vmul(load_f32x16(acc, r + 48), s))


@njit(cache=True, inline="always")
def _store64(acc, r, a0, a1, a2, a3):
    store_f32x16(acc, r, a0)
    store_f32x16(acc, r + 16, a1)
    store_f32x16(acc, r + 32, a2)
    store_f32x16(acc, r + 48, a3)
