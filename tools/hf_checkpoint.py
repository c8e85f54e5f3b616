"""A Hugging Face checkpoint directory as a converter source, mirroring llama.cpp's convert_hf_to_gguf.py.

config.json names the architecture; the family's module in edgeinfer/arch/ declares (HF_CONVERT, an
edgeinfer.arch.hf.HFConversion) what llama.cpp's model class for it does: the `{arch}.*` keys it writes from the
config (with the defaults transformers' config class fills in), whether Q and K rows are permuted so RoPE rotates
adjacent pairs, the shift added to norm weights, tensors dropped or generated (Llama 3's rope_freqs.weight), the
tokenizer files it reads and its vocabulary extras. This module applies any declaration the same way: the weights
come from model.safetensors or shards listed in model.safetensors.index.json, read through a memory map one tensor at
a time, names map to GGUF's with gguf.TensorNameMap, and every tensor's shape is checked against config.json before
anything is written. The tokenizer is read by tools/hf_vocab.py.
"""
from __future__ import annotations

import json
import math
import struct
from types import ModuleType
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import GGUFValue

import edgeinfer.arch
from kernels_cpu import formats as F
from edgeinfer.arch.hf import HFConversion
from tools.convert import ConvertError, Source, SourceTensor
from tools.hf_vocab import add_vocab

# config.json "architectures"[0] -> its module of edgeinfer/arch/
ARCHITECTURES = {hf_name: module for module in edgeinfer.arch.ARCHITECTURES.values()
                 for hf_name in module.HF_ARCHITECTURES}
SKIPPED = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")  # buffers llama.cpp drops too


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


def read_config(src: Path) -> tuple[ModuleType, dict]:
    """The architecture module and config.json (a multimodal wrapper's text_config merged in, the family's defaults
    filled in where a key is absent or null), checked; ConvertError naming the file and field otherwise."""
    config_path = src / "config.json"
    if not config_path.is_file():
        raise ConvertError(f"{src}: no config.json; expected a Hugging Face checkpoint directory or a GGUF file")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ConvertError(f"{config_path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{config_path}: not a JSON object")
    archs = config.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else config.get("model_type", "?")
    if name not in ARCHITECTURES:
        raise ConvertError(f"{config_path}: architecture {name!r} is not supported "
                           f"(supported: {', '.join(ARCHITECTURES)})")
    module = ARCHITECTURES[name]
    if isinstance(config.get("text_config"), dict):  # multimodal wrappers keep the language model's settings there
        config = {**config, **config["text_config"]}
    for key, default in module.HF_CONVERT.defaults.items():
        if config.get(key) is None:
            config[key] = default(config) if callable(default) else default
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(config.get(key), int) or isinstance(config[key], bool) or config[key] <= 0:
            raise ConvertError(f"{config_path}: {key} is missing or not a positive integer")
    reason = module.HF_CONVERT.refuse(config) if module.HF_CONVERT.refuse else None
    if reason:
        raise ConvertError(f"{config_path}: {name}: {reason}")
    return module, config


def put(w: gguf.GGUFWriter, key: str, value) -> None:
    """Set one key, replacing an earlier value: int -> uint32, float -> float32, bool, str, list -> array (the types
    llama.cpp's converter gives every key these families write)."""
    w.kv_data[0].pop(key, None)
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_uint32(key, value)
    elif isinstance(value, float):
        w.add_float32(key, value)
    elif isinstance(value, str):
        w.add_string(key, value)
    elif isinstance(value, (list, tuple)):
        w.add_array(key, list(value))
    else:
        raise TypeError(f"{key}: cannot write a {type(value).__name__}")


def write_hparams(w: gguf.GGUFWriter, arch: str, conversion: HFConversion, config: dict, config_path: Path) -> None:
    """The family's hyper-parameter keys, each under `{arch}.`."""
    try:
        hparams = conversion.hparams(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:
        what = f"{e.args[0]} is missing" if isinstance(e, KeyError) else f"bad value ({e})"
        raise ConvertError(f"{config_path}: {what}") from None
    for key, value in hparams.items():
        if value is not None:
            put(w, f"{arch}.{key}", value)


# ---------------------------------------------------------------- tensors


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rows from HF's (two halves) order to interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def allowed_shapes(name: str, config: dict, n_vocab: int, names: set[str]) -> list[tuple[int, ...]] | None:
    """The numpy shapes a GGUF tensor may have for config.json (the first is named in errors); None: not checked."""
    d, n_head, d_ff = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    n_kv = config.get("num_key_value_heads") or n_head
    hd = config.get("head_dim") or d // n_head
    q, kv = n_head * hd, n_kv * hd
    if name in ("token_embd.weight", "output.weight"):
        return [(n_vocab, d)]
    if name == "output_norm.weight":
        return [(d,)]
    if not name.startswith("blk."):
        return None
    layer, base = name.split(".", 2)[1], name.split(".", 2)[2]
    has_gate = f"blk.{layer}.ffn_gate.weight" in names
    return {"attn_norm.weight": [(d,)], "ffn_norm.weight": [(d,)], "post_attention_norm.weight": [(d,)],
            "post_ffw_norm.weight": [(d,)], "attn_q_norm.weight": [(hd,), (q,)], "attn_k_norm.weight": [(hd,), (kv,)],
            "attn_q.weight": [(q, d)], "attn_k.weight": [(kv, d)], "attn_v.weight": [(kv, d)],
            "attn_q.bias": [(q,)], "attn_k.bias": [(kv,)], "attn_v.bias": [(kv,)],
            "attn_qkv.weight": [(q + 2 * kv, d)], "attn_output.weight": [(d, q)],
            "ffn_gate.weight": [(d_ff, d)], "ffn_up.weight": [(d_ff, d)] if has_gate else [(2 * d_ff, d)],
            "ffn_down.weight": [(d, d_ff)]}.get(base)


def missing_tensors(names: set[str], n_layers: int) -> list[str]:
    """The tensors every family needs that are absent (Q, K, V or their fused attn_qkv)."""
    needed = ["token_embd.weight", "output_norm.weight"]
    for i in range(n_layers):
        p = f"blk.{i}."
        qkv = [p + "attn_qkv.weight"] if p + "attn_qkv.weight" in names else \
            [p + "attn_q.weight", p + "attn_k.weight", p + "attn_v.weight"]
        needed += qkv + [p + "attn_output.weight", p + "ffn_up.weight", p + "ffn_down.weight"]
    return [n for n in needed if n not in names]


def map_tensors(src: Path, module: ModuleType, config: dict, located: dict, n_vocab: int) -> list[SourceTensor]:
    """The checkpoint's tensors under GGUF names with the family's conversions, shapes checked against config.json,
    followed by the tensors the family generates."""
    conversion: HFConversion = module.HF_CONVERT
    n_layers = config["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, module.GGUF_MODEL_ARCH), n_layers)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads") or n_head
    mapped = {}
    for hf_name, shard in located.items():
        if hf_name.endswith(SKIPPED) or hf_name in conversion.dropped:
            continue
        name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConvertError(f"{shard.path}: cannot map tensor {hf_name} to a GGUF name for {module.ARCH}")
        mapped[name] = (hf_name, shard)
    if "output.weight" not in mapped and config.get("tie_word_embeddings") is False and \
            "lm_head.weight" not in conversion.dropped:
        raise ConvertError(f"{src / 'config.json'}: tie_word_embeddings is false, but the checkpoint has no "
                           "lm_head.weight")
    tensors = []
    for name, (hf_name, shard) in mapped.items():
        dtype, shape, _ = shard.entries[hf_name]
        if name == "token_embd.weight" and conversion.vocab_rows_trimmed and shape[0] > n_vocab:
            shape = (n_vocab, *shape[1:])  # llama.cpp drops the embedding rows past the vocabulary
        want = allowed_shapes(name, config, n_vocab, set(mapped))
        if want is not None and tuple(shape) not in want:
            raise ConvertError(f"{shard.path}: tensor {hf_name} has shape {list(shape)}, but config.json implies "
                               f"{list(want[0])}")
        permute = 0
        if conversion.permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            permute = n_head
        elif conversion.permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            permute = n_kv
        shift = conversion.norm_shift if hf_name.endswith("norm.weight") else 0.0

        def load(shard=shard, hf_name=hf_name, dtype=dtype, shape=shape, permute=permute, shift=shift):
            x = shard.read(hf_name)[:shape[0]] if len(shape) else shard.read(hf_name)
            if permute:
                x = permute_rows(x, permute)
            if shift and dtype == "F16":  # llama.cpp adds in the checkpoint's F16 (BF16 is widened first)
                return (x.astype(np.float16) + np.float16(shift)).astype(np.float32)
            return x + np.float32(shift) if shift else x

        tensors.append(SourceTensor(name, tuple(shape), _DTYPES[dtype][1], load))
    missing = missing_tensors(set(mapped), n_layers)
    if missing:
        raise ConvertError(f"{src}: the checkpoint lacks {len(missing)} tensor(s) the architecture needs, "
                           f"e.g. {', '.join(missing[:3])}")
    generated = conversion.extra_tensors(config) if conversion.extra_tensors else {}
    for name, values in generated.items():
        tensors.append(SourceTensor(name, values.shape, F.F32, lambda values=values: values))
    return tensors


# ---------------------------------------------------------------- the source


def open_checkpoint(src: Path) -> Source:
    """A Hugging Face checkpoint directory as a converter Source (metadata built, tensors mapped and checked)."""
    module, config = read_config(src)
    arch = module.ARCH
    collector = gguf.GGUFWriter(None, arch)  # only collects key-values here; never opens a file
    collector.add_type("model")
    collector.add_name(str(config.get("_name_or_path") or src.resolve().name).rstrip("/").split("/")[-1])
    write_hparams(collector, arch, module.HF_CONVERT, config, src / "config.json")
    n_vocab = add_vocab(collector, src, config, module.HF_CONVERT, put)
    located = find_weights(src)
    tensors = map_tensors(src, module, config, located, n_vocab)
    metadata: dict[str, GGUFValue] = dict(collector.kv_data[0])

    def close():
        for shard in set(located.values()):
            shard.close()

    return Source(arch, metadata, tensors, config["num_hidden_layers"], from_checkpoint=True, close=close)
