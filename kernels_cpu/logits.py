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


@njit(cache=True, nogil=True)
def row_summaries(logits, best, finite):
    """For each row r of logits (n, n_vocab) float32: best[r] = its first largest index (np.argmax's, for rows with
    no NaN) and finite[r] = whether every value is finite, in one pass over the row. A server step asks both of
    every row; called per row from Python (np.argmax, then all_finite) they took half the step's Python time at 8
    sequences, most of it waiting for a core beside the event loop."""
    for r in range(logits.shape[0]):
        row = logits[r]
        top, at, bad = row[0], 0, 0
        for i in range(row.shape[0]):
            v = row[i]
            bad |= (v - v) != 0.0
            if v > top:
                top, at = v, i
        best[r] = at
        finite[r] = bad == 0
