"""Loading refuses, naming the key or tensor, every hyper-parameter out of range, special token id outside the
vocabulary and feature the forward pass does not compute (issue 11, item 5); the tiny llama of `tiny_gguf`."""
import numpy as np
import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from conftest import MODEL_NAMES, model_path
from edgeinfer.arch import load_decoder
from edgeinfer.errors import GGUFError, UnsupportedError
from edgeinfer.gguf_reader import GGUFFile
from tiny_gguf import HEAD_DIM, write_tiny_llama


def load(path):
    with GGUFFile(path) as f:
        return load_decoder(f)


def test_the_tiny_llama_loads(tmp_path):
    cfg, weights = load(write_tiny_llama(tmp_path / "tiny.gguf"))
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.n_vocab) == (2, 4, 2, HEAD_DIM, 304)
    assert len(weights.layers) == 2


@pytest.mark.parametrize("key, value, problem", [
    ("llama.attention.head_count_kv", 0, "0 is out of range (expected 1 to 4)"),  # was a ZeroDivisionError
    ("llama.attention.head_count_kv", 3, "3 does not divide head_count 4"),
    ("llama.attention.head_count_kv", 8, "8 is out of range (expected 1 to 4)"),
    ("llama.attention.head_count", 0, "0 is out of range"),
    ("llama.attention.head_count", 3, "3 does not divide embedding_length 64"),
    ("llama.block_count", 0, "0 is out of range"),
    ("llama.block_count", 2 ** 31, f"{2 ** 31} is out of range"),
    ("llama.block_count", "2", "expected int, found str"),
    ("llama.embedding_length", 0, "0 is out of range"),
    ("llama.feed_forward_length", 0, "0 is out of range"),
    ("llama.context_length", 0, "0 is out of range"),
    ("llama.attention.key_length", 0, "0 is out of range"),
    ("llama.attention.value_length", 2 ** 40, "is out of range"),
    ("llama.rope.dimension_count", 15, "15 is odd"),
    ("llama.rope.dimension_count", 2 * HEAD_DIM, f"{2 * HEAD_DIM} is out of range (expected 2 to {HEAD_DIM})"),
    ("llama.attention.layer_norm_rms_epsilon", float("nan"), "nan must be a finite number above 0"),
    ("llama.attention.layer_norm_rms_epsilon", 0.0, "must be a finite number above 0"),
    ("llama.rope.freq_base", float("inf"), "inf must be a finite number above 0"),
    ("llama.rope.freq_base", -1.0, "must be a finite number above 0"),
    ("llama.vocab_size", 303, "303 does not match the 304 tokens"),
    ("tokenizer.ggml.bos_token_id", 304, "304 is not a token id of the 304-token vocabulary"),  # was an IndexError
    ("tokenizer.ggml.eos_token_id", 2 ** 32 - 1, f"{2 ** 32 - 1} is not a token id"),
    ("tokenizer.ggml.eot_token_id", 1000, "1000 is not a token id"),
    ("tokenizer.ggml.padding_token_id", -1, "-1 is not a token id"),
    ("tokenizer.ggml.fim_pre_token_id", "3", "'3' is not a token id"),
])
def test_bad_hyper_parameters_and_special_ids_are_gguf_errors_naming_the_key(tmp_path, key, value, problem):
    path = write_tiny_llama(tmp_path / "bad.gguf", {key: value})
    with pytest.raises(GGUFError) as e:
        load(path)
    assert e.value.field == key and problem in e.value.problem, str(e.value)


def test_a_missing_hyper_parameter_is_a_gguf_error_naming_it(tmp_path):
    with pytest.raises(GGUFError, match="llama.feed_forward_length: required metadata key is missing"):
        load(write_tiny_llama(tmp_path / "bad.gguf", drop=("llama.feed_forward_length",)))


@pytest.mark.parametrize("metadata, tensors, fragment", [
    ({"llama.rope.scaling.type": "dynamic"}, {}, "llama.rope.scaling.type = 'dynamic': this RoPE scaling"),
    ({"llama.attn_logit_softcapping": 50.0}, {}, "llama.attn_logit_softcapping = 50.0: soft-capping"),
    ({"llama.final_logit_softcapping": 30.0}, {}, "llama.final_logit_softcapping = 30.0: soft-capping"),
    ({"llama.expert_count": 8}, {}, "llama.expert_count = 8: mixture of experts"),
    ({}, {"blk.0.attn_q.bias": [0.0] * 64}, "the tensor blk.0.attn_q.bias is not implemented for llama"),
    ({}, {"blk.2.attn_norm.weight": [1.0] * 64}, "the tensor blk.2.attn_norm.weight"),  # a layer past block_count
])
def test_what_the_forward_pass_does_not_compute_is_refused_by_name(tmp_path, metadata, tensors, fragment):
    path = write_tiny_llama(tmp_path / "unsupported.gguf", metadata, extra_tensors=tensors)
    with pytest.raises(UnsupportedError) as e:
        load(path)
    assert fragment in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("metadata", [
    {"llama.rope.scaling.type": "none"},
    {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 1.0},
    {"llama.rope.scaling.factor": 0.0},  # llama.cpp reads 0 as no scaling
    {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0},
    {"llama.rope.scaling.type": "longrope"},  # llama.cpp computes it as linear; the factors are tensors
    {"llama.expert_count": 0, "llama.attention.sliding_window": 0},
    {"llama.vocab_size": 304},
])
def test_keys_that_change_nothing_still_load(tmp_path, metadata):
    cfg, _ = load(write_tiny_llama(tmp_path / "fine.gguf", metadata))
    assert cfg.n_vocab == 304


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_real_models_pass_the_checks(name):
    with GGUFFile(model_path(name)) as f:
        cfg, weights = load_decoder(f)
        assert len(weights.layers) == cfg.n_layers


@pytest.mark.slow
def test_cli_reports_head_count_kv_zero_in_one_line(tmp_path):
    path = write_tiny_llama(tmp_path / "kv0.gguf", {"llama.attention.head_count_kv": 0})
    result = run_edgeinfer("run", str(path), "hello", "-n", "2", "--threads", "1",
                           env={"EDGEINFER_HOME": str(tmp_path / "home")})
    assert_one_error_line(result, "kv0.gguf", "llama.attention.head_count_kv", "out of range")


def test_rope_scaling_and_window_keys_become_the_config(tmp_path):
    """Linear scaling (freq_scale = 1 / factor, llama.cpp's default type), Llama 3 factors dividing each pair's
    frequency, a Mistral-style window on every layer."""
    factors = [1.0, 1.0, 2.0, 2.0, 4.0, 8.0, 8.0, 8.0][:HEAD_DIM // 2]
    path = write_tiny_llama(tmp_path / "scaled.gguf", {"llama.rope.scaling.factor": 4.0,
                                                      "llama.attention.sliding_window": 100},
                            extra_tensors={"rope_freqs.weight": factors})
    cfg, _ = load(path)
    assert cfg.rope_freq_scale == 0.25 and cfg.rope_freq_factors == tuple(factors)
    assert [cfg.layer_window(i) for i in range(cfg.n_layers)] == [100] * cfg.n_layers
    base = 10000.0 ** (-np.arange(HEAD_DIM // 2) * 2.0 / HEAD_DIM)
    np.testing.assert_allclose(cfg.layer_rope_freqs(1), 0.25 * base / np.array(factors), rtol=1e-12)


@pytest.mark.parametrize("factors, problem", [([1.0] * 3, "expected F32 of shape"), ([0.0] * (HEAD_DIM // 2),
                                                                                      "not a finite number above 0")])
def test_bad_rope_freqs_are_gguf_errors(tmp_path, factors, problem):
    path = write_tiny_llama(tmp_path / "bad.gguf", extra_tensors={"rope_freqs.weight": factors})
    with pytest.raises(GGUFError, match=problem):
        load(path)


def test_yarn_keys_become_the_config(tmp_path):
    """YaRN as llama.cpp sets it up: ext_factor 1, the original context stored (else the trained one), a magnitude
    of 1 + 0.1 ln(factor) on cos and sin, so the attention scale grows by its square."""
    path = write_tiny_llama(tmp_path / "yarn.gguf", {"llama.rope.scaling.type": "yarn",
                                                    "llama.rope.scaling.factor": 4.0,
                                                    "llama.rope.scaling.original_context_length": 64})
    cfg, _ = load(path)
    assert (cfg.rope_scaling, cfg.rope_freq_scale, cfg.rope_ext_factor) == ("yarn", 0.25, 1.0)
    assert cfg.rope_orig_context == 64
    mscale = 1 + 0.1 * np.log(4.0)
    assert np.isclose(cfg.layer_rope_mscale(0), mscale) and np.isclose(cfg.scale, mscale ** 2 / np.sqrt(HEAD_DIM))
    freqs, base = cfg.layer_rope_freqs(0), 10000.0 ** (-np.arange(HEAD_DIM // 2) * 2.0 / HEAD_DIM)
    assert freqs[0] == base[0] and np.isclose(freqs[-1], 0.25 * base[-1])  # the fastest pair kept, the slowest scaled


def test_long_rope_factors_are_chosen_by_the_context(tmp_path):
    """rope_factors_long/short: long when the context (padded to 256, as llama.cpp) exceeds the original one."""
    half = HEAD_DIM // 2
    path = write_tiny_llama(tmp_path / "long.gguf", {"llama.rope.scaling.original_context_length": 512},
                            extra_tensors={"rope_factors_long.weight": [4.0] * half,
                                           "rope_factors_short.weight": [2.0] * half})
    cfg, _ = load(path)
    base = 10000.0 ** (-np.arange(half) * 2.0 / HEAD_DIM)
    with pytest.raises(ValueError, match="for_context"):
        cfg.layer_rope_freqs(0)
    for n_ctx, factor in ((256, 2.0), (512, 2.0), (513, 4.0), (4096, 4.0)):
        np.testing.assert_allclose(cfg.for_context(n_ctx).layer_rope_freqs(0), base / factor, rtol=1e-12)
