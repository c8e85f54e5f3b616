"""The KV cache's element types in compiled code: storing a row, scoring queries against a key, adding up values.

A cache array is a pair (values, scales) (edgeinfer.kv_cache). Values are stored by rows, (n_layers, n_seq,
n_kv_heads, n_ctx, dim); keys in blocks of KEY_BLOCK positions, each block transposed: (n_layers, n_seq, n_kv_heads,
n_ctx / KEY_BLOCK, dim, KEY_BLOCK), so the attention kernels load one dimension of 16 keys as one SIMD vector (a
decode row's few query vectors score 16 keys per instruction) and still broadcast one element of one key.
  f32   values float32                       (scales: a stand-in, unused)
  f16   values uint16, IEEE half bits        (scales: a stand-in, unused)
  q8_0  values int8, scales float32 per 32 values along dim (values: (..., n_ctx, dim / 32); keys: (..., n_ctx /
        KEY_BLOCK, dim / 32, KEY_BLOCK)): x ~ scale * value, the scale rounded to a half as ggml's block_q8_0
        stores it
Each primitive below is one Python name with an implementation per values dtype (numba's @overload picks it when the
caller compiles), so the attention kernels are written once for all three types. They work on one (layer, sequence,
KV head) at a time: `head_view` gives its rows (or key blocks), which lie contiguously, `tile_rows` a tile of value
rows as float32 and `tile_keys` a tile of key blocks as the scoring reads them.

f32 and f16 keys are scored against float32 queries. A job with many query vectors (a prompt block: every head of a
GQA group, every row of the block) widens an f16 tile to float32 once (`tile_keys`, `tile_rows`); a job with few (a
decode row) converts each vector as it loads it (`raw_keys`/`raw_rows` with `key_vector`/`value_vector`), so a long
cache streams from memory without widened copies crowding the L1 cache. Both give the same float32 values.
q8_0 keys are scored as llama.cpp scores them: the query vectors quantized to q8_0 too (`quantize_queries`), int8
dot products per 32 dimensions (4 dimensions of 16 keys per instruction), float32 only for the blocks' scales. That
is a quarter of float32's multiply-adds, and q8_0 keys are never widened. q8_0 values are widened like f16.
"""
import numpy as np
from numba import njit, types
from numba.extending import overload

from kernels_cpu._fp16 import f32_to_half_bits_native, half_bits_to_f32, native_half_conversion
from kernels_cpu.activations_q8 import quantize_activations
from kernels_cpu.quantize import f32_to_half_bits, round_away
from kernels_cpu.simd import (I8_DOT_BIAS, halves_f32x16, hint_l2_part, int8s_f32x16, load_f32x16, splat_f32x16,
                              store_f32x16, vmul)

# float32 -> half bits for the f16 cache's stores: the hardware conversion where there is one (the same bits)
_to_half = f32_to_half_bits_native if native_half_conversion() else f32_to_half_bits

QK = 32  # values per q8_0 block
KEY_BLOCK = 16  # positions per key block (edgeinfer.kv_cache.KEY_BLOCK; one float32 SIMD vector)


def store_row(values, scales, layer, seq, pos, x):
    """values[layer, seq, :, pos] (and its scales) = the float32 rows x (n_kv_heads, dim), in the cache's type."""


def store_key(values, scales, layer, seq, pos, x):
    """store_row into a key array: position pos of the blocked layout (the module docstring)."""


def head_view(values, scales, layer, seq, kv_head):
    """(rows, row_scales) of one (layer, sequence, KV head): rows (n_ctx, dim) (keys: (n_ctx / KEY_BLOCK, dim,
    KEY_BLOCK)); row_scales likewise with dim / 32 for q8_0, a stand-in otherwise."""


def tile_rows(rows, row_scales, start, stop, buf):
    """rows start..stop-1 of a head_view as float32 (n, dim): a view for f32, else widened into buf (TILE, dim)."""


def tile_keys(blocks, block_scales, start, stop, buf):
    """(blocks, scales): the key blocks holding positions start..stop-1 (start a multiple of KEY_BLOCK) of a
    head_view as tile_scores reads them: float32 (n_blocks, dim, KEY_BLOCK) for f32 (a view) and f16 (widened into
    buf (TILE / KEY_BLOCK, dim, KEY_BLOCK)); q8_0's own int8 blocks and their scales (views: scored in int8).
    Positions past stop in the last block hold whatever was stored there: the caller masks them."""


def raw_keys(blocks, block_scales, start, stop):
    """The key blocks holding positions start..stop-1 of a head_view and their scales, in the cache's own type (no
    copy): what key_vector reads."""


def raw_rows(rows, row_scales, start, stop):
    """Rows start..stop-1 of a head_view and their scales, in the cache's own type (no copy): what value_vector
    reads."""


def key_vector(blocks, block_scales, b, c):
    """Dimension c of the 16 keys of block b (of tile_keys' float32 blocks, or of raw_keys' f32 / f16 ones) as a
    float32 SIMD vector: the same float32 values tile_keys would widen them to."""


def quantize_queries(blocks, qs, nv, q8, qd, q_bias):
    """For q8_0 keys: query vectors 0..nv-1 of qs (rows, dim) as q8_0, ggml's quantize_row_q8_0 (per 32 values d =
    max|x| / 127 rounded to a half, q = roundf(x / d)) into q8 (rows, dim) int8 and qd (rows, dim / 32) float32, and
    q_bias = -I8_DOT_BIAS x each block's sum of q (what dot_i8_biased's sums start from); the rows from nv on are
    zeroed (padding). Nothing for other key types."""


def hint_scales(blocks, block_scales, row_scales, start, stop):
    """Hint into L2 the scales of the key blocks and value rows holding positions start..stop-1 (a coming tile of a
    head_view), for q8_0; nothing for other types. The attention loops hint a coming tile's int8 keys and values as
    they go, but q8_0's scales are two more streams beside them. Decode attention at depth 4096, 1 thread, 3 MB read
    between layers as the weights would be, runs in turn: SmolLM2 107-117 -> 98-115 us a layer (7 rounds), Gemma 3
    138-162 -> 126-134 (3); Qwen2.5 (7 query vectors a KV head: more arithmetic per byte) the same within noise."""


def value_vector(rows, row_scales, j, c):
    """Elements c..c+15 of row j (of tile_rows' float32 rows, or of raw_rows' in any type) as a float32 SIMD vector:
    the same float32 values tile_rows would widen them to."""


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
                    values[layer, seq, h, pos, c] = _to_half(x[h, c])
        return store_f16
    if values.dtype == types.int8:
        def store_q8_0(values, scales, layer, seq, pos, x):
            for h in range(x.shape[0]):
                for b in range(x.shape[1] // QK):
                    _store_block(x[h], b * QK, values[layer, seq, h, pos], scales[layer, seq, h, pos], b)
        return store_q8_0
    return None


@overload(store_key, inline="always")
def _store_key(values, scales, layer, seq, pos, x):
    if values.dtype == types.float32:
        def store_f32(values, scales, layer, seq, pos, x):
            block, j = pos // KEY_BLOCK, pos % KEY_BLOCK
            for h in range(x.shape[0]):
                for c in range(x.shape[1]):
                    values[layer, seq, h, block, c, j] = x[h, c]
        return store_f32
    if values.dtype == types.uint16:
        def store_f16(values, scales, layer, seq, pos, x):
            block, j = pos // KEY_BLOCK, pos % KEY_BLOCK
            for h in range(x.shape[0]):
                for c in range(x.shape[1]):
                    values[layer, seq, h, block, c, j] = _to_half(x[h, c])
        return store_f16
    if values.dtype == types.int8:
        def store_q8_0(values, scales, layer, seq, pos, x):
            block, j = pos // KEY_BLOCK, pos % KEY_BLOCK
            for h in range(x.shape[0]):
                for b in range(x.shape[1] // QK):  # strided views: this position's column of the block
                    _store_block(x[h], b * QK, values[layer, seq, h, block, :, j], scales[layer, seq, h, block, :, j],
                                 b)
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
        return lambda rows, row_scales, start, stop, buf: _widen_q8_0(rows[start:stop], row_scales[start:stop], buf)
    return None


@overload(tile_keys, inline="always")
def _tile_keys(blocks, block_scales, start, stop, buf):
    if blocks.dtype == types.float32:
        return lambda blocks, block_scales, start, stop, buf: (blocks[start // KEY_BLOCK:_blocks_end(stop)],
                                                               block_scales)
    if blocks.dtype == types.uint16:
        return lambda blocks, block_scales, start, stop, buf: (
            _widen_f16(blocks[start // KEY_BLOCK:_blocks_end(stop)], buf), block_scales)
    if blocks.dtype == types.int8:
        return lambda blocks, block_scales, start, stop, buf: raw_keys(blocks, block_scales, start, stop)
    return None


@overload(raw_keys, inline="always")
def _raw_keys(blocks, block_scales, start, stop):
    if blocks.dtype == types.int8:
        return lambda blocks, block_scales, start, stop: (blocks[start // KEY_BLOCK:_blocks_end(stop)],
                                                          block_scales[start // KEY_BLOCK:_blocks_end(stop)])
    return lambda blocks, block_scales, start, stop: (blocks[start // KEY_BLOCK:_blocks_end(stop)], block_scales)


@overload(raw_rows, inline="always")
def _raw_rows(rows, row_scales, start, stop):
    if rows.dtype == types.int8:
        return lambda rows, row_scales, start, stop: (rows[start:stop], row_scales[start:stop])
    return lambda rows, row_scales, start, stop: (rows[start:stop], row_scales)


@overload(key_vector, inline="always")
def _key_vector(blocks, block_scales, b, c):
    if blocks.dtype == types.float32:
        return lambda blocks, block_scales, b, c: load_f32x16(blocks, (b * blocks.shape[1] + c) * KEY_BLOCK)
    if blocks.dtype == types.uint16:
        return lambda blocks, block_scales, b, c: halves_f32x16(blocks, (b * blocks.shape[1] + c) * KEY_BLOCK)
    return None


@overload(quantize_queries, inline="always")
def _quantize_queries(blocks, qs, nv, q8, qd, q_bias):
    if blocks.dtype == types.int8:
        return lambda blocks, qs, nv, q8, qd, q_bias: _quantize_q8_0_rows(qs, nv, q8, qd, q_bias)
    return lambda blocks, qs, nv, q8, qd, q_bias: None


@overload(hint_scales, inline="always")
def _hint_scales(blocks, block_scales, row_scales, start, stop):
    if blocks.dtype == types.int8:
        def hint_q8_0(blocks, block_scales, row_scales, start, stop):
            key_scales = block_scales[start // KEY_BLOCK:_blocks_end(stop)]
            value_scales = row_scales[start:stop]
            hint_l2_part(key_scales, 0, key_scales.size)  # 8 + 8 cache lines a tile: all at once
            hint_l2_part(value_scales, 0, value_scales.size)
        return hint_q8_0
    return lambda blocks, block_scales, row_scales, start, stop: None


@overload(value_vector, inline="always")
def _value_vector(rows, row_scales, j, c):
    if rows.dtype == types.float32:
        return lambda rows, row_scales, j, c: load_f32x16(rows, j * rows.shape[1] + c)
    if rows.dtype == types.uint16:
        return lambda rows, row_scales, j, c: halves_f32x16(rows, j * rows.shape[1] + c)
    if rows.dtype == types.int8:  # each value times its block's scale (c a multiple of 16: one scale for all 16)
        return lambda rows, row_scales, j, c: vmul(int8s_f32x16(rows, j * rows.shape[1] + c),
                                                   splat_f32x16(row_scales[j, c // QK]))
    return None


@njit(cache=True, inline="always")
def _blocks_end(stop):
    return (stop + KEY_BLOCK - 1) // KEY_BLOCK


@njit(cache=True, inline="always")
def _widen_halves(bits, out):
    """out[:] = the halves bits (1-D, of out's length) as float32, 16 per SIMD instruction: left to LLVM's
    vectorizer, the loop ran scalar inside the attention kernel (a tile of values took 5 times its scoring)."""
    n = bits.shape[0]
    i = 0
    while i + 16 <= n:
        store_f32x16(out, i, halves_f32x16(bits, i))
        i += 16
    while i < n:
        out[i] = half_bits_to_f32(bits[i])
        i += 1


@njit(cache=True, fastmath=False)
def _quantize_q8_0_rows(x, n, q8, qd, q_bias):
    """quantize_queries for q8_0 keys (rows of x C-contiguous): the matvec kernels' activation quantization (the same
    rounding), then each scale rounded to a half and each sum turned into dot_i8_biased's start. fastmath=False, as
    quantize_activations says why."""
    q8[n:] = 0
    qd[n:] = 0.0
    q_bias[n:] = 0
    for r in range(n):
        quantize_activations(x[r], q8[r], qd[r], q_bias[r])
        for b in range(qd.shape[1]):
            qd[r, b] = half_bits_to_f32(f32_to_half_bits(qd[r, b]))
            q_bias[r, b] *= -I8_DOT_BIAS


@njit(cache=True)
def _widen_f16(bits, buf):
    """Half bits (rows, or key blocks) -> float32 in buf[:len(bits)], the same shape."""
    out = buf[:bits.shape[0]]
    _widen_halves(bits.reshape(-1), out.reshape(-1))
    return out


@njit(cache=True)
def _widen_q8_0(q, d, buf):
    """q8_0 rows (n, dim) with scales (n, dim / 32) -> float32 in buf, one value_vector per 16 values."""
    out = buf[:q.shape[0]]
    dim = q.shape[1]
    for j in range(q.shape[0]):
        for c in range(0, dim, 16):
            store_f32x16(out, j * dim + c, value_vector(q, d, j, c))
    return out
