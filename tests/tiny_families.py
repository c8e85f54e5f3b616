"""Tiny random-weight models of each architecture family, written as GGUF in llama.cpp's layout (its tensor names,
shapes and metadata keys, as its converter writes them), for parity tests against llama.cpp's logits.

Every model has 4 layers, d_model 64, 4 query heads over 2 KV heads (GQA), d_ff 128 and the 304-token SentencePiece
vocabulary of tests/tiny_gguf.py; each family adds what makes it itself (RoPE factors, Q/K norms, soft-caps,
multipliers, fused matrices, NoPE layers, sliding windows shorter than the prompt). Matrices and the embedding are
all F16 or all Q8_0, so every family runs one of two compiled forwards. Values come from a seeded generator:
the same family and type always give the same bytes, so the file a test writes is the one the reference was
recorded from (tests/record_family_references.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from tiny_gguf import _add, spm_vocab

N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, D_FF = 4, 64, 4, 2, 128
N_VOCAB = 304
CONTEXT = 512
WEIGHT_TYPES = {"F16": GGMLQuantizationType.F16, "Q8_0": GGMLQuantizationType.Q8_0}

# a prompt of ~300 tokens in the tiny vocabulary (mostly one letter each): positions far past the sliding windows
# and the Llama 3 factors' original context below
PROMPT = ("the theory of the thing is that there is a thin thread in the heather where the hen hides her eggs "
          "in winter, and the otter that hunts in the river never finds them, for the hen is clever and the "
          "heather is thick; then one day the thaw comes early and the thread is seen by everyone in the town, "
          "and the hen, who has never been seen in the open, walks out into the sun with her chicks behind her")


@dataclass(frozen=True)
class Family:
    """One architecture's tiny model: its GGUF architecture, head size, metadata and which tensors it has."""

    arch: str
    head_dim: int = D_MODEL // N_HEADS
    rope_dims: int = D_MODEL // N_HEADS
    metadata: dict = field(default_factory=dict)  # `{arch}.` keys beyond the common ones
    tied: bool = False  # no output.weight: the LM head is the embedding
    pre_norms: bool = True  # attn_norm and ffn_norm
    post_norms: bool = False  # post_attention_norm and post_ffw_norm
    qk_norm: str = ""  # "head" (per head) or "whole" (over the projection)
    fused: bool = False  # attn_qkv and a gate|up ffn_up (Phi-3)
    rope_freqs: dict | None = None  # Llama 3 rope_scaling parameters to compute rope_freqs.weight from


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}  # a short original context: most pairs are scaled

FAMILIES = {
    "llama3": Family("llama", rope_freqs=LLAMA3_SCALING, metadata={"rope.freq_base": 10000.0}),
    "mistral": Family("llama", metadata={"rope.freq_base": 1000000.0, "attention.sliding_window": 4096}),
    "qwen3": Family("qwen3", head_dim=32, rope_dims=32, qk_norm="head", tied=True,
                    metadata={"rope.freq_base": 1000000.0}),
    "gemma2": Family("gemma2", tied=True, post_norms=True,
                     metadata={"attention.sliding_window": 48, "attn_logit_softcapping": 2.5,
                               "final_logit_softcapping": 15.0}),
    "granite": Family("granite", metadata={"embedding_scale": 2.0, "residual_scale": 0.5, "attention.scale": 0.35,
                                           "logit_scale": 0.5}),
    "olmo2": Family("olmo2", pre_norms=False, post_norms=True, qk_norm="whole",
                    metadata={"rope.freq_base": 500000.0}),
    "smollm3": Family("smollm3", tied=True, metadata={"rope.freq_base": 2000000.0}),
    "phi3": Family("phi3", rope_dims=8, fused=True,
                   metadata={"attention.sliding_window": 2047}),  # stored by Phi-3 mini, ignored by llama.cpp
}


def llama3_rope_factors(base: float, dim: int, factor: float, low_freq_factor: float, high_freq_factor: float,
                        original_max_position_embeddings: int) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's converter computes it from rope_scaling "llama3" (conversion/llama.py)."""
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    low_wavelen = original_max_position_embeddings / low_freq_factor
    high_wavelen = original_max_position_embeddings / high_freq_factor
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor -
                                                                                       low_freq_factor)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def family_metadata(f: Family) -> dict:
    a = f.arch
    meta = {f"{a}.block_count": N_LAYERS, f"{a}.context_length": CONTEXT, f"{a}.embedding_length": D_MODEL,
            f"{a}.feed_forward_length": D_FF, f"{a}.attention.head_count": N_HEADS,
            f"{a}.attention.head_count_kv": N_KV_HEADS, f"{a}.attention.layer_norm_rms_epsilon": 1e-5,
            f"{a}.rope.dimension_count": f.rope_dims, f"{a}.vocab_size": N_VOCAB}
    if f.head_dim != D_MODEL // N_HEADS:
        meta[f"{a}.attention.key_length"] = meta[f"{a}.attention.value_length"] = f.head_dim
    meta.update({f"{a}.{k}": v for k, v in f.metadata.items()})
    return {**meta, **spm_vocab(N_VOCAB)}


def family_tensors(f: Family, seed: int = 0) -> dict[str, np.ndarray]:
    """name -> float32 values (numpy shape: rows = outputs) of the tiny model of family f."""
    rng = np.random.default_rng(seed)
    q_dim, kv_dim = N_HEADS * f.head_dim, N_KV_HEADS * f.head_dim

    def matrix(n_rows, n_cols):
        return (rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32)

    def norm(n=D_MODEL):
        return (1 + rng.random(n) / 4).astype(np.float32)

    out = {"token_embd.weight": rng.standard_normal((N_VOCAB, D_MODEL)).astype(np.float32),
           "output_norm.weight": norm()}
    if not f.tied:
        out["output.weight"] = matrix(N_VOCAB, D_MODEL)
    if f.rope_freqs:
        out["rope_freqs.weight"] = llama3_rope_factors(f.metadata.get("rope.freq_base", 10000.0), f.rope_dims,
                                                       **f.rope_freqs)
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        if f.pre_norms:
            out[p + "attn_norm.weight"] = norm()
        if f.fused:
            out[p + "attn_qkv.weight"] = matrix(q_dim + 2 * kv_dim, D_MODEL)
        else:
            out.update({p + "attn_q.weight": matrix(q_dim, D_MODEL), p + "attn_k.weight": matrix(kv_dim, D_MODEL),
                        p + "attn_v.weight": matrix(kv_dim, D_MODEL)})
        if f.qk_norm:
            out[p + "attn_q_norm.weight"] = norm(q_dim if f.qk_norm == "whole" else f.head_dim)
            out[p + "attn_k_norm.weight"] = norm(kv_dim if f.qk_norm == "whole" else f.head_dim)
        out[p + "attn_output.weight"] = matrix(D_MODEL, q_dim)
        if f.post_norms:
            out[p + "post_attention_norm.weight"] = norm()
        if f.pre_norms:
            out[p + "ffn_norm.weight"] = norm()
        if f.fused:
            out[p + "ffn_up.weight"] = matrix(2 * D_FF, D_MODEL)
        else:
            out.update({p + "ffn_gate.weight": matrix(D_FF, D_MODEL), p + "ffn_up.weight": matrix(D_FF, D_MODEL)})
        out[p + "ffn_down.weight"] = matrix(D_MODEL, D_FF)
        if f.post_norms:
            out[p + "post_ffw_norm.weight"] = norm()
    return out


def write_family(path: Path, name: str, weight_type: str, drop: tuple[str, ...] = ()) -> Path:
    """Write the tiny model of FAMILIES[name] with its matrices and embedding of weight_type ("F16" or "Q8_0") and
    the vectors in F32; `drop` leaves out tensors or metadata keys. Returns path."""
    f = FAMILIES[name]
    ggml_type = WEIGHT_TYPES[weight_type]
    w = GGUFWriter(str(path), f.arch)
    w.add_name("tiny random model")  # not the family's name: llama.cpp sets token attributes by model name
    for key, value in family_metadata(f).items():
        if key not in drop:
            _add(w, key, value)
    for tensor, values in family_tensors(f).items():
        if tensor in drop:
            continue
        if values.ndim == 1:
            w.add_tensor(tensor, values)
        elif ggml_type == GGMLQuantizationType.F16:
            w.add_tensor(tensor, values.astype(np.float16))
        else:  # the writer takes the bytes' shape and works out the elements' from the type
            w.add_tensor(tensor, gguf.quants.quantize(values, ggml_type), raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
