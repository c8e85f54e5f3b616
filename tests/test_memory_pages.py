"""kernels_cpu.memory_pages: one byte of every page written with 0, nothing else touched."""
import numpy as np
import pytest

from kernels_cpu.memory_pages import PAGE, zero_pages


@pytest.mark.parametrize("n_bytes", [1, PAGE - 1, PAGE, 3 * PAGE + 17])
def test_one_byte_of_every_page_becomes_zero(n_bytes):
    array = np.full(n_bytes, 7, np.uint8)
    zero_pages(array, n_threads=1)
    expected = np.full(n_bytes, 7, np.uint8)
    expected[::PAGE] = 0  # the numpy reference
    np.testing.assert_array_equal(array, expected)


def test_any_dtype_and_shape_and_an_empty_array():
    array = np.arange(15000, dtype=np.float32).reshape(3, 5000) + 1  # 60,000 bytes: 15 pages
    expected = array.copy()
    expected.reshape(-1).view(np.uint8)[::PAGE] = 0
    zero_pages(array)
    np.testing.assert_array_equal(array.view(np.uint8), expected.view(np.uint8))
    zero_pages(np.zeros((0, 4), np.float32))


def test_a_strided_view_is_refused():
    with pytest.raises(ValueError, match="C-contiguous"):
        zero_pages(np.zeros((64, 64), np.float32)[:, ::2])
