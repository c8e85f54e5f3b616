"""phi3 (Phi-3, Phi-3.5, Phi-4 mini): llama with Q, K and V in one matrix (`attn_qkv`), gate and up in one
(`ffn_up`, 2 * d_ff rows, gate first: SwiGLU of its halves), NeoX-style RoPE over the leading `rope.dimension_count`
dims of each head (partial on Phi-4 mini), as llama.cpp's src/models/phi3.cpp.

The 128k-context variants' RoPE factors (`rope_factors_long/short.weight`, chosen by the context llama.cpp runs
with) are refused by name. `phi3.attention.sliding_window` is read and not applied, as llama.cpp does (its phi3
code disables the window: the converters store values the models were not run with)."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.arch.hf import HFConversion, first, rope_parameters
from edgeinfer.gguf_reader import GGUFFile

ARCH = "phi3"
HF_ARCHITECTURES = ("Phi3ForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "phi3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "PHI3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def hf_hparams(config: dict) -> dict:
    """llama.cpp's Phi3MiniModel.set_gguf_parameters: its own list, RoPE over partial_rotary_factor of each head,
    the original context, and the sliding window (0 when unset)."""
    rope = rope_parameters(config)
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    return {"context_length": first(config, ("n_positions", "max_position_embeddings")),
            "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
            "embedding_length": n_embd, "feed_forward_length": config["intermediate_size"],
            "block_count": config["num_hidden_layers"], "attention.head_count": n_head,
            "attention.head_count_kv": first(config, ("num_key_value_heads", "n_head_kv")),
            "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
            "rope.dimension_count": int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head,
            "rope.freq_base": float(rope["rope_theta"]),
            "attention.sliding_window": config.get("sliding_window") or 0}


def hf_refuse(config: dict) -> str | None:
    if rope_parameters(config).get("long_factor"):
        return ("Phi-3's long-context RoPE (rope_scaling long_factor / short_factor, the 128k variants) is not "
                "supported: the runtime does not implement rope_factors_long/short")
    return None


# qkv_proj and gate_up_proj are stored fused as llama.cpp writes them (attn_qkv, ffn_up); no permutation (NeoX RoPE);
# Phi-3's own SentencePiece reading; the defaults are Phi3Config's
HF_CONVERT = HFConversion(hf_hparams, phi3_added_tokens=True, refuse=hf_refuse,
                          defaults={"original_max_position_embeddings": 4096, "max_position_embeddings": 4096,
                                    "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                                    "num_key_value_heads": lambda config: config["num_attention_heads"]})


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu",
                         fused_qkv="blk.0.attn_qkv.weight" in gguf.tensors, fused_gate_up=True,
                         ignored_keys=(f"{ARCH}.attention.sliding_window",))
