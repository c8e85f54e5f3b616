"""The KV cache's element types: the compiled stores (kernels_cpu.kv_types.store_row, and store_key into blocks of
16 positions) write exactly what the numpy encoding (edgeinfer.kv_cache.encode, to_key_blocks) writes, decoding gives
the values back within each type's precision, and the widened key tiles are the decoded keys."""
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
def _widened_tile(values, scales, kv_head, start, stop, buf):
    keys, key_scales = head_view(values, scales, 0, 0, kv_head)
    return tile_keys(keys, key_scales, start, stop, buf).copy()


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
def test_widened_key_tile_is_the_decoded_keys(kv_type, start, stop):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((100, 2, 64)).astype(np.float32)
    values, scales = key_cache(kv_type, x)
    buf = np.empty((4, 64, KEY_BLOCK), np.float32)
    tile = _widened_tile(values, scales, 1, start, stop, buf)
    rows = from_key_blocks(tile, stop - start)
    want = decode(kv_type, *encode(kv_type, x[start:stop, 1]))
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
