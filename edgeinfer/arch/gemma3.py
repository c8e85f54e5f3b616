"""gemma3 (Gemma 3 text models): GeGLU, Q/K RMS norms, post-attention and post-FFN norms, embeddings scaled by
sqrt(d_model), and sliding-window attention on five layers of every six with their own RoPE base.

GGUF's converter already adds Gemma's +1 to every norm weight, so the norms here are plain RMSNorm."""
import math

from edgeinfer.arch.decoder import ROPE_NEOX, DecoderConfig, read_common_hparams
from edgeinfer.gguf_reader import GGUFFile

ARCH = "gemma3"
SLIDING_WINDOW_PATTERN = 6  # layers i with i % 6 < 5 are local; every sixth is global (llama.cpp's set_swa_pattern(6))
LOCAL_ROPE_BASE = 10000.0  # llama.cpp's rope_freq_base_train_swa for gemma3; the GGUF does not store it


def config_from_gguf(gguf: GGUFFile) -> DecoderConfig:
    hp = read_common_hparams(gguf, ARCH)
    window = int(gguf.get(f"{ARCH}.attention.sliding_window", 0))
    local = tuple(window > 0 and i % SLIDING_WINDOW_PATTERN < SLIDING_WINDOW_PATTERN - 1
                  for i in range(hp["n_layers"]))
    return DecoderConfig(
        **hp,
        rope_style=ROPE_NEOX,
        activation="gelu_tanh",
        qk_norm=True,
        post_norms=True,
        embedding_scale=math.sqrt(hp["d_model"]),
        attention_scale=1.0 / math.sqrt(hp["head_dim"]),  # query_pre_attn_scalar = key length (all but 27B)
        sliding_window=window,
        local_layers=local,
        rope_base_local=float(gguf.get(f"{ARCH}.rope.freq_base_swa", LOCAL_ROPE_BASE)),
        final_logit_softcap=float(gguf.get(f"{ARCH}.final_logit_softcapping", 0.0)),
    )
