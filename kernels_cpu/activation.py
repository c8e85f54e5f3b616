"""Gated feed-forward activations: SiLU(gate) * up (SwiGLU) and GELU-tanh(gate) * up (GeGLU), in place into gate.

tanh is a rational function of x (Eigen's fast float tanh: odd degree-13 numerator, even degree-6 denominator,
within a few float32 ulps of tanh) made of multiplies, adds and one divide, so the loops vectorize, where
math.tanh / math.exp are scalar library calls (about 10x slower here). SiLU uses sigmoid(g) = (1 + tanh(g / 2)) / 2.
No fastmath: the row kernel (decode) and the block kernel (prefill) must round identically.
"""
import math

import numpy as np
from numba import njit, prange

_SQRT_2_OVER_PI = np.float32(math.sqrt(2.0 / math.pi))
_GELU_CUBIC = np.float32(0.044715)
_TANH_CLAMP = np.float32(7.90531110763549805)  # tanh is 1 - 2e-7 here: +-1 in float32 beyond
_A1, _A3, _A5, _A7 = (np.float32(v) for v in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
                                              5.12229709037114e-08))
_A9, _A11, _A13 = (np.float32(v) for v in (-8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))
_B0, _B2, _B4, _B6 = (np.float32(v) for v in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04,
                                              1.19825839466702e-06))
_HALF, _ONE = np.float32(0.5), np.float32(1.0)


@njit(cache=True, inline="always", error_model="numpy")
def tanh_f32(x):
    """tanh of a float32, as a rational function (see the module docstring)."""
    x = x if x < _TANH_CLAMP else _TANH_CLAMP  # (not min/max: Numba's NaN handling there blocks vectorizing)
    x = x if x > -_TANH_CLAMP else -_TANH_CLAMP
    x2 = x * x
    p = x2 * _A13 + _A11
    p = x2 * p + _A9
    p = x2 * p + _A7
    p = x2 * p + _A5
    p = x2 * p + _A3
    p = x2 * p + _A1
    p = x * p
    q = x2 * _B6 + _B4
    q = x2 * q + _B2
    q = x2 * q + _B0
    return p / q


@njit(cache=True, inline="always", error_model="numpy")
def _gelu_mul(g, u):
    return _HALF * g * (_ONE + tanh_f32(_SQRT_2_OVER_PI * (g + _GELU_CUBIC * g * g * g))) * u


@njit(cache=True, inline="always", error_model="numpy")
def _silu_mul(g, u):
    return g * (_HALF + _HALF * tanh_f32(_HALF * g)) * u


@njit(cache=True, error_model="numpy")
def gated_activation_row(gate, up, gelu):
    """One row (decode): gate (d,) <- GELU-tanh(gate) * up if gelu else SiLU(gate) * up, on the calling thread.
    (The branch stays outside the loops: inside, it keeps LLVM from vectorizing them.)"""
    if gelu:
        for j in range(gate.shape[0]):
            gate[j] = _gelu_mul(gate[j], up[j])
    else:
        for j in range(gate.shape[0]):
            gate[j] = _silu_mul(gate[j], up[j])


# up to this many elements (a decode step of a few sequences) the calling thread does them: waking the workers cost
# more (8 of SmolLM2's rows of 1536: 5.7 us alone, 6.7 us on 2 threads; 16 rows: 11.4 against 6.9)
SERIAL_ELEMENTS = 8 * 1536


@njit(cache=True, parallel=True, error_model="numpy")
def _gated_rows(gate, up, gelu):
    if gate.size <= SERIAL_ELEMENTS:
        for r in range(gate.shape[0]):
            gated_activation_row(gate[r], up[r], gelu)
        return
    for r in prange(gate.shape[0]):
        gated_activation_row(gate[r], up[r], gelu)


@njit(cache=True, error_model="numpy")
def gated_from_fused_row(gate_up, out, gelu):
    """One row: out (d,) <- GELU-tanh(gate) * up if gelu else SiLU(gate) * up, where gate_up (2d,) is the fused
    gate|up projection: read where the projection left them, not copied apart first."""
    d = out.shape[0]
    gated_row(gate_up[:d], gate_up[d:2 * d], out, gelu)


@njit(cache=True, error_model="numpy")
def gated_row(gate, up, out, gelu):
    """out (d,) <- GELU-tanh(gate) * up if gelu else SiLU(gate) * up (out may be gate): a row, or a part of one."""
    if gelu:
        for j in range(out.shape[0]):
            out[j] = _gelu_mul(gate[j], up[j])
    else:
        for j in range(out.shape[0]):
            out[j] = _silu_mul(gate[j], up[j])


@njit(cache=True, parallel=True, error_model="numpy")
def gated_from_fused_rows(gate_up, out, gelu):
    if out.size <= SERIAL_ELEMENTS:
        for r in range(out.shape[0]):
            gated_from_fused_row(gate_up[r], out[r], gelu)
        return
    for r in prange(out.shape[0]):
        gated_from_fused_row(gate_up[r], out[r], gelu)


def silu_mul_inplace(gate: np.ndarray, up: np.ndarray) -> None:
    """gate (n, d) float32 <- SiLU(gate) * up."""
    _gated_rows(gate, up, False)


def gelu_tanh_mul_inplace(gate: np.ndarray, up: np.ndarray) -> None:
    """gate (n, d) float32 <- GELU(gate, tanh approximation) * up."""
    _gated_rows(gate, up, True)
