"""qwen2 (Qwen2, Qwen2.5): llama with biases on Q, K and V, and NeoX-style RoPE (pairs i, i + d/2)."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "qwen2"


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu", qkv_bias=True)
