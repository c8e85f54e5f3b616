"""kernels_cpu.borrow: views of a borrowed array are not reference counted, and read and write the array itself."""
import numpy as np
from numba import njit, prange
from numba.core.unsafe.refcount import get_refcount

from kernels_cpu.borrow import borrowed


@njit
def _refcount_with_three_live_views(a, borrow):
    b = borrowed(a) if borrow else a
    r0, r1, r2 = b[0], b[1], b[2]
    count = get_refcount(a)
    r0[0], r1[0], r2[0] = 1.0, 2.0, 3.0  # the views stay live until here
    return count


@njit
def _refcount(a):
    return get_refcount(a)


def test_views_of_a_borrowed_array_add_no_references_and_write_the_array():
    a = np.zeros((3, 4))
    assert _refcount_with_three_live_views(a, False) > _refcount(a)
    assert _refcount_with_three_live_views(a, True) == _refcount(a)
    np.testing.assert_array_equal(a[:, 0], [1.0, 2.0, 3.0])


@njit(parallel=True)
def _row_sums_into_borrowed(a, out):
    a, out = borrowed(a), borrowed(out)
    for i in prange(a.shape[0]):
        out[i] = a[i].sum()


@njit
def _scaled_rows(a, scale):
    b = borrowed(a)
    for i in range(b.shape[0]):
        row = b[i]
        row *= scale


def test_a_parallel_loop_that_writes_a_borrowed_output_writes_the_output():
    """Numba's parallel passes see `borrowed(out)` as `out` (an alias), not as a new array whose writes nobody reads:
    without that they removed the whole loop."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 7))
    out = np.zeros(100)
    _row_sums_into_borrowed(x, out)
    np.testing.assert_allclose(out, x.sum(axis=1))


def test_writes_through_views_of_a_borrowed_array_land_in_the_array():
    a = np.arange(12, dtype=np.float64).reshape(3, 4)
    _scaled_rows(a, 2.0)
    np.testing.assert_array_equal(a, np.arange(12).reshape(3, 4) * 2.0)
