"""olmo2 (OLMo 2): no norms before the blocks, only after them (post-attention and post-FFN RMS norms before each
residual add), and Q/K RMS norms over the whole query and key projections (not per head), before NeoX-style RoPE;
SwiGLU, an untied LM head, as llama.cpp's src/models/olmo2.cpp. OLMo 3's sliding-window layers are not taken up
(`olmo2.attention.sliding_window` is refused by name)."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "olmo2"
# config.json "architectures" names converted from: none yet, the HF converter (tools/hf_checkpoint.py) does not
# write this family (its checkpoints say "Olmo2ForCausalLM")
HF_ARCHITECTURES: tuple[str, ...] = ()
HF_MODEL_TYPE = "olmo2"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "OLMO2"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu",
                         pre_norms=False, post_norms=True, qk_norm=True, qk_norm_whole=True)
