"""gemma2 (Gemma 2): Gemma 3's block (GeGLU, post-attention and post-FFN norms, embeddings times sqrt(d_model))
without Q/K norms, with soft-capping of the attention scores and of the logits (cap * tanh(x / cap)), and a
sliding window on every other layer (0, 2, 4, ...), as llama.cpp's src/models/gemma2.cpp.

GGUF's converter already adds Gemma's +1 to every norm weight, so the norms here are plain RMSNorm."""
import math

from edgeinfer.arch.decoder import (MAX_CONTEXT, ROPE_NEOX, DecoderConfig, optional_number, read_common_hparams,
                                    sliding_window_layers)
from edgeinfer.arch.hf import HFConversion
from edgeinfer.gguf_reader import GGUFFile

ARCH = "gemma2"
HF_ARCHITECTURES = ("Gemma2ForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "gemma2"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "GEMMA2"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
SLIDING_WINDOW_PATTERN = 2  # llama.cpp's load_swa_pattern(ml, 2): even layers local, odd ones global
# llama.cpp's defaults where the file stores none
SLIDING_WINDOW, ATTN_SOFTCAP, FINAL_SOFTCAP = 4096, 50.0, 30.0
LAYERS_OF_27B = 46  # the 27B scales queries by 1/sqrt(d_model / n_heads), the others by 1/sqrt(head_dim)


def hf_hparams(config: dict) -> dict:
    """llama.cpp's Gemma2Model.set_gguf_parameters (its own list: no RoPE base, vocab size or RoPE dims)."""
    return {"context_length": config["max_position_embeddings"], "embedding_length": config["hidden_size"],
            "block_count": config["num_hidden_layers"], "feed_forward_length": config["intermediate_size"],
            "attention.head_count": config["num_attention_heads"],
            "attention.head_count_kv": config.get("num_key_value_heads", config["num_attention_heads"]),
            "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            "attention.key_length": config["head_dim"], "attention.value_length": config["head_dim"],
            "attn_logit_softcapping": float(config["attn_logit_softcapping"]),
            "final_logit_softcapping": float(config["final_logit_softcapping"]),
            "attention.sliding_window": config["sliding_window"]}


# norms stored as w (+1 here, as Gemma's RMSNorm multiplies by 1 + w), lm_head never converted (tied), SentencePiece
# only and without the space prefix; the defaults are Gemma2Config's
HF_CONVERT = HFConversion(hf_hparams, norm_shift=1.0, dropped=("lm_head.weight",), tokenizers=("sentencepiece",),
                          vocab_keys=lambda config, tokenizer_config, kind: {"tokenizer.ggml.add_space_prefix": False},
                          defaults={"head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
                                    "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                                    "sliding_window": 4096})


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)

    def number(name, kind, default, **bounds):
        return optional_number(gguf, f"{ARCH}.{name}", kind, default, **bounds)

    scale_dim = hp["d_model"] / hp["n_heads"] if hp["n_layers"] == LAYERS_OF_27B else hp["head_dim"]
    return DecoderConfig(
        **hp,
        rope_style=ROPE_NEOX,
        activation="gelu_tanh",
        post_norms=True,
        embedding_scale=math.sqrt(hp["d_model"]),
        attention_scale=1.0 / math.sqrt(scale_dim),
        sliding_window=number("attention.sliding_window", int, SLIDING_WINDOW, low=1, high=MAX_CONTEXT),
        local_layers=sliding_window_layers(gguf, ARCH, hp["n_layers"], SLIDING_WINDOW_PATTERN),
        rope_base_local=number("rope.freq_base_swa", float, 0.0, low=1e-30),  # 0: rope.freq_base
        attn_logit_softcap=number("attn_logit_softcapping", float, ATTN_SOFTCAP, low=1e-30),
        final_logit_softcap=number("final_logit_softcapping", float, FINAL_SOFTCAP, low=1e-30),
    )
