"""Rotary position embedding, applied in place to (n_tokens, n_heads, head_dim) float32 arrays."""
import numpy as np
from numba import njit

from kernels_cpu.ops_reference import ROPE_NEOX, ROPE_NORMAL, rope_frequencies  # noqa: F401  (re-exported)


@njit(cache=True, inline="always")
def _rotate_heads(x, t, cos, sin, style):
    """Rotate every head of row t of x (n_tokens, n_heads, head_dim) by the angles whose cos/sin are given."""
    half = cos.shape[0]
    for h in range(x.shape[1]):
        for i in range(half):
            if style == 1:
                a_idx, b_idx = i, i + half
            else:
                a_idx, b_idx = 2 * i, 2 * i + 1
            a = x[t, h, a_idx]
            b = x[t, h, b_idx]
            x[t, h, a_idx] = a * cos[i] - b * sin[i]
            x[t, h, b_idx] = a * sin[i] + b * cos[i]


@njit(cache=True, inline="always")
def _angles(position, freqs, cos, sin):
    for i in range(freqs.shape[0]):
        angle = position * freqs[i]
        cos[i] = np.cos(angle)
        sin[i] = np.sin(angle)


@njit(cache=True)
def rope_inplace(x, positions, freqs, style):
    """Rotate the first 2 * len(freqs) dims of every head of x (n_tokens, n_heads, head_dim): pair i by the angle
    positions[t] * freqs[i] (freqs float64: `rope_frequencies`, where RoPE scaling is folded in).

    style 0 (normal): pairs (2i, 2i+1); style 1 (NeoX): pairs (i, i + n_rot/2). Frequencies of 0 (a layer without
    RoPE) rotate by angle 0, which is exactly the identity."""
    rope_qk_inplace(x, x[:, :0], positions, freqs, style)  # a second array of no heads


@njit(cache=True)
def rope_qk_inplace(q, k, positions, freqs, style):
    """rope_inplace of q and of k (the same rows), each row's sines and cosines computed once for both (a decode
    step of many sequences spends more on them than on the rotations)."""
    half = freqs.shape[0]
    cos = np.empty(half, dtype=np.float64)
    sin = np.empty(half, dtype=np.float64)
    for t in range(q.shape[0]):
        _angles(positions[t], freqs, cos, sin)
        _rotate_heads(q, t, cos, sin, style)
        _rotate_heads(k, t, cos, sin, style)
