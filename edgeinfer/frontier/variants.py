"""The variant grid and the weight variants it needs, made once with the converter and cached.

A variant is a weight variant (a file type such as Q4_0, and an FFN pruning ratio) run with a KV-cache type and a
thread count. Each weight variant is one GGUF file made from the source by tools.convert and kept at
$EDGEINFER_HOME/frontier/<source digest>/<TYPE>[-prune<R>]/model.gguf (the converter writes it atomically, so a file
there is whole); the next run on the same source reuses it. The digest is the sha256 of the source's bytes (every
file of a checkpoint directory), so a changed source never reuses another's variants; `source.json` beside the
variants records where the source was, so `edgeinfer prune` can remove variants whose source is gone or changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import InvalidArgument
from edgeinfer.kv_cache import KV_TYPES

DEFAULT_TYPES = ("F16", "Q8_0", "Q4_K_M", "Q4_0")  # a ladder from half precision down to 4 bits
DEFAULT_KV_TYPES = ("f16",)
VARIANT_FILE = "model.gguf"
SOURCE_RECORD = "source.json"
DIGEST_CHARS = 16


@dataclass(frozen=True)
class WeightVariant:
    """A file type (tools.quantize_plan.FILE_TYPES name) and the fraction of each FFN row pruned before quantizing."""

    type_name: str
    prune: float = 0.0

    @property
    def label(self) -> str:
        """"Q4_0", or "Q4_0-prune0.1" when pruned: the table's name and the cache directory's."""
        return self.type_name + (f"-prune{self.prune:g}" if self.prune else "")


@dataclass(frozen=True)
class Variant:
    """One measured configuration: a weight variant under a KV-cache type at a thread count."""

    weight: WeightVariant
    kv_type: str
    n_threads: int

    @property
    def label(self) -> str:
        return f"{self.weight.label}/{self.kv_type}/t{self.n_threads}"


def _items(text: str | tuple | list, option: str) -> list[str]:
    items = list(text) if isinstance(text, (tuple, list)) else [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise InvalidArgument(f"{option}: {text!r} is not a comma-separated list")
    return list(dict.fromkeys(items))  # duplicates once, in the order given


def parse_types(text) -> tuple[str, ...]:
    """--types "F16,q8_0" -> ("F16", "Q8_0"); InvalidArgument naming an unknown type and the known ones."""
    from tools.quantize_plan import FILE_TYPES

    names = tuple(dict.fromkeys(t.upper() for t in _items(text, "--types")))
    for name in names:
        if name not in FILE_TYPES:
            raise InvalidArgument(f"--types: unknown type {name!r} (choose from {', '.join(FILE_TYPES)})")
    return names


def parse_prunes(text) -> tuple[float, ...]:
    """--prune "0,0.1" -> (0.0, 0.1); each ratio in [0, 1)."""
    ratios = []
    for item in _items(text, "--prune"):
        try:
            ratio = float(item)
        except (TypeError, ValueError):
            raise InvalidArgument(f"--prune: {item!r} is not a number") from None
        if not 0.0 <= ratio < 1.0:  # also refuses nan
            raise InvalidArgument(f"--prune: {item} is out of range: a pruning ratio is in [0, 1)")
        ratios.append(ratio)
    return tuple(dict.fromkeys(ratios))


def parse_kv_types(text) -> tuple[str, ...]:
    """--kv-types "f16,q8_0" -> ("f16", "q8_0")."""
    names = tuple(_items(text, "--kv-types"))
    for name in names:
        if name not in KV_TYPES:
            raise InvalidArgument(f"--kv-types: unknown KV cache type {name!r} (choose from {', '.join(KV_TYPES)})")
    return names


def variant_grid(types, prunes, kv_types, threads) -> list[Variant]:
    """Every combination, weight variant by weight variant (so one weight file is measured at a stretch)."""
    return [Variant(WeightVariant(t, p), kv, n) for t in types for p in prunes for kv in kv_types for n in threads]


def weight_variants(grid: list[Variant]) -> list[WeightVariant]:
    return list(dict.fromkeys(v.weight for v in grid))


# ---------------------------------------------------------------- the source and its digest


def resolve_source(source: str) -> Path:
    """A catalogue name (fetched on first use), a GGUF file or a Hugging Face checkpoint directory -> its path."""
    from models.fetch import resolve_model

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidArgument(f"{path}: a directory, but not a Hugging Face checkpoint (no config.json)")
        return path
    return Path(resolve_model(source))


def _source_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    return [path]


def source_digest(path: Path, chunk: int = 1 << 22) -> str:
    """First DIGEST_CHARS hex digits of the sha256 of the source's bytes (a directory: each file's relative name
    and bytes, in name order). About a second for a 500 MB model."""
    digest = hashlib.sha256()
    for f in _source_files(path):
        if path.is_dir():
            digest.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as stream:
            while block := stream.read(chunk):
                digest.update(block)
    return digest.hexdigest()[:DIGEST_CHARS]


def _identity(path: Path) -> dict:
    """What changes when the source is replaced: path, total size and newest mtime (checked by `prune`)."""
    stats = [f.stat() for f in _source_files(path)]
    return {"source": str(path.resolve()), "size": sum(s.st_size for s in stats),
            "mtime_ns": max((s.st_mtime_ns for s in stats), default=0)}


# ---------------------------------------------------------------- the cache of weight variants


class VariantCache:
    """The weight variants of one source: made on demand with the converter, reused when present.

    directory: where they live (frontier_dir()/<digest>); a home that cannot be written gives a temporary directory
    for this run only (removed by `cleanup`)."""

    def __init__(self, source: Path, digest: str | None = None, directory: Path | None = None):
        from edgeinfer.paths import frontier_dir, writable_home

        self.source = source
        self.digest = digest or source_digest(source)
        self._temporary = None
        if directory is None:
            if writable_home() is not None:
                directory = frontier_dir() / self.digest
            else:
                self._temporary = directory = Path(tempfile.mkdtemp(prefix="edgeinfer-frontier-"))
        self.directory = directory

    def path_of(self, weight: WeightVariant) -> Path:
        return self.directory / weight.label / VARIANT_FILE

    def cached(self, weight: WeightVariant) -> bool:
        return self.path_of(weight).is_file()

    def make(self, weight: WeightVariant, on_tensor: Callable[[int, int, str], None] | None = None) -> Path:
        """The variant's file, converted from the source unless it is already there. on_tensor(i, n, name) before
        each tensor is written."""
        from tools.convert import convert

        out = self.path_of(weight)
        out.parent.mkdir(parents=True, exist_ok=True)
        self._write_record()  # also when reused: the source may be the same bytes under a new mtime
        if out.is_file():
            return out
        total = [0]

        def on_plan(plans, nbytes):
            total[0] = len(plans)

        def each_tensor(i, plan):
            if on_tensor is not None:
                on_tensor(i, total[0], plan.name)

        convert(self.source, out, weight.type_name, prune=weight.prune, on_plan=on_plan, on_tensor=each_tensor)
        return out

    def _write_record(self) -> None:
        record = self.directory / SOURCE_RECORD
        tmp = record.with_name(f".{record.name}.{os.getpid()}.part")
        tmp.write_text(json.dumps(_identity(self.source), indent=2), encoding="utf-8")
        os.replace(tmp, record)

    def cleanup(self) -> None:
        """Remove the directory if it was a temporary one (the home could not be written)."""
        if self._temporary is not None:
            shutil.rmtree(self._temporary, ignore_errors=True)


# ---------------------------------------------------------------- for `edgeinfer prune`


def cached_variant_dirs() -> list[tuple[Path, str]]:
    """(directory of one source's variants, why it is stale or "") for every source under frontier_dir(): stale
    when its source is gone or changed since the variants were made (or there is no record of it)."""
    from edgeinfer.paths import frontier_dir

    root = frontier_dir()
    if not root.is_dir():
        return []
    out = []
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        out.append((directory, _staleness(directory)))
    return out


def _staleness(directory: Path) -> str:
    try:
        record = json.loads((directory / SOURCE_RECORD).read_text(encoding="utf-8"))
        source = Path(record["source"])
    except (OSError, ValueError, KeyError, TypeError):
        return "frontier variants without a record of their source"
    if not source.exists():
        return f"frontier variants of {source}, which is gone"
    if {k: v for k, v in _identity(source).items() if k != "source"} != {"size": record.get("size"),
                                                                       "mtime_ns": record.get("mtime_ns")}:
        return f"frontier variants of {source}, which has changed"
    return ""


def variant_files(directory: Path) -> list[Path]:
    """The variant model files under one source's directory."""
    return sorted(directory.glob(f"*/{VARIANT_FILE}"))
