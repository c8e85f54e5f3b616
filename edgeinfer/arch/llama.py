"""llama (SmolLM2, Llama 2/3, Mistral without sliding window): the plain pre-norm decoder with SwiGLU.

GGUF's converter permutes Q and K rows so that RoPE rotates adjacent pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM)."""
from edgeinfer.arch.decoder import ROPE_NORMAL, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "llama"
HF_ARCHITECTURES = ("LlamaForCausalLM",)  # config.json "architectures" names converted from (the first: written on export)
HF_MODEL_TYPE = "llama"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "LLAMA"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NORMAL, activation="silu")
