"""A tiny valid llama GGUF (2 layers, d_model 64, 4 heads, 2 KV heads, d_ff 128, a 304-token SentencePiece vocab)
written with gguf-py's GGUFWriter, for load-validation and fuzz tests.

Matrices are Q4_1 and the embedding Q8_0, the norms F32: the weight types of SmolLM2, so loading it runs the decode
step the test session already compiled (every row count is a multiple of the repacked layout's 16 rows too).
"""
from __future__ import annotations

from pathlib import Path

import gguf.quants
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter

N_LAYERS, D_MODEL, N_HEADS, N_KV_HEADS, D_FF = 2, 64, 4, 2, 128
HEAD_DIM = D_MODEL // N_HEADS
MATRIX_TYPE, EMBEDDING_TYPE = GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0


def spm_vocab(n_tokens: int = 304) -> dict:
    """unk, bos, eos, 256 byte tokens and lowercase pieces, padded with unused pieces to n_tokens (GGUF metadata)."""
    pieces = ["\u2581"] + [chr(c) for c in range(97, 123)] + ["\u2581t", "\u2581th", "\u2581the", "he", "in", "er"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"\u2581p{i}" for i in range(n_tokens - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": np.array(types, np.int32),
            "tokenizer.ggml.scores": np.array(scores, np.float32), "tokenizer.ggml.bos_token_id": 1,
            "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}


def tiny_tensors(seed: int = 0, n_vocab: int = 304) -> dict[str, tuple[np.ndarray, GGMLQuantizationType]]:
    """name -> (float32 values in numpy shape, GGUF type to store them as) for the tiny llama."""
    rng = np.random.default_rng(seed)

    def matrix(n_rows, n_cols):
        return (rng.standard_normal((n_rows, n_cols)) / np.sqrt(n_cols)).astype(np.float32), MATRIX_TYPE

    def norm():
        return (1 + rng.random(D_MODEL) / 4).astype(np.float32), GGMLQuantizationType.F32

    out = {"token_embd.weight": (rng.standard_normal((n_vocab, D_MODEL)).astype(np.float32), EMBEDDING_TYPE),
           "output_norm.weight": norm()}
    for i in range(N_LAYERS):
        p = f"blk.{i}."
        out.update({p + "attn_norm.weight": norm(), p + "attn_q.weight": matrix(N_HEADS * HEAD_DIM, D_MODEL),
                    p + "attn_k.weight": matrix(N_KV_HEADS * HEAD_DIM, D_MODEL),
                    p + "attn_v.weight": matrix(N_KV_HEADS * HEAD_DIM, D_MODEL),
                    p + "attn_output.weight": matrix(D_MODEL, N_HEADS * HEAD_DIM), p + "ffn_norm.weight": norm(),
                    p + "ffn_gate.weight": matrix(D_FF, D_MODEL), p + "ffn_up.weight": matrix(D_FF, D_MODEL),
                    p + "ffn_down.weight": matrix(D_MODEL, D_FF)})
    return out


def tiny_metadata() -> dict:
    """The llama.* hyper-parameters and tokenizer metadata of the tiny llama."""
    return {"llama.block_count": N_LAYERS, "llama.context_length": 256, "llama.embedding_length": D_MODEL,
            "llama.feed_forward_length": D_FF, "llama.attention.head_count": N_HEADS,
            "llama.attention.head_count_kv": N_KV_HEADS, "llama.rope.freq_base": 10000.0,
            "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.rope.dimension_count": HEAD_DIM,
            **spm_vocab()}


def write_tiny_llama(path: Path, metadata: dict | None = None, drop: tuple[str, ...] = (),
                     extra_tensors: dict[str, np.ndarray] | None = None, seed: int = 0) -> Path:
    """Write the tiny llama to `path`; `metadata` overrides or adds keys (a value of None removes the key),
    `drop` removes keys or tensors, `extra_tensors` adds F32 tensors. Returns `path`."""
    meta = {**tiny_metadata(), **(metadata or {})}
    tensors = tiny_tensors(seed)
    tensors.update({name: (np.asarray(v, np.float32), GGMLQuantizationType.F32)
                    for name, v in (extra_tensors or {}).items()})
    arch = meta.pop("general.architecture", "llama")
    w = GGUFWriter(str(path), arch if isinstance(arch, str) else "llama")
    if not isinstance(arch, str):  # the writer adds the architecture as a string: replace it by this value
        w.kv_data[0].pop("general.architecture")
        _add(w, "general.architecture", arch)
    for key, value in meta.items():
        if value is not None and key not in drop:
            _add(w, key, value)
    for name, (values, ggml_type) in tensors.items():
        if name not in drop:
            if ggml_type == GGMLQuantizationType.F32:
                w.add_tensor(name, values)
            else:  # the writer takes the bytes' shape and works out the elements' from the type
                w.add_tensor(name, gguf.quants.quantize(values, ggml_type), raw_dtype=ggml_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _add(w: GGUFWriter, key: str, value) -> None:
    """Add one key with the GGUF type the converter would use (uint32 counts, float32 reals, string, arrays)."""
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        (w.add_uint32 if 0 <= value < 2 ** 32 else w.add_int64)(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    else:
        w.add_array(key, value.tolist() if isinstance(value, np.ndarray) else list(value))
