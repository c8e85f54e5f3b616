"""granite (IBM Granite 3.x dense): llama with four multipliers, as llama.cpp's src/models/granite.cpp: the
embeddings times `embedding_scale`, the attention scores times `attention.scale` (in place of 1/sqrt(head_dim)),
each block's output times `residual_scale` before the residual add, and the logits divided by `logit_scale`."""
import math

from edgeinfer.arch.decoder import (ROPE_NORMAL, DecoderConfig, optional_number, read_common_hparams,
                                    read_rope_freq_factors)
from edgeinfer.gguf_reader import GGUFFile

ARCH = "granite"
# config.json "architectures" names converted from: none yet, the HF converter (tools/hf_checkpoint.py) does not
# write this family (its checkpoints say "GraniteForCausalLM")
HF_ARCHITECTURES: tuple[str, ...] = ()
HF_MODEL_TYPE = "granite"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "GRANITE"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)

    def multiplier(name, default):  # 0 stands for "not set" in llama.cpp's hparams: the default applies
        value = optional_number(gguf, f"{ARCH}.{name}", float, default, low=0, high=math.inf)
        return value or default

    logit_scale = optional_number(gguf, f"{ARCH}.logit_scale", float, None, low=1e-30)
    if logit_scale is None:
        gguf.require(f"{ARCH}.logit_scale", float)  # llama.cpp requires it: the missing key is a GGUFError
    # rope.scaling.finetuned false switches RoPE off on every layer (llama.cpp's rope_pattern for granite)
    finetuned = gguf.get(f"{ARCH}.rope.scaling.finetuned", True)
    return DecoderConfig(
        **hp, rope_style=ROPE_NORMAL, activation="silu",
        rope_layers=(bool(finetuned),) * hp["n_layers"],
        rope_freq_factors=read_rope_freq_factors(gguf, hp["rope_dims"]),
        embedding_scale=multiplier("embedding_scale", 1.0),
        attention_scale=multiplier("attention.scale", 0.0),  # 0: 1/sqrt(head_dim)
        residual_scale=multiplier("residual_scale", 1.0),
        logit_scale=logit_scale,
    )
