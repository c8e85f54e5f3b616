"""The forward pass's team (kernels_cpu.team): atomic counters, claimed items, and phases that wait for each other."""
import numba
import numpy as np
import pytest
from numba import njit, prange

from conftest import model_path
from kernels_cpu.team import (atomic_add, atomic_load, chunks, claim, done_and_claim, item_range, make_sync, wait_done,
                              yield_cpu)


@njit
def _add_and_read(a, i, v):
    before = atomic_add(a, i, v)
    return before, atomic_load(a, i)


def test_atomic_add_returns_the_value_before_and_the_load_sees_the_sum():
    a = np.array([5, 40], np.int64)
    assert _add_and_read(a, 1, 2) == (40, 42)
    assert list(a) == [5, 42]


@njit
def _yield_times(n):
    for _ in range(n):
        yield_cpu()
    return n


def test_yielding_the_cpu_compiles_links_and_returns():
    assert _yield_times(3) == 3


@njit(parallel=True)
def _team(sync, data, n_phases, items, team_size):
    """Phase p's item i writes 1 + the sum of phase p - 1's row (wrong if a phase started before the last ended),
    and counts who did it."""
    for _ in prange(team_size):
        phase = 0
        for p in range(n_phases):
            i = claim(sync, phase)
            while i < items:
                total = 0
                for j in range(items):
                    total += data[p, j]
                data[p + 1, i] = total + 1
                data[n_phases + 1, i] += 1  # (items are never done twice: no two threads write one cell)
                i = done_and_claim(sync, phase)
            phase = wait_done(sync, phase, items)


def _reference(n_phases, items):
    data = np.zeros((n_phases + 1, items), np.int64)
    for p in range(n_phases):
        data[p + 1] = data[p].sum() + 1
    return data


@pytest.mark.parametrize("threads, team_size", [(1, 1), (2, 2), (1, 3), (2, 5)])
def test_every_item_is_done_once_and_each_phase_sees_the_last_one_whole(threads, team_size):
    """Also where the team is larger than numba's threads, so that some of its iterations run one after another:
    the first of them claims every item and the later ones find every phase done (no deadlock)."""
    n_phases, items = 50, 7
    before = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        sync = make_sync(n_phases)
        data = np.zeros((n_phases + 2, items), np.int64)
        _team(sync, data, n_phases, items, team_size)
    finally:
        numba.set_num_threads(before)
    np.testing.assert_array_equal(data[:n_phases + 1], _reference(n_phases, items))
    assert (data[n_phases + 1] == n_phases).all()
    assert (sync[:, 0] >= items).all() and (sync[:, 1] == items).all()


@njit
def _items(n, threads, per_thread, least):
    items = chunks(n, threads, per_thread, least)
    return items, [item_range(i, items, n) for i in range(items)]


@pytest.mark.parametrize("n, threads, per_thread, least", [(36, 2, 4, 1), (3072, 2, 4, 4), (5, 2, 4, 1),
                                                          (1, 1, 4, 1), (100, 3, 8, 7), (3, 2, 4, 6)])
def test_items_cover_the_units_once_in_even_shares(n, threads, per_thread, least):
    items, ranges = _items(n, threads, per_thread, least)
    assert [u for lo, hi in ranges for u in range(lo, hi)] == list(range(n))
    sizes = [hi - lo for lo, hi in ranges]
    assert max(sizes) - min(sizes) <= 1 and 1 <= items <= threads * per_thread
    assert min(sizes) >= least or items == 1


@pytest.mark.parametrize("n, threads", [(1, 2), (2, 2), (3, 2), (4, 2), (5, 2), (8, 2), (9, 2), (4, 1), (9, 1), (17, 4)])
def test_a_small_op_has_an_item_per_thread_at_least_and_at_most_four_rows_an_item(n, threads):
    """The norms, the cache store and quantizing are cut so that 2-4 rows on 2 threads keep both busy (one item of
    4 rows left one thread waiting), and no item has more than ROWS_PER_ITEM rows (their norms run side by side)."""
    from kernels_cpu.forward import ROWS_PER_ITEM, _row_items, _rows_of

    items = _row_items(n, threads)
    ranges = [_rows_of(i, items, n) for i in range(items)]
    assert [r for lo, hi in ranges for r in range(lo, hi)] == list(range(n))
    assert items >= min(threads, n) and all(1 <= hi - lo <= ROWS_PER_ITEM for lo, hi in ranges)
    if threads == 1:
        assert items == -(-n // ROWS_PER_ITEM)  # one thread: items of 4 rows, as before


def test_a_forward_whose_team_runs_one_iteration_after_another_gives_the_same_logits():
    """A team of 2 on one numba thread (both iterations on it, in turn): no deadlock, the same logits."""
    import edgeinfer
    from kernels_cpu.forward import make_scratch

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=64, n_seq=2, n_threads=2) as model:
        engine, tables = model.engine, model.engine.runner.tables
        engine.prefill([1, 504, 3458, 282])
        tokens, positions = np.array([33, 34, 35]), np.array([4, 5, 6])
        seqs, rows = np.zeros(3, np.int64), np.arange(3)
        results = []
        before = numba.get_num_threads()
        try:
            for numba_threads in (2, 1):
                numba.set_num_threads(numba_threads)
                scratch = make_scratch(tables.hyper, 3)
                scratch.threads[0] = 2
                logits = np.zeros((3, model.n_vocab), np.float32)
                engine.runner._compiled(*tables.arguments(tokens, positions, seqs, rows, engine.cache.k,
                                                          engine.cache.v, scratch, logits))
                results.append(logits)
        finally:
            numba.set_num_threads(before)
        np.testing.assert_array_equal(results[0], results[1])
        assert np.isfinite(results[0]).all() and results[0].std() > 0
