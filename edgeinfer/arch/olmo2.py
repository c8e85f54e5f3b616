"""olmo2 (OLMo 2): no norms before the blocks, only after them (post-attention and post-FFN RMS norms before each
residual add), and Q/K RMS norms over the whole query and key projections (not per head), before NeoX-style RoPE;
SwiGLU, an untied LM head, as llama.cpp's src/models/olmo2.cpp. OLMo 3's sliding-window layers are not taken up
(`olmo2.attention.sliding_window` is refused by name)."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.arch.hf import HFConversion, text_model_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "olmo2"
HF_ARCHITECTURES = ("Olmo2ForCausalLM",)  # config.json "architectures" names converted from
HF_MODEL_TYPE = "olmo2"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "OLMO2"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def hf_hparams(config: dict) -> dict:
    """llama.cpp's Olmo2Model.set_gguf_parameters: TextModel's keys, and OLMo 3's sliding window when configured
    (which the runtime then refuses by name)."""
    out = text_model_hparams(config)
    if "sliding_window" in config:
        out["attention.sliding_window"] = config["sliding_window"]
        out["attention.sliding_window_pattern"] = (
            [t == "sliding_attention" for t in config["layer_types"]] if "layer_types" in config
            else [(i + 1) % 4 != 0 for i in range(config["num_hidden_layers"])])
    return out


# no permutation (NeoX RoPE); llama.cpp reads only tokenizer.json (TextModel's GPT-2 BPE), tokenizer.model is taken
# where there is none
HF_CONVERT = HFConversion(hf_hparams, tokenizers=("bpe", "sentencepiece"))


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu",
                         pre_norms=False, post_norms=True, qk_norm=True, qk_norm_whole=True)
