"""Compiled passes over a forward pass's logits: checks on each row, the sampler's top-k selection, and the
normalizer of a log-softmax (logprobs).

A server step has a row of logits per sequence (Gemma 3: 262k floats, 1 MB each); numpy's two reductions per row
(min and max: NaN reaches both) read each row twice and were a third of the step's Python time at 8 sequences.
"""
import numpy as np
from numba import njit, types

from kernels_cpu.simd import (add_widened, exp_f32x16, hmax, load_f32x16, splat_f32x16, tree_sum, vmax, vsub,
                              zero_f64x16)


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


@njit(cache=True)
def masked_by_bits(logits, bits, out):
    """out (n,) float32 = logits where bit i of `bits` (uint8, little-endian bit order: llguidance's token
    bitmask) is set, -inf where it is not: a grammar's allowed tokens in one pass into a buffer the caller keeps
    (numpy's unpackbits, astype and where made three vocabulary-sized arrays per token)."""
    for i in range(out.shape[0]):
        out[i] = logits[i] if (bits[i >> 3] >> (i & 7)) & 1 else -np.inf


_CHUNK = 256  # values per chunk of the largest-value pass (a multiple of 16)


@njit(cache=True, inline="always")
def _largest_of(row, start, stop):
    """The largest of row[start:stop] (stop - start a positive multiple of 16), 16 lanes at a time: a scalar
    comparison chain is not vectorized by the compiler."""
    lanes = load_f32x16(row, start)
    for i in range(start + 16, stop, 16):
        lanes = vmax(lanes, load_f32x16(row, i))
    return hmax(lanes)


@njit(cache=True, inline="always")
def _first_largest(row):
    """np.argmax of a row with no NaN: the largest value of each chunk of 256, 16 lanes at a time, then the first
    chunk holding the row's largest, then the first index in it (a scalar comparison chain over the row is not
    vectorized by the compiler: 83 us for Qwen2.5's 152k values; ties, -0.0 == 0.0 and +-inf as np.argmax)."""
    n = row.shape[0]
    whole = n // _CHUNK * _CHUNK
    top, start = row[0], 0  # the largest so far and where the first chunk (or tail index) holding it starts
    for c in range(0, whole, _CHUNK):
        largest = _largest_of(row, c, c + _CHUNK)
        if largest > top:  # strictly: a later chunk with the same largest value is not the first
            top, start = largest, c
    for i in range(whole, n):
        if row[i] > top:
            top, start = row[i], i
    for i in range(start, n):
        if row[i] == top:
            return i
    return 0


@njit(cache=True, nogil=True)
def row_summaries(logits, best, finite):
    """For each row r of logits (n, n_vocab) float32: best[r] = its first largest index (np.argmax's, for rows with
    no NaN) and finite[r] = whether every value is finite. A server step asks both of every row; called per row from
    Python (np.argmax, then all_finite) they took half the step's Python time at 8 sequences. Two vectorized passes
    (finite; the largest value per chunk) and a scan of one chunk: 8 rows of SmolLM2's 49k / Qwen2.5's 152k / Gemma
    3's 262k values in 53 / 161 / 280 us, against 320 / 1023 / 1739 us for one scalar pass (Zen 4)."""
    for r in range(logits.shape[0]):
        row = logits[r]
        finite[r] = all_finite_flat(row)
        best[r] = _first_largest(row)


_TOP_K_BLOCK = 64  # values per block of top_k_order's first pass (a multiple of 16)
# One signature, read-only arrays (writable ones convert to them): the sampler passes its read-only ids, other callers
# writable ones, and each kind would otherwise compile its own copy (7 s on a first run).
_TOP_K_SIGNATURE = types.int64[::1](types.Array(types.float32, 1, "C", readonly=True),
                                    types.Array(types.int64, 1, "C", readonly=True), types.int64)


@njit(_TOP_K_SIGNATURE, cache=True)
def top_k_order(logits, ids, k):
    """Positions of the min(k, n) largest of logits (1-D float32, no NaN), largest first, ties to the lower id
    (ids: the candidates' token ids, int64): np.lexsort((ids, -logits))[:k]. The sampler's top-k over a whole
    vocabulary, in two passes that read the row about once: np.argpartition took 62 us of a 99 us SmolLM2 sample
    (49k logits) and most of a 222 us Qwen2.5 one (152k).
    1. The largest value of each block of 64. The k-th largest of these maxima, t, is a lower bound of the k-th
       largest value: the k blocks whose maxima reach t hold at least k values >= t.
    2. The positions of the values >= t, from the blocks whose maxima reach t (about k blocks), sorted: a few dozen
       to a few hundred values, not the row.
    Where fewer than k blocks hold a value > -inf (a row masked to a few tokens), the finite values come first,
    then -inf positions by id."""
    n = logits.shape[0]
    k = min(k, n)
    if k <= 0:
        return np.empty(0, np.int64)
    n_blocks = (n + _TOP_K_BLOCK - 1) // _TOP_K_BLOCK
    maxima = np.empty(n_blocks, np.float32)
    whole = n // _TOP_K_BLOCK
    for b in range(whole):
        maxima[b] = _largest_of(logits, b * _TOP_K_BLOCK, b * _TOP_K_BLOCK + _TOP_K_BLOCK)
    if whole < n_blocks:
        top = logits[whole * _TOP_K_BLOCK]
        for i in range(whole * _TOP_K_BLOCK, n):
            top = max(top, logits[i])
        maxima[whole] = top
    threshold = np.float32(-np.inf)
    if n_blocks >= k:
        threshold = np.partition(maxima, n_blocks - k)[n_blocks - k]
    finite_only = threshold == -np.inf  # then the -inf values are taken by id after the finite ones
    reaching = 0
    for b in range(n_blocks):
        reaching += maxima[b] >= threshold and maxima[b] > -np.inf
    found = np.empty(reaching * _TOP_K_BLOCK, np.int64)  # (a vocabulary-sized buffer would be mmap'd every call)
    count = 0
    for b in range(n_blocks):
        if maxima[b] >= threshold and maxima[b] > -np.inf:
            for i in range(b * _TOP_K_BLOCK, min(b * _TOP_K_BLOCK + _TOP_K_BLOCK, n)):
                v = logits[i]
                if v >= threshold and not (finite_only and v == -np.inf):
                    found[count] = i
                    count += 1
    found = found[:count]
    by_id = found[np.argsort(ids[found], kind="mergesort")]
    order = by_id[np.argsort(-logits[by_id], kind="mergesort")]
    if count >= k:
        return order[:k].copy()
    masked = np.empty(n - count, np.int64)  # the -inf values, lower ids first (a row masked to fewer than k tokens)
    m = 0
    for i in range(n):
        if logits[i] == -np.inf:
            masked[m] = i
            m += 1
    masked = masked[:m]
    masked = masked[np.argsort(ids[masked], kind="mergesort")]
    return np.concatenate((order, masked[:k - count]))


@njit(cache=True)
def log_normalizer(logits):
    """log(sum(exp(logits))) of a 1-D float32 row whose largest value is finite: what a log-softmax subtracts
    (OpenAI's logprobs). Each exp in float32 within 2 ulp (exp_f32x16), their sum in float64: within ~1e-8 of float64
    numpy's on the rows tested, which took 138 us a token over SmolLM2's 49k logits (here 23 us, with the top 5) and
    2.1 ms over Qwen2.5's 152k (its 1.2 MB float64 temporaries mmap'd at each call; here 61 us)."""
    n = logits.shape[0]
    whole = n // 16 * 16
    largest = _largest_of(logits, 0, whole) if whole > 0 else np.float32(-np.inf)
    for i in range(whole, n):
        largest = max(largest, logits[i])
    shift = splat_f32x16(largest)
    total = zero_f64x16()
    for i in range(0, whole, 16):
        total = add_widened(total, exp_f32x16(vsub(load_f32x16(logits, i), shift)))
    s = tree_sum(total)
    for i in range(whole, n):
        s += np.exp(np.float64(logits[i]) - np.float64(largest))
    return np.float64(largest) + np.log(s)
