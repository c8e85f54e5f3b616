"""gemma3 (Gemma 3 text models): GeGLU, Q/K RMS norms, post-attention and post-FFN norms, embeddings scaled by
sqrt(d_model), and sliding-window attention on five layers of every six with their own RoPE base.

GGUF's converter already adds Gemma's +1 to every norm weight, so the norms here are plain RMSNorm."""
import math

import numpy as np

from edgeinfer.arch.decoder import MAX_CONTEXT, ROPE_NEOX, DecoderConfig, optional_number, read_common_hparams
from edgeinfer.arch.hf import HFConversion, rope_parameters, text_model_hparams
from edgeinfer.errors import UnsupportedError
from edgeinfer.gguf_reader import GGUFFile

ARCH = "gemma3"
HF_ARCHITECTURES = ("Gemma3ForCausalLM",)  # config.json "architectures" names converted from (the first: written on export)
HF_MODEL_TYPE = "gemma3_text"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "GEMMA3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
SLIDING_WINDOW_PATTERN = 6  # layers i with i % 6 < 5 are local; every sixth is global (llama.cpp's set_swa_pattern(6))
LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3; the GGUF does not store it


def hf_hparams(config: dict) -> dict:
    """llama.cpp's Gemma3Model.set_gguf_parameters: TextModel's keys with Gemma 3's defaults, the final soft-cap when
    set, the sliding window unless sliding_window_pattern is 1."""
    out = {**text_model_hparams(config),
           "context_length": config.get("max_position_embeddings", 131072),
           "attention.head_count": config.get("num_attention_heads", 8),
           "attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-6)),
           "attention.key_length": config.get("head_dim", 256), "attention.value_length": config.get("head_dim", 256),
           "rope.freq_base": float(rope_parameters(config).get("rope_theta", 1_000_000.0))}
    if config.get("final_logit_softcapping"):
        out["final_logit_softcapping"] = float(config["final_logit_softcapping"])
    if config.get("sliding_window_pattern") != 1:
        out["attention.sliding_window"] = config["sliding_window"]
    out["attention.head_count_kv"] = config.get("num_key_value_heads", 4)
    return out


# norms stored as w (Gemma3RMSNorm multiplies by 1 + w), embedding rows past the vocabulary dropped, SentencePiece
# vocabularies without the space prefix
HF_CONVERT = HFConversion(hf_hparams, norm_shift=1.0, vocab_rows_trimmed=True, exported=True,
                          vocab_keys=lambda config, tokenizer_config, kind: (
                              {"tokenizer.ggml.add_space_prefix": False} if kind == "sentencepiece" else {}))


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)
    window = _number(gguf, "attention.sliding_window", int, 0, high=MAX_CONTEXT)
    local = tuple(window > 0 and i % SLIDING_WINDOW_PATTERN < SLIDING_WINDOW_PATTERN - 1
                  for i in range(hp["n_layers"]))
    pattern_key = f"{ARCH}.attention.sliding_window_pattern"
    if pattern_key in gguf.metadata and not _same_pattern(gguf.metadata[pattern_key], local):
        raise UnsupportedError(f"{gguf.path}: {pattern_key}: a sliding-window pattern other than "
                               f"{SLIDING_WINDOW_PATTERN - 1} local layers of every {SLIDING_WINDOW_PATTERN} "
                               "is not implemented")
    return DecoderConfig(
        **hp,
        rope_style=ROPE_NEOX,
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        embedding_scale=math.sqrt(hp["d_model"]),
        attention_scale=1.0 / math.sqrt(hp["head_dim"]),  # query_pre_attn_scalar = key length (all but 27B)
        sliding_window=window,
        local_layers=local,
        rope_base_local=_number(gguf, "rope.freq_base_swa", float, LOCAL_ROPE_BASE, low=1e-30),
        rope_freq_scale_local=1.0,  # linear RoPE scaling (4B and up) is for the global layers only, as llama.cpp
        final_logit_softcap=_number(gguf, "final_logit_softcapping", float, 0.0),
    )


def _number(gguf: GGUFFile, name: str, kind: type, default, low=0, high=math.inf):
    """`gemma3.{name}`: a finite number in [low, high] (default when absent), else a GGUFError naming the key."""
    return optional_number(gguf, f"{ARCH}.{name}", kind, default, low, high)


def _same_pattern(value, local: tuple[bool, ...]) -> bool:
    """Whether a stored sliding-window pattern (a period, or one flag per layer) is the one this module uses."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value == SLIDING_WINDOW_PATTERN
    return isinstance(value, np.ndarray) and value.shape == (len(local),) and tuple(bool(v) for v in value) == local
