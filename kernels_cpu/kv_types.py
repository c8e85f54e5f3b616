"""The KV cache's element types in compiled code: storing a row, scoring queries against a key, adding up values.

A cache array is a pair (values, scales) of shape (n_layers, n_seq, n_kv_heads, n_ctx, dim) (edgeinfer.kv_cache):
  f32   values float32                       (scales: a stand-in, unused)
  f16   values uint16, IEEE half bits        (scales: a stand-in, unused)
  q8_0  values int8, scales float32 (..., dim / 32): x ~ scale * value per 32-value block, the scale rounded to a
        half as ggml's block_q8_0 stores it
Each primitive below is one Python name with an implementation per values dtype (numba's @overload picks it when the
caller compiles), so the attention kernels are written once for all three types. They work on one (layer, sequence,
KV head) at a time: `head_view` gives its (positions, dim) rows, which lie contiguously, and `tile_rows` a tile of
them as float32.

Keys of every type are scored against float32 queries: an f16 or q8_0 tile is widened to float32 once and serves all
the query vectors of a job (every head of a GQA group, every row of a block). llama.cpp quantizes the queries to
int8 for q8_0 keys instead; that adds the queries' own rounding (KL against f32 0.0075 instead of 0.0063 on SmolLM2,
0.0069 instead of 0.0043 on Gemma 3, measured) for no gain where widening a key is shared by several queries.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels_cpu._fp16 import half_bits_to_f32
from kernels_cpu.quantize import f32_to_half_bits, round_away

QK = 32  # values per q8_0 block


def store_row(values, scales, layer, seq, pos, x):
    """values[layer, seq, :, pos] (and its scales) = the float32 rows x (n_kv_heads, dim), in the cache's type."""


def head_view(values, scales, layer, seq, kv_head):
    """(rows, row_scales) of one (layer, sequence, KV head): rows (n_ctx, dim); row_scales (n_ctx, dim / 32) for
    q8_0, a stand-in otherwise."""


def tile_rows(rows, row_scales, start, stop, buf):
    """rows start..stop-1 of a head_view as float32 (n, dim): a view for f32, else widened into buf (TILE, dim)."""


# -------------------------------------------------------------------------------------------------- storing a row
@overload(store_row, inline="always")
def _store_row(values, scales, layer, seq, pos, x):
    if values.dtype == types.float32:
        def store_f32(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for c in range(x.shape[1]):
                    values[layer, seq, h, pos, c] = x[h, c]
        return store_f32
    if values.dtype == types.uint16:
        def store_f16(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for c in range(x.shape[1]):
                    values[layer, seq, h, pos, c] = f32_to_half_bits(x[h, c])
        return store_f16
    if values.dtype == types.int8:
        def store_q8_0(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for b in range(x.shape[1] // QK):
                    _store_block(x[h], b * QK, values[layer, seq, h, pos], scales[layer, seq, h, pos], b)
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


@overload(head_view, inline="always")
def _head_view(values, scales, layer, seq, kv_head):
    if values.dtype == types.int8:
        return lambda values, scales, layer, seq, kv_head: (values[layer, seq, kv_head], scales[layer, seq, kv_head])
    return lambda values, scales, layer, seq, kv_head: (values[layer, seq, kv_head], scales[0, 0, 0])


@overload(tile_rows, inline="always")
def _tile_rows(rows, row_scales, start, stop, buf):
    if rows.dtype == types.float32:
        return lambda rows, row_scales, start, stop, buf: rows[start:stop]
    if rows.dtype == types.uint16:
        return lambda rows, row_scales, start, stop, buf: _widen_f16(rows[start:stop], buf)
    if rows.dtype == types.int8:
        return lambda rows, row_scales, start, stop, buf: _widen_q8_0(rows[start:stop], row_scales[start:stop], buf,
                                                                      rows.shape[1] // row_scales.shape[1])
    return None


@njit(cache=True, fastmath=True)
def _widen_f16(bits, buf):
    out = buf[:bits.shape[0]]
    for j in range(bits.shape[0]):
        for c in range(bits.shape[1]):
            out[j, c] = half_bits_to_f32(bits[j, c])
    return out


@njit(cache=True, fastmath=True)
def _widen_q8_0(q, d, buf, block):
    """block (= QK) arrives as an argument: a loop of a constant 32 is unrolled into scalar code, a loop of a
    run-time length is vectorized."""
    out = buf[:q.shape[0]]
    for j in range(q.shape[0]):
        row = out[j]
        for c in range(q.shape[1]):
            row[c] = np.float32(q[j, c])
        for b in range(d.shape[1]):
            scale = d[j, b]
            part = row[b * block:b * block + block]
            for c in range(part.shape[0]):
                part[c] *= scale
    return out
