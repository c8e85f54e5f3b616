"""smollm3 (SmolLM3): llama without RoPE on every fourth layer (layers 3, 7, 11, ...: "NoPE"), as llama.cpp's
src/models/smollm3.cpp (n_no_rope_layer_step = 4, fixed: the GGUF does not store it)."""
from edgeinfer.arch.decoder import ROPE_NORMAL, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "smollm3"
# config.json "architectures" names converted from: none yet, the HF converter (tools/hf_checkpoint.py) does not
# write this family (its checkpoints say "SmolLM3ForCausalLM")
HF_ARCHITECTURES: tuple[str, ...] = ()
HF_MODEL_TYPE = "smollm3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "SMOLLM3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
NO_ROPE_LAYER_STEP = 4  # layer i applies RoPE unless (i + 1) % 4 == 0


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)
    rope_layers = tuple((i + 1) % NO_ROPE_LAYER_STEP != 0 for i in range(hp["n_layers"]))
    return DecoderConfig(**hp, rope_style=ROPE_NORMAL, activation="silu", rope_layers=rope_layers)
