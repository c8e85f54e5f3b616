"""Plain numpy references for the transformer ops in this package (norm, rope, attention, activations).

They define what the Numba kernels must compute; tests compare the two on random data and real activations.
"""
import numpy as np

ROPE_NORMAL, ROPE_NEOX = 0, 1  # rotated pairs: (2i, 2i+1) as in GPT-J / llama GGUF, or (i, i + d/2) as in GPT-NeoX


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x (..., d) / sqrt(mean(x^2) + eps) * weight (d,)."""
    x64 = x.astype(np.float64)
    scale = 1.0 / np.sqrt(np.mean(x64 * x64, axis=-1, keepdims=True) + eps)
    return (x64 * scale * weight).astype(np.float32)


def rope_frequencies(base: float, n_rot: int, freq_factors=None, freq_scale: float = 1.0) -> np.ndarray:
    """The angle per position of each rotated pair i < n_rot/2 (float64): freq_scale * base^(-2i/n_rot) / factor_i.

    As llama.cpp's ggml_rope_ext without YaRN: freq_scale is linear scaling's 1/factor, freq_factors the per-pair
    divisors of Llama 3's `rope_freqs.weight` (None: all 1)."""
    freqs = float(base) ** (-np.arange(n_rot // 2, dtype=np.float64) * 2.0 / n_rot)
    if freq_factors is not None and len(freq_factors):
        freqs = freqs / np.asarray(freq_factors, dtype=np.float64)
    return freqs * float(freq_scale)


def rope(x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, style: int) -> np.ndarray:
    """Rotary position embedding of x (n_tokens, n_heads, head_dim) at integer positions (n_tokens,).

    The first n_rot = 2 * len(freqs) dimensions of each head are rotated: pair i by angle pos * freqs[i]."""
    out = x.astype(np.float64).copy()
    n_rot = 2 * len(freqs)
    half = n_rot // 2
    angles = positions.astype(np.float64)[:, None] * np.asarray(freqs, np.float64)[None, :]  # (n_tokens, half)
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    if style == ROPE_NEOX:
        a, b = x[..., :half].astype(np.float64), x[..., half:n_rot].astype(np.float64)
        out[..., :half], out[..., half:n_rot] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:n_rot:2].astype(np.float64), x[..., 1:n_rot:2].astype(np.float64)
        out[..., 0:n_rot:2], out[..., 1:n_rot:2] = a * cos - b * sin, a * sin + b * cos
    return out.astype(np.float32)


def attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, q_positions: np.ndarray, scale: float,
              window: int = 0, softcap: float = 0.0) -> np.ndarray:
    """Causal grouped-query attention.

    q (n_q, n_heads, d_k); k (n_keys, n_kv_heads, d_k) and v (n_keys, n_kv_heads, d_v) hold positions 0..n_keys-1.
    Query at position p sees keys j <= p, and with a sliding window (window > 0) only those with p - j < window.
    softcap > 0 caps each score s (already scaled) to softcap * tanh(s / softcap), as Gemma 2 does.
    Returns (n_q, n_heads, d_v)."""
    n_q, n_heads, _ = q.shape
    n_keys, n_kv, d_v = v.shape
    group = n_heads // n_kv
    out = np.zeros((n_q, n_heads, d_v), dtype=np.float64)
    key_pos = np.arange(n_keys)
    for i in range(n_q):
        p = q_positions[i]
        visible = key_pos <= p
        if window > 0:
            visible &= (p - key_pos) < window
        for h in range(n_heads):
            kv = h // group
            scores = (k[visible, kv, :].astype(np.float64) @ q[i, h].astype(np.float64)) * scale
            if softcap > 0:
                scores = softcap * np.tanh(scores / softcap)
            w = np.exp(scores - scores.max())
            out[i, h] = (w / w.sum()) @ v[visible, kv, :].astype(np.float64)
    return out.astype(np.float32)


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """SiLU(gate) * up, the SwiGLU feed-forward activation."""
    g = gate.astype(np.float64)
    return (g / (1.0 + np.exp(-g)) * up).astype(np.float32)


def gelu_tanh_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """GELU (tanh approximation) of gate times up, Gemma's GeGLU feed-forward activation."""
    g = gate.astype(np.float64)
    gelu = 0.5 * g * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (g + 0.044715 * g ** 3)))
    return (gelu * up).astype(np.float32)
