"""Which ggml type each tensor gets for a requested file type: llama.cpp's llama-quantize rules, ported.

`--type` names a file type. F32 / F16 / BF16 / Q8_0 / Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q6_K and the mixtures Q4_K_M /
Q5_K_M follow `llama_tensor_get_type` in llama.cpp's src/llama-quant.cpp: norms, biases and 1-D tensors keep F32;
the output head (and the token embedding when it doubles as the head) gets Q6_K unless its rows are not a multiple
of 256 (then Q8_0); Q4_K_M / Q5_K_M give attn_v and ffn_down Q6_K on the first and last eighth of the layers and on
every third layer between (`use_more_bits`). Q4_K and Q5_K are "pure": every quantizable tensor gets that type
(llama-quantize --pure). A type that cannot hold a tensor's rows falls back as llama.cpp does (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, then F16). `--tensor-type PATTERN=TYPE` overrides come first, as in llama-quantize.
"""
from __future__ import annotations

import fnmatch
import math
import re
from dataclasses import dataclass

from kernels_cpu import formats as F
from kernels_cpu.quantize import QUANTIZABLE_TYPES, quantized_nbytes

TYPE_BY_NAME = {name: t for t, name in F.TYPE_NAMES.items()}
QUANTIZED = frozenset(QUANTIZABLE_TYPES - {F.F32, F.F16, F.BF16})


@dataclass(frozen=True)
class FileType:
    """What `--type NAME` asks for: llama.cpp's llama_ftype value and its default tensor type."""

    name: str
    ftype: int  # general.file_type (gguf.LlamaFileType)
    default_type: int  # ggml type of the tensors the mixture rules leave alone
    pure: bool = False  # no mixture rules (llama-quantize --pure)


FILE_TYPES = {ft.name: ft for ft in (
    FileType("F32", 0, F.F32), FileType("F16", 1, F.F16), FileType("BF16", 32, F.BF16),
    FileType("Q8_0", 7, F.Q8_0), FileType("Q4_0", 2, F.Q4_0), FileType("Q4_1", 3, F.Q4_1),
    FileType("Q5_0", 8, F.Q5_0), FileType("Q5_1", 9, F.Q5_1),
    FileType("Q4_K", 14, F.Q4_K, pure=True), FileType("Q5_K", 16, F.Q5_K, pure=True),  # written as Q4_K_S / Q5_K_S
    FileType("Q6_K", 18, F.Q6_K), FileType("Q4_K_M", 15, F.Q4_K), FileType("Q5_K_M", 17, F.Q5_K),
)}


class PlanError(ValueError):
    """A --type or --tensor-type the planner cannot honour (turned into a ConvertError by the converter)."""


@dataclass
class TensorPlan:
    """One tensor of the output: where it comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # numpy order: rows along the last axis
    src_type: int
    dst_type: int
    requantize: bool = True  # False: the source bytes are copied unchanged

    @property
    def nbytes(self) -> int:
        return quantized_nbytes(self.dst_type, self.shape)


def parse_type(name: str) -> int:
    """ggml type id of a name such as 'Q8_0' (case-insensitive), for --tensor-type."""
    t = TYPE_BY_NAME.get(name.upper())
    if t is None or t not in QUANTIZABLE_TYPES:
        raise PlanError(f"unknown tensor type {name!r} (choose from {', '.join(sorted_type_names())})")
    return t


def sorted_type_names() -> list[str]:
    return [F.TYPE_NAMES[t] for t in sorted(QUANTIZABLE_TYPES)]


def parse_overrides(specs: list[str]) -> list[tuple[str, int]]:
    """--tensor-type values 'PATTERN=TYPE' -> [(pattern, ggml type)], checked."""
    out = []
    for spec in specs:
        pattern, sep, type_name = spec.rpartition("=")
        if not sep or not pattern:
            raise PlanError(f"--tensor-type {spec!r}: expected PATTERN=TYPE, e.g. output.weight=F16")
        try:
            re.compile(pattern)
        except re.error as e:
            raise PlanError(f"--tensor-type {spec!r}: bad regular expression: {e}") from None
        out.append((pattern, parse_type(type_name)))
    return out


def pattern_matches(pattern: str, name: str) -> bool:
    """A --tensor-type pattern matches a tensor name as a regular expression (searched, as llama-quantize does) or as
    a shell glob over the whole name (blk.*.ffn_down.weight)."""
    return re.search(pattern, name) is not None or fnmatch.fnmatchcase(name, pattern)


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def processing_order(names: list[str]) -> list[str]:
    """llama.cpp's weight order (llama_model_loader::weight_name_comparer): by layer (non-layer tensors first),
    then by name. The mixture counters advance in this order and the output file lists tensors in it."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization for the decoder family: 2-D+ weights that are not norms or gates."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers Q4_K_M / Q5_K_M give more bits: the first and last eighth, and every third one between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(dst_type: int, n_cols: int) -> int:
    """llama.cpp's tensor_type_fallback: a type whose block does not divide the row becomes a compatible one."""
    if n_cols % F.BLOCK_SIZES[dst_type][0] == 0:
        return dst_type
    dst_type = {F.Q4_K: F.Q5_0, F.Q5_K: F.Q5_1, F.Q6_K: F.Q8_0}.get(dst_type, F.F16)
    return dst_type if n_cols % F.BLOCK_SIZES[dst_type][0] == 0 else F.F16


class _Mixture:
    """The counters and rules of llama_tensor_get_type_impl for one file (dense decoders: no experts, no Falcon)."""

    def __init__(self, file_type: FileType, names: list[str], n_layers: int):
        self.ft = file_type
        self.n_layers = n_layers
        self.n_attention_wv = sum("attn_v.weight" in n or "attn_qkv.weight" in n for n in names)
        self.tied_embeddings = "output.weight" not in names
        self.i_attention_wv = 0
        self.i_ffn_down = 0

    def choose(self, name: str, n_cols: int) -> int:
        ft, new_type = self.ft.name, self.ft.default_type
        if name == "output.weight" or (self.tied_embeddings and name == "token_embd.weight"):
            if n_cols % F.BLOCK_SIZES[new_type][0]:
                return F.Q8_0
            return new_type if new_type == F.Q8_0 else F.Q6_K
        if name == "token_embd.weight":
            return new_type
        if "attn_v.weight" in name or "attn_qkv.weight" in name:
            if ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(self.i_attention_wv, self.n_attention_wv):
                new_type = F.Q6_K
            self.i_attention_wv += 1
        elif "ffn_down" in name:
            if ft in ("Q4_K_M", "Q5_K_M") and use_more_bits(self.i_ffn_down, self.n_layers):
                new_type = F.Q6_K
            self.i_ffn_down += 1
        return new_type


def plan_tensors(tensors: list[tuple[str, tuple[int, ...], int]], file_type: FileType, n_layers: int,
                 overrides: list[tuple[str, int]] = (), float_source: bool = False) -> list[TensorPlan]:
    """The output tensors, in llama.cpp's order, with their target types.

    tensors: (GGUF name, numpy shape, source ggml type). float_source: the source is a Hugging Face checkpoint, whose
    non-quantizable tensors (norms, biases) are stored as F32 as convert_hf_to_gguf.py does; a GGUF source keeps
    their type. Raises PlanError for an override pattern that matches no quantizable tensor.
    """
    by_name = {name: (shape, src) for name, shape, src in tensors}
    order = processing_order(list(by_name))
    mixture = _Mixture(file_type, order, n_layers)
    used = [False] * len(overrides)
    plans = []
    for name in order:
        shape, src = by_name[name]
        if not allows_quantization(name, shape):
            plans.append(TensorPlan(name, shape, src, F.F32 if float_source else src))
            continue
        dst = file_type.default_type
        manual = next((i for i, (pattern, _) in enumerate(overrides) if pattern_matches(pattern, name)), None)
        if manual is not None:
            used[manual] = True
            dst = overrides[manual][1]
        elif dst in QUANTIZED and not file_type.pure:
            dst = mixture.choose(name, shape[-1])
        plans.append(TensorPlan(name, shape, src, fallback(dst, shape[-1])))
    for (pattern, _), hit in zip(overrides, used):
        if not hit:
            raise PlanError(f"--tensor-type pattern {pattern!r} matches no quantizable tensor")
    return plans


def format_plan(plans: list[TensorPlan], total_bytes: int) -> str:
    """The --dry-run table: tensor, shape, from-type -> to-type, bytes, then the output size."""
    width = max((len(p.name) for p in plans), default=10)
    lines = [f"{'tensor':<{width}}  {'shape':>16}  {'from':>5} -> {'to':<12} {'bytes':>12}"]
    for p in plans:
        shape = "x".join(str(d) for d in p.shape)
        what = F.type_name(p.dst_type) + ("" if p.requantize else " (copy)")
        lines.append(f"{p.name:<{width}}  {shape:>16}  {F.type_name(p.src_type):>5} -> {what:<12} {p.nbytes:>12,}")
    n_params = sum(math.prod(p.shape) for p in plans)
    lines.append(f"{len(plans)} tensors, {n_params:,} parameters; output file {total_bytes:,} bytes "
                 f"({total_bytes / 1e6:.1f} MB, {8 * sum(p.nbytes for p in plans) / max(n_params, 1):.2f} bits per "
                 f"parameter)")
    return "\n".join(lines)
