"""Weights in the kernels' own layout: repacked once per model file, kept in a cache file, memory-mapped.

The int8 matvec kernels run 2-3x faster on 16 rows interleaved with pre-decoded K-quant scales
(`kernels_cpu.repack.repack`) than on raw ggml blocks. Repacking a model costs about a second per 100 MB, so the
result is written once to $EDGEINFER_HOME/repacked/ (atomically: temporary file, fsync, rename) and every later load
maps it like the model itself: nothing is copied into RAM, pages come in as the kernels touch them, and the model
file's own pages are touched only for embedding rows and norm vectors.

The cache file is the packed matrices one after another (each 64-byte aligned) in the order of `packable()`; its
name carries a hash of the model file's identity (path, size, mtime) and of the layout code, so a changed model or a
changed layout never reads stale bytes; writing a new one deletes the older ones of the same model path. It takes
as much disk as the model's matrices (delete the directory to reclaim it). Where the cache directory cannot be
written, the packed matrices live in memory instead.
"""
from __future__ import annotations

import dataclasses
import hashlib
import mmap
import os
import tempfile
from pathlib import Path

import numpy as np

from edgeinfer.arch.decoder import DecoderWeights, QuantMatrix
from edgeinfer.paths import home
from kernels_cpu import matvec_q8
from kernels_cpu import repack as repack_module
from kernels_cpu.repack import repack

ALIGN = 64  # cache-line alignment of every packed matrix in the buffer


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


def cache_path(model_path: str | os.PathLike, size: int) -> Path:
    """Where the repacked weights of this model file (as it is now) are cached."""
    st = os.stat(model_path)
    # the layouts (matvec_q8) and the conversion to them (repack)
    layout_code = Path(matvec_q8.__file__).read_bytes() + Path(repack_module.__file__).read_bytes()
    key = hashlib.sha256(f"{st.st_size}|{st.st_mtime_ns}|{size}".encode() + layout_code).hexdigest()[:16]
    return home() / "repacked" / f"{_cache_prefix(model_path)}{key}.bin"


def _remove_stale(path: Path, prefix: str) -> None:
    """Delete the cache files of older versions of the same model file or layout (a process still mapping one
    keeps reading it: unlinking a mapped file frees it only when unmapped)."""
    for old in path.parent.glob(prefix + "*.bin"):
        if old != path:
            try:
                old.unlink()
            except OSError:
                pass


def _pack_into(matrices, offsets, buffer: np.ndarray) -> None:
    for (_, m), off in zip(matrices, offsets):
        rows, row_bytes = packed_shape(m)
        type_id, packed = repack(m.ggml_type, m.raw)
        assert type_id == matvec_q8.REPACKED + m.ggml_type and packed.shape == (rows, row_bytes)
        buffer[off:off + packed.nbytes] = packed.reshape(-1)


def _write_cache(path: Path, matrices, offsets, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as f:
            buffer = np.zeros(size, np.uint8)
            _pack_into(matrices, offsets, buffer)
            f.write(memoryview(buffer))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _map_cache(path: Path, size: int) -> np.ndarray | None:
    """The cache file as a read-only uint8 array, or None if it is missing or of the wrong size."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size != size:
                return None
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    return np.frombuffer(mapped, np.uint8)  # read-only: the kernels see file views and packed data alike


def repack_weights(weights: DecoderWeights, model_path: str | os.PathLike, use_cache: bool = True) -> DecoderWeights:
    """weights with every matrix that has a repacked layout pointing at it (QuantMatrix.packed*), the raw views kept
    for embedding lookups; the packed bytes come from the cache file (made on first use) or, failing that, memory."""
    matrices = packable(weights)
    if not matrices:
        return weights
    offsets, size = _layout(matrices)
    buffer = None
    if use_cache:
        path = cache_path(model_path, size)
        buffer = _map_cache(path, size)
        if buffer is None:
            try:
                _write_cache(path, matrices, offsets, size)
                _remove_stale(path, _cache_prefix(model_path))
                buffer = _map_cache(path, size)
            except OSError:
                buffer = None  # an unwritable or full cache directory: pack in memory below
    if buffer is None:
        buffer = np.zeros(size, np.uint8)
        _pack_into(matrices, offsets, buffer)
        buffer.flags.writeable = False
    packed_by_offset = {}
    for (_, m), off in zip(matrices, offsets):
        rows, row_bytes = packed_shape(m)
        packed_by_offset[m.offset] = (off, buffer[off:off + rows * row_bytes].reshape(rows, row_bytes))

    def with_packed(m):
        if not isinstance(m, QuantMatrix) or m.offset not in packed_by_offset:
            return m
        off, data = packed_by_offset[m.offset]
        return dataclasses.replace(m, packed_type=matvec_q8.REPACKED + m.ggml_type, packed=data, packed_offset=off)

    layers = [dataclasses.replace(lw, **{f.name: with_packed(getattr(lw, f.name)) for f in dataclasses.fields(lw)})
              for lw in weights.layers]
    return dataclasses.replace(weights, layers=layers, output=with_packed(weights.output), packed_bytes=buffer)

