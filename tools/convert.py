"""`edgeinfer convert`: a Hugging Face checkpoint or a GGUF file -> a GGUF file of the requested type.

The flow: open the source (tools/hf_checkpoint.py for a checkpoint directory, `GGUFSource` here for a GGUF file) as
metadata plus lazily loaded tensors under their GGUF names; with --keep-layers, keep only some blocks, renumbered
(`keep_layers`: a depth-pruned draft model); plan each tensor's type (tools/quantize_plan.py); write
the header and every tensor info first, then stream the tensors one at a time (load, prune, quantize, write), so no
more than one tensor is in memory. The file is written next to OUT under a hidden temporary name and renamed at
the end; on any failure or interruption the temporary file is removed and nothing appears at OUT. An existing OUT
is refused unless `force` is given.
"""
from __future__ import annotations

import errno
import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFValueType, GGUFWriter
from gguf.gguf_writer import GGUFValue

from edgeinfer.arch import ARCHITECTURES
from edgeinfer.errors import EdgeInferError
from kernels_cpu import formats as F
from kernels_cpu.quantize import quantize
from tools.quantize_plan import FILE_TYPES, PlanError, TensorPlan, format_plan, parse_overrides, plan_tensors

SUPPORTED_ARCHS = tuple(ARCHITECTURES)  # one per module of edgeinfer/arch/
ALIGNMENT = 32  # GGUF's default data alignment, which GGUFWriter uses
# keys a GGUF -> GGUF conversion does not copy: they describe the old file's encoding or layout
DROPPED_KEYS = ("general.file_type", "general.quantization_version", "general.alignment")
DROPPED_PREFIXES = ("split.",)
PRUNED = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.weight$")
BLOCK = re.compile(r"blk\.(\d+)\.")
# metadata that may hold one value per layer (`{arch}.` + key): --keep-layers keeps the kept layers' values
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length",
                  "attention.sliding_window_pattern")
# architectures whose layers differ by their number, not by anything stored per layer: a renumbered layer would
# change kind, so --keep-layers refuses them
NUMBERED_LAYERS = {"gemma2": "the sliding window is on every other layer, by layer number",
                   "gemma3": "the sliding window is on 5 layers of every 6, by layer number",
                   "smollm3": "every 4th layer has no RoPE, by layer number"}


class ConvertError(EdgeInferError):
    """The conversion cannot be done (bad or unsupported input, or the output could not be written)."""


@dataclass
class SourceTensor:
    """A tensor of the source under its GGUF name; its data is read only when the writer reaches it."""

    name: str
    shape: tuple[int, ...]  # numpy order: rows along the last axis
    src_type: int  # ggml type of the stored data
    load: Callable[[], np.ndarray]  # -> float32 array of `shape`
    raw: Callable[[], np.ndarray] | None = None  # -> the stored ggml bytes, when they can be copied unchanged


@dataclass
class Source:
    """What a converter input provides: architecture, metadata in file order, tensors, layer count."""

    arch: str
    metadata: dict[str, GGUFValue]
    tensors: list[SourceTensor]
    n_layers: int
    from_checkpoint: bool  # a Hugging Face checkpoint (its norms and biases are written as F32)
    close: Callable[[], None] = lambda: None


@dataclass
class ConvertResult:
    plans: list[TensorPlan]
    nbytes: int  # size of the output file
    written: bool


# ---------------------------------------------------------------- sources


_VALUE_TYPES = {"uint8": GGUFValueType.UINT8, "int8": GGUFValueType.INT8, "uint16": GGUFValueType.UINT16,
                "int16": GGUFValueType.INT16, "uint32": GGUFValueType.UINT32, "int32": GGUFValueType.INT32,
                "float32": GGUFValueType.FLOAT32, "bool": GGUFValueType.BOOL, "string": GGUFValueType.STRING,
                "uint64": GGUFValueType.UINT64, "int64": GGUFValueType.INT64, "float64": GGUFValueType.FLOAT64}


def gguf_value(value, type_name: str) -> GGUFValue:
    """A metadata value read by GGUFFile, with its GGUF type, ready for GGUFWriter.add_key_value."""
    if type_name.startswith("array["):
        item = _VALUE_TYPES[type_name[6:-1]]
        items = value.tolist() if isinstance(value, np.ndarray) else list(value)
        return GGUFValue(items, GGUFValueType.ARRAY, item)
    return GGUFValue(value, _VALUE_TYPES[type_name])


def open_gguf_source(path: Path) -> Source:
    """A GGUF file as a source: all metadata but the encoding keys, tensors dequantized on demand (or copied)."""
    from edgeinfer.arch import load_decoder
    from edgeinfer.gguf_reader import GGUFFile
    from kernels_cpu.dequant import dequantize

    gguf = GGUFFile(path)
    try:
        arch = gguf.architecture
        if arch not in SUPPORTED_ARCHS:
            raise ConvertError(f"{path}: architecture {arch!r} is not supported (supported: "
                               f"{', '.join(SUPPORTED_ARCHS)})")
        cfg, _ = load_decoder(gguf)  # checks every tensor's presence and shape against the hyper-parameters
        metadata = {key: gguf_value(value, gguf.metadata_types[key]) for key, value in gguf.metadata.items()
                    if key not in DROPPED_KEYS and not key.startswith(DROPPED_PREFIXES)}
        tensors = []
        for t in gguf.tensors.values():
            if t.ggml_type not in F.SUPPORTED_TYPES:
                raise ConvertError(f"{path}: tensor {t.name} has type {t.type_name}, which edgeinfer cannot read")
            n_cols = t.shape[-1]
            tensors.append(SourceTensor(
                t.name, t.shape, t.ggml_type,
                load=lambda t=t, n_cols=n_cols: dequantize(t.ggml_type, t.raw, n_cols).reshape(t.shape),
                raw=lambda t=t: t.raw))
    except BaseException:
        gguf.close()
        raise
    return Source(arch, metadata, tensors, cfg.n_layers, from_checkpoint=False, close=gguf.close)


def open_source(src: str | os.PathLike) -> Source:
    """A checkpoint directory or a GGUF file; ConvertError / GGUFError for anything else."""
    src = Path(src)
    if src.is_dir():
        from tools.hf_checkpoint import open_checkpoint

        return open_checkpoint(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    return open_gguf_source(src)


# ---------------------------------------------------------------- depth pruning (--keep-layers)


def parse_keep_layers(spec: str, n_layers: int) -> list[int]:
    """The layers --keep-layers SPEC keeps, sorted: comma-separated items, each a layer `5`, a range `0-5`
    (inclusive) or `every:N` (layers 0, N, 2N, ...); layers count from 0 and must be below n_layers."""
    if not isinstance(spec, str) or not spec.strip():
        raise ConvertError("--keep-layers is empty: give layers like 0-5,18-23 or every:2")
    kept: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        every = re.fullmatch(r"every:(\d+)", item)
        span = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if every:
            step = int(every.group(1))
            if step < 1:
                raise ConvertError(f"--keep-layers {spec!r}: every:{step} needs a step of 1 or more")
            kept.update(range(0, n_layers, step))
        elif span:
            first, last = int(span.group(1)), int(span.group(2) or span.group(1))
            if last < first:
                raise ConvertError(f"--keep-layers {spec!r}: the range {item} runs backwards")
            if last >= n_layers:
                raise ConvertError(f"--keep-layers {spec!r}: layer {last} does not exist (the model has "
                                   f"{n_layers} layers, 0 to {n_layers - 1})")
            kept.update(range(first, last + 1))
        else:
            raise ConvertError(f"--keep-layers {spec!r}: {item!r} is not a layer, a range like 0-5 or every:N")
    return sorted(kept)


def keep_layers(source: Source, spec: str) -> None:
    """Cut `source` down to the layers --keep-layers SPEC names (in place): their blocks' tensors renumbered 0, 1,
    ..., `{arch}.block_count` and the per-layer metadata arrays cut to match. ConvertError for a bad spec, and for
    an architecture or per-layer key whose layers cannot be renumbered faithfully."""
    if source.arch in NUMBERED_LAYERS:
        raise ConvertError(f"--keep-layers: {source.arch} cannot be cut down: {NUMBERED_LAYERS[source.arch]}")
    kept = parse_keep_layers(spec, source.n_layers)
    new_index = {old: new for new, old in enumerate(kept)}
    tensors = []
    for t in source.tensors:
        block = BLOCK.match(t.name)
        if block is None:
            tensors.append(t)
        elif int(block.group(1)) in new_index:
            name = f"blk.{new_index[int(block.group(1))]}.{t.name[block.end():]}"
            tensors.append(SourceTensor(name, t.shape, t.src_type, t.load, t.raw))
    metadata = dict(source.metadata)
    prefix = f"{source.arch}."
    for key, v in source.metadata.items():
        if v.type == GGUFValueType.ARRAY and key.startswith(prefix) and len(v.value) == source.n_layers:
            if key[len(prefix):] not in PER_LAYER_KEYS:
                raise ConvertError(f"--keep-layers: {key} holds {source.n_layers} values, which may be one per "
                                   f"layer; edgeinfer does not know how to cut it")
            metadata[key] = GGUFValue([v.value[i] for i in kept], v.type, v.sub_type)
    count = f"{prefix}block_count"
    metadata[count] = GGUFValue(len(kept), source.metadata[count].type if count in source.metadata
                                else GGUFValueType.UINT32)
    source.tensors, source.metadata, source.n_layers = tensors, metadata, len(kept)


def check_kept_layers(path: Path, n_layers: int) -> None:
    """The written file loads, with n_layers layers (before it is renamed into place)."""
    from edgeinfer.arch import load_decoder
    from edgeinfer.gguf_reader import GGUFFile

    gguf = GGUFFile(path)
    try:
        cfg, _ = load_decoder(gguf)
    finally:
        gguf.close()
    if cfg.n_layers != n_layers:
        raise ConvertError(f"--keep-layers: the written file has {cfg.n_layers} layers, expected {n_layers}")


# ---------------------------------------------------------------- tensor data


def prune_rows(rows: np.ndarray, ratio: float) -> np.ndarray:
    """Magnitude pruning: zero the floor(ratio * n_cols) smallest |w| of every row (in place; returns rows)."""
    k = int(ratio * rows.shape[1])
    if k <= 0:
        return rows
    smallest = np.argpartition(np.abs(rows), k - 1, axis=1)[:, :k]
    np.put_along_axis(rows, smallest, 0.0, axis=1)
    return rows


def tensor_bytes(plan: TensorPlan, tensor: SourceTensor, prune: float, n_threads: int | None) -> np.ndarray:
    """The output bytes of one tensor, flat uint8."""
    if not plan.requantize:
        return np.ascontiguousarray(tensor.raw()).reshape(-1)
    values = np.asarray(tensor.load(), dtype=np.float32)
    if values.shape != tuple(plan.shape):
        raise ConvertError(f"tensor {plan.name}: source data has shape {values.shape}, expected {plan.shape}")
    rows = np.ascontiguousarray(values.reshape(-1, plan.shape[-1]))
    if prune and PRUNED.search(plan.name):
        rows = prune_rows(rows.copy(), prune)  # a copy: the source may be a read-only map of the input file
    return quantize(plan.dst_type, rows, n_threads).reshape(-1)


# ---------------------------------------------------------------- writing


def metadata_nbytes(metadata: dict[str, GGUFValue]) -> int:
    """Bytes the key-value section takes (for the size --dry-run reports)."""
    fixed = {GGUFValueType.UINT8: 1, GGUFValueType.INT8: 1, GGUFValueType.BOOL: 1, GGUFValueType.UINT16: 2,
             GGUFValueType.INT16: 2, GGUFValueType.UINT32: 4, GGUFValueType.INT32: 4, GGUFValueType.FLOAT32: 4,
             GGUFValueType.UINT64: 8, GGUFValueType.INT64: 8, GGUFValueType.FLOAT64: 8}

    def size(value, vtype) -> int:
        if vtype == GGUFValueType.STRING:
            return 8 + len(value.encode("utf-8") if isinstance(value, str) else value)
        return fixed[vtype]

    total = 0
    for key, v in metadata.items():
        total += 8 + len(key.encode("utf-8")) + 4
        if v.type == GGUFValueType.ARRAY:
            sub = v.sub_type or GGUFValueType.get_type(v.value[0])
            total += 4 + 8 + (len(v.value) * fixed[sub] if sub in fixed else sum(size(x, sub) for x in v.value))
        else:
            total += size(v.value, v.type)
    return total


def file_nbytes(metadata: dict[str, GGUFValue], plans: list[TensorPlan]) -> int:
    """The exact size of the GGUF file the writer will produce."""
    header = 4 + 4 + 8 + 8 + metadata_nbytes(metadata)
    header += sum(8 + len(p.name.encode()) + 4 + 8 * len(p.shape) + 4 + 8 for p in plans)
    pad = lambda n: -(-n // ALIGNMENT) * ALIGNMENT  # noqa: E731  (GGUFWriter pads after every tensor)
    return pad(header) + sum(pad(p.nbytes) for p in plans)


def temporary_path(out: Path) -> Path:
    """A hidden name next to OUT (same file system, so the final rename is atomic)."""
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.part")


def write_gguf(out: Path, arch: str, metadata: dict[str, GGUFValue], plans: list[TensorPlan],
               tensors: dict[str, SourceTensor], prune: float = 0.0, n_threads: int | None = None,
               on_tensor: Callable[[int, TensorPlan], None] | None = None,
               check: Callable[[Path], None] | None = None) -> None:
    """Write the file: header and tensor infos, then each tensor streamed from its source, then (once check(the
    written file) raises nothing) rename into place."""
    tmp = temporary_path(out)
    writer = GGUFWriter(tmp, arch)
    try:
        for key, v in metadata.items():
            if key != "general.architecture":
                writer.add_key_value(key, v.value, v.type, v.sub_type)
        for p in plans:
            writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes,
                                   raw_dtype=GGMLQuantizationType(p.dst_type))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for i, p in enumerate(plans):
            if on_tensor is not None:
                on_tensor(i, p)
            data = tensor_bytes(p, tensors[p.name], prune, n_threads)
            if data.nbytes != p.nbytes:
                raise ConvertError(f"tensor {p.name}: produced {data.nbytes} bytes, expected {p.nbytes}")
            writer.write_tensor_data(data)
        writer.flush()
        os.fsync(writer.fout[0].fileno())
        writer.close()
        if check is not None:
            check(tmp)
        os.replace(tmp, out)
    except BaseException as e:
        writer.close()
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            reason = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise ConvertError(f"writing {out}: {reason}; nothing was written") from None
        raise


# ---------------------------------------------------------------- the conversion


def convert(src: str | os.PathLike, out: str | os.PathLike, type_name: str, *, tensor_types: list[str] = (),
            prune: float = 0.0, keep: str | None = None, dry_run: bool = False, force: bool = False,
            n_threads: int | None = None,
            on_plan: Callable[[list[TensorPlan], int], None] | None = None,
            on_tensor: Callable[[int, TensorPlan], None] | None = None) -> ConvertResult:
    """Convert SRC (checkpoint directory or GGUF file) to OUT as file type `type_name` (a FILE_TYPES name).

    tensor_types: 'PATTERN=TYPE' overrides; prune: fraction of each FFN weight row to zero by magnitude (0 <= r < 1);
    keep: the layers to keep (--keep-layers, see parse_keep_layers; None: all), renumbered from 0;
    dry_run: plan only, write nothing; force: replace an existing OUT (otherwise refused, before any work, and by
    --dry-run too, since it predicts the real run). on_plan(plans, nbytes) is called once the plan is known,
    on_tensor(i, plan) before each tensor is written. Raises ConvertError (or GGUFError for a damaged GGUF source).
    """
    file_type = FILE_TYPES.get(type_name.upper())
    if file_type is None:
        raise ConvertError(f"unknown --type {type_name!r} (choose from {', '.join(FILE_TYPES)})")
    if not 0.0 <= prune < 1.0:
        raise ConvertError(f"--prune must be in [0, 1), got {prune}")
    out = Path(out)
    if not dry_run and not out.parent.is_dir():
        raise ConvertError(f"{out}: the directory {out.parent} does not exist")
    if not dry_run and out.is_dir():
        raise ConvertError(f"{out} is a directory; give the output file's name")
    if not force and os.path.lexists(out) and not out.is_dir():  # lexists: a dangling link would be replaced too
        raise ConvertError(f"{out} exists; pass --force to overwrite it")
    source = open_source(src)
    try:
        if out.exists() and Path(src).exists() and out.resolve() == Path(src).resolve():
            raise ConvertError(f"{out}: the output would overwrite the input")
        if keep is not None:
            keep_layers(source, keep)
        try:
            overrides = parse_overrides(list(tensor_types))
            plans = plan_tensors([(t.name, t.shape, t.src_type) for t in source.tensors], file_type,
                                 source.n_layers, overrides, float_source=source.from_checkpoint)
        except PlanError as e:
            raise ConvertError(str(e)) from None
        tensors = {t.name: t for t in source.tensors}
        for p in plans:
            p.requantize = not (p.dst_type == p.src_type and tensors[p.name].raw is not None
                                and not (prune and PRUNED.search(p.name)))
        metadata = dict(source.metadata)
        metadata["general.file_type"] = GGUFValue(file_type.ftype, GGUFValueType.UINT32)
        metadata["general.quantization_version"] = GGUFValue(GGML_QUANT_VERSION, GGUFValueType.UINT32)
        nbytes = file_nbytes(metadata, plans)
        if on_plan is not None:
            on_plan(plans, nbytes)
        if not dry_run:
            check = None if keep is None else lambda path: check_kept_layers(path, source.n_layers)
            write_gguf(out, source.arch, metadata, plans, tensors, prune, n_threads, on_tensor, check)
        return ConvertResult(plans, nbytes, written=not dry_run)
    finally:
        source.close()


def run_convert(src: str, out: str, type_name: str, *, tensor_types: list[str] = (), prune: float = 0.0,
                keep: str | None = None, dry_run: bool = False, force: bool = False, n_threads: int | None = None,
                echo: Callable[[str], None] = print) -> None:
    """The `edgeinfer convert` command: a rich progress bar per tensor on stderr, the plan for --dry-run, a summary.
    An interruption becomes a ConvertError (the CLI prints it as one line) after the temporary file is removed."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("{task.description:<40}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    task = None

    def on_plan(plans, nbytes):
        nonlocal task
        if dry_run:
            echo(format_plan(plans, nbytes))
            return
        progress.start()  # only once the input is open and planned, so early errors print one clean line
        task = progress.add_task("converting", total=len(plans))

    def on_tensor(i, plan):
        progress.update(task, completed=i, description=plan.name)

    try:
        result = convert(src, out, type_name, tensor_types=tensor_types, prune=prune, keep=keep, dry_run=dry_run,
                         force=force, n_threads=n_threads, on_plan=on_plan, on_tensor=on_tensor)
        if task is not None:
            progress.update(task, completed=len(result.plans), description="done")
    except KeyboardInterrupt:
        raise ConvertError(f"interrupted; nothing was written to {out}") from None
    finally:
        progress.stop()
    if not dry_run:
        echo(f"wrote {out}: {len(result.plans)} tensors, {result.nbytes / 1e6:.1f} MB ({type_name.upper()}"
             + (f", FFN pruned {prune:.0%}" if prune else "") + (f", layers {keep}" if keep else "") + ")")


__all__ = ["ConvertError", "ConvertResult", "Source", "SourceTensor", "convert", "format_plan", "keep_layers",
           "open_source", "parse_keep_layers", "prune_rows", "run_convert"]
