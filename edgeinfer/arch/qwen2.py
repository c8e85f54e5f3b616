"""qwen2 (Qwen2, Qwen2.5): llama with biases on Q, K and V, and NeoX-style RoPE (pairs i, i + d/2). The long-context
configs' YaRN (`rope.scaling.type` yarn) is read with the common hyper-parameters (decoder.py)."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.arch.hf import HFConversion, text_model_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "qwen2"
HF_ARCHITECTURES = ("Qwen2ForCausalLM",)  # config.json "architectures" names converted from (the first: written on export)
HF_MODEL_TYPE = "qwen2"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "QWEN2"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
HF_CONVERT = HFConversion(text_model_hparams, exported=True)  # llama.cpp's Qwen2Model: TextModel's keys, as stored


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu", qkv_bias=True)
