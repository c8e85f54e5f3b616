"""The KV cache's element types: the compiled store (kernels_cpu.kv_types.store_row) writes exactly what the numpy
encoding (edgeinfer.kv_cache.encode) writes, and decoding gives the values back within each type's precision."""
import numpy as np
import pytest
from numba import njit

from edgeinfer.kv_cache import KV_TYPES, decode, encode
from kernels_cpu.kv_types import store_row


@njit(cache=True)
def _store_all(values, scales, x):
    for p in range(x.shape[0]):
        store_row(values, scales, 0, 0, p, x[p])


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
