"""Gated feed-forward activations: SiLU(gate) * up (SwiGLU) and GELU-tanh(gate) * up (GeGLU), in place into gate."""
import math

from numba import njit, prange

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@njit(cache=True, parallel=True)
def silu_mul_inplace(gate, up):
    """gate (n, d) <- SiLU(gate) * up."""
    n, d = gate.shape
    for r in prange(n):
        for j in range(d):
            g = gate[r, j]
            gate[r, j] = g / (1.0 + math.exp(-g)) * up[r, j]


@njit(cache=True, parallel=True)
def gelu_tanh_mul_inplace(gate, up):
    """gate (n, d) <- GELU(gate, tanh approximation) * up."""
    n, d = gate.shape
    for r in prange(n):
        for j in range(d):
            g = gate[r, j]
            gate[r, j] = 0.5 * g * (1.0 + math.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g))) * up[r, j]


@njit(cache=True)
def gated_activation_row(gate, up, gelu):
    """One row (decode): gate (d,) <- GELU-tanh(gate) * up if gelu else SiLU(gate) * up, on the calling thread."""
    for j in range(gate.shape[0]):
        g = gate[j]
        if gelu:
            gate[j] = 0.5 * g * (1.0 + math.tanh(_SQRT_2_OVER_PI * (g + 0.044715 * g * g * g))) * up[j]
        else:
            gate[j] = g / (1.0 + math.exp(-g)) * up[j]
