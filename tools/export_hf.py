"""GGUF -> Hugging Face checkpoint directory: the exact inverse of the converter, for tests and round trips.

Writes config.json, the dequantized weights as F32 or F16 safetensors (one file, or N shards plus
model.safetensors.index.json), and the tokenizer: tokenizer.json for byte-level BPE vocabularies, tokenizer.model
(a SentencePiece model serialized by hand, so no protobuf package is needed) for SentencePiece ones, and
tokenizer_config.json with the special tokens, add_bos/add_eos and the chat template. Q/K rows are un-permuted and
norm weights unshifted where the family's HF_CONVERT declares it, undoing what tools/hf_checkpoint.py applies. Only
the families declared `exported` (llama, qwen2, gemma3) are written.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np

from edgeinfer.arch import ARCHITECTURES, load_decoder
from edgeinfer.gguf_reader import GGUFFile
from kernels_cpu.dequant import dequantize
from tools.convert import ConvertError
from tools.hf_vocab import BYTE, CONTROL, UNKNOWN, UNUSED, USER_DEFINED

# GGUF architecture -> (config.json "architectures"[0], "model_type", gguf.MODEL_ARCH), as edgeinfer/arch/ declares
HF_ARCH = {arch: (module.HF_ARCHITECTURES[0], module.HF_MODEL_TYPE, getattr(gguf.MODEL_ARCH, module.GGUF_MODEL_ARCH))
           for arch, module in ARCHITECTURES.items() if module.HF_CONVERT.exported}  # the families converted both ways

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N."); ffn_norm depends on the architecture
LAYER_NAMES = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
               "attn_k_norm": "self_attn.k_norm", "post_attention_norm": "post_attention_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                "output_norm.weight": "model.norm.weight"}

# tokenizer.ggml.pre -> (normalizer, pre_tokenizer) of the Hugging Face tokenizer.json that llama.cpp maps to it
_SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False}
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
PRE_TOKENIZERS = {
    "smollm": (None, {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}),
    "qwen2": ({"type": "NFC"}, {"type": "Sequence", "pretokenizers": [
        {**_SPLIT, "pattern": {"Regex": _QWEN2_REGEX}}, _BYTE_LEVEL]}),
    "llama-bpe": (None, {"type": "Sequence", "pretokenizers": [
        {**_SPLIT, "pattern": {"Regex": _LLAMA3_REGEX}}, _BYTE_LEVEL]}),
    "gpt-2": (None, {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}),
}
SPECIAL_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id",
                "sep": "seperator_token_id", "mask": "mask_token_id"}


def hf_name(name: str, arch: str) -> str:
    if name in GLOBAL_NAMES:
        return GLOBAL_NAMES[name]
    _, layer, rest = name.split(".", 2)
    base, kind = rest.rsplit(".", 1)
    if base == "ffn_norm":
        hf = "pre_feedforward_layernorm" if arch == "gemma3" else "post_attention_layernorm"
    else:
        hf = LAYER_NAMES[base]
    return f"model.layers.{layer}.{hf}.{kind}"


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's LlamaModel.permute: interleaved RoPE pairs back to HF's two halves per head."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- safetensors


def write_safetensors(path: Path, tensors: list[tuple[str, tuple[int, ...]]], produce, dtype: np.dtype) -> None:
    """Stream tensors into a .safetensors file: header from the shapes, then produce(name) one at a time."""
    code = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[np.dtype(dtype)]
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in tensors:
        n = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in tensors:
            f.write(np.ascontiguousarray(produce(name), dtype=dtype).tobytes())


def split_shards(items: list[tuple[str, tuple[int, ...]]], n_shards: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Consecutive groups of tensors of about equal size."""
    sizes = [math.prod(shape) for _, shape in items]
    total, shards, acc = sum(sizes), [[] for _ in range(n_shards)], 0
    for item, size in zip(items, sizes):
        shards[min(n_shards - 1, acc * n_shards // max(total, 1))].append(item)
        acc += size
    return [s for s in shards if s]


# ---------------------------------------------------------------- tokenizer


def special_tokens(meta: dict) -> dict[str, int]:
    tokens = meta["tokenizer.ggml.tokens"]
    return {k: int(meta[f"tokenizer.ggml.{key}"]) for k, key in SPECIAL_KEYS.items()
            if isinstance(meta.get(f"tokenizer.ggml.{key}"), int) and meta[f"tokenizer.ggml.{key}"] < len(tokens)}


def write_tokenizer_json(out: Path, meta: dict) -> None:
    """A byte-level BPE tokenizer.json whose vocabulary, merges and pre-tokenizer are the GGUF's."""
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise ConvertError(f"cannot export pre-tokenizer {pre!r} (known: {', '.join(PRE_TOKENIZERS)})")
    normalizer, pre_tokenizer = PRE_TOKENIZERS[pre]
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    vocab, added = {}, []
    for i, (text, kind) in enumerate(zip(tokens, types.tolist())):
        if kind == UNUSED and text == f"[PAD{i}]":
            continue  # padding the converter recreates from vocab_size
        vocab[text] = i
        if kind in (CONTROL, USER_DEFINED):
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": kind == USER_DEFINED, "special": kind == CONTROL})
    special = special_tokens(meta)
    if meta.get("tokenizer.ggml.add_bos_token") and "bos" in special:
        bos = tokens[special["bos"]]
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                         {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [special["bos"]], "tokens": [bos]}}}
    else:
        post = dict(_BYTE_LEVEL)
    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": normalizer,
            "pre_tokenizer": pre_tokenizer, "post_processor": post,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": list(meta.get("tokenizer.ggml.merges", []))}}
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes | int | float) -> bytes:
    """One protobuf field: varint (int / bool), fixed32 (float) or length-delimited (bytes)."""
    if isinstance(payload, float):
        return _varint(number << 3 | 5) + struct.pack("<f", payload)
    if isinstance(payload, (bool, int)):
        return _varint(number << 3) + _varint(int(payload))
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def write_sentencepiece_model(out: Path, meta: dict) -> None:
    """tokenizer.model: a SentencePiece BPE ModelProto (pieces with scores and types, trainer and normalizer specs)
    holding the GGUF's vocabulary. Types CONTROL / USER_DEFINED set by tokenizer_config.json are stored NORMAL here,
    as in the original models; the unknown token is always UNKNOWN (SentencePiece requires one)."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"].tolist()
    scores = meta.get("tokenizer.ggml.scores")
    unk = special_tokens(meta).get("unk", types.index(UNKNOWN) if UNKNOWN in types else 0)
    pieces = bytearray()
    for i, (text, kind) in enumerate(zip(tokens, types)):
        kind = UNKNOWN if i == unk else kind if kind in (CONTROL, UNUSED, BYTE) else 1
        body = _field(1, text.encode("utf-8")) + _field(2, float(scores[i]) if scores is not None else 0.0)
        pieces += _field(1, body + (_field(3, kind) if kind != 1 else b""))
    special = special_tokens(meta)
    trainer = (_field(3, 2) + _field(4, len(tokens)) + _field(35, True) + _field(40, unk)
               + _field(41, special.get("bos", -1) & 0xFFFFFFFFFFFFFFFF)
               + _field(42, special.get("eos", -1) & 0xFFFFFFFFFFFFFFFF)
               + _field(43, special.get("pad", -1) & 0xFFFFFFFFFFFFFFFF))
    normalizer = (_field(1, b"identity") + _field(3, bool(meta.get("tokenizer.ggml.add_space_prefix", False)))
                  + _field(4, False) + _field(5, True))
    (out / "tokenizer.model").write_bytes(bytes(pieces) + _field(2, trainer) + _field(3, normalizer))


def write_tokenizer_config(out: Path, meta: dict, arch: str) -> None:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"].tolist()
    scores = meta.get("tokenizer.ggml.scores")
    unk = special_tokens(meta).get("unk")

    def listed(i: int, kind: int) -> bool:
        """Which tokens go to added_tokens_decoder. For SentencePiece the converter gives those score -1000 and
        their type from `special`, so only tokens that had exactly that treatment are listed."""
        if scores is None:
            return kind in (CONTROL, USER_DEFINED)
        return kind == USER_DEFINED or (kind == CONTROL and (scores[i] == -1000.0 or i == unk))

    config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
              "added_tokens_decoder": {
                  str(i): {"content": text, "lstrip": False, "normalized": kind == USER_DEFINED, "rstrip": False,
                           "single_word": False, "special": kind == CONTROL}
                  for i, (text, kind) in enumerate(zip(tokens, types)) if listed(i, kind)}}
    for kind, i in special_tokens(meta).items():
        config[f"{kind}_token"] = tokens[i]
    for kind in ("bos", "eos", "sep"):
        if isinstance(meta.get(f"tokenizer.ggml.add_{kind}_token"), bool):
            config[f"add_{kind}_token"] = meta[f"tokenizer.ggml.add_{kind}_token"]
    if arch == "llama" and "tokenizer.ggml.add_space_prefix" in meta:
        config["add_prefix_space"] = bool(meta["tokenizer.ggml.add_space_prefix"])
    if meta.get("tokenizer.chat_template"):
        config["chat_template"] = meta["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False), encoding="utf-8")


# ---------------------------------------------------------------- config and weights


def hf_config(gguf_file: GGUFFile, cfg, tied: bool, dtype_name: str) -> dict:
    meta, arch = gguf_file.metadata, cfg.arch
    hf_arch, model_type, _ = HF_ARCH[arch]
    config = {"architectures": [hf_arch], "model_type": model_type, "hidden_size": cfg.d_model,
              "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
              "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
              "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
              "rope_theta": cfg.rope_base, "vocab_size": cfg.n_vocab, "tie_word_embeddings": tied,
              "torch_dtype": {"F32": "float32", "F16": "float16"}[dtype_name],
              "hidden_act": "gelu_pytorch_tanh" if arch == "gemma3" else "silu"}
    config.update({f"{k}_token_id": i for k, i in special_tokens(meta).items()})  # SpecialVocab's fallback
    if f"{arch}.attention.key_length" in meta or cfg.head_dim * cfg.n_heads != cfg.d_model:
        config["head_dim"] = cfg.head_dim
    if arch == "qwen2":
        config["use_sliding_window"] = False
    if arch == "gemma3":
        config.update({"head_dim": cfg.head_dim, "query_pre_attn_scalar": cfg.head_dim,
                       "sliding_window": cfg.sliding_window, "sliding_window_pattern": 6,
                       "rope_local_base_freq": cfg.rope_base_local or 10000.0,
                       "final_logit_softcapping": cfg.final_logit_softcap or None})
    return config


def export_hf(model: str | Path, out_dir: str | Path, dtype: str = "F32", n_shards: int = 1) -> Path:
    """Write MODEL (a GGUF file) as a Hugging Face checkpoint directory OUT_DIR; returns it.

    dtype: "F32" (exact dequantized values) or "F16"; n_shards > 1 writes model-0000k-of-0000n.safetensors files
    and model.safetensors.index.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = {"F32": np.float32, "F16": np.float16}[dtype]
    with GGUFFile(model) as g:
        cfg, _ = load_decoder(g)
        arch, meta = cfg.arch, g.metadata
        if arch not in HF_ARCH:
            raise ConvertError(f"{model}: exporting {arch} to a Hugging Face checkpoint is not implemented "
                               f"(exported: {', '.join(HF_ARCH)})")
        name_map = gguf.get_tensor_name_map(HF_ARCH[arch][2], cfg.n_layers)
        conversion = ARCHITECTURES[arch].HF_CONVERT  # undone here: Q/K permutation, norm shift
        items = []
        for name, t in g.tensors.items():
            hf = hf_name(name, arch)
            if name_map.get_name(hf, try_suffixes=(".weight", ".bias")) != name:
                raise ConvertError(f"export: {name} -> {hf} does not map back (the name tables disagree)")
            items.append((hf, t.shape, name))

        def produce(hf: str) -> np.ndarray:
            name = by_hf[hf]
            t = g.tensors[name]
            x = dequantize(t.ggml_type, t.raw, t.shape[-1]).reshape(t.shape)
            if conversion.permuted and name.endswith(("attn_q.weight", "attn_q.bias")):
                x = unpermute_rows(x, cfg.n_heads)
            elif conversion.permuted and name.endswith(("attn_k.weight", "attn_k.bias")):
                x = unpermute_rows(x, cfg.n_kv_heads)
            if conversion.norm_shift and name.endswith("norm.weight"):
                x = x - np.float32(conversion.norm_shift)
            return x

        by_hf = {hf: name for hf, _, name in items}
        shapes = [(hf, shape) for hf, shape, _ in items]
        if n_shards <= 1:
            write_safetensors(out / "model.safetensors", shapes, produce, np_dtype)
        else:
            shards = split_shards(shapes, n_shards)
            weight_map = {}
            for k, shard in enumerate(shards):
                part = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
                write_safetensors(out / part, shard, produce, np_dtype)
                weight_map.update({hf: part for hf, _ in shard})
            total = sum(math.prod(s) for _, s in shapes) * np.dtype(np_dtype).itemsize
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1), encoding="utf-8")
        tied = "output.weight" not in g.tensors
        (out / "config.json").write_text(json.dumps(hf_config(g, cfg, tied, dtype), indent=1), encoding="utf-8")
        if meta.get("tokenizer.ggml.model") == "gpt2":
            write_tokenizer_json(out, meta)
        elif meta.get("tokenizer.ggml.model") == "llama":
            write_sentencepiece_model(out, meta)
        else:
            raise ConvertError(f"cannot export tokenizer model {meta.get('tokenizer.ggml.model')!r}")
        write_tokenizer_config(out, meta, arch)
    return out
