"""phi3 (Phi-3, Phi-3.5, Phi-4 mini): llama with Q, K and V in one matrix (`attn_qkv`), gate and up in one
(`ffn_up`, 2 * d_ff rows, gate first: SwiGLU of its halves), NeoX-style RoPE over the leading `rope.dimension_count`
dims of each head (partial on Phi-4 mini), as llama.cpp's src/models/phi3.cpp.

The 128k-context variants ("long-rope") divide each rotated pair's frequency by a factor from `rope_factors_long` or
`rope_factors_short.weight`, chosen by the context the model runs with, as llama.cpp's get_rope_factors: long when
the context per sequence (rounded up to a multiple of 256, as llama.cpp pads it) exceeds
`rope.scaling.original_context_length` (4096), else short. The Model makes the choice from the context the budget
(or n_ctx=) gives it (DecoderConfig.for_context), before the weights are prepared. Their `rope.scaling.attn_factor`
(sqrt(1 + ln(context_length / original) / ln(original))) multiplies cos and sin whichever set applies, so the
attention scores by its square where RoPE turns the whole head (Phi-3 and Phi-3.5 128k); on partly rotated heads
(Phi-4 mini's long-rope, 3/4 of each head) the magnitude would need its own scale and such a file is refused by
name. `phi3.attention.sliding_window` is read and not applied, as llama.cpp does (its phi3 code disables the window:
the converters store values the models were not run with)."""
import math

import numpy as np

from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams, read_rope_factors
from edgeinfer.arch.hf import HFConversion, first, rope_parameters
from edgeinfer.gguf_reader import GGUFFile

ARCH = "phi3"
HF_ARCHITECTURES = ("Phi3ForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "phi3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "PHI3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def hf_hparams(config: dict) -> dict:
    """llama.cpp's Phi3MiniModel.set_gguf_parameters: its own list, RoPE over partial_rotary_factor of each head,
    the original context, and the sliding window (0 when unset); with long-rope factors, generate_extra_tensors'
    attention factor."""
    rope = rope_parameters(config)
    n_embd, n_head = config["hidden_size"], config["num_attention_heads"]
    out = {"context_length": first(config, ("n_positions", "max_position_embeddings")),
           "rope.scaling.original_context_length": rope["original_max_position_embeddings"],
           "embedding_length": n_embd, "feed_forward_length": config["intermediate_size"],
           "block_count": config["num_hidden_layers"], "attention.head_count": n_head,
           "attention.head_count_kv": first(config, ("num_key_value_heads", "n_head_kv")),
           "attention.layer_norm_rms_epsilon": float(config["rms_norm_eps"]),
           "rope.dimension_count": _rope_dims(config),
           "rope.freq_base": float(rope["rope_theta"]),
           "attention.sliding_window": config.get("sliding_window") or 0}
    if rope.get("long_factor"):
        out["rope.scaling.attn_factor"] = _long_rope_attn_factor(config)
    return out


def _rope_dims(config: dict) -> int:
    rope = rope_parameters(config)
    return int(rope.get("partial_rotary_factor", 1.0) * config["hidden_size"]) // config["num_attention_heads"]


def _long_rope_attn_factor(config: dict) -> float:
    """generate_extra_tensors' attention factor for the scale context_length / original context: longrope's
    sqrt(1 + ln(scale) / ln(original)), yarn's 1 + 0.1 ln(scale); 1 where the scale is not above 1."""
    rope = rope_parameters(config)
    original = rope["original_max_position_embeddings"]
    scale = first(config, ("n_positions", "max_position_embeddings")) / original
    kind = str(rope.get("rope_type", "")).lower()
    if scale <= 1.0:
        return 1.0
    if kind in ("su", "longrope"):
        return math.sqrt(1 + math.log(scale) / math.log(original))
    return 0.1 * math.log(scale) + 1.0


def hf_long_rope_factors(config: dict) -> dict[str, np.ndarray]:
    """rope_factors_long/short.weight from rope_scaling's long_factor / short_factor (F32), as
    generate_extra_tensors writes them; {} without long factors."""
    rope = rope_parameters(config)
    if not rope.get("long_factor"):
        return {}
    return {"rope_factors_long.weight": np.array(rope["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.array(rope["short_factor"], dtype=np.float32)}


def hf_refuse(config: dict) -> str | None:
    """llama.cpp's converter's errors for long-rope parameters it cannot write."""
    rope = rope_parameters(config)
    if not rope.get("long_factor"):
        return None
    kind = str(rope.get("rope_type", "")).lower()
    if kind not in ("su", "longrope", "yarn"):
        return f"rope_scaling type {kind or '(none)'!r} with long_factor is not supported (longrope, su or yarn)"
    long, short, half = rope.get("long_factor"), rope.get("short_factor"), _rope_dims(config) / 2
    if short is None or len(long) != half or len(short) != half:
        return (f"rope_scaling long_factor and short_factor must both have {half:g} values (the rotated pairs), "
                f"found {len(long)} and {'none' if short is None else len(short)}")
    return None


# qkv_proj and gate_up_proj are stored fused as llama.cpp writes them (attn_qkv, ffn_up); no permutation (NeoX RoPE);
# Phi-3's own SentencePiece reading; long-rope factors as tensors; the defaults are Phi3Config's
HF_CONVERT = HFConversion(hf_hparams, phi3_added_tokens=True, refuse=hf_refuse, extra_tensors=hf_long_rope_factors,
                          defaults={"original_max_position_embeddings": 4096, "max_position_embeddings": 4096,
                                    "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
                                    "num_key_value_heads": lambda config: config["num_attention_heads"]})


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)
    long_short = {k: v for k, v in read_rope_factors(gguf, hp["rope_dims"]).items() if k != "rope_freq_factors"}
    return DecoderConfig(**hp, **long_short, rope_style=ROPE_NEOX, activation="silu",
                         fused_qkv="blk.0.attn_qkv.weight" in gguf.tensors, fused_gate_up=True,
                         ignored_keys=(f"{ARCH}.attention.sliding_window",))
