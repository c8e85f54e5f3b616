"""The CPU backend's weights in its kernels' own layout: repacked once per model file, cached, memory-mapped.

The int8 matvec kernels run 2-3x faster on 16 rows interleaved with pre-decoded K-quant scales
(`kernels_cpu.repack.repack`) than on raw ggml blocks. Repacking a model costs about a second per 100 MB, so the
result is written once to $EDGEINFER_HOME/repacked/ (atomically: temporary file, fsync, rename) and every later load
maps it like the model itself: nothing is copied into RAM, pages come in as the kernels touch them, and the model
file's own pages are touched only for embedding rows and norm vectors.

The cache file is the packed matrices one after another (each 64-byte aligned) in the order of `packable()`; its
name carries a hash of the model file's identity (path, size, mtime) and of the layout code, so a changed model or a
changed layout never reads stale bytes; writing a new one deletes the older ones of the same model path. Beside it a
small `.json` record (written before the data is renamed into place) names the model file and holds the data's
CRC-32, checked on a process's first load of the file (about 2.5 GB/s: 40 ms for SmolLM2's 96 MB, 150 ms for
Qwen2.5-0.5B's 392 MB); a damaged file is rebuilt with one warning line, and `edgeinfer prune` uses the record to find
caches whose model is gone. It takes as much disk as the model's matrices (delete the directory to reclaim it).
Where the home cannot be written, the packed matrices live in memory instead.

The architecture's weights (views into the model file) are never changed: `repack_weights` returns a `Repacked`
record (the buffer and where each matrix lies in it) that the CPU backend keeps beside them.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import mmap
import os
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinfer.arch.decoder import DecoderWeights, QuantMatrix
from edgeinfer.paths import home, warn, writable_home
from kernels_cpu import matvec_q8, q8_layouts
from kernels_cpu import repack as repack_module
from kernels_cpu.repack import repack

ALIGN = 64  # cache-line alignment of every packed matrix in the buffer
RECORD_FORMAT = 1  # version of the .json record beside each cache file
_verified: set[tuple] = set()  # (path, inode, mtime_ns, size) of cache files whose CRC-32 matched in this process


@dataclass(frozen=True)
class PackedMatrix:
    """Where one matrix lies in the repacked buffer, in the kernels' layout."""

    type_id: int  # matvec_q8's id of the layout (REPACKED + the ggml type)
    offset: int  # of its first byte in `Repacked.buffer`
    n_array_rows: int  # rows of the (n_array_rows, row_bytes) uint8 array (16 matrix rows each)
    row_bytes: int

    @property
    def nbytes(self) -> int:
        return self.n_array_rows * self.row_bytes


@dataclass(frozen=True)
class Repacked:
    """A model's repacked matrices: one read-only uint8 buffer (None when no matrix has a repacked layout) and where
    each matrix lies in it, keyed by the matrix's offset in the model file (`QuantMatrix.offset`, unique per tensor:
    a tied LM head and its embedding are one entry)."""

    buffer: np.ndarray | None
    matrices: dict[int, PackedMatrix]
    cache_file: Path | None = None  # the file the buffer is mapped from (None: packed in memory)

    def get(self, m: QuantMatrix) -> PackedMatrix | None:
        """m's place in the buffer, or None if m is read in its file layout (no repacked layout, e.g. embeddings)."""
        return self.matrices.get(m.offset)

    def array(self, m: QuantMatrix) -> np.ndarray | None:
        """m's repacked (n_array_rows, row_bytes) uint8 view of the buffer, or None."""
        p = self.get(m)
        return None if p is None else self.buffer[p.offset:p.offset + p.nbytes].reshape(p.n_array_rows, p.row_bytes)


def packed_shape(m: QuantMatrix) -> tuple[int, int] | None:
    """(array rows, bytes per array row) of m's repacked layout, or None if its type and shape have none."""
    row_bytes = matvec_q8.repacked_row_bytes(m.ggml_type, m.n_cols)
    if not row_bytes or m.n_rows % matvec_q8.GROUP:
        return None
    return m.n_rows // matvec_q8.GROUP, row_bytes


def packable(weights: DecoderWeights) -> list[tuple[str, QuantMatrix]]:
    """(attribute path, matrix) of every distinct matrix with a repacked layout, in buffer order."""
    found, seen = [], set()
    candidates = [(f"layers.{i}.{f.name}", getattr(lw, f.name)) for i, lw in enumerate(weights.layers)
                  for f in dataclasses.fields(lw)]
    candidates.append(("output", weights.output))
    for path, m in candidates:
        if isinstance(m, QuantMatrix) and m.offset not in seen and packed_shape(m):
            seen.add(m.offset)
            found.append((path, m))
    return found


def _layout(matrices: list[tuple[str, QuantMatrix]]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for _, m in matrices:
        offsets.append(end)
        rows, row_bytes = packed_shape(m)
        end += -(-rows * row_bytes // ALIGN) * ALIGN
    return offsets, end


def _cache_prefix(model_path: str | os.PathLike) -> str:
    """File-name prefix of every cache file ever made for the model file at this path."""
    where = hashlib.sha256(os.path.realpath(model_path).encode()).hexdigest()[:8]
    return f"{Path(model_path).stem}.{where}."


def layout_digest(matrices: list[tuple[str, QuantMatrix]], offsets: list[int]) -> str:
    """A digest of which matrix lies where in the buffer: the order comes from the architecture's weight fields,
    so a new field changes it while the total size may stay the same (a cache keyed by size alone then maps every
    matrix at another's offset: NaN logits)."""
    plan = ";".join(f"{path}|{m.offset}|{m.ggml_type}|{m.n_rows}x{m.n_cols}|{offset}"
                    for (path, m), offset in zip(matrices, offsets))
    return hashlib.sha256(plan.encode()).hexdigest()[:16]


def cache_path(model_path: str | os.PathLike, size: int, layout: str = "") -> Path:
    """Where the repacked weights of this model file (as it is now), of that size and `layout_digest`, are cached."""
    st = os.stat(model_path)
    # the layouts (q8_layouts' table, described in matvec_q8) and the conversion to them (repack)
    layout_code = b"".join(Path(module.__file__).read_bytes() for module in (q8_layouts, matvec_q8, repack_module))
    key = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{size}|{layout}".encode() + layout_code).hexdigest()[:16]
    return home() / "repacked" / f"{_cache_prefix(model_path)}{key}.bin"


def record_path(cache_file: Path) -> Path:
    """The `.json` record (model file, sizes, CRC-32) beside a cache file."""
    return cache_file.with_suffix(".json")


def _remove_stale(path: Path, prefix: str) -> None:
    """Delete the cache files of older versions of the same model file or layout (a process still mapping one
    keeps reading it: unlinking a mapped file frees it only when unmapped)."""
    for old in path.parent.glob(prefix + "*.bin"):
        if old != path:
            for stale in (record_path(old), old):
                try:
                    stale.unlink(missing_ok=True)
                except OSError:
                    pass


def _pack_into(matrices, offsets, buffer: np.ndarray) -> None:
    for (_, m), off in zip(matrices, offsets):
        rows, row_bytes = packed_shape(m)
        type_id, packed = repack(m.ggml_type, m.raw)
        assert type_id == matvec_q8.REPACKED + m.ggml_type and packed.shape == (rows, row_bytes)
        buffer[off:off + packed.nbytes] = packed.reshape(-1)


def _write_atomically(path: Path, data) -> None:
    """Write bytes-like `data` to `path` via a temporary `<name>.<random>.<pid>.partial` beside it, fsync, rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=f".{os.getpid()}.partial")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_cache(path: Path, matrices, offsets, size: int, model_path) -> None:
    """Pack into memory, then write the record and the data (the record first: data on disk always has one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = np.zeros(size, np.uint8)
    _pack_into(matrices, offsets, buffer)
    st = os.stat(model_path)
    record = {"format": RECORD_FORMAT, "model": os.path.realpath(model_path), "model_size": st.st_size,
              "model_mtime_ns": st.st_mtime_ns, "bytes": size, "layout": layout_digest(matrices, offsets),
              "crc32": zlib.crc32(buffer)}
    _write_atomically(record_path(path), json.dumps(record).encode())
    _write_atomically(path, memoryview(buffer))


def read_record(cache_file: Path) -> dict | None:
    """The record beside a cache file, or None if it is missing, unreadable or of another format."""
    try:
        record = json.loads(record_path(cache_file).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("format") == RECORD_FORMAT else None


def _map_file(path: Path) -> np.ndarray | None:
    """The whole file as a read-only uint8 array (the kernels see file views and packed data alike), or None."""
    try:
        with open(path, "rb") as f:
            return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
    except (OSError, ValueError):
        return None


def _map_verified(path: Path, size: int) -> np.ndarray | None:
    """The cache file mapped if it matches its record (size and CRC-32), else None; a file that has a record but
    does not match it was damaged, and says so in one warning line."""
    record = read_record(path)
    if record is None or record.get("bytes") != size:
        return None  # never finished by this version (legacy, or a crash between record and data): rebuilt quietly
    buffer = _map_file(path)
    if buffer is None:
        return None
    if buffer.shape[0] != size:
        warn(f"repacked cache {path} was damaged ({buffer.shape[0]} bytes, expected {size}); rebuilt")
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    identity = (str(path), st.st_ino, st.st_mtime_ns, st.st_size)
    if identity not in _verified:  # a write to the file changes its mtime, so it is checked again
        if zlib.crc32(buffer) != record.get("crc32"):
            warn(f"repacked cache {path} was damaged (checksum mismatch); rebuilt")
            return None
        _verified.add(identity)
    return buffer


def cache_files_of(model_path: str | os.PathLike) -> list[Path]:
    """Every cache file and record on disk made for the model file at this path (which need not exist now)."""
    directory = home() / "repacked"
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(_cache_prefix(model_path) + "*") if p.suffix in (".bin", ".json")]
    return sorted(found, key=lambda p: (p.suffix == ".bin", p.name))  # records first: no cache is left trusted


def stale_cache_files() -> list[tuple[Path, str]]:
    """(path, why) of every file in the cache directory that no load will use again: caches whose model file is gone
    or changed, caches without a record, records without a cache and partial files of processes that are gone."""
    import psutil

    directory = home() / "repacked"
    if not directory.is_dir():
        return []
    stale = []
    for path in sorted(directory.iterdir()):
        if path.suffix == ".partial":
            pid = path.name.rsplit(".", 2)[-2]
            if not (pid.isdigit() and psutil.pid_exists(int(pid))):
                stale.append((path, "partial file of a finished process"))
        elif path.suffix == ".json" and not path.with_suffix(".bin").exists():
            stale.append((path, "record without a cache file"))
        elif path.suffix == ".bin":
            why = _why_stale(path)
            if why:
                stale.extend([(r, why) for r in [record_path(path)] if r.exists()] + [(path, why)])
    return stale


def _why_stale(cache_file: Path) -> str | None:
    record = read_record(cache_file)
    if record is None:
        return "no record of its model file"
    model = record.get("model", "")
    try:
        st = os.stat(model)
    except OSError:
        return f"model file {model} is gone"
    if (st.st_size, st.st_mtime_ns) != (record.get("model_size"), record.get("model_mtime_ns")):
        return f"model file {model} has changed"
    if cache_path(model, record.get("bytes", 0), record.get("layout", "")) != cache_file:
        return "made by an older layout"
    return None


def repack_weights(weights: DecoderWeights, model_path: str | os.PathLike, use_cache: bool = True) -> Repacked:
    """Where each matrix of weights that has a repacked layout lies in the kernels' layout (the architecture's views
    are left as they are); the packed bytes come from the cache file (made on first use) or, failing that, memory."""
    matrices = packable(weights)
    if not matrices:
        return Repacked(None, {})
    offsets, size = _layout(matrices)
    buffer, path = None, None
    if use_cache and writable_home() is not None:
        path = cache_path(model_path, size, layout_digest(matrices, offsets))
        buffer = _map_verified(path, size)
        if buffer is None:
            try:
                _write_cache(path, matrices, offsets, size, model_path)
                _remove_stale(path, _cache_prefix(model_path))
                buffer = _map_file(path)
            except OSError as e:  # e.g. a full disk: pack in memory below
                warn(f"cannot write repacked cache {path} ({e.strerror or e}); weights repacked in memory")
    if buffer is None:
        path = None
        buffer = np.zeros(size, np.uint8)
        _pack_into(matrices, offsets, buffer)
        buffer.flags.writeable = False
    where = {}
    for (_, m), off in zip(matrices, offsets):
        rows, row_bytes = packed_shape(m)
        where[m.offset] = PackedMatrix(matvec_q8.REPACKED + m.ggml_type, off, rows, row_bytes)
    return Repacked(buffer, where, path)
