"""phi3 (Phi-3, Phi-3.5, Phi-4 mini): llama with Q, K and V in one matrix (`attn_qkv`), gate and up in one
(`ffn_up`, 2 * d_ff rows, gate first: SwiGLU of its halves), NeoX-style RoPE over the leading `rope.dimension_count`
dims of each head (partial on Phi-4 mini), as llama.cpp's src/models/phi3.cpp.

The 128k-context variants' RoPE factors (`rope_factors_long/short.weight`, chosen by the context llama.cpp runs
with) are refused by name. `phi3.attention.sliding_window` is read and not applied, as llama.cpp does (its phi3
code disables the window: the converters store values the models were not run with)."""
from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "phi3"
# config.json "architectures" names converted from: none yet, the HF converter (tools/hf_checkpoint.py) does not
# write this family (its checkpoints say "Phi3ForCausalLM")
HF_ARCHITECTURES: tuple[str, ...] = ()
HF_MODEL_TYPE = "phi3"  # config.json "model_type" written on export
GGUF_MODEL_ARCH = "PHI3"  # the member of gguf-py's MODEL_ARCH whose tensor-name map the converter uses


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    return DecoderConfig(**read_common_hparams(gguf, ARCH), rope_style=ROPE_NEOX, activation="silu",
                         fused_qkv="blk.0.attn_qkv.weight" in gguf.tensors, fused_gate_up=True,
                         ignored_keys=(f"{ARCH}.attention.sliding_window",))
