"""RMSNorm over the last axis, in place or into `out`."""
import numpy as np
from numba import njit, prange


@njit(cache=True, inline="always")
def _scale_row(x, r, acc, weight, eps, out):
    d = x.shape[1]
    scale = np.float32(1.0 / np.sqrt(acc / d + eps))
    for j in range(d):
        out[r, j] = x[r, j] * scale * weight[j]


@njit(cache=True, fastmath=False, parallel=False)
def rms_norm_rows(x, weight, eps, out):
    """out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight, for x and out (n_rows, d) float32; out may be x.
    Four rows at a time: each row's sum is still one chain in order (the same bits as alone), but four chains in
    flight hide the float64 add's latency (a decode step of several sequences, a verify batch)."""
    n_rows, d = x.shape
    r = 0
    while r + 4 <= n_rows:
        a0 = a1 = a2 = a3 = 0.0  # float64: the mean of squares over a few thousand values loses digits in float32
        for j in range(d):
            a0 += np.float64(x[r, j]) * x[r, j]
            a1 += np.float64(x[r + 1, j]) * x[r + 1, j]
            a2 += np.float64(x[r + 2, j]) * x[r + 2, j]
            a3 += np.float64(x[r + 3, j]) * x[r + 3, j]
        _scale_row(x, r, a0, weight, eps, out)
        _scale_row(x, r + 1, a1, weight, eps, out)
        _scale_row(x, r + 2, a2, weight, eps, out)
        _scale_row(x, r + 3, a3, weight, eps, out)
        r += 4
    for r in range(r, n_rows):
        acc = 0.0
        for j in range(d):
            acc += np.float64(x[r, j]) * x[r, j]
        _scale_row(x, r, acc, weight, eps, out)


@njit(cache=True, parallel=True)
def rms_norm_rows_parallel(x, weight, eps, out):
    """rms_norm_rows for many rows (prefill), rows split across threads."""
    n_rows, d = x.shape
    for r in prange(n_rows):
        acc = 0.0
        for j in range(d):
            acc += np.float64(x[r, j]) * x[r, j]
        _scale_row(x, r, acc, weight, eps, out)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float, out: np.ndarray | None = None) -> np.ndarray:
    """RMSNorm of x (..., d) with weight (d,); returns out (same shape, float32)."""
    x2 = x.reshape(-1, x.shape[-1])
    if out is None:
        out = np.empty_like(x2)
    out2 = out.reshape(x2.shape)
    if x2.shape[0] >= 64:
        rms_norm_rows_parallel(x2, weight, np.float64(eps), out2)
    else:
        rms_norm_rows(x2, weight, np.float64(eps), out2)
    return out2.reshape(x.shape)
