"""smollm3 (SmolLM3): llama without RoPE on every fourth layer (layers 3, 7, 11, ...: "NoPE"), as llama.cpp's
src/models/smollm3.cpp (n_no_rope_layer_step = 4, fixed: the GGUF does not store it)."""
from edgeinfer.arch.decoder import ROPE_NORMAL, DecoderConfig, read_common_hparams
from edgeinfer.arch.hf import HFConversion, llama3_rope_factors, llama_hparams, llama_vocab_keys
from edgeinfer.gguf_reader import GGUFFile

ARCH = "smollm3"
HF_ARCHITECTURES = ("SmolLM3ForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "smollm3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "SMOLLM3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
NO_ROPE_LAYER_STEP = 4  # layer i applies RoPE unless (i + 1) % 4 == 0


def hf_refuse(config: dict) -> str | None:
    """config.json's no_rope_layers (1: RoPE) must be the fixed pattern llama.cpp (and this module) assume, since
    the GGUF does not store it."""
    fixed = [int((i + 1) % NO_ROPE_LAYER_STEP != 0) for i in range(config["num_hidden_layers"])]
    layers = config.get("no_rope_layers")
    if layers is not None and [int(x) for x in layers] != fixed:
        return (f"no_rope_layers {layers} is not RoPE on all but every {NO_ROPE_LAYER_STEP}th layer, the only "
                "pattern llama.cpp's smollm3 (and edgeinfer's) computes")
    return None


# a LlamaModel in llama.cpp's converter (Q/K permuted, its keys and vocabulary rules); no key for the NoPE layers
HF_CONVERT = HFConversion(llama_hparams, permuted=True, vocab_keys=llama_vocab_keys, extra_tensors=llama3_rope_factors,
                          refuse=hf_refuse)


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)
    rope_layers = tuple((i + 1) % NO_ROPE_LAYER_STEP != 0 for i in range(hp["n_layers"]))
    return DecoderConfig(**hp, rope_style=ROPE_NORMAL, activation="silu", rope_layers=rope_layers)
