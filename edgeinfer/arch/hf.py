"""How a family is converted from a Hugging Face checkpoint: the `HF_CONVERT` declaration of each architecture module
and the hyper-parameter writers the families share, mirroring llama.cpp's convert_hf_to_gguf.py (its TextModel and
LlamaModel classes in conversion/base.py and conversion/llama.py).

A declaration is data plus small functions of config.json (a dict); the converter (tools/hf_checkpoint.py) applies
it the same way for every family. Hyper-parameters are returned as {GGUF key: value}: an int is written as uint32,
a float as float32, a bool as bool, a str as string, a list as an array of its items' type (llama.cpp's types for
every key these families write); hparams' keys are written under `{arch}.`, vocab_keys' (tokenizer.*) as they are.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class HFConversion:
    """What llama.cpp's converter does for one family beyond mapping tensor names."""

    hparams: Callable[[dict], dict]  # config -> {key under `{arch}.`: value}, the model class's set_gguf_parameters
    defaults: dict = field(default_factory=dict)  # config keys transformers' config class fills in when absent
    # (llama.cpp reads the config through AutoConfig): a value, or a function of the config
    permuted: bool = False  # Q/K rows permuted so RoPE rotates adjacent pairs (LlamaModel.permute)
    norm_shift: float = 0.0  # added to every `*norm.weight` (Gemma stores w and multiplies by 1 + w)
    dropped: tuple[str, ...] = ()  # checkpoint tensors llama.cpp does not convert (Gemma's lm_head)
    vocab_rows_trimmed: bool = False  # embedding rows past the vocabulary are dropped (Gemma 3's padding)
    tokenizers: tuple[str, ...] = ("sentencepiece", "bpe")  # tokenizer.model / tokenizer.json, tried in order
    # (config, tokenizer_config.json, "sentencepiece" or "bpe") -> tokenizer keys set after the vocabulary's
    vocab_keys: Callable[[dict, dict, str], dict] | None = None
    phi3_added_tokens: bool = False  # Phi-3's SentencePiece reading: added tokens typed by their `special` flag only
    extra_tensors: Callable[[dict], dict[str, np.ndarray]] | None = None  # generated tensors (rope_freqs.weight)
    refuse: Callable[[dict], str | None] | None = None  # a reason the checkpoint is not converted, or None
    exported: bool = False  # tools/export_hf.py writes this family back to a checkpoint


def rope_parameters(config: dict) -> dict:
    """llama.cpp's TextModel.rope_parameters: transformers 5's `rope_parameters` or 4's `rope_scaling`, with the
    top-level rope_theta, partial_rotary_factor, original_max_position_embeddings and RoPE type mirrored in; the
    global layers' parameters where it is split by layer type ("full_attention")."""
    params = dict(config.get("rope_parameters", config.get("rope_scaling")) or {})
    if "full_attention" in params or "sliding_attention" in params:
        return dict(params.get("full_attention", params))
    mirrored = {"rope_theta": ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                               "rotary_emb_base"),
                "partial_rotary_factor": ("partial_rotary_factor", "rope_pct", "rope_percent"),
                "original_max_position_embeddings": ("original_max_position_embeddings",)}
    for key, names in mirrored.items():
        value = first(config, names)
        if key not in params and value is not None:
            params[key] = value
    if "rope_type" not in params and params.get("type") is not None:
        params["rope_type"] = params["type"]
    return params


def first(config: dict, keys, default=None):
    """The first of `keys` present in config (llama.cpp's find_hparam, optional=True), else default."""
    return next((config[k] for k in keys if k in config), default)


def text_model_hparams(config: dict) -> dict:
    """The keys llama.cpp's TextModel.set_gguf_parameters writes for a dense decoder."""
    out: dict = {"block_count": config["num_hidden_layers"]}
    optional = {"context_length": ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                                   "max_sequence_length", "model_max_length"),
                "embedding_length": ("hidden_size", "n_embd", "dim"),
                "feed_forward_length": ("prefix_dense_intermediate_size", "dense_intermediate_size",
                                        "intermediate_size", "n_inner", "hidden_dim"),
                "attention.head_count": ("num_attention_heads", "n_head", "n_heads"),
                "attention.head_count_kv": ("num_key_value_heads", "n_kv_heads")}
    for key, names in optional.items():
        if (value := first(config, names)) is not None:
            out[key] = int(value)
    rope = rope_parameters(config)
    rope_type, factor = rope.get("rope_type"), rope.get("factor")
    if rope_type == "linear" and factor is not None:
        out.update({"rope.scaling.type": "linear", "rope.scaling.factor": float(factor)})
    elif rope_type == "yarn" and factor is not None:
        out.update({"rope.scaling.type": "yarn", "rope.scaling.factor": float(factor),
                    "rope.scaling.original_context_length": int(rope["original_max_position_embeddings"])})
        yarn = {"rope.scaling.yarn_ext_factor": rope.get("extrapolation_factor"),
                "rope.scaling.yarn_attn_factor": rope.get("attention_factor", rope.get("attn_factor")),
                "rope.scaling.yarn_beta_fast": rope.get("beta_fast"),
                "rope.scaling.yarn_beta_slow": rope.get("beta_slow")}
        out.update({k: float(v) for k, v in yarn.items() if v is not None})
    elif rope_type in ("su", "longrope"):
        out["rope.scaling.type"] = "longrope"
    if rope.get("rope_theta") is not None:
        out["rope.freq_base"] = float(rope["rope_theta"])
    local_theta = first(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                 "rope_local_base_freq"))
    if local_theta is not None:
        out["rope.freq_base_swa"] = float(local_theta)
    if (eps := first(config, ("rms_norm_eps", "norm_eps"))) is not None:
        out["attention.layer_norm_rms_epsilon"] = float(eps)
    if (eps := first(config, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        out["attention.layer_norm_epsilon"] = float(eps)
    if config.get("head_dim") is not None:
        out["attention.key_length"] = out["attention.value_length"] = int(config["head_dim"])
    return out


def llama_hparams(config: dict) -> dict:
    """LlamaModel.set_gguf_parameters: TextModel's keys, the vocabulary size and the rotated dims (the head size)."""
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {**text_model_hparams(config), "vocab_size": config["vocab_size"], "rope.dimension_count": head_dim}


def head_dim_of(config: dict) -> int:
    """transformers' default head_dim for llama-like configs: hidden_size / num_attention_heads."""
    return config["hidden_size"] // config["num_attention_heads"]


def llama_vocab_keys(config: dict, tokenizer_config: dict, tokenizer: str) -> dict:
    """LlamaModel.set_vocab's extras: add_prefix_space from tokenizer_config.json, and no BOS for the 49152-token
    vocabularies (SmolLM, Granite)."""
    out = {}
    if tokenizer_config.get("add_prefix_space") is not None:
        out["tokenizer.ggml.add_space_prefix"] = bool(tokenizer_config["add_prefix_space"])
    if config.get("vocab_size", 32000) == 49152:
        out["tokenizer.ggml.add_bos_token"] = False
    return out


def llama3_rope_factors(config: dict) -> dict[str, np.ndarray]:
    """rope_freqs.weight as LlamaModel.generate_extra_tensors computes it for rope_type "llama3" (one factor per
    rotated pair, dividing its frequency); {} for any other RoPE type."""
    rope = rope_parameters(config)
    if str(rope.get("rope_type", "")).lower() != "llama3":
        return {}
    base = rope.get("rope_theta", 10000.0)
    dim = config.get("head_dim") or head_dim_of(config)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return {"rope_freqs.weight": np.array(factors, dtype=np.float32)}
