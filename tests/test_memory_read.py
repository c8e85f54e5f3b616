"""The memory read probe `edgeinfer bench` measures decode against (kernels_cpu.memory_read)."""
import math

import numba
import numpy as np
import pytest

from kernels_cpu.memory_read import PARTS_PER_THREAD, read_buffer, read_rate, xor_parts


@pytest.mark.parametrize("shape", [(1, 1), (1, 1000), (3, 17), (32, 4096)])
def test_xor_parts_is_numpys_xor_of_every_word(shape):
    words = np.random.default_rng(sum(shape)).integers(0, 2**63, size=shape, dtype=np.uint64) * np.uint64(3)
    assert xor_parts(words) == np.bitwise_xor.reduce(words.ravel())


def test_the_buffer_has_every_page_written():
    buffer = read_buffer(1 << 20)
    assert buffer.dtype == np.uint64 and buffer.nbytes == 1 << 20
    assert np.count_nonzero(buffer[1:]) == buffer.size - 1  # no page left to the kernel's zero page


@pytest.mark.parametrize("n_threads", range(1, numba.config.NUMBA_NUM_THREADS + 1))
def test_read_rate_is_a_positive_rate_for_any_thread_count(n_threads):
    rate = read_rate(read_buffer((4 << 20) + 8), n_threads, reps=2)  # an odd size: the whole parts are read
    assert math.isfinite(rate) and rate > 0


def test_read_rate_refuses_what_it_cannot_split():
    with pytest.raises(ValueError, match="cannot split"):
        read_rate(read_buffer(1 << 10)[:8], 1)
    for n_threads in (0, numba.config.NUMBA_NUM_THREADS + 1):
        with pytest.raises(ValueError, match=f"n_threads={n_threads}"):
            read_rate(read_buffer(1 << 20), n_threads)
