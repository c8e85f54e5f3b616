"""kernels_cuda against numpy references, in numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1, tests/conftest.py) or
on a GPU. Tiny shapes: the simulator runs every thread as a Python thread. Each launching test runs the simulator's
geometry (one lane per row) and a GPU-like one (several lanes per row and key lanes: the reductions and merges)."""
import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pip install 'edgeinfer[cuda]')")

from numba import cuda  # noqa: E402

from edgeinfer.kv_cache import decode, encode  # noqa: E402
from kernels_cpu.dequant import dequantize  # noqa: E402
from kernels_cpu.formats import F16, F32, Q2_K, Q4_0, Q4_K, Q5_1, Q6_K, Q8_0, SUPPORTED_TYPES, type_name  # noqa: E402
from kernels_cpu.matvec_q8_reference import quantize_activations_reference  # noqa: E402
from kernels_cpu.ops_reference import (ROPE_NEOX, ROPE_NORMAL, attention as attention_reference,  # noqa: E402
                                       gelu_tanh_mul, rms_norm as rms_norm_reference, rope as rope_reference,
                                       rope_frequencies, silu_mul)
from kernels_cpu.quant_reference import dequantize_reference, random_raw  # noqa: E402
from kernels_cuda import attention, cache_ops, ops  # noqa: E402
from kernels_cuda.launch import SIMULATOR, Geometry  # noqa: E402
from kernels_cuda.layout import GROUPS, host_layout, reconstruct  # noqa: E402
from kernels_cuda.linear import DeviceMatrix, linear, quantize  # noqa: E402

# several lanes per row, two rows per block and two blocks: every reduction, merge and grid-stride loop runs
GPU_LIKE = Geometry(lanes=4, rows=2, key_lanes=4, heads=2, threads=32, max_blocks=2)
GEOMETRIES = pytest.mark.parametrize("geo", [SIMULATOR, GPU_LIKE], ids=["simulator", "gpu-like"])


def device(a):
    return cuda.to_device(np.ascontiguousarray(a))


# ------------------------------------------------------------------------------------------------ weight layout
@pytest.mark.parametrize("ggml_type", sorted(SUPPORTED_TYPES), ids=type_name)
def test_layout_reconstructs_the_cpu_dequantization_exactly(ggml_type):
    raw = random_raw(ggml_type, 5, 512, np.random.default_rng(ggml_type))
    layout = host_layout(ggml_type, raw, 512)
    if ggml_type in GROUPS:
        assert layout.q.dtype == np.int8 and layout.q.shape == (5, 512)
        assert layout.scale.shape == layout.offset.shape == (5, 512 // GROUPS[ggml_type])
        assert layout.q.flags.c_contiguous and layout.scale.flags.c_contiguous
    else:
        assert layout.values.dtype == (np.float16 if ggml_type == F16 else np.float32)
    np.testing.assert_array_equal(reconstruct(layout), dequantize(ggml_type, raw, 512))


def test_layout_refuses_a_row_of_the_wrong_length():
    raw = random_raw(Q8_0, 2, 64, np.random.default_rng(0))
    with pytest.raises(ValueError, match="Q8_0"):
        host_layout(Q8_0, raw, 96)


# ------------------------------------------------------------------------------------------------ int8 linear
def _quantized(x, geo):
    n, width = x.shape
    xq, xd, xs = (cuda.device_array((n, width // k), dt) for k, dt in ((1, np.int8), (32, np.float32),
                                                                        (16, np.int32)))
    quantize(device(x), xq, xd, xs, geo)
    return xq, xd, xs


@GEOMETRIES
def test_quantize_activations_as_the_cpu(geo):
    x = np.random.default_rng(1).standard_normal((3, 96)).astype(np.float32)
    x[1, :32] = 0  # an all-zero block: scale 0, values 0
    xq, xd, xs = _quantized(x, geo)
    q, d, _ = quantize_activations_reference(x)
    np.testing.assert_array_equal(xq.copy_to_host(), q)
    np.testing.assert_array_equal(xd.copy_to_host(), d)
    np.testing.assert_array_equal(xs.copy_to_host(), q.astype(np.int32).reshape(3, 6, 16).sum(-1))


@GEOMETRIES
@pytest.mark.parametrize("ggml_type", [Q8_0, Q4_0, Q5_1, Q4_K, Q6_K, Q2_K, F16, F32], ids=type_name)
def test_linear_against_the_dequantized_matrix(ggml_type, geo):
    """out = (W as gguf.quants dequantizes it) @ (xd * xq) for a batch of tokens larger than one tile (8)."""
    rng = np.random.default_rng(ggml_type)
    n_rows, n_cols, n_tokens = 6, 256, 9
    raw = random_raw(ggml_type, n_rows, n_cols, rng)
    x = rng.standard_normal((n_tokens, n_cols)).astype(np.float32)
    xq, xd, xs = _quantized(x, geo)
    out = cuda.device_array((n_tokens, n_rows), np.float32)
    linear(DeviceMatrix(host_layout(ggml_type, raw, n_cols)), xq, xd, xs, out, geo)
    q, d, _ = quantize_activations_reference(x)
    x_used = (q.reshape(n_tokens, -1, 32).astype(np.float64) * d[..., None]).reshape(n_tokens, n_cols)
    w = dequantize_reference(ggml_type, raw, n_cols).astype(np.float64)
    expected = x_used @ w.T
    scale = np.abs(x_used) @ np.abs(w).T
    assert np.all(np.abs(out.copy_to_host() - expected) <= 1e-5 * scale + 1e-6)


# ------------------------------------------------------------------------------------------------ per-row ops
@GEOMETRIES
def test_rms_norm_of_rows_heads_and_projections(geo):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    w64, w16 = (1 + rng.random(64) / 4).astype(np.float32), (1 + rng.random(16) / 4).astype(np.float32)
    whole = device(x[:, :64].copy())
    ops.rms_norm(whole, device(w64), 1e-5, geo)
    np.testing.assert_allclose(whole.copy_to_host(), rms_norm_reference(x[:, :64], w64, 1e-5), rtol=2e-6, atol=1e-6)
    heads = device(x)  # 2 heads of 16 from column 64 (K heads after Q's), the rest untouched
    ops.rms_norm(heads, device(w16), 1e-5, geo, col0=64, n_sub=2, width=16)
    got = heads.copy_to_host()
    np.testing.assert_array_equal(got[:, :64], x[:, :64])
    expected = rms_norm_reference(x[:, 64:].reshape(3, 2, 16), w16, 1e-5).reshape(3, 32)
    np.testing.assert_allclose(got[:, 64:], expected, rtol=2e-6, atol=1e-6)
    out = cuda.device_array((3, 96), np.float32)  # no weight, into another array
    ops.rms_norm(device(x), cuda.to_device(np.zeros(0, np.float32)), 1e-5, geo, out=out)
    np.testing.assert_allclose(out.copy_to_host(), rms_norm_reference(x, np.ones(96, np.float32), 1e-5), rtol=2e-6,
                               atol=1e-6)


@pytest.mark.parametrize("style", [ROPE_NORMAL, ROPE_NEOX], ids=["normal", "neox"])
def test_rope_with_partial_rotation_and_pair_factors(style):
    rng = np.random.default_rng(3)
    n_heads, head_dim = 3, 16
    x = rng.standard_normal((4, n_heads * head_dim)).astype(np.float32)
    positions = np.array([0, 5, 17, 300])
    freqs = rope_frequencies(10000.0, 8, freq_factors=[1.0, 2.0, 4.0, 8.0], freq_scale=0.5)  # 8 of 16 rotated
    buf = device(x)
    ops.rope(buf, n_heads, head_dim, device(positions), device(freqs), style == ROPE_NEOX, SIMULATOR)
    expected = rope_reference(x.reshape(4, n_heads, head_dim), positions, freqs, style).reshape(4, -1)
    np.testing.assert_allclose(buf.copy_to_host(), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("gelu", [False, True], ids=["silu", "gelu"])
def test_gated_activation(gelu):
    rng = np.random.default_rng(4)
    gate, up = (rng.standard_normal((2, 40)).astype(np.float32) * 3 for _ in range(2))
    buf = device(np.concatenate([gate, up], axis=1))
    ops.gated(buf, 40, gelu, SIMULATOR)
    expected = (gelu_tanh_mul if gelu else silu_mul)(gate, up)
    np.testing.assert_allclose(buf.copy_to_host()[:, :40], expected, rtol=1e-5, atol=1e-6)


def test_embedding_residual_bias_gather_and_logit_finish():
    rng = np.random.default_rng(5)
    raw = random_raw(Q4_K, 10, 256, rng)
    tokens = np.array([7, 0, 7, 3])
    x = cuda.device_array((4, 256), np.float32)
    ops.embed(DeviceMatrix(host_layout(Q4_K, raw, 256)), device(tokens), 2.0, x, SIMULATOR)
    table = dequantize(Q4_K, raw, 256)
    np.testing.assert_array_equal(x.copy_to_host(), table[tokens] * np.float32(2.0))
    y = rng.standard_normal((4, 256)).astype(np.float32)
    ops.add_scaled(x, device(y), 0.5, SIMULATOR)
    expected = table[tokens] * np.float32(2.0) + y * np.float32(0.5)
    np.testing.assert_array_equal(x.copy_to_host(), expected)
    bias = rng.standard_normal(100).astype(np.float32)
    ops.add_vector(x, device(bias), SIMULATOR)
    expected[:, :100] += bias
    np.testing.assert_array_equal(x.copy_to_host(), expected)
    rows = cuda.device_array((2, 256), np.float32)
    ops.gather_rows(x, device(np.array([3, 1])), rows, SIMULATOR)
    np.testing.assert_array_equal(rows.copy_to_host(), expected[[3, 1]])
    ops.finish_logits(rows, 0.5, 15.0, SIMULATOR)
    np.testing.assert_allclose(rows.copy_to_host(), np.tanh(expected[[3, 1]] * 2 / 15) * 15, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("ggml_type", [F16, F32], ids=type_name)
def test_embedding_of_a_float_matrix(ggml_type):
    rng = np.random.default_rng(6)
    raw = random_raw(ggml_type, 6, 64, rng)
    tokens = np.array([5, 0, 5])
    x = cuda.device_array((3, 64), np.float32)
    ops.embed(DeviceMatrix(host_layout(ggml_type, raw, 64)), device(tokens), 3.0, x, SIMULATOR)
    np.testing.assert_array_equal(x.copy_to_host(), dequantize(ggml_type, raw, 64)[tokens] * np.float32(3.0))


# ------------------------------------------------------------------------------------------------ KV cache, attention
N_LAYERS, N_SEQ, N_CTX = 2, 2, 24


def _cache(kv_type, n_kv, dim):
    from edgeinfer.backends.cuda_cache import DEVICE_DTYPES

    shape = (N_LAYERS, N_SEQ, n_kv, N_CTX, dim)
    scales = shape[:-1] + (dim // 32,) if kv_type == "q8_0" else (1,) * 5
    return cache_ops.zeros(shape, DEVICE_DTYPES[kv_type]), cache_ops.zeros(scales, np.float32)


def _decoded(kv_type, pair):
    values, scales = (a.copy_to_host() for a in pair)
    return decode(kv_type, values.view(np.uint16) if kv_type == "f16" else values, scales)


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_store_kv_encodes_rows_as_the_host_cache(kv_type):
    rng = np.random.default_rng(6)
    src = rng.standard_normal((3, 2 * 64)).astype(np.float32) * 4
    src[1, 64:96] = 0  # an all-zero q8_0 block
    pair = _cache(kv_type, 2, 64)
    seqs, positions = np.array([0, 1, 1]), np.array([5, 0, 23])
    attention.store_kv(device(src), 0, 2, 64, 1, device(seqs), device(positions), pair, SIMULATOR)
    stored = _decoded(kv_type, pair)
    values, scales = encode(kv_type, src.reshape(3, 2, 64))
    host = decode(kv_type, values, scales if kv_type == "q8_0" else np.zeros(1, np.float32))
    for i in range(3):
        np.testing.assert_array_equal(stored[1, seqs[i], :, positions[i]], host[i])
    assert not stored[0].any()  # the other layer is untouched


@GEOMETRIES
@pytest.mark.parametrize("kv_type,window,softcap", [("f16", 0, 0.0), ("q8_0", 0, 0.0), ("f16", 4, 2.5)],
                         ids=["f16", "q8_0", "f16-window-softcap"])
def test_attention_over_two_sequences(kv_type, window, softcap, geo):
    """A prompt chunk of sequence 0 (positions 3..7, causal among themselves) beside one decode row of sequence 1,
    GQA (4 query heads over 2 KV heads), against ops_reference.attention over what the cache holds."""
    rng = np.random.default_rng(7)
    n_heads, n_kv, hd = 4, 2, 32
    qd, kd = n_heads * hd, n_kv * hd
    k_pair, v_pair = _cache(kv_type, n_kv, hd), _cache(kv_type, n_kv, hd)
    history = rng.standard_normal((N_SEQ, 12, 2 * kd)).astype(np.float32)  # what earlier batches stored
    for s in range(N_SEQ):
        src = device(np.concatenate([np.zeros((12, qd), np.float32), history[s]], axis=1))
        seq_ids, pos = device(np.full(12, s)), device(np.arange(12))
        attention.store_kv(src, qd, n_kv, hd, 0, seq_ids, pos, k_pair, SIMULATOR)
        attention.store_kv(src, qd + kd, n_kv, hd, 0, seq_ids, pos, v_pair, SIMULATOR)
    seqs, positions = np.array([0, 0, 0, 0, 0, 1]), np.array([3, 4, 5, 6, 7, 11])
    q = rng.standard_normal((6, qd)).astype(np.float32)
    qkv = device(np.concatenate([q, np.zeros((6, 2 * kd), np.float32)], axis=1))
    out = cuda.device_array((6, n_heads * hd), np.float32)
    scale = hd ** -0.5
    attention.attention(qkv, n_heads, n_kv, hd, hd, device(positions), device(seqs), k_pair, v_pair, 0, scale,
                        softcap, window, out, geo)
    keys, values = _decoded(kv_type, k_pair)[0], _decoded(kv_type, v_pair)[0]  # (n_seq, n_kv, n_ctx, hd)
    got = out.copy_to_host().reshape(6, n_heads, hd)
    for s in range(N_SEQ):
        rows = seqs == s
        n_keys = positions[rows].max() + 1
        expected = attention_reference(q[rows].reshape(-1, n_heads, hd), keys[s, :, :n_keys].transpose(1, 0, 2),
                                       values[s, :, :n_keys].transpose(1, 0, 2), positions[rows], scale, window,
                                       softcap)
        np.testing.assert_allclose(got[rows], expected, rtol=1e-4, atol=1e-5)


def test_copy_positions_copies_one_sequence_prefix():
    a = cache_ops.zeros((2, 3, 2, 8, 4), np.float32)
    host = np.random.default_rng(8).standard_normal((2, 2, 5, 4)).astype(np.float32)
    cache_ops.write_positions(a, 1, host)
    cache_ops.copy_positions(a, 1, 2, 3)
    got = a.copy_to_host()
    np.testing.assert_array_equal(got[:, 1, :, :5], host)
    np.testing.assert_array_equal(got[:, 2, :, :3], host[:, :, :3])
    assert not got[:, 2, :, 3:].any() and not got[:, 0].any()


def test_fill_zero_clears_a_device_array():
    """(zeros() fills on a GPU; the simulator uploads host zeros instead, so the fill kernel is run here.)"""
    a = device(np.random.default_rng(9).standard_normal((2, 3, 4)).astype(np.float32) + 1)
    cache_ops.fill_zero(a)
    assert not a.copy_to_host().any()
