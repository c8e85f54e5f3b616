"""Checks on a forward pass's logits, in one pass over them.

A server step has a row of logits per sequence (Gemma 3: 262k floats, 1 MB each); numpy's two reductions per row
(min and max: NaN reaches both) read each row twice and were a third of the step's Python time at 8 sequences.
"""
from numba import njit


@njit(cache=True)
def all_finite_flat(values):
    """Whether every value of a 1-D float array is finite. v - v is 0 for a finite v and NaN for an infinite or NaN
    one; the comparisons are or-ed as integers, a reduction the compiler vectorizes (no fastmath: it would assume
    no NaN)."""
    bad = 0
    for i in range(values.shape[0]):
        v = values[i]
        bad |= (v - v) != 0.0
    return bad == 0
