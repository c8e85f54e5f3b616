"""Y = X @ W.T for a block of tokens with int8 activations: the prefill counterpart of matvec_q8.

Each token's row of Y is computed by exactly the arithmetic of `matvec_q8_dispatch`, so a prompt evaluated in one
block gives the same logits as the same tokens decoded one at a time (llama.cpp has the same property). The loop over
tokens runs inside one compiled call; a layer's weights (at most a few MB for the models here) stay in cache across
tokens. A tile kernel that shares each weight load between tokens is the next step for prefill speed.
"""
import numpy as np
from numba import njit

from kernels_cpu.activations_q8 import quantize_activations_rows
from kernels_cpu.formats import check_out, check_raw
from kernels_cpu.matvec_q8 import matvec_q8_dispatch


@njit(cache=True)
def matmul_q8_rows(ggml_type, raw, xq, xd, xs, out):
    """out[t] = W @ x_t for every token t; xq int8 (n_tokens, n_cols), xd/xs (n_tokens, n_cols // 32)."""
    for t in range(xq.shape[0]):
        matvec_q8_dispatch(ggml_type, raw, xq[t], xd[t], xs[t], out[t])


def matmul_q8(ggml_type: int, raw: np.ndarray, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x float32 (n_tokens, n_cols) -> (n_tokens, n_rows): x quantized to int8 blocks, then integer dot products."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    n_tokens, n_cols = x.shape
    raw = check_raw(ggml_type, raw, n_cols)
    out = check_out(out, (n_tokens, raw.shape[0]))
    xq = np.empty((n_tokens, n_cols), np.int8)
    xd = np.empty((n_tokens, n_cols // 32), np.float32)
    xs = np.empty((n_tokens, n_cols // 32), np.int32)
    quantize_activations_rows(x, xq, xd, xs)
    matmul_q8_rows(int(ggml_type), raw, xq, xd, xs, out)
    return out
