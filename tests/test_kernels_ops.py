"""The transformer op kernels (RMSNorm, RoPE, gated activations) against their numpy references (attention:
test_attention.py)."""
import numpy as np
import pytest

from kernels_cpu import ops_reference as ref
from kernels_cpu.activation import (gated_activation_row, gated_from_fused_row, gated_from_fused_rows,
                                   gelu_tanh_mul_inplace, silu_mul_inplace, tanh_f32)
from kernels_cpu.norm import rms_norm
from kernels_cpu.rope import rope_inplace, rope_qk_inplace

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
    freqs = ref.rope_frequencies(10000.0, n_rot)
    expected = ref.rope(x, pos, freqs, style)
    rope_inplace(x, pos, freqs, style)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_rope_frequencies_fold_in_llama3_factors_and_linear_scaling():
    """pair i turns by scale * base^(-2i/n) / factor_i per position (llama.cpp's theta_scale^i / ff[i] * freq_scale)."""
    factors = np.array([1.0, 1.5, 4.0, 8.0])
    freqs = ref.rope_frequencies(500000.0, 8, factors, 0.25)
    expected = [0.25 * 500000.0 ** (-2 * i / 8) / factors[i] for i in range(4)]
    np.testing.assert_allclose(freqs, expected, rtol=1e-15)
    x = rng.standard_normal((3, 2, 12)).astype(np.float32)
    pos = np.array([5, 100, 257], dtype=np.int64)
    expected = ref.rope(x, pos, freqs, ref.ROPE_NORMAL)
    assert np.array_equal(expected[..., 8:], x[..., 8:])  # dims past n_rot stay
    rope_inplace(x, pos, freqs, ref.ROPE_NORMAL)
    np.testing.assert_allclose(x, expected, rtol=1e-5, atol=1e-5)


def test_rope_with_zero_frequencies_is_the_identity():
    """A NoPE layer (SmolLM3) gets frequencies 0: the rotation by 0 leaves every value exactly as it was."""
    x = rng.standard_normal((4, 3, 16)).astype(np.float32)
    before = x.copy()
    rope_inplace(x, np.array([0, 3, 90, 1000], dtype=np.int64), np.zeros(8), ref.ROPE_NEOX)
    assert np.array_equal(x, before)


def test_activations_match_reference():
    gate = rng.standard_normal((3, 500)).astype(np.float32) * 4
    up = rng.standard_normal((3, 500)).astype(np.float32)
    g = gate.copy()
    silu_mul_inplace(g, up)
    # sigmoid(g) = (1 + tanh(g / 2)) / 2 is accurate to ~1e-7 absolute, not relative, where it is tiny (g << 0)
    bound = 1e-5 * np.abs(ref.silu_mul(gate, up)) + 1e-7 * np.abs(gate * up) + 1e-7
    assert np.all(np.abs(g - ref.silu_mul(gate, up)) <= bound)
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


def test_fast_tanh_is_float32_accurate():
    x = np.concatenate([np.linspace(-12, 12, 200_001), [0.0, -0.0, 1e-30, 7.9, 8.0, 50.0, -50.0]]).astype(np.float32)
    got = np.array([tanh_f32(v) for v in x[::97]] + [tanh_f32(v) for v in x[-7:]], dtype=np.float32)
    want = np.tanh(np.concatenate([x[::97], x[-7:]]).astype(np.float64))
    assert np.max(np.abs(got - want)) < 4e-7 and np.all(np.abs(got) <= 1.0)


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_activation_row_equals_block_bitwise(gelu):
    """Decode (one row) and prefill (a block) must round identically: a prompt's logits do not depend on the split."""
    rng = np.random.default_rng(9)
    gate = (rng.standard_normal((5, 1000)) * 4).astype(np.float32)
    up = rng.standard_normal((5, 1000)).astype(np.float32)
    block = gate.copy()
    (gelu_tanh_mul_inplace if gelu else silu_mul_inplace)(block, up)
    for r in range(5):
        row = gate[r].copy()
        gated_activation_row(row, up[r], gelu)
        assert np.array_equal(row, block[r])


@pytest.mark.parametrize("gelu", [False, True])
def test_gated_from_fused_projection_equals_split_bitwise(gelu):
    """The activation read from a fused gate|up projection (the forward's path) gives the bits of the split one."""
    rng = np.random.default_rng(11)
    gate_up = (rng.standard_normal((5, 2000)) * 4).astype(np.float32)
    gate, up = gate_up[:, :1000].copy(), np.ascontiguousarray(gate_up[:, 1000:])
    (gelu_tanh_mul_inplace if gelu else silu_mul_inplace)(gate, up)
    rows = np.empty((5, 1000), np.float32)
    gated_from_fused_rows(gate_up, rows, gelu)
    assert np.array_equal(rows, gate)
    one = np.empty(1000, np.float32)
    gated_from_fused_row(gate_up[2], one, gelu)
    assert np.array_equal(one, gate[2])


@pytest.mark.parametrize("style", [ref.ROPE_NORMAL, ref.ROPE_NEOX])
def test_rope_of_q_and_k_together_equals_each_alone(style):
    rng = np.random.default_rng(12)
    q, k = rng.standard_normal((6, 4, 64)).astype(np.float32), rng.standard_normal((6, 2, 64)).astype(np.float32)
    positions, freqs = np.array([0, 1, 7, 100, 4000, 5], dtype=np.int64), ref.rope_frequencies(10000.0, 48)
    q1, k1 = q.copy(), k.copy()
    rope_inplace(q1, positions, freqs, style)
    rope_inplace(k1, positions, freqs, style)
    rope_qk_inplace(q, k, positions, freqs, style)
    assert np.array_equal(q, q1) and np.array_equal(k, k1)
