"""The transformer op kernels (RMSNorm, RoPE, attention, gated activations) against their numpy references."""
import numpy as np
import pytest

from kernels_cpu import ops_reference as ref
from kernels_cpu.activation import gelu_tanh_mul_inplace, silu_mul_inplace
from kernels_cpu.attention import attention_cached
from kernels_cpu.norm import rms_norm
from kernels_cpu.rope import rope_inplace

rng = np.random.default_rng(0)


@pytest.mark.parametrize("n_rows", [1, 7, 100])
def test_rms_norm_matches_reference(n_rows):
    x = rng.standard_normal((n_rows, 640)).astype(np.float32) * 3
    w = rng.standard_normal(640).astype(np.float32)
    np.testing.assert_allclose(rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_in_place_per_head():
    x = rng.standard_normal((3, 4, 256)).astype(np.float32)
    w = rng.standard_normal(256).astype(np.float32)
    expected = ref.rms_norm(x, w, 1e-6)
    rms_norm(x, w, 1e-6, out=x)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("style", [ref.ROPE_NORMAL, ref.ROPE_NEOX])
@pytest.mark.parametrize("n_rot", [64, 32])
def test_rope_matches_reference(style, n_rot):
    x = rng.standard_normal((5, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 17, 300, 4095], dtype=np.int64)
    expected = ref.rope(x, pos, 10000.0, n_rot, style)
    rope_inplace(x, pos, 10000.0, n_rot, style)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("n_heads,n_kv", [(4, 4), (9, 3), (4, 1)])
def test_attention_matches_reference(n_heads, n_kv, window):
    n_keys, d = 12, 32
    k = rng.standard_normal((16, n_kv, d)).astype(np.float32)  # cache longer than what is filled
    v = rng.standard_normal((16, n_kv, d)).astype(np.float32)
    q_pos = np.array([8, 9, 10, 11], dtype=np.int64)
    q = rng.standard_normal((4, n_heads, d)).astype(np.float32)
    out = np.empty((4, n_heads, d), dtype=np.float32)
    attention_cached(q, q_pos, k, v, 0.2, window, out)
    expected = ref.attention(q, k[:n_keys], v[:n_keys], q_pos, 0.2, window)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_activations_match_reference():
    gate = rng.standard_normal((3, 500)).astype(np.float32) * 4
    up = rng.standard_normal((3, 500)).astype(np.float32)
    g = gate.copy()
    silu_mul_inplace(g, up)
    np.testing.assert_allclose(g, ref.silu_mul(gate, up), rtol=1e-5, atol=1e-6)
    g = gate.copy()
    gelu_tanh_mul_inplace(g, up)
    np.testing.assert_allclose(g, ref.gelu_tanh_mul(gate, up), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ops_on_real_gemma_weights():
    """Real norm weights (Gemma's per-head Q norm and block norm) on activation-scale inputs."""
    from conftest import model_path
    from edgeinfer.gguf_reader import GGUFFile

    with GGUFFile(model_path("gemma3-270m")) as g:
        q_norm = g.tensor("blk.0.attn_q_norm.weight").array().copy()
        attn_norm = g.tensor("blk.0.attn_norm.weight").array().copy()
    x = rng.standard_normal((6, 4, 256)).astype(np.float32) * 20
    np.testing.assert_allclose(rms_norm(x, q_norm, 1e-6), ref.rms_norm(x, q_norm, 1e-6), rtol=1e-5, atol=1e-5)
    h = rng.standard_normal((6, 640)).astype(np.float32) * 50
    np.testing.assert_allclose(rms_norm(h, attn_norm, 1e-6), ref.rms_norm(h, attn_norm, 1e-6), rtol=1e-5, atol=1e-5)
