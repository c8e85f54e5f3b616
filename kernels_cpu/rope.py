"""Rotary position embedding, applied in place to (n_tokens, n_heads, head_dim) float32 arrays."""
import numpy as np
from numba import njit

from kernels_cpu.ops_reference import ROPE_NEOX, ROPE_NORMAL, rope_frequencies  # noqa: F401  (re-exported)


@njit(cache=True)
def rope_inplace(x, positions, freqs, style):
    """Rotate the first 2 * len(freqs) dims of every head of x (n_tokens, n_heads, head_dim): pair i by the angle
    positions[t] * freqs[i] (freqs float64: `rope_frequencies`, where RoPE scaling is folded in).

    style 0 (normal): pairs (2i, 2i+1); style 1 (NeoX): pairs (i, i + n_rot/2). Frequencies of 0 (a layer without
    RoPE) rotate by angle 0, which is exactly the identity."""
    n_tokens, n_heads, _ = x.shape
    half = freqs.shape[0]
    cos = np.empty(half, dtype=np.float64)
    sin = np.empty(half, dtype=np.float64)
    for t in range(n_tokens):
        for i in range(half):
            angle = positions[t] * freqs[i]
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
