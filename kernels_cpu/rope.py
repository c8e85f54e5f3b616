"""Rotary position embedding, applied in place to (n_tokens, n_heads, head_dim) float32 arrays."""
import numpy as np
from numba import njit

from kernels_cpu.ops_reference import ROPE_NEOX, ROPE_NORMAL  # noqa: F401  (re-exported: callers pick a style)


@njit(cache=True)
def rope_inplace(x, positions, base, n_rot, style):
    """Rotate the first n_rot dims of every head of x (n_tokens, n_heads, head_dim) by pos * base^(-2i/n_rot).

    style 0 (normal): pairs (2i, 2i+1); style 1 (NeoX): pairs (i, i + n_rot/2)."""
    n_tokens, n_heads, _ = x.shape
    half = n_rot // 2
    cos = np.empty(half, dtype=np.float64)
    sin = np.empty(half, dtype=np.float64)
    inv_freq = np.empty(half, dtype=np.float64)
    for i in range(half):
        inv_freq[i] = base ** (-2.0 * i / n_rot)
    for t in range(n_tokens):
        for i in range(half):
            angle = positions[t] * inv_freq[i]
            cos[i] = np.cos(angle)
            sin[i] = np.sin(angle)
        for h in range(n_heads):
            for i in range(half):
                if style == 1:
                    a_idx, b_idx = i, i + half
                else:
                    a_idx, b_idx = 2 * i, 2 * i + 1
                a = x[t, h, a_idx]
                b = x[t, h, b_idx]
                x[t, h, a_idx] = a * cos[i] - b * sin[i]
                x[t, h, b_idx] = a * sin[i] + b * cos[i]
