"""What `edgeinfer info` shows: a JSON-serialisable summary of a GGUF file and a compact text rendering of it.

Works on any file the reader accepts: every metadata value is type-checked here, because a valid GGUF may still
carry odd values (a string context length, an out-of-range token id) and `info` is the tool for looking at such files.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
from gguf.constants import LlamaFileType

from edgeinfer.gguf_reader import GGUFFile

_FTYPE_GUESSED = LlamaFileType.GUESSED  # llama.cpp ORs this flag in when it inferred the file type itself
_ARRAY_SHOWN = 8  # arrays longer than this are summarised as type, length and their first elements


def summarize(gguf: GGUFFile) -> dict:
    """A JSON-serialisable description of an open GGUF file (sizes in bytes, counts in elements)."""
    meta = gguf.metadata
    arch = meta.get("general.architecture")
    arch = arch if isinstance(arch, str) else None
    prefix = f"{arch}." if arch else None
    hyper = {key[len(prefix):]: _jsonable(value) for key, value in meta.items()
             if prefix and key.startswith(prefix)}
    histogram: dict[str, dict[str, int]] = {}
    for tensor in gguf.tensors.values():
        row = histogram.setdefault(tensor.type_name, {"count": 0, "parameters": 0, "bytes": 0})
        row["count"] += 1
        row["parameters"] += tensor.n_elements
        row["bytes"] += tensor.nbytes
    return {
        "file": str(gguf.path),
        "file_size": gguf.file_size,
        "gguf_version": gguf.version,
        "architecture": arch,
        "name": _text(meta.get("general.name")),
        "quantization": quantization_label(meta.get("general.file_type")),
        "context_length": _int(meta.get(f"{prefix}context_length")) if prefix else None,
        "parameters": sum(row["parameters"] for row in histogram.values()),
        "n_tensors": len(gguf.tensors),
        "n_metadata": len(meta),
        "hyperparameters": hyper,
        "variant": variant(gguf),
        "vocabulary": _vocabulary(meta, prefix),
        "chat_template": isinstance(meta.get("tokenizer.chat_template"), str),
        "tensor_types": dict(sorted(histogram.items(), key=lambda kv: -kv[1]["bytes"])),
    }


def quantization_label(file_type: Any) -> str | None:
    """llama.cpp's name for `general.file_type` (3 -> "Q4_1", 15 -> "Q4_K_M"); None when the key is absent."""
    if file_type is None:
        return None
    if not isinstance(file_type, int) or isinstance(file_type, bool):
        return f"invalid ({_text(file_type)})"
    guessed = file_type != _FTYPE_GUESSED and bool(file_type & _FTYPE_GUESSED)
    base = file_type & ~_FTYPE_GUESSED if guessed else file_type
    try:
        label = LlamaFileType(base).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return f"unknown ({file_type})"
    return label + (" (guessed)" if guessed else "")


def _vocabulary(meta: dict, prefix: str | None) -> dict:
    tokens = meta.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, list) else None
    n_vocab = len(tokens) if tokens is not None else _int(meta.get(f"{prefix}vocab_size")) if prefix else None
    vocab = {"model": _text(meta.get("tokenizer.ggml.model")), "pre": _text(meta.get("tokenizer.ggml.pre")),
             "n_vocab": n_vocab}
    for role in ("bos", "eos"):
        token_id = _int(meta.get(f"tokenizer.ggml.{role}_token_id"))
        vocab[f"{role}_id"] = token_id
        in_range = tokens is not None and token_id is not None and 0 <= token_id < len(tokens)
        vocab[role] = tokens[token_id] if in_range else None
    return vocab


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _text(value: Any) -> str | None:
    return None if value is None else value if isinstance(value, str) else str(_jsonable(value))


def _jsonable(value: Any) -> Any:
    """Scalars as they are (non-finite floats as strings, so the JSON stays strict); long arrays summarised."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (np.ndarray, list)):
        items = value.tolist() if isinstance(value, np.ndarray) else value
        if len(items) <= _ARRAY_SHOWN:
            return [_jsonable(v) for v in items]
        kind = str(value.dtype) if isinstance(value, np.ndarray) else type(items[0]).__name__
        return {"array": kind, "length": len(items), "first": [_jsonable(v) for v in items[:4]]}
    return value


def variant(gguf: GGUFFile) -> dict | None:
    """What the forward pass computes differently for this file's family, as its architecture module reads it
    (switches and numbers away from the plain llama decoder, RoPE scaling, per-layer patterns); None where the
    architecture is not supported or the file's hyper-parameters do not load."""
    from edgeinfer.arch import ARCHITECTURES
    from edgeinfer.arch.decoder import DecoderConfig
    module = ARCHITECTURES.get(gguf.metadata.get("general.architecture"))
    if module is None:
        return None
    try:
        cfg = module.config_from_gguf(gguf)
    except Exception:  # noqa: BLE001  (info describes any file, however damaged: no variant then)
        return None
    plain = {f.name: f.default for f in dataclasses.fields(DecoderConfig) if f.default is not dataclasses.MISSING}
    out: dict[str, Any] = {"rope_style": "neox" if cfg.rope_style else "normal", "activation": cfg.activation}
    if cfg.rope_dims != cfg.head_dim:
        out["rope_dims"] = f"{cfg.rope_dims} of {cfg.head_dim}"
    for name in ("qkv_bias", "qk_norm", "qk_norm_whole", "post_norms", "pre_norms", "fused_qkv", "fused_gate_up",
                 "embedding_scale", "attention_scale", "residual_scale", "logit_scale", "attn_logit_softcap",
                 "final_logit_softcap", "rope_freq_scale", "rope_freq_scale_local", "rope_base_local"):
        if getattr(cfg, name) != plain[name]:
            out[name] = _jsonable(getattr(cfg, name))
    if cfg.rope_freq_factors:
        f = cfg.rope_freq_factors
        out["rope_freq_factors"] = f"{len(f)} pairs, {min(f):g} to {max(f):g} (rope_freqs.weight)"
    if scaling := rope_scaling(cfg):
        out["rope_scaling"] = scaling
    if cfg.sliding_window:
        local = [i for i in range(cfg.n_layers) if cfg.layer_window(i)]
        out["sliding_window"] = f"{cfg.sliding_window} on {len(local)} of {cfg.n_layers} layers"
    if cfg.rope_layers and not all(cfg.rope_layers):
        out["layers_without_rope"] = [i for i, on in enumerate(cfg.rope_layers) if not on]
    return out


def rope_scaling(cfg) -> str | None:
    """RoPE scaling in one line (type, factor, original context, what the attention scores are scaled by), or None
    where RoPE is not scaled."""
    mscale = cfg.layer_rope_mscale(0)
    if cfg.rope_freq_scale == 1.0 and mscale == 1.0 and cfg.rope_scaling not in ("yarn", "longrope") \
            and not cfg.long_rope:
        return None
    parts = [f"factor {1.0 / cfg.rope_freq_scale:g}"] if cfg.rope_freq_scale != 1.0 else []
    if cfg.rope_ext_factor or cfg.long_rope:
        parts.append(f"original context {cfg.rope_orig_context}")
    if cfg.long_rope:
        def span(f):
            return f"{min(f):g} to {max(f):g}" if f else "none"
        parts.append(f"long factors {span(cfg.rope_factors_long)} above it, short {span(cfg.rope_factors_short)}")
    if mscale != 1.0:
        parts.append(f"attention scores x{mscale * mscale:.4g}")
    kind = "long-rope" if cfg.long_rope and cfg.rope_scaling != "yarn" else cfg.rope_scaling
    return f"{kind}: {', '.join(parts)}" if parts else kind


# -- text rendering ---------------------------------------------------------------------------------------------------
def format_summary(d: dict) -> str:
    """The summary as aligned `key: value` lines, the hyper-parameters, then a table of tensor types."""
    vocab = d["vocabulary"]
    specials = ", ".join(f"{role} {vocab[role + '_id']} {_show(vocab[role])}" for role in ("bos", "eos")
                         if vocab[role + "_id"] is not None)
    lines = _aligned([
        ("file", f"{_show(d['file'])} ({_bytes(d['file_size'])})"),
        ("gguf version", d["gguf_version"]),
        ("architecture", _show(d["architecture"])),
        ("name", _show(d["name"])),
        ("quantization", _show(d["quantization"])),
        ("parameters", f"{d['parameters']:,} ({_scaled(d['parameters'], ('', 'K', 'M', 'B'))})"),
        ("context length", _show(d["context_length"])),
        ("vocabulary", f"{_show(vocab['model'])} (pre {_show(vocab['pre'])}), n_vocab {_show(vocab['n_vocab'])}"),
        ("special tokens", specials or "-"),
        ("chat template", "yes" if d["chat_template"] else "no"),
        ("tensors", f"{d['n_tensors']} ({d['n_metadata']} metadata keys)"),
    ])
    if d["hyperparameters"]:
        lines += ["", "hyper-parameters:"]
        lines += _aligned([(_show(k), _show(v)) for k, v in d["hyperparameters"].items()], indent="  ")
    if d.get("variant"):
        lines += ["", f"{d['architecture']} variant (what the forward computes):"]
        lines += _aligned([(k, _show(v)) for k, v in d["variant"].items()], indent="  ")
    lines += ["", "tensor types:", f"  {'type':<8} {'count':>6} {'parameters':>14} {'bytes':>10}"]
    for name, row in d["tensor_types"].items():
        lines.append(f"  {name:<8} {row['count']:>6} {row['parameters']:>14,} {_bytes(row['bytes']):>10}")
    return "\n".join(lines)


def _aligned(pairs: list[tuple[str, Any]], indent: str = "") -> list[str]:
    width = max(len(key) for key, _ in pairs) + 1
    return [f"{indent}{key + ':':<{width}} {value}" for key, value in pairs]


def _show(value: Any) -> str:
    """One line of printable text: control characters escaped, very long values cut."""
    if value is None:
        return "-"
    text = value if isinstance(value, str) else str(value)
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= 120 else text[:117] + "..."


def _scaled(n: int, units: tuple[str, str, str, str]) -> str:
    """n in the largest fitting unit of (1, 1e3, 1e6, 1e9), one decimal: 1536 bytes -> "1.5 kB"."""
    for power in (3, 2, 1):
        if n >= 1000 ** power:
            return f"{n / 1000 ** power:.1f}{units[power]}"
    return f"{n}{units[0]}"


def _bytes(n: int) -> str:
    return _scaled(n, (" B", " kB", " MB", " GB"))
