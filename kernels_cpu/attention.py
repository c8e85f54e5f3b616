"""Causal grouped-query attention of a batch of rows over a KV cache of sequences, optionally with a sliding window.

The cache holds keys and values by sequence and position: k (n_seq, n_ctx, n_kv_heads, d_k), v (n_seq, n_ctx,
n_kv_heads, d_v). Row i, a query at position p of sequence s, attends to s's cached positions j <= p (and with
window > 0 only to those with p - j < window: llama.cpp's standard sliding window). Scores and the weighted values
are float32 (as llama.cpp's CPU path), the softmax normalizer float64.
"""
import numpy as np
from numba import njit, prange

# below this many multiply-adds per call, waking the worker threads costs more than it saves
PARALLEL_ATTENTION_WORK = 1 << 18


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _attend_head(qh, p, k_cache, v_cache, kv, scale, window, oh):
    """oh = softmax(qh . K^T * scale) V over kv head `kv`'s cached positions visible from position p. Dot products
    and the weighted sum of values run in float32 SIMD lanes (rows sliced first, so the inner loops vectorize); the
    softmax's maximum and normalizer are float64."""
    d_v = v_cache.shape[2]
    first = 0
    if window > 0 and p - window + 1 > 0:
        first = p - window + 1
    n_keys = p + 1 - first
    scores = np.empty(n_keys, dtype=np.float32)
    best = -np.inf
    for j in range(n_keys):
        s = _dot(qh, k_cache[first + j, kv]) * np.float32(scale)
        scores[j] = s
        if s > best:
            best = s
    total = 0.0
    for j in range(n_keys):
        e = np.exp(np.float64(scores[j]) - best)
        scores[j] = e
        total += e
    acc = np.zeros(d_v, dtype=np.float32)
    for j in range(n_keys):
        _axpy(np.float32(scores[j] / total), v_cache[first + j, kv], acc)
    for c in range(d_v):
        oh[c] = acc[c]


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _attend_row_head(q, positions, seqs, k_seqs, v_seqs, scale, window, out, job):
    """One (row, head) pair of a batch over a cache of sequences: row i reads its own sequence's cache."""
    n_heads = q.shape[1]
    i = job // n_heads
    h = job - i * n_heads
    s = seqs[i]
    _attend_head(q[i, h], positions[i], k_seqs[s], v_seqs[s], h // (n_heads // k_seqs.shape[2]), scale, window,
                 out[i, h])


@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def _attention_rows_parallel(q, positions, seqs, k_seqs, v_seqs, scale, window, out):
    for job in prange(q.shape[0] * q.shape[1]):
        _attend_row_head(q, positions, seqs, k_seqs, v_seqs, scale, window, out, job)


@njit(cache=True, fastmath=True, error_model="numpy")
def attention_rows(q, positions, seqs, k_seqs, v_seqs, scale, window, out):
    """A batch over a cache of sequences: q (n, n_heads, d_k), row i at positions[i] of sequence seqs[i], against
    k_seqs (n_seq, n_ctx, n_kv_heads, d_k) and v_seqs (n_seq, n_ctx, n_kv_heads, d_v) -> out (n, n_heads, d_v).
    Small work (one query over a short cache) runs on the calling thread: waking the workers would cost more."""
    work = 0
    for i in range(q.shape[0]):
        keys = positions[i] + 1
        if window > 0 and keys > window:
            keys = window
        work += keys
    if work * q.shape[1] * q.shape[2] < PARALLEL_ATTENTION_WORK:
        for job in range(q.shape[0] * q.shape[1]):
            _attend_row_head(q, positions, seqs, k_seqs, v_seqs, scale, window, out, job)
    else:
        _attention_rows_parallel(q, positions, seqs, k_seqs, v_seqs, scale, window, out)


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _dot(a, b):
    s = np.float32(0.0)
    for c in range(a.shape[0]):
        s += a[c] * b[c]
    return s


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _axpy(w, x, acc):
    for c in range(x.shape[0]):
        acc[c] += w * x[c]
