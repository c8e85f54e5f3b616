"""qwen3 (Qwen3 dense models): qwen2 without the Q/K/V biases, with RMS norms of each query and key head before
RoPE, and a head size of its own (`attention.key_length`, 128, wider than embedding_length / head_count on the
smaller models). NeoX-style RoPE, SwiGLU, as llama.cpp's src/models/qwen3.cpp."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.arch.hf import HFConversion, text_model_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "qwen3"
HF_ARCHITECTURES = ("Qwen3ForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "qwen3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "QWEN3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
# llama.cpp's Qwen3Model (a Qwen2Model): TextModel's keys, no permutation; Qwen3Config's head_dim is 128 when unset
HF_CONVERT = HFConversion(text_model_hparams, defaults={"head_dim": 128})


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu", qk_norm=True)
