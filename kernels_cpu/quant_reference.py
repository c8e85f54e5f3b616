"""Plain-numpy references for the quant kernels, and random ggml blocks to test them with.

The dequantize reference is gguf-py's `gguf.quants` (an independent numpy implementation of ggml's block formats),
imported lazily so the runtime never loads it; the kernels are tested against it.
"""
import numpy as np

from kernels_cpu.formats import (BF16, BLOCK_SIZES, F16, F32, Q2_K, Q3_K, Q4_0, Q4_1, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K,
                                 Q8_0, check_raw)

# byte offsets of the IEEE-half scale fields (d, m, dmin) inside one block of each block format
HALF_FIELDS = {
    Q8_0: (0,), Q4_0: (0,), Q4_1: (0, 2), Q5_0: (0,), Q5_1: (0, 2),
    Q2_K: (80, 82), Q3_K: (108,), Q4_K: (0, 2), Q5_K: (0, 2), Q6_K: (208,),
}


def dequantize_reference(ggml_type: int, raw: np.ndarray, n_cols: int) -> np.ndarray:
    """float32[n_rows, n_cols] from raw ggml blocks uint8[n_rows, row_bytes], computed by gguf.quants."""
    from gguf.quants import dequantize as gguf_dequantize

    raw = check_raw(ggml_type, raw, n_cols)
    out = gguf_dequantize(np.ascontiguousarray(raw), ggml_type)
    return np.asarray(out, dtype=np.float32).reshape(raw.shape[0], n_cols)


def matvec_reference(ggml_type: int, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64[n_rows]: dequantize_reference(...) @ x, accumulated in float64."""
    return dequantize_reference(ggml_type, raw, x.shape[-1]).astype(np.float64) @ x.astype(np.float64)


def matmul_reference(ggml_type: int, raw: np.ndarray, x: np.ndarray) -> np.ndarray:
    """float64[n_tokens, n_rows]: x @ W.T with W = dequantize_reference(...), accumulated in float64."""
    return x.astype(np.float64) @ dequantize_reference(ggml_type, raw, x.shape[-1]).astype(np.float64).T


def random_raw(ggml_type: int, n_rows: int, n_cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8[n_rows, row_bytes] of random blocks: every quant bit random, half scales finite in [-scale, scale]
    with scale = 1 / 64 (so weights stay O(1)); plain float types hold standard-normal values."""
    if ggml_type in (F32, F16, BF16):
        values = rng.standard_normal((n_rows, n_cols)).astype(np.float32)
        if ggml_type == F32:
            return values.view(np.uint8)
        if ggml_type == F16:
            return values.astype(np.float16).view(np.uint8)
        return (values.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)  # truncation is fine for test data
    elements, nbytes = BLOCK_SIZES[ggml_type]
    n_blocks = n_cols // elements
    blocks = rng.integers(0, 256, size=(n_rows, n_blocks, nbytes), dtype=np.uint8)
    for offset in HALF_FIELDS[ggml_type]:
        halves = (rng.uniform(-1.0, 1.0, size=(n_rows, n_blocks)) / 64).astype(np.float16)
        blocks[:, :, offset:offset + 2] = halves.view(np.uint8).reshape(n_rows, n_blocks, 2)
    return blocks.reshape(n_rows, n_blocks * nbytes)


def quantized_raw(ggml_type: int, values: np.ndarray) -> np.ndarray:
    """uint8[n_rows, row_bytes]: float32 values quantized by gguf.quants (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, BF16)."""
    from gguf.quants import quantize as gguf_quantize

    return np.ascontiguousarray(gguf_quantize(values.astype(np.float32), ggml_type)).view(np.uint8)
