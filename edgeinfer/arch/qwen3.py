"""qwen3 (Qwen3 dense models): qwen2 without the Q/K/V biases, with RMS norms of each query and key head before
RoPE, and a head size of its own (`attention.key_length`, 128, wider than embedding_length / head_count on the
smaller models). NeoX-style RoPE, SwiGLU, as llama.cpp's src/models/qwen3.cpp."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "qwen3"
# config.json "architectures" names converted from: none yet, the HF converter (tools/hf_checkpoint.py) does not
# write this family (its checkpoints say "Qwen3ForCausalLM")
HF_ARCHITECTURES: tuple[str, ...] = ()
HF_MODEL_TYPE = "qwen3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "QWEN3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu", qk_norm=True)
