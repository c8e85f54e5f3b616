"""Quantize activations x to int8 blocks of 32 (ggml's quantize_row_q8_1), the input of the int8 matvec kernels.

Block b of x (elements 32b .. 32b + 31) becomes xq (int8), a float32 scale xd[b] = max|x| / 127 and the sum of its
xq, xs[b] (int32): x ~ xd[b] * xq. The sums serve the formats with an offset or a minimum (sum of w * x over a block
with w = d * q + m is d * sum(q * xq) * xd + m * xd * xs). Rounding is ggml's: q = roundf(x * (1 / d)) in float32,
halves away from zero; ggml stores d as a half, we keep it float32.
"""
import numpy as np
from numba import njit, prange

from kernels_cpu.formats import QK
from kernels_cpu.simd import absmax_f32x32, round_store_i8x32


@njit(cache=True, fastmath=False)
def quantize_activations(x, xq, xd, xs):
    """x float32[n] (n a multiple of 32, C-contiguous) -> xq int8[n], xd float32[n // 32], xs int32[n // 32].
    fastmath=False said explicitly: a function that leaves it unset is compiled with its caller's flags, and under
    the attention kernels' fast math 1 / d became an approximate reciprocal, so a product of exactly k + 0.5 came
    out just under it and rounded the other way (attention's q8_0 queries, 2% of random test cases)."""
    for b in range(x.shape[0] // QK):
        d = absmax_f32x32(x, QK * b) / np.float32(127.0)
        inverse = np.float32(1.0) / d if d > 0 else np.float32(0.0)
        xs[b] = round_store_i8x32(x, QK * b, inverse, xq)
        xd[b] = d


# below this many elements (a decode step of a few sequences, a short verify pass) the calling thread quantizes them:
# waking the workers cost more (8 rows of 576: 1.2 us alone, 3.3 us on 2 threads; 16 rows: 2.5 us either way)
SERIAL_ELEMENTS = 16 * 576


@njit(cache=True, parallel=True)
def quantize_activations_rows(x, xq, xd, xs):
    """A batch (prefill): x float32[n_tokens, n] -> xq int8[n_tokens, n], xd float32[n_tokens, n // 32],
    xs int32[n_tokens, n // 32]; row t as quantize_activations(x[t], ...)."""
    if x.size < SERIAL_ELEMENTS:
        for t in range(x.shape[0]):
            quantize_activations(x[t], xq[t], xd[t], xs[t])
        return
    for t in prange(x.shape[0]):
        quantize_activations(x[t], xq[t], xd[t], xs[t])


def quantized_activations(x: np.ndarray):
    """Convenience for tests and tools: (xq, xd, xs) of a float32 x of shape (n,) or (n_tokens, n)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"activation length {x.shape[-1]} is not a multiple of {QK}")
    xq = np.empty(x.shape, np.int8)
    xd = np.empty(x.shape[:-1] + (x.shape[-1] // QK,), np.float32)
    xs = np.empty(xd.shape, np.int32)
    (quantize_activations if x.ndim == 1 else quantize_activations_rows)(x, xq, xd, xs)
    return xq, xd, xs
