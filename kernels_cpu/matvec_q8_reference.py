"""Plain-numpy references for the int8-activation kernels (activations_q8, matvec_q8), to test them against."""
import numpy as np

from kernels_cpu.formats import QK
from kernels_cpu.quant_reference import dequantize_reference


def quantize_activations_reference(x: np.ndarray):
    """ggml's quantize_row_q8_1 with a float32 scale: x float32[..., n] -> (xq int8, xd float32, xs int32), the last
    axis in blocks of 32. d = max|x| / 127, q = roundf(x * (1 / d)) in float32 (halves away from zero)."""
    x = np.asarray(x, dtype=np.float32)
    blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // QK, QK))
    d = (np.abs(blocks).max(axis=-1) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inverse = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = (blocks * inverse[..., None]).astype(np.float32).astype(np.float64)
    q = (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int8)
    return q.reshape(x.shape), d, q.astype(np.int32).sum(axis=-1).astype(np.int32)


def dequantize_activations_reference(xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """float64 x ~ xd * xq, block by block."""
    blocks = xq.astype(np.float64).reshape(xq.shape[:-1] + (xq.shape[-1] // QK, QK))
    return (blocks * xd.astype(np.float64)[..., None]).reshape(xq.shape)


def matvec_q8_reference(ggml_type: int, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """float64[n_rows]: (W dequantized by gguf.quants) @ (xd * xq), accumulated in float64."""
    w = dequantize_reference(ggml_type, raw, xq.shape[-1]).astype(np.float64)
    return w @ dequantize_activations_reference(xq, xd)


def matvec_q8_error_scale(ggml_type: int, raw: np.ndarray, xq: np.ndarray, xd: np.ndarray) -> np.ndarray:
    """float64[n_rows]: sum |w| |x| per row, the scale relative errors are measured against."""
    w = dequantize_reference(ggml_type, raw, xq.shape[-1]).astype(np.float64)
    return np.abs(w) @ np.abs(dequantize_activations_reference(xq, xd))
