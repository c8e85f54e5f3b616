"""Causal grouped-query attention over a KV cache, optionally with a sliding window.

The cache holds keys and values by position: k_cache (n_ctx, n_kv_heads, d_k), v_cache (n_ctx, n_kv_heads, d_v).
A query at position p attends to cached positions j <= p, and with window > 0 only to those with p - j < window
(llama.cpp's standard sliding window). Scores and softmax are float32 values accumulated in float64.
"""
import numpy as np
from numba import njit, prange


@njit(cache=True, parallel=True)
def attention_cached(q, q_positions, k_cache, v_cache, scale, window, out):
    """q (n_q, n_heads, d_k) at q_positions (n_q,) -> out (n_q, n_heads, d_v); work split over (query, head)."""
    for job in prange(q.shape[0] * q.shape[1]):
        _attend(q, q_positions, k_cache, v_cache, scale, window, out, job)


@njit(cache=True)
def attention_cached_serial(q, q_positions, k_cache, v_cache, scale, window, out):
    """attention_cached on the calling thread: for one query over a short cache, starting threads costs more."""
    for job in range(q.shape[0] * q.shape[1]):
        _attend(q, q_positions, k_cache, v_cache, scale, window, out, job)


@njit(cache=True, inline="always")
def _attend(q, q_positions, k_cache, v_cache, scale, window, out, job):
    """One (query, head) pair: softmax(q . K^T * scale) V over the visible cached positions."""
    n_heads, d_k = q.shape[1], q.shape[2]
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
    scores = np.empty(n_keys, dtype=np.float64)
    best = -np.inf
    for j in range(n_keys):
        s = 0.0
        for c in range(d_k):
            s += q[i, h, c] * k_cache[first + j, kv, c]
        s *= scale
        scores[j] = s
        if s > best:
            best = s
    total = 0.0
    for j in range(n_keys):
        scores[j] = np.exp(scores[j] - best)
        total += scores[j]
    acc = np.zeros(d_v, dtype=np.float64)
    for j in range(n_keys):
        w = scores[j] / total
        for c in range(d_v):
            acc[c] += w * v_cache[first + j, kv, c]
    for c in range(d_v):
        out[i, h, c] = acc[c]
