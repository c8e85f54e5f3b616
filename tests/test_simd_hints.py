"""L2 hints (kernels_cpu.simd.hint_share, hint_l2_part): the share of a coming piece of data each step of a loop
hints, computed once before the loop; the hints compile for every array type the kernels hint (a cache line's
elements are a constant of the dtype) and to nothing for None."""
import numpy as np
import pytest
from numba import njit

from kernels_cpu.simd import hint_l2_part, hint_share


@njit
def _hint_all(ahead, n):
    share = hint_share(ahead, n)
    for i in range(n):
        hint_l2_part(ahead, i, share)
    return share


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.float32])  # uint16: f16 caches' bits
def test_each_step_hints_an_even_share(dtype):
    ahead = np.zeros((3, 64, 16), dtype)  # a tile of key blocks, or a group of repacked weights
    assert _hint_all(ahead, 64) == ahead.size // 64
    assert _hint_all(ahead, 7) == ahead.size // 7


def test_nothing_to_hint_compiles_to_nothing():
    assert _hint_all(None, 8) == 0
