"""Causal grouped-query attention over a KV cache, optionally with a sliding window.

The cache holds keys and values by position: k_cache (n_ctx, n_kv_heads, d_k), v_cache (n_ctx, n_kv_heads, d_v).
A query at position p attends to cached positions j <= p, and with window > 0 only to those with p - j < window
(llama.cpp's standard sliding window). Scores and the weighted values are float32 (as llama.cpp's CPU path), the
softmax normalizer float64.
"""
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True, fastmath=True, error_model="numpy")
def attention_cached(q, q_positions, k_cache, v_cache, scale, window, out):
    """q (n_q, n_heads, d_k) at q_positions (n_q,) -> out (n_q, n_heads, d_v); work split over (query, head)."""
    for job in prange(q.shape[0] * q.shape[1]):
        _attend(q, q_positions, k_cache, v_cache, scale, window, out, job)


@njit(cache=True, fastmath=True, error_model="numpy")
def attention_cached_serial(q, q_positions, k_cache, v_cache, scale, window, out):
    """attention_cached on the calling thread: for one query over a short cache, starting threads costs more."""
    for job in range(q.shape[0] * q.shape[1]):
        _attend(q, q_positions, k_cache, v_cache, scale, window, out, job)


@njit(cache=True, inline="always", fastmath=True, error_model="numpy")
def _attend(q, q_positions, k_cache, v_cache, scale, window, out, job):
    """One (query, head) pair: softmax(q . K^T * scale) V over the visible cached positions. Dot products and the
    weighted sum of values run in float32 SIMD lanes (rows sliced first, so the inner loops vectorize); the
    softmax's maximum and normalizer are float64."""
    n_heads = q.shape[1]
    n_kv = k_cache.shape[1]
    d_v = v_cache.shape[2]
    group = n_heads // n_kv
    i = job // n_heads
    h = job - i * n_heads
    kv = h // group
    p = q_positions[i]
    first = 0
    if window > 0 and p - window + 1 > 0:
        first = p - window + 1
    n_keys = p + 1 - first
    qh = q[i, h]
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
    oh = out[i, h]
    for c in range(d_v):
        oh[c] = acc[c]


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
