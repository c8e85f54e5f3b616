"""The KV cache's element types: the compiled stores (kernels_cpu.kv_types.store_row, and store_key into blocks of
16 positions) write exactly what the numpy encoding (edgeinfer.kv_cache.encode, to_key_blocks) writes, decoding gives
the values back within each type's precision, and the key tiles the attention kernels read are the decoded keys."""
import numpy as np
import pytest
from numba import njit

from edgeinfer.kv_cache import KEY_BLOCK, KV_TYPES, decode, encode, from_key_blocks, to_key_blocks
from kernels_cpu import kv_types
from kernels_cpu.kv_types import head_view, store_key, store_row, tile_keys
from kernels_cpu.quantize import f32_to_half_bits


@njit(cache=True)
def _store_all(values, scales, x):
    for p in range(x.shape[0]):
        store_row(values, scales, 0, 0, p, x[p])


@njit(cache=True)
def _store_keys(values, scales, x):
    for p in range(x.shape[0]):
        store_key(values, scales, 0, 0, p, x[p])


@njit(cache=True)
def _key_tile(values, scales, kv_head, start, stop, buf):
    keys, key_scales = head_view(values, scales, 0, 0, kv_head)
    tile, tile_scales = tile_keys(keys, key_scales, start, stop, buf)
    return tile.copy(), tile_scales.copy()


def compiled_store(kv_type, x):
    """x (positions, n_kv, dim) stored through store_row; (values, scales) back as (positions, n_kv, ...)."""
    n_pos, n_kv, dim = x.shape
    values = np.zeros((1, 1, n_kv, n_pos, dim), dtype=KV_TYPES[kv_type][0])
    scales = (np.zeros((1, 1, n_kv, n_pos, dim // 32), np.float32) if kv_type == "q8_0"
              else np.zeros((1,) * 5, np.float32))
    _store_all(values, scales, x)
    return values[0, 0].transpose(1, 0, 2), (scales[0, 0].transpose(1, 0, 2) if kv_type == "q8_0" else None)


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_compiled_store_equals_numpy_encoding(kv_type):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((50, 3, 64)) * np.exp(rng.uniform(-8, 8, (50, 3, 1)))).astype(np.float32)
    x[0] = 0.0  # an all-zero block (scale 0)
    x[1, 0, :32] = np.float32(0.5) * np.arange(32)  # exact halves: roundf rounds them away from zero
    values, scales = compiled_store(kv_type, x)
    want_values, want_scales = encode(kv_type, x)
    np.testing.assert_array_equal(values, want_values)
    if kv_type == "q8_0":
        np.testing.assert_array_equal(scales, want_scales)


@pytest.mark.parametrize("kv_type,bound", [("f32", 0.0), ("f16", 2 ** -11), ("q8_0", 1 / 127)])
def test_decode_gives_values_back(kv_type, bound):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 2, 64)).astype(np.float32)
    back = decode(kv_type, *encode(kv_type, x))
    blocks = np.abs(x.reshape(20, 2, 2, 32)).max(axis=-1, keepdims=True)
    scale = np.broadcast_to(blocks, (20, 2, 2, 32)).reshape(x.shape) if kv_type == "q8_0" else np.abs(x)
    assert np.all(np.abs(back - x) <= bound * scale * 1.01 + 1e-30)


def test_key_block_is_one_constant():
    assert kv_types.KEY_BLOCK == KEY_BLOCK == 16


def key_cache(kv_type, x):
    """x (positions, n_kv, dim) stored through store_key: (values, scales) of shape (1, 1, n_kv, blocks, ...)."""
    n_pos, n_kv, dim = x.shape
    n_blocks = -(-n_pos // KEY_BLOCK)
    values = np.zeros((1, 1, n_kv, n_blocks, dim, KEY_BLOCK), dtype=KV_TYPES[kv_type][0])
    scales = (np.zeros((1, 1, n_kv, n_blocks, dim // 32, KEY_BLOCK), np.float32) if kv_type == "q8_0"
              else np.zeros((1,) * 6, np.float32))
    _store_keys(values, scales, x)
    return values, scales


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
def test_compiled_key_store_equals_numpy_blocks(kv_type):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((37, 2, 64)) * np.exp(rng.uniform(-4, 4, (37, 2, 1)))).astype(np.float32)
    values, scales = key_cache(kv_type, x)
    want_values, want_scales = encode(kv_type, x.transpose(1, 0, 2))  # (n_kv, positions, ...)
    np.testing.assert_array_equal(values[0, 0], to_key_blocks(want_values))
    np.testing.assert_array_equal(from_key_blocks(values[0, 0], 37), want_values)
    if kv_type == "q8_0":
        np.testing.assert_array_equal(scales[0, 0], to_key_blocks(want_scales))


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
@pytest.mark.parametrize("start,stop", [(0, 64), (64, 100), (32, 33)])
def test_key_tile_is_the_decoded_keys(kv_type, start, stop):
    """f32 and f16 key tiles come as float32 (f16 widened); q8_0's as its own blocks and scales (scored in int8),
    which decode to the same keys."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 2, 64)).astype(np.float32)
    values, scales = key_cache(kv_type, x)
    buf = np.empty((4, 64, KEY_BLOCK), np.float32)
    tile, tile_scales = _key_tile(values, scales, 1, start, stop, buf)
    want = decode(kv_type, *encode(kv_type, x[start:stop, 1]))
    if kv_type == "q8_0":
        assert tile.dtype == np.int8
        rows = decode("q8_0", from_key_blocks(tile, stop - start), from_key_blocks(tile_scales, stop - start))
    else:
        assert tile.dtype == np.float32
        rows = from_key_blocks(tile, stop - start)
    np.testing.assert_array_equal(rows, want)
    assert tile.shape == (-(-stop // KEY_BLOCK) - start // KEY_BLOCK, 64, KEY_BLOCK)


@njit(cache=True)
def _both_half_conversions(x, native, portable):
    for i in range(x.shape[0]):
        native[i] = kv_types._to_half(x[i])
        portable[i] = f32_to_half_bits(x[i])


def test_f16_store_conversion_is_the_portable_rounding():
    """The f16 cache's stores convert with the hardware's instruction where there is one: the same bits as the
    portable round-to-nearest-even (and numpy's) for every float32 but NaNs, which stay NaNs."""
    rng = np.random.default_rng(3)
    patterns = rng.integers(0, 2 ** 32, 1_000_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    edges = np.array([65504.0, 65519.99, 65520.0, 1e-8, -3e-5, 6.1e-5, 2.0 ** -24, 2.0 ** -25, 0.0, -0.0, np.inf,
                      -np.inf, 1.0 + 2.0 ** -11, 1.0 + 3 * 2.0 ** -11], np.float32)
    x = np.concatenate([patterns, edges])
    native, portable = np.zeros(len(x), np.uint16), np.zeros(len(x), np.int64)
    _both_half_conversions(x, native, portable)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(native[finite], portable[finite].astype(np.uint16))
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(native[finite], x[finite].astype(np.float16).view(np.uint16))
    assert np.isnan(native[~finite].view(np.float16)).all()


@njit(cache=True, fastmath={"nsz", "arcp", "contract", "afn", "reassoc"})
def _quantized_queries_in_fast_math(keys, qs, nv, q8, qd, q_bias):
    """quantize_queries called as the attention kernels call it: from code compiled with fast math."""
    kv_types.quantize_queries(keys, qs, nv, q8, qd, q_bias)


def test_queries_for_q8_0_keys_are_ggml_q8_0():
    """The query vectors scored against q8_0 keys are quantized as the cache's rows are (numpy encode: ggml's
    quantize_row_q8_0), even from fast-math code, including a product of exactly k + 0.5 (a failing case once: 1 / d
    became an approximate reciprocal); padding rows are zero, and q_bias is what dot_i8_biased's sums start from."""
    rng = np.random.default_rng(4)
    qs = (rng.standard_normal((300, 64)) * 0.2).astype(np.float32)
    qs[0, :32] = 0.0
    qs[0, 32:] = 0.0
    qs[0, 32] = np.float32(0.48894938826560974)  # d = this / 127, and the next one times 1 / d is 64.5 in float32
    qs[0, 33] = np.float32(0.2483246624469757)
    nv = 297
    q8, qd = np.full((300, 64), 7, np.int8), np.full((300, 2), 7.0, np.float32)
    q_bias = np.full((300, 2), 7, np.int32)
    _quantized_queries_in_fast_math(np.zeros((1, 1, 1), np.int8), qs, nv, q8, qd, q_bias)
    want, want_d = encode("q8_0", qs[:nv])
    assert want[0, 33] == 65  # the tie, rounded away from zero
    np.testing.assert_array_equal(q8[:nv], want)
    np.testing.assert_array_equal(qd[:nv], want_d)
    sums = want.reshape(nv, 2, 32).astype(np.int32).sum(axis=-1)
    np.testing.assert_array_equal(q_bias[:nv], -kv_types.I8_DOT_BIAS * sums)
    assert not q8[nv:].any() and not qd[nv:].any() and not q_bias[nv:].any()
