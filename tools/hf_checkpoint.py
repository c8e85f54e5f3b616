"""A Hugging Face checkpoint directory as a converter source, mirroring llama.cpp's convert_hf_to_gguf.py.

config.json gives the architecture and hyper-parameters (written as `{arch}.*` keys the way convert_hf_to_gguf's
TextModel / LlamaModel / Gemma3Model do); the weights come from model.safetensors or shards listed in
model.safetensors.index.json, read through a memory map one tensor at a time. Names map to GGUF's with
gguf.TensorNameMap; llama's Q and K rows are permuted so RoPE rotates adjacent pairs (LlamaModel.permute), Gemma's
norm weights get +1 (Gemma3RMSNorm multiplies by 1 + w) and its embedding loses the rows past the vocabulary. The
tokenizer is read by tools/hf_vocab.py. Every tensor's shape is checked against config.json before anything is written.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import GGUFValue

import edgeinfer.arch
from kernels_cpu import formats as F
from tools.convert import ConvertError, Source, SourceTensor
from tools.hf_vocab import add_vocab

# config.json "architectures"[0] -> (GGUF architecture, gguf.MODEL_ARCH), as each module of edgeinfer/arch/ declares
ARCHITECTURES = {hf_name: (module.ARCH, getattr(gguf.MODEL_ARCH, module.GGUF_MODEL_ARCH))
                 for module in edgeinfer.arch.ARCHITECTURES.values() for hf_name in module.HF_ARCHITECTURES}
SKIPPED = ("rotary_emb.inv_freq",)  # buffers some checkpoints save; llama.cpp drops them too


# ---------------------------------------------------------------- safetensors


_DTYPES = {"F32": (np.float32, F.F32), "F16": (np.float16, F.F16), "BF16": (np.uint16, F.BF16)}


class SafetensorsFile:
    """The header of one .safetensors file, with validated offsets; tensors are read through a memory map."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConvertError(f"{path}: too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise ConvertError(f"{path}: header length {n} runs past the end of the file")
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise ConvertError(f"{path}: the safetensors header is not valid JSON ({e})") from None
        self.data_start = 8 + n
        self.entries = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = entry.get("dtype")
            if dtype not in _DTYPES:
                raise ConvertError(f"{path}: tensor {name} has dtype {dtype}, not one of {', '.join(_DTYPES)}")
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = entry["data_offsets"]
            if end - begin != math.prod(shape) * np.dtype(_DTYPES[dtype][0]).itemsize or \
                    self.data_start + end > size:
                raise ConvertError(f"{path}: tensor {name}: data offsets {begin}..{end} do not fit its shape "
                                   f"{list(shape)} or the file")
            self.entries[name] = (dtype, shape, begin)
        self._map = None

    def read(self, name: str) -> np.ndarray:
        """float32 copy of a tensor (BF16 widened exactly, F16 converted)."""
        dtype, shape, begin = self.entries[name]
        if self._map is None:
            self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        np_dtype = _DTYPES[dtype][0]
        count = math.prod(shape)
        data = np.frombuffer(self._map, dtype=np_dtype, count=count, offset=self.data_start + begin)
        if dtype == "BF16":
            return (data.astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return data.astype(np.float32).reshape(shape)

    def close(self) -> None:
        self._map = None


def find_weights(src: Path) -> dict[str, SafetensorsFile]:
    """HF tensor name -> the shard holding it, from the index file if there is one, else from model*.safetensors."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConvertError(f"{index}: not a valid safetensors index ({e})") from None
        shards = {}
        for part in sorted(set(weight_map.values())):
            if not (src / part).is_file():
                raise ConvertError(f"{index}: lists {part}, which is missing")
            shards[part] = SafetensorsFile(src / part)
        located = {}
        for name, part in weight_map.items():
            if name not in shards[part].entries:
                raise ConvertError(f"{src / part}: does not hold tensor {name}, which the index places there")
            located[name] = shards[part]
        return located
    parts = sorted(src.glob("model*.safetensors"))
    if not parts:
        raise ConvertError(f"{src}: no model.safetensors (or shards with model.safetensors.index.json); "
                           f"PyTorch .bin checkpoints are not supported")
    located = {}
    for part in parts:
        shard = SafetensorsFile(part)
        located.update({name: shard for name in shard.entries})
    return located


# ---------------------------------------------------------------- config and metadata


def read_config(src: Path) -> tuple[str, gguf.MODEL_ARCH, dict]:
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: no config.json; expected a Hugging Face checkpoint directory or a GGUF file")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{config_path}: not valid JSON ({e})") from None
    archs = config.get("architectures") or []
    name = archs[0] if archs else config.get("model_type", "?")
    if name not in ARCHITECTURES:
        raise ConvertError(f"{config_path}: architecture {name!r} is not supported "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    if "text_config" in config:  # multimodal wrappers keep the language model's settings there
        config = {**config, **config["text_config"]}
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int) or config[key] <= 0:
            raise ConvertError(f"{config_path}: {key} is missing or not a positive integer")
    arch, model_arch = ARCHITECTURES[name]
    return arch, model_arch, config


def _first(config: dict, keys, default=None):
    return next((config[k] for k in keys if config.get(k) is not None), default)


def write_hparams(w: gguf.GGUFWriter, arch: str, config: dict) -> None:
    """The `{arch}.*` keys convert_hf_to_gguf.py writes for llama / qwen2 / gemma3."""
    gemma = arch == "gemma3"
    n_head = config.get("num_attention_heads", 8 if gemma else None)
    w.add_block_count(config["num_hidden_layers"])
    n_ctx = _first(config, ("max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                            "model_max_length"), 131072 if gemma else None)
    if n_ctx is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(n_head)
    n_kv = config.get("num_key_value_heads", 4 if gemma else None)
    if n_kv is not None:
        w.add_head_count_kv(n_kv)
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type"))
    if rope_type == "linear" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    elif rope_type == "yarn" and rope.get("factor") is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    theta = _first(config, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                            "rotary_emb_base"), rope.get("rope_theta", 1_000_000.0 if gemma else None))
    if theta is not None:
        w.add_rope_freq_base(theta)
    local_theta = _first(config, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                                  "rope_local_base_freq"))
    if local_theta is not None:
        w.add_rope_freq_base_swa(local_theta)
    w.add_layer_norm_rms_eps(_first(config, ("rms_norm_eps", "norm_eps"), 1e-6 if gemma else None))
    head_dim = config.get("head_dim", 256 if gemma else None)
    if head_dim is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "llama":
        w.add_vocab_size(config["vocab_size"])
        w.add_rope_dimension_count(head_dim or config["hidden_size"] // n_head)
    if gemma:
        if config.get("final_logit_softcapping"):
            w.add_final_logit_softcapping(config["final_logit_softcapping"])
        if config.get("sliding_window_pattern") != 1 and config.get("sliding_window"):
            w.add_sliding_window(config["sliding_window"])


# ---------------------------------------------------------------- tensors


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from HF's (two halves) order to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_shapes(arch: str, config: dict, n_vocab: int) -> dict[str, tuple[int, ...]]:
    """GGUF name -> numpy shape every tensor must have; the required ones for the architecture."""
    d, n_head, d_ff = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    n_kv = config.get("num_key_value_heads", n_head)
    hd = config.get("head_dim") or d // n_head
    shapes = {"token_embd.weight": (n_vocab, d), "output_norm.weight": (d,)}
    for i in range(config["num_hidden_layers"]):
        p = f"blk.{i}."
        shapes.update({p + "attn_norm.weight": (d,), p + "attn_q.weight": (n_head * hd, d),
                       p + "attn_k.weight": (n_kv * hd, d), p + "attn_v.weight": (n_kv * hd, d),
                       p + "attn_output.weight": (d, n_head * hd), p + "ffn_norm.weight": (d,),
                       p + "ffn_gate.weight": (d_ff, d), p + "ffn_up.weight": (d_ff, d),
                       p + "ffn_down.weight": (d, d_ff)})
        if arch == "qwen2":
            shapes.update({p + "attn_q.bias": (n_head * hd,), p + "attn_k.bias": (n_kv * hd,),
                           p + "attn_v.bias": (n_kv * hd,)})
        if arch == "gemma3":
            shapes.update({p + "attn_q_norm.weight": (hd,), p + "attn_k_norm.weight": (hd,),
                           p + "post_attention_norm.weight": (d,), p + "post_ffw_norm.weight": (d,)})
    return shapes


def map_tensors(src: Path, arch: str, model_arch, config: dict, located: dict, n_vocab: int) -> list[SourceTensor]:
    """The checkpoint's tensors under GGUF names with their conversions, shapes checked against config.json."""
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(model_arch, n_layers)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    required = expected_shapes(arch, config, n_vocab)
    tensors = []
    for hf_name, shard in located.items():
        if hf_name.endswith(SKIPPED):
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"{shard.path}: cannot map tensor {hf_name} to a GGUF name for {arch}")
        dtype, shape, _ = shard.entries[hf_name]
        if name == "token_embd.weight" and arch == "gemma3" and shape[0] > n_vocab:
            shape = (n_vocab, *shape[1:])  # llama.cpp drops the embedding rows past the vocabulary
        want = required.get(name, (n_vocab, config["hidden_size"]) if name == "output.weight" else None)
        if want is not None and tuple(shape) != want:
            raise ConvertError(f"{shard.path}: tensor {hf_name} has shape {list(shape)}, but config.json implies "
                               f"{list(want)}")
        permute = 0
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = n_head
        elif arch == "llama" and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = n_kv
        shift = 1.0 if arch == "gemma3" and hf_name.endswith("norm.weight") else 0.0

        def load(shard=shard, hf_name=hf_name, shape=shape, permute=permute, shift=shift):
            x = shard.read(hf_name)[:shape[0]] if len(shape) else shard.read(hf_name)
            if permute:
                x = permute_rows(x, permute)
            return x + np.float32(shift) if shift else x

        tensors.append(SourceTensor(name, tuple(shape), _DTYPES[dtype][1], load))
    present = {t.name for t in tensors}
    missing = [n for n in required if n not in present]
    if missing:
        raise ConvertError(f"{src}: the checkpoint lacks {len(missing)} tensor(s) the architecture needs, "
                           f"e.g. {', '.join(missing[:3])}")
    return tensors


# ---------------------------------------------------------------- the source


def open_checkpoint(src: Path) -> Source:
    """A Hugging Face checkpoint directory as a converter Source (metadata built, tensors mapped and checked)."""
    arch, model_arch, config = read_config(src)
    collector = gguf.GGUFWriter(None, arch)  # only collects key-values here; never opens a file
    collector.add_type("model")
    collector.add_name(str(config.get("_name_or_path") or src.resolve().name).rstrip("/").split("/")[-1])
    write_hparams(collector, arch, config)
    n_vocab = add_vocab(collector, src, arch, config)
    located = find_weights(src)
    tensors = map_tensors(src, arch, model_arch, config, located, n_vocab)
    metadata: dict[str, GGUFValue] = dict(collector.kv_data[0])

    def close():
        for shard in set(located.values()):
            shard.close()

    return Source(arch, metadata, tensors, config["num_hidden_layers"], from_checkpoint=True, close=close)
