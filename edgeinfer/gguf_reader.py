"""A validating, memory-mapped GGUF reader.

Every length, count, type and offset in the file is checked against the file's size before it is used (and tensors
may not share bytes), so a damaged or hostile file fails with a `GGUFError` naming the file, the field and the byte
offset, never with a crash or a huge allocation. Tensor data is never copied: `TensorInfo.raw` is a uint8 view into the memory map.

Layout (all little-endian): magic "GGUF", u32 version, u64 tensor_count, u64 kv_count, kv_count x (string key,
u32 value_type, value), tensor_count x (string name, u32 n_dims, n_dims x u64 ne, u32 ggml_type, u64 offset), padding
to `general.alignment`, then the data section; tensor offsets are relative to its start. ne[0] is the innermost
(contiguous) dimension, so numpy's shape is the reverse.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgeinfer.errors import GGUFError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUF value types -> (name, struct format of one element); STRING (8) and ARRAY (9) are variable-sized.
_SCALAR_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
_NUMPY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# the smallest encodings: a KV is key length + type + 1 value byte; a tensor info is name length + n_dims + type + offset
_MIN_KV_BYTES = 8 + 4 + 1
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8


@dataclass(frozen=True)
class TensorInfo:
    """One tensor: its ggml type, numpy-order shape and where its bytes lie in the file."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]  # numpy order: outermost first, ne[0] last
    offset: int  # absolute byte offset in the file
    nbytes: int
    raw: np.ndarray  # uint8 view (n_rows, row_bytes): rows of ggml blocks along the innermost dimension

    @property
    def type_name(self) -> str:
        return GGMLQuantizationType(self.ggml_type).name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def array(self) -> np.ndarray:
        """The tensor as a typed numpy view of its shape; only for unquantized types (F32, F16, BF16 as uint16)."""
        dtypes = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16,
                  GGMLQuantizationType.BF16: np.uint16, GGMLQuantizationType.F64: np.float64,
                  GGMLQuantizationType.I32: np.int32}
        if self.ggml_type not in dtypes:
            raise TypeError(f"tensor {self.name} is {self.type_name}: dequantize it instead of viewing it")
        return self.raw.reshape(-1).view(dtypes[self.ggml_type]).reshape(self.shape)


class _Cursor:
    """Reads little-endian values from the map, checking each read against the end of the file."""

    def __init__(self, gguf: "GGUFFile", buf, size: int):
        self.gguf, self.buf, self.size, self.pos = gguf, buf, size, 0

    def need(self, n: int, field: str) -> None:
        if n < 0 or self.pos + n > self.size:
            self.gguf.fail(field, self.pos, f"needs {n} bytes but only {self.size - self.pos} remain in the file")

    def unpack(self, fmt: str, field: str):
        n = struct.calcsize(fmt)
        self.need(n, field)
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, field: str) -> str:
        start = self.pos
        length = self.unpack("<Q", field + " (string length)")
        self.need(length, field)
        data = self.buf[self.pos:self.pos + length]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.gguf.fail(field, start, f"string is not valid UTF-8 ({e.reason} at byte {e.start})")
        self.pos += length
        return text


class GGUFFile:
    """A validated GGUF file, memory-mapped read-only.

    `metadata` maps keys to Python values (str, int, float, bool; arrays of strings as list[str], numeric arrays as
    numpy arrays copied out of the map); `tensors` maps names to `TensorInfo` whose `raw` views the map.
    Use as a context manager or call `close()`; views handed out keep the mapping alive until they are dropped.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size == 0:
                    self.fail("header", 0, "file is empty")
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise GGUFError(self.path, "file", None, e.strerror or str(e)) from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    # -- parsing ------------------------------------------------------------------------------------------------
    def fail(self, field: str, offset: int | None, problem: str):
        raise GGUFError(self.path, field, offset, problem)

    def _parse(self) -> None:
        cur = _Cursor(self, self._map, self.file_size)
        if self.file_size < 24:
            self.fail("header", 0, f"file is {self.file_size} bytes, too short for a GGUF header (24 bytes)")
        magic = self._map[0:4]
        if magic != GGUF_MAGIC:
            self.fail("magic", 0, f"expected b'GGUF', found {magic!r}: not a GGUF file")
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in SUPPORTED_VERSIONS:
            self.fail("version", 4, f"GGUF version {self.version} is not supported (supported: 2, 3)")
        n_tensors = cur.unpack("<Q", "tensor_count")
        n_kv = cur.unpack("<Q", "kv_count")
        room = self.file_size - cur.pos
        if n_kv * _MIN_KV_BYTES > room:
            self.fail("kv_count", 16, f"{n_kv} key-value pairs cannot fit in a {self.file_size}-byte file")
        if n_tensors * _MIN_TENSOR_INFO_BYTES > room:
            self.fail("tensor_count", 8, f"{n_tensors} tensors cannot fit in a {self.file_size}-byte file")

        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, str] = {}
        for i in range(n_kv):
            key_offset = cur.pos
            key = cur.string(f"kv[{i}].key")
            if key in self.metadata:
                self.fail(key, key_offset, "duplicate metadata key")
            self.metadata[key], self.metadata_types[key] = self._read_value(cur, key)

        self.alignment = self._alignment()
        infos = [self._read_tensor_info(cur, i) for i in range(n_tensors)]
        self.data_offset = -(-cur.pos // self.alignment) * self.alignment
        self._whole = np.frombuffer(self._map, dtype=np.uint8)
        self.tensors: dict[str, TensorInfo] = {}
        for name, ggml_type, ne, offset, info_offset, offset_field in infos:
            if name in self.tensors:
                self.fail(name, info_offset, "duplicate tensor name")
            self.tensors[name] = self._place_tensor(name, ggml_type, ne, offset, offset_field)
        self._check_no_overlap({name: offset_field for name, *_, offset_field in infos})

    def _check_no_overlap(self, offset_fields: dict[str, int]) -> None:
        """Two tensors sharing bytes would alias each other's weights (ggml's reader requires them packed in order)."""
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (_, end, before), (start, stop, name) in zip(spans, spans[1:]):
            if start < end:
                self.fail(f"{name}.offset", offset_fields[name],
                          f"tensor data [{start}, {stop}) overlaps that of {before} (which ends at {end})")

    def _read_value(self, cur: _Cursor, key: str, value_type: int | None = None):
        type_offset = cur.pos
        if value_type is None:
            value_type = cur.unpack("<I", key + " (value type)")
        if value_type in _SCALAR_TYPES:
            name, fmt = _SCALAR_TYPES[value_type]
            return cur.unpack(fmt, key), name
        if value_type == _STRING:
            return cur.string(key), "string"
        if value_type != _ARRAY:
            self.fail(key, type_offset, f"unknown value type {value_type}")
        elem_offset = cur.pos
        elem_type = cur.unpack("<I", key + " (array element type)")
        if elem_type == _ARRAY:  # ggml's gguf.cpp rejects arrays of arrays; reading them would recurse without bound
            self.fail(key, elem_offset, "arrays of arrays are not supported")
        count_offset = cur.pos
        count = cur.unpack("<Q", key + " (array length)")
        if elem_type in _SCALAR_TYPES:
            itemsize = struct.calcsize(_SCALAR_TYPES[elem_type][1])
            if count * itemsize > self.file_size - cur.pos:
                self.fail(key, count_offset, f"array of {count} {_SCALAR_TYPES[elem_type][0]} runs past the end of the file")
            values = np.frombuffer(self._map, dtype=_NUMPY_DTYPES[elem_type], count=count, offset=cur.pos).copy()
            cur.pos += count * itemsize
            if elem_type == 7:
                values = values.astype(bool)
            return values, f"array[{_SCALAR_TYPES[elem_type][0]}]"
        if elem_type == _STRING:
            if count * 8 > self.file_size - cur.pos:
                self.fail(key, count_offset, f"array of {count} strings cannot fit in the file")
            return self._read_string_array(cur, key, count), "array[string]"
        self.fail(key, elem_offset, f"unknown array element type {elem_type}")

    def _read_string_array(self, cur: _Cursor, key: str, count: int) -> list[str]:
        # The hot loop of opening a model (262,144 vocabulary strings for Gemma): keep it to bare struct reads.
        buf, size, pos, out = self._map, self.file_size, cur.pos, []
        unpack = struct.Struct("<Q").unpack_from
        append = out.append
        for j in range(count):
            if pos + 8 > size:
                self.fail(f"{key}[{j}]", pos, "string length runs past the end of the file")
            (length,) = unpack(buf, pos)
            end = pos + 8 + length
            if end > size:
                self.fail(f"{key}[{j}]", pos, f"string of {length} bytes runs past the end of the file")
            try:
                append(buf[pos + 8:end].decode("utf-8"))
            except UnicodeDecodeError as e:
                self.fail(f"{key}[{j}]", pos, f"string is not valid UTF-8 ({e.reason} at byte {e.start})")
            pos = end
        cur.pos = pos
        return out

    def _alignment(self) -> int:
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if self.metadata_types.get("general.alignment", "uint32") != "uint32" or alignment <= 0 \
                or alignment & (alignment - 1):
            self.fail("general.alignment", None, f"must be a power-of-two uint32, found {alignment!r}")
        return alignment

    def _read_tensor_info(self, cur: _Cursor, i: int):
        info_offset = cur.pos
        name = cur.string(f"tensor[{i}].name")
        dims_offset = cur.pos
        n_dims = cur.unpack("<I", f"{name}.n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            self.fail(f"{name}.n_dims", dims_offset, f"{n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        shape_offset = cur.pos
        ne = [cur.unpack("<Q", f"{name}.shape") for _ in range(n_dims)]
        if any(d == 0 for d in ne) or any(d > self.file_size * 256 for d in ne):
            self.fail(f"{name}.shape", shape_offset, f"absurd shape {ne}")
        type_offset = cur.pos
        ggml_type = cur.unpack("<I", f"{name}.type")
        if ggml_type not in GGML_QUANT_SIZES:
            self.fail(f"{name}.type", type_offset, f"unknown tensor type {ggml_type}")
        block_elems = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)][0]
        if ne[0] % block_elems:
            self.fail(f"{name}.shape", shape_offset,
                      f"innermost dimension {ne[0]} is not a multiple of the {block_elems}-element "
                      f"{GGMLQuantizationType(ggml_type).name} block")
        offset_field = cur.pos
        offset = cur.unpack("<Q", f"{name}.offset")
        return name, ggml_type, ne, offset, info_offset, offset_field

    def _place_tensor(self, name: str, ggml_type: int, ne: list[int], offset: int, field_offset: int) -> TensorInfo:
        block_elems, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        n_rows = int(np.prod(ne[1:], dtype=object)) if len(ne) > 1 else 1
        row_bytes = ne[0] // block_elems * block_bytes
        nbytes = n_rows * row_bytes
        if offset % self.alignment:
            self.fail(f"{name}.offset", field_offset, f"offset {offset} is not a multiple of the alignment {self.alignment}")
        start = self.data_offset + offset
        if start + nbytes > self.file_size:
            self.fail(f"{name}.offset", field_offset,
                      f"tensor data [{start}, {start + nbytes}) runs past the end of the file ({self.file_size} bytes)")
        raw = self._whole[start:start + nbytes].reshape(n_rows, row_bytes)
        return TensorInfo(name, ggml_type, tuple(int(d) for d in reversed(ne)), start, nbytes, raw)

    # -- access ---------------------------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        if not isinstance(arch, str):
            self.fail("general.architecture", None, "missing or not a string")
        return arch

    @property
    def file_bytes(self) -> np.ndarray:
        """The whole file as a read-only uint8 array (a view of the map; tensor offsets index into it)."""
        return self._whole

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def require(self, key: str, kind: type | tuple[type, ...] = object) -> Any:
        """A metadata value that must exist (and be of `kind`), else a GGUFError naming the key."""
        if key not in self.metadata:
            self.fail(key, None, "required metadata key is missing")
        value = self.metadata[key]
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            self.fail(key, None, f"expected {getattr(kind, '__name__', kind)}, found {type(value).__name__}")
        return value

    def tensor(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            self.fail(name, None, "required tensor is missing")
        return self.tensors[name]

    def close(self) -> None:
        """Release the memory map (it stays alive while views handed out still exist)."""
        self.tensors = {}
        self._whole = None
        m, self._map = getattr(self, "_map", None), None
        if m is not None:
            try:
                m.close()
            except BufferError:
                pass  # numpy views still reference it; the OS mapping is released when they are dropped

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
