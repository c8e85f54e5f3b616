"""The KV cache's element types in compiled code: storing a row, scoring queries against a key, adding up values.

A cache array is a pair (values, scales) of shape (n_layers, n_seq, n_ctx, n_kv_heads, dim) (edgeinfer.kv_cache):
  f32   values float32                       (scales: a stand-in, unused)
  f16   values uint16, IEEE half bits        (scales: a stand-in, unused)
  q8_0  values int8, scales float32 (..., dim / 32): x ~ scale * value per 32-value block, the scale rounded to a
        half as ggml's block_q8_0 stores it
Each primitive below is one Python name with an implementation per values dtype (numba's @overload picks it when the
caller compiles), so the attention kernels are written once for all three types.

Keys of a q8_0 cache are scored as the matvec kernels multiply: the query quantized to int8 blocks (scale qd), an
integer dot product per 32-block times kd * qd (llama.cpp's flash attention does the same with vec_dot_q8_0_q8_0).
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels_cpu._fp16 import half_bits_to_f32
from kernels_cpu.quantize import f32_to_half_bits, round_away
from kernels_cpu.simd import dot_i8, fma_splat, hsum, lane_sums, load_i8x32, zero_f32x8, zero_i32x8

QK = 32  # values per q8_0 block


def store_row(values, scales, layer, seq, pos, x):
    """values[layer, seq, pos] (and its scales) = the float32 rows x (n_kv_heads, dim), in the cache's type."""


def key_scores(values, scales, layer, seq, pos, kv_head, queries, scores, col, buf):
    """scores[v, col] = queries.f[v] . key (for every query vector v), the key at [layer, seq, pos, kv_head].
    queries: a Queries tuple (f: float32 (nv, dim) already scaled; q, d, s: the int8 blocks of f, their scales and
    sums, filled only for q8_0 keys, see quantize_queries); buf: float32 scratch of at least dim."""


def add_value(values, scales, layer, seq, pos, kv_head, weights, acc, buf):
    """acc[v] += weights[v] * value (for every v), the value at [layer, seq, pos, kv_head]; buf as key_scores."""


def needs_int8_queries(values):
    """Whether key_scores on this cache reads the int8 form of the queries (q8_0)."""


@overload(needs_int8_queries, inline="always")
def _needs_int8_queries(values):
    flag = False
    return lambda values: flag


# -------------------------------------------------------------------------------------------------- storing a row
@overload(store_row, inline="always")
def _store_row(values, scales, layer, seq, pos, x):
    if values.dtype == types.float32:
        def store_f32(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for c in range(x.shape[1]):
                    values[layer, seq, pos, h, c] = x[h, c]
        return store_f32
    if values.dtype == types.uint16:
        def store_f16(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for c in range(x.shape[1]):
                    values[layer, seq, pos, h, c] = f32_to_half_bits(x[h, c])
        return store_f16
    if values.dtype == types.int8:
        def store_q8_0(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for b in range(x.shape[1] // QK):
                    _store_block(x[h], b * QK, values[layer, seq, pos, h], scales[layer, seq, pos, h], b)
        return store_q8_0
    return None


@njit(cache=True)
def _store_block(x, start, out, scales, b):
    """ggml's quantize_row_q8_0 for one block: d = max|x| / 127, q = roundf(x * (1 / d)), d stored as a half."""
    amax = np.float32(0.0)
    for c in range(QK):
        amax = max(amax, abs(x[start + c]))
    d = amax / np.float32(127.0)
    inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
    for c in range(QK):
        out[start + c] = np.int8(round_away(x[start + c] * inverse))
    scales[b] = half_bits_to_f32(f32_to_half_bits(d))


# ----------------------------------------------------------------------------------------------- scoring a key
@overload(key_scores, inline="always")
def _key_scores(values, scales, layer, seq, pos, kv_head, queries, scores, col, buf):
    if values.dtype == types.float32:
        def scores_f32(values, scales, layer, seq, pos, kv_head, queries, scores, col, buf):
            key = values[layer, seq, pos, kv_head]
            for v in range(queries.f.shape[0]):
                scores[v, col] = _dot(queries.f[v], key)
        return scores_f32
    if values.dtype == types.uint16:
        def scores_f16(values, scales, layer, seq, pos, kv_head, queries, scores, col, buf):
            key = _halves_to_f32(values[layer, seq, pos, kv_head], buf)
            for v in range(queries.f.shape[0]):
                scores[v, col] = _dot(queries.f[v], key)
        return scores_f16
    if values.dtype == types.int8:
        def scores_q8_0(values, scales, layer, seq, pos, kv_head, queries, scores, col, buf):
            key = _q8_to_f32(values[layer, seq, pos, kv_head], scales[layer, seq, pos, kv_head], buf)
            for v in range(queries.f.shape[0]):
                scores[v, col] = _dot(queries.f[v], key)
        return scores_q8_0
    return None


@njit(cache=True, inline="always", fastmath=True)
def _dot(a, b):
    s = np.float32(0.0)
    for c in range(a.shape[0]):
        s += a[c] * b[c]
    return s


@njit(cache=True, inline="always", fastmath=True)
def _halves_to_f32(bits, buf):
    out = buf[:bits.shape[0]]
    for c in range(bits.shape[0]):
        out[c] = half_bits_to_f32(bits[c])
    return out


@njit(cache=True, inline="always", fastmath=True)
def _q8_to_f32(row, d, buf):
    out = buf[:row.shape[0]]
    for b in range(row.shape[0] // QK):
        for c in range(b * QK, b * QK + QK):
            out[c] = np.float32(row[c]) * d[b]
    return out


@njit(cache=True, inline="always", fastmath=True)
def _dot_q8(key, key_d, q, q_d):
    """sum over 32-blocks b of key_d[b] * q_d[b] * (integer dot of the int8 blocks)."""
    acc = zero_f32x8()
    for b in range(key.shape[0] // QK):
        x = load_i8x32(q, b * QK)
        dp = dot_i8(zero_i32x8(), load_i8x32(key, b * QK), x, lane_sums(x))
        acc = fma_splat(acc, dp, key_d[b] * q_d[b])
    return hsum(acc)


# ------------------------------------------------------------------------------------------ adding up values
@overload(add_value, inline="always")
def _add_value(values, scales, layer, seq, pos, kv_head, weights, acc, buf):
    if values.dtype == types.float32:
        def add_f32(values, scales, layer, seq, pos, kv_head, weights, acc, buf):
            _axpy_rows(weights, values[layer, seq, pos, kv_head], acc)
        return add_f32
    if values.dtype == types.uint16:
        def add_f16(values, scales, layer, seq, pos, kv_head, weights, acc, buf):
            _axpy_rows(weights, _halves_to_f32(values[layer, seq, pos, kv_head], buf), acc)
        return add_f16
    if values.dtype == types.int8:
        def add_q8_0(values, scales, layer, seq, pos, kv_head, weights, acc, buf):
            _axpy_rows(weights, _q8_to_f32(values[layer, seq, pos, kv_head], scales[layer, seq, pos, kv_head], buf),
                       acc)
        return add_q8_0
    return None


@njit(cache=True, inline="always", fastmath=True)
def _axpy_rows(weights, x, acc):
    for v in range(acc.shape[0]):
        w = weights[v]
        if w != 0.0:
            row = acc[v]
            for c in range(x.shape[0]):
                row[c] += w * x[c]
