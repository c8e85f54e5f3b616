"""granite (IBM Granite 3.x dense): llama with four multipliers, as llama.cpp's src/models/granite.cpp: the
embeddings times `embedding_scale`, the attention scores times `attention.scale` (in place of 1/sqrt(head_dim)),
each block's output times `residual_scale` before the residual add, and the logits divided by `logit_scale`."""
import math

from edgeinfer.arch.decoder import (ROPE_NORMAL, DecoderConfig, optional_number, read_common_hparams,
                                    read_rope_factors)
from edgeinfer.arch.hf import HFConversion, llama3_rope_factors, llama_hparams, llama_vocab_keys
from edgeinfer.gguf_reader import GGUFFile

ARCH = "granite"
HF_ARCHITECTURES = ("GraniteForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "granite"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "GRANITE"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
# config.json multiplier -> GGUF key (llama.cpp's GraniteModel writes each that is set and not 0)
HF_MULTIPLIERS = {"attention_multiplier": "attention.scale", "embedding_multiplier": "embedding_scale",
                  "residual_multiplier": "residual_scale", "logits_scaling": "logit_scale"}


def hf_hparams(config: dict) -> dict:
    """llama.cpp's GraniteModel.set_gguf_parameters: LlamaModel's keys with head_dim ignored, and the multipliers."""
    out = llama_hparams({k: v for k, v in config.items() if k != "head_dim"})
    out.update({key: float(config[name]) for name, key in HF_MULTIPLIERS.items() if config.get(name)})
    return out


# a LlamaModel in llama.cpp's converter: Q/K permuted, Llama 3 factors, its vocabulary rules; GraniteConfig's
# multipliers default to 1 (so they are always written)
HF_CONVERT = HFConversion(hf_hparams, permuted=True, vocab_keys=llama_vocab_keys, extra_tensors=llama3_rope_factors,
                          defaults=dict.fromkeys(HF_MULTIPLIERS, 1.0))


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
        **read_rope_factors(gguf, hp["rope_dims"]),
        embedding_scale=multiplier("embedding_scale", 1.0),
        attention_scale=multiplier("attention.scale", 0.0),  # 0: 1/sqrt(head_dim)
        residual_scale=multiplier("residual_scale", 1.0),
        logit_scale=logit_scale,
    )
