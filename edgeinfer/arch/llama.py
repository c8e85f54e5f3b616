"""llama (SmolLM2, Llama 2, Llama 3.x, Mistral): the plain pre-norm decoder with SwiGLU.

GGUF's converter permutes Q and K rows so that RoPE rotates adjacent pairs (llama.cpp's LLAMA_ROPE_TYPE_NORM).
Llama 3.x scales RoPE by per-pair frequency factors stored as the tensor `rope_freqs.weight` (llama.cpp's converter
computes them from config.json's rope_scaling "llama3"); linear and YaRN scaling (`rope.scaling.*`) are read with
the common hyper-parameters (decoder.py), long-rope factors (`rope_factors_long/short.weight`, chosen by the context
as for Phi-3) with rope_freqs. Mistral files are llama files; one that stores `llama.attention.sliding_window`
(Mistral 7B v0.1's 4096) gets that window on every layer, as the model was trained (llama.cpp ignores the key for
llama, so its logits differ from ours, and from the model's, only past the window).
"""
from edgeinfer.arch.decoder import (MAX_CONTEXT, ROPE_NORMAL, DecoderConfig, optional_number, read_common_hparams,
                                    read_rope_factors)
from edgeinfer.arch.hf import HFConversion, head_dim_of, llama3_rope_factors, llama_hparams, llama_vocab_keys
from edgeinfer.gguf_reader import GGUFFile

ARCH = "llama"
# config.json "architectures" names converted from (the first: written on export); Mistral's are llama files too
HF_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
HF_MODEL_TYPE = "llama"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "LLAMA"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses
# llama.cpp's LlamaModel: TextModel's keys plus vocab_size and rope.dimension_count, Q/K permuted, Llama 3's
# rope_freqs.weight from rope_scaling "llama3" (linear and yarn scaling are keys); no sliding window is written
HF_CONVERT = HFConversion(llama_hparams, defaults={"head_dim": head_dim_of}, permuted=True,
                          vocab_keys=llama_vocab_keys, extra_tensors=llama3_rope_factors, exported=True)


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)
    window = optional_number(gguf, f"{ARCH}.attention.sliding_window", int, 0, high=MAX_CONTEXT)
    return DecoderConfig(**hp, rope_style=ROPE_NORMAL, activation="silu",
                         **read_rope_factors(gguf, hp["rope_dims"]),
                         sliding_window=window, local_layers=(window > 0,) * hp["n_layers"] if window else ())

