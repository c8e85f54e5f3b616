"""Tiny random-weight models of each architecture family, written as GGUF in llama.cpp's layout (its tensor names,
shapes and metadata keys, as its converter writes them), for parity tests against llama.cpp's logits.

Every model has 4 layers, d_model 64, 4 query heads over 2 KV heads (GQA), d_ff 128 and the 304-token SentencePiece
vocabulary of tests/tiny_gguf.py; each family adds what makes it itself (RoPE factors, Q/K norms, soft-caps,
multipliers, fused matrices, NoPE layers, sliding windows shorter than the prompt, YaRN and long-rope scaling over
original contexts shorter than it). Matrices and the embedding are
all F16 or all Q8_0, so every family runs one of two compiled forwards. Values come from a seeded generator:
the same family and type always give the same bytes, so the file a test writes is the one the reference was
recorded from (tests/record_family_references.py).

`write_checkpoint` writes the same weights as the Hugging Face checkpoint llama.cpp's converter reads (config.json in
the family's layout, F32 safetensors with Q/K un-permuted and Gemma's norms less 1, tokenizer.model of the same
vocabulary), so converting it at F16 gives back the tensors of the family's F16 GGUF, bit for bit.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

from edgeinfer.arch.hf import llama3_rope_factors
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
    long_rope: dict | None = None  # {"long": factors, "short": factors}: rope_factors_long/short.weight (Phi-3 128k)
    # n_ctx the tests run with and llama.cpp's logits were recorded at (long-rope's factors depend on it): the first
    # gives <family>-<type>.npz, any other <family>-<type>-ctx<n>.npz
    contexts: tuple[int, ...] = (CONTEXT,)


LLAMA3_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 32}  # a short original context: most pairs are scaled
# YaRN over original contexts far shorter than the prompt (factor x original = CONTEXT, as transformers expects)
LLAMA_YARN = {"rope_type": "yarn", "factor": 8.0, "beta_fast": 32.0, "beta_slow": 1.0,
              "original_max_position_embeddings": 64}
QWEN3_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}
# Phi-3 128k's long-rope over the whole head (8 rotated pairs), as Phi-3 mini/medium 128k and Phi-3.5 mini; the long
# factors only above an original context of 512, so the prompt runs with them at n_ctx 1024, with the short at 512
PHI3_ORIGINAL, PHI3_LONG_CONTEXT = 512, 4096
PHI3_FACTORS = {"long": [1.0, 1.2, 1.8, 3.0, 6.0, 12.0, 24.0, 40.0],
                "short": [1.0, 1.0, 1.05, 1.1, 1.2, 1.4, 1.6, 1.9]}


def yarn_keys(rope_scaling: dict) -> dict:
    """The `rope.scaling.*` keys llama.cpp's converter writes for a yarn rope_scaling."""
    out = {"rope.scaling.type": "yarn", "rope.scaling.factor": rope_scaling["factor"],
           "rope.scaling.original_context_length": rope_scaling["original_max_position_embeddings"]}
    out.update({f"rope.scaling.yarn_{k}": rope_scaling[k] for k in ("beta_fast", "beta_slow") if k in rope_scaling})
    return out


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
    "llama-yarn": Family("llama", metadata={"rope.freq_base": 10000.0, **yarn_keys(LLAMA_YARN)}),
    "qwen3-yarn": Family("qwen3", head_dim=32, rope_dims=32, qk_norm="head", tied=True,
                         metadata={"rope.freq_base": 1000000.0, **yarn_keys(QWEN3_YARN)}),
    "phi3-longrope": Family("phi3", fused=True, long_rope=PHI3_FACTORS, contexts=(1024, 512),
                            metadata={"attention.sliding_window": 2047, "context_length": PHI3_LONG_CONTEXT,
                                      "rope.scaling.original_context_length": PHI3_ORIGINAL,
                                      # as llama.cpp's converter: sqrt(1 + ln(scale) / ln(original)), in float32
                                      "rope.scaling.attn_factor": float(np.float32(math.sqrt(
                                          1 + math.log(PHI3_LONG_CONTEXT / PHI3_ORIGINAL) / math.log(PHI3_ORIGINAL)
                                      )))}),
}


def reference_name(name: str, weight_type: str, n_ctx: int) -> str:
    """The stored llama.cpp logits' file name of a family run at n_ctx (tests/data/families)."""
    extra = "" if n_ctx == FAMILIES[name].contexts[0] else f"-ctx{n_ctx}"
    return f"{name}-{weight_type}{extra}.npz"


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


def family_tensors(f: Family, seed: int = 0, n_vocab: int = N_VOCAB) -> dict[str, np.ndarray]:
    """name -> float32 values (numpy shape: rows = outputs) of the tiny model of family f."""
    rng = np.random.default_rng(seed)
    q_dim, kv_dim = N_HEADS * f.head_dim, N_KV_HEADS * f.head_dim

    def matrix(n_rows, n_cols):
        return (rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32)

    def norm(n=D_MODEL):
        return (1 + rng.random(n) / 4).astype(np.float32)

    out = {"token_embd.weight": rng.standard_normal((n_vocab, D_MODEL)).astype(np.float32),
           "output_norm.weight": norm()}
    if not f.tied:
        out["output.weight"] = matrix(n_vocab, D_MODEL)
    if f.long_rope:
        out["rope_factors_long.weight"] = np.array(f.long_rope["long"], np.float32)
        out["rope_factors_short.weight"] = np.array(f.long_rope["short"], np.float32)
    if f.rope_freqs:
        out.update(llama3_rope_factors({"hidden_size": D_MODEL, "num_attention_heads": N_HEADS, "head_dim": f.rope_dims,
                                        "rope_scaling": {"rope_type": "llama3", **f.rope_freqs},
                                        "rope_theta": f.metadata.get("rope.freq_base", 10000.0)}))
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


def write_family(path: Path, name: str, weight_type: str, drop: tuple[str, ...] = (),
                 metadata: dict | None = None) -> Path:
    """Write the tiny model of FAMILIES[name] with its matrices and embedding of weight_type ("F16" or "Q8_0") and
    the vectors in F32; `drop` leaves out tensors or metadata keys, `metadata` adds or replaces keys (full names).
    Returns path."""
    f = FAMILIES[name]
    ggml_type = WEIGHT_TYPES[weight_type]
    w = GGUFWriter(str(path), f.arch)
    w.add_name("tiny random model")  # not the family's name: llama.cpp sets token attributes by model name
    for key, value in {**family_metadata(f), **(metadata or {})}.items():
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


# ---------------------------------------------------------------- the same models as Hugging Face checkpoints

# family -> (config.json beyond the common keys, GGUF ffn_norm's HF name). Both config layouts appear: transformers 4
# (top-level rope_theta, rope_scaling) and 5 (rope_parameters).
CHECKPOINTS = {
    "llama3": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 16, "rope_theta": 10000.0,
               "rope_scaling": {"rope_type": "llama3", **LLAMA3_SCALING}},
    "mistral": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "head_dim": 16,
                "sliding_window": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32,
              "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}, "use_sliding_window": False,
              "sliding_window": None},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "head_dim": 16, "rope_theta": 10000.0,
               "sliding_window": 48, "attn_logit_softcapping": 2.5, "final_logit_softcapping": 15.0,
               "query_pre_attn_scalar": 16, "hidden_activation": "gelu_pytorch_tanh"},
    "granite": {"architectures": ["GraniteForCausalLM"], "model_type": "granite", "rope_theta": 10000.0,
                "embedding_multiplier": 2.0, "residual_multiplier": 0.5, "attention_multiplier": 0.35,
                "logits_scaling": 0.5},
    "olmo2": {"architectures": ["Olmo2ForCausalLM"], "model_type": "olmo2",
              "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}},
    "smollm3": {"architectures": ["SmolLM3ForCausalLM"], "model_type": "smollm3", "rope_theta": 2000000.0,
                "no_rope_layers": [1, 1, 1, 0], "no_rope_layer_interval": 4},
    "phi3": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rope_theta": 10000.0,
             "partial_rotary_factor": 0.5, "original_max_position_embeddings": CONTEXT, "sliding_window": 2047},
    "llama-yarn": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "head_dim": 16,
                   "rope_theta": 10000.0, "rope_scaling": LLAMA_YARN},
    "qwen3-yarn": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 32,
                   "rope_parameters": {**QWEN3_YARN, "rope_theta": 1000000.0}, "use_sliding_window": False,
                   "sliding_window": None},
    "phi3-longrope": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "rope_theta": 10000.0,
                      "max_position_embeddings": PHI3_LONG_CONTEXT,
                      "original_max_position_embeddings": PHI3_ORIGINAL, "sliding_window": 2047,
                      "rope_scaling": {"type": "longrope", "long_factor": PHI3_FACTORS["long"],
                                       "short_factor": PHI3_FACTORS["short"]}},
}
PERMUTED = ("llama", "granite", "smollm3")  # families whose GGUF Q/K rows are permuted from HF's order
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
               "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
               "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


def checkpoint_tensors(name: str, n_vocab: int = N_VOCAB) -> dict[str, np.ndarray]:
    """HF name -> float32 values of FAMILIES[name]'s tiny model (the inverse of llama.cpp's conversion)."""
    from tools.export_hf import unpermute_rows

    f = FAMILIES[name]
    out = {}
    for gguf_name, values in family_tensors(f, n_vocab=n_vocab).items():
        if gguf_name.startswith("rope_f"):
            continue  # rope_freqs, rope_factors_long/short: generated by the converter from rope_scaling
        if f.arch in PERMUTED and gguf_name.endswith(("attn_q.weight", "attn_k.weight")):
            values = unpermute_rows(values, N_HEADS if "attn_q" in gguf_name else N_KV_HEADS)
        if f.arch == "gemma2" and gguf_name.endswith("norm.weight"):
            values = values - np.float32(1)  # exact: every norm weight is in [1, 1.25)
        hf = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}.get(gguf_name)
        if hf is None:
            _, layer, base, kind = gguf_name.split(".")
            hf_base = LAYER_NAMES[base]
            if f.arch == "gemma2" and base == "ffn_norm":
                hf_base = "pre_feedforward_layernorm"
            if f.fused and base == "ffn_up":
                hf_base = "mlp.gate_up_proj"
            hf = f"model.layers.{layer}.{hf_base}.{kind}"
        out[hf] = values
    if f.arch == "gemma2":  # saved tied under both names, as some checkpoints are; llama.cpp drops lm_head
        out["lm_head.weight"] = out["model.embed_tokens.weight"]
    return out


def write_checkpoint(directory: Path, name: str, tokenizer_from: Path | None = None) -> Path:
    """Write FAMILIES[name]'s tiny model as a Hugging Face checkpoint directory; returns it. Its name becomes
    general.name: llama.cpp retypes tokens of models named like "phi3", so give it a neutral one. tokenizer_from: a GGUF
    whose byte-level BPE vocabulary becomes the checkpoint's tokenizer.json (and sizes its embedding), in place of
    the tiny SentencePiece one."""
    from tools.export_hf import write_safetensors, write_sentencepiece_model, write_tokenizer_json

    f = FAMILIES[name]
    directory.mkdir(parents=True, exist_ok=True)
    vocab, n_vocab = spm_vocab(N_VOCAB), N_VOCAB
    if tokenizer_from is not None:
        from edgeinfer.gguf_reader import GGUFFile

        with GGUFFile(tokenizer_from) as g:
            vocab = {k: v for k, v in g.metadata.items() if k.startswith("tokenizer.ggml.")}
        n_vocab = len(vocab["tokenizer.ggml.tokens"])
    config = {"hidden_size": D_MODEL, "intermediate_size": D_FF, "num_hidden_layers": N_LAYERS,
              "num_attention_heads": N_HEADS, "num_key_value_heads": N_KV_HEADS, "max_position_embeddings": CONTEXT,
              "rms_norm_eps": 1e-5, "vocab_size": n_vocab, "bos_token_id": vocab["tokenizer.ggml.bos_token_id"],
              "eos_token_id": vocab["tokenizer.ggml.eos_token_id"], "tie_word_embeddings": f.tied,
              "torch_dtype": "float32", "hidden_act": "silu", **CHECKPOINTS[name]}
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    tensors = checkpoint_tensors(name, n_vocab)
    write_safetensors(directory / "model.safetensors", [(k, v.shape) for k, v in tensors.items()],
                      tensors.__getitem__, np.float32)
    if tokenizer_from is not None:
        write_tokenizer_json(directory, vocab)
        tokens = vocab["tokenizer.ggml.tokens"]
        specials = {f"{k}_token": tokens[vocab[f"tokenizer.ggml.{k}_token_id"]] for k in ("bos", "eos")}
        (directory / "tokenizer_config.json").write_text(json.dumps(
            {**specials, "add_bos_token": False, "tokenizer_class": "GPT2Tokenizer", "chat_template": CHAT_TEMPLATE}))
        return directory
    write_sentencepiece_model(directory, vocab)
    tokenizer_config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
                        "add_eos_token": False, "tokenizer_class": "LlamaTokenizer"}
    if name == "qwen3":  # transformers 5 saves the template beside tokenizer_config.json
        (directory / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    else:
        tokenizer_config["chat_template"] = CHAT_TEMPLATE
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=1))
    return directory
