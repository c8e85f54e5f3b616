"""The GGUF reader: agreement with gguf-py's GGUFReader on the real models, and a clear GGUFError for damaged files.

Damaged files are a small valid GGUF written by `gguf.GGUFWriter` with bytes then changed in place; the offsets the
errors must name come from gguf-py's own parse of the clean file (`Layout`), not from our reader.
`BAD_FILES` and its helpers are shared with test_info_cli.py, which checks the CLI's one-line errors on them.
"""
from __future__ import annotations

import mmap
import re
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from conftest import MODEL_NAMES, model_path
from edgeinfer.errors import GGUFError
from edgeinfer.gguf_reader import GGUFFile


# -- real models ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=MODEL_NAMES)
def both_readers(request):
    """(our GGUFFile, gguf-py's GGUFReader) on one real model; gguf-py takes ~30 s on Gemma's vocabulary, so once."""
    path = model_path(request.param)
    ours = GGUFFile(path)
    yield ours, gguf.GGUFReader(path)
    ours.close()


def _sample(reference: gguf.GGUFReader) -> list[gguf.ReaderTensor]:
    """The first, the last and the first tensor of each type."""
    first_of_type = {}
    for t in reference.tensors:
        first_of_type.setdefault(t.tensor_type, t)
    return [reference.tensors[0], reference.tensors[-1], *first_of_type.values()]


@pytest.mark.slow
def test_tensor_bytes_offsets_and_shapes_match_gguf_py(both_readers):
    ours, reference = both_readers
    assert list(ours.tensors) == [t.name for t in reference.tensors]
    for ref in reference.tensors:
        mine = ours.tensors[ref.name]
        assert mine.shape == tuple(int(d) for d in reversed(ref.shape)), ref.name  # gguf-py keeps ggml order
        assert (mine.ggml_type, mine.offset, mine.nbytes) == (ref.tensor_type, ref.data_offset, ref.n_bytes)
        assert mine.n_elements == ref.n_elements
    for ref in _sample(reference):
        mine = ours.tensors[ref.name]
        assert np.array_equal(mine.raw.reshape(-1), ref.data.reshape(-1).view(np.uint8)), ref.name
        if ref.tensor_type == GGMLQuantizationType.F32:
            assert np.array_equal(mine.array(), ref.data) and mine.array().shape == ref.data.shape


@pytest.mark.slow
def test_metadata_matches_gguf_py(both_readers):
    ours, reference = both_readers
    fields = {k: f for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.metadata) == list(fields)
    for key, field in fields.items():
        mine, theirs = ours.metadata[key], field.contents()
        if isinstance(mine, np.ndarray):
            assert np.array_equal(mine, np.asarray(theirs)), key
        else:
            assert mine == theirs and type(mine) is type(theirs), key
    assert ours.version == reference.fields["GGUF.version"].contents()
    assert ours.architecture == reference.fields["general.architecture"].contents()


@pytest.mark.slow
def test_known_shapes_in_numpy_order():
    with GGUFFile(model_path("smollm2-135m-instruct")) as f:
        assert f.tensors["token_embd.weight"].shape == (49152, 576)  # ne = [576, 49152]
        assert f.tensors["blk.0.ffn_down.weight"].shape == (576, 1536)
        assert f.tensors["output_norm.weight"].array().shape == (576,)
        assert f.require("llama.block_count", int) == 30


@pytest.mark.slow
def test_raw_is_a_read_only_view_into_the_map():
    with GGUFFile(model_path("smollm2-135m-instruct")) as f:
        raw = f.tensors["blk.0.attn_q.weight"].raw
        assert not raw.flags.owndata and not raw.flags.writeable
        assert np.shares_memory(raw, np.frombuffer(f._map, dtype=np.uint8))
        base = raw
        while isinstance(base, np.ndarray):
            base = base.base
        assert isinstance(base.obj if isinstance(base, memoryview) else base, mmap.mmap)  # frombuffer's memoryview


@pytest.mark.slow
def test_close_releases_the_map_and_keeps_live_views_valid():
    path = model_path("smollm2-135m-instruct")
    f = GGUFFile(path)
    the_map = f._map
    f.close()
    assert the_map.closed and f.tensors == {}
    f.close()  # twice is harmless

    with GGUFFile(path) as f:
        kept = f.tensors["output_norm.weight"].array()
        expected = kept.copy()
    assert f._map is None and np.array_equal(kept, expected)  # the view holds the mapping open


# -- a small valid file, and the same file damaged -------------------------------------------------------------------
@dataclass
class Layout:
    """Absolute offsets of every part of the small file, from gguf-py's parse: for a KV, the key length, key bytes,
    value type, then the value's parts (array: element type, count, then each element's parts); for a tensor info,
    the name length, name bytes, n_dims, shape, type and data offset."""

    size: int
    kv: dict[str, list[int]]
    tensor: dict[str, list[int]]


def _part_offsets(field: gguf.ReaderField) -> list[int]:
    starts = np.cumsum([0] + [p.nbytes for p in field.parts])[:-1]
    return [field.offset + int(s) for s in starts]


def write_small_gguf(path: Path) -> Layout:
    """A 736-byte GGUF: 7 KVs (strings, a uint32, a string array, an int32 array), tensors w.a (2, 8) F32,
    w.b (4,) F32 and w.q (2, 64) Q8_0."""
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(64)
    w.add_string("test.key_a", "alpha")
    w.add_string("test.key_b", "beta")
    w.add_array("tokenizer.ggml.tokens", ["a", "bb", "ccc"])
    w.add_array("test.ints", [1, 2, 3])
    rng = np.random.default_rng(0)
    w.add_tensor("w.a", rng.standard_normal((2, 8)).astype(np.float32))
    w.add_tensor("w.b", rng.standard_normal(4).astype(np.float32))
    w.add_tensor("w.q", quantize(rng.standard_normal((2, 64)).astype(np.float32), GGMLQuantizationType.Q8_0),
                 raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    reference = gguf.GGUFReader(path)
    return Layout(path.stat().st_size,
                  {k: _part_offsets(f) for k, f in reference.fields.items() if not k.startswith("GGUF.")},
                  {t.name: _part_offsets(t.field) for t in reference.tensors})


with tempfile.TemporaryDirectory() as _tmp:  # the layout is deterministic: read it once, at import
    _LAYOUT = write_small_gguf(Path(_tmp) / "small.gguf")
KV, T, SIZE = _LAYOUT.kv, _LAYOUT.tensor, _LAYOUT.size
Edit = Callable[[bytearray], None]


def put(offset: int, fmt: str, value) -> Edit:
    return lambda b: struct.pack_into(fmt, b, offset, value)


def cut(length: int) -> Edit:
    return lambda b: b.__delitem__(slice(length, None))


def nested_arrays(depth: int) -> Edit:
    """Replace the whole file by one whose only KV is an array of an array of ... `depth` levels (12 bytes each)."""
    head = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 4) + b"nest" + struct.pack("<I", 9)
    body = head + struct.pack("<IQ", 9, 1) * depth + struct.pack("<IQ", 0, 0)
    return lambda b: b.__setitem__(slice(None), body)


# name -> (edits to the small file, the field the error must name, the offset it must give)
BAD_FILES: dict[str, tuple[list[Edit], str, int | None]] = {
    "empty": ([cut(0)], "header", 0),
    "truncated_header": ([cut(20)], "header", 0),
    "truncated_kv": ([cut(KV["test.key_b"][4] + 2)], "test.key_b", KV["test.key_b"][4]),
    "truncated_tensor_info": ([cut(T["w.b"][3] + 4)], "w.b.shape", T["w.b"][3]),
    "truncated_data": ([cut(SIZE - 40)], "w.q.offset", T["w.q"][5]),
    "wrong_magic": ([put(0, "4s", b"GGML")], "magic", 0),
    "version_1": ([put(4, "<I", 1)], "version", 4),
    "version_4": ([put(4, "<I", 4)], "version", 4),
    "absurd_tensor_count": ([put(8, "<Q", 2**60)], "tensor_count", 8),
    "absurd_kv_count": ([put(16, "<Q", 2**60)], "kv_count", 16),
    # a string whose length runs past the end of the file is reported where its bytes would start
    "absurd_key_length": ([put(KV["test.key_a"][0], "<Q", 2**62)], "kv[3].key", KV["test.key_a"][1]),
    "absurd_string_length": ([put(KV["general.name"][3], "<Q", 2**62)], "general.name", KV["general.name"][4]),
    "string_array_length_past_end": ([put(KV["tokenizer.ggml.tokens"][4], "<Q", 2**40)],
                                     "tokenizer.ggml.tokens", KV["tokenizer.ggml.tokens"][4]),
    "string_array_element_past_end": ([put(KV["tokenizer.ggml.tokens"][9], "<Q", 1000)],
                                      "tokenizer.ggml.tokens[2]", KV["tokenizer.ggml.tokens"][9]),
    "unknown_value_type": ([put(KV["test.key_a"][2], "<I", 13)], "test.key_a", KV["test.key_a"][2]),
    "unknown_array_element_type": ([put(KV["test.ints"][3], "<I", 13)], "test.ints", KV["test.ints"][3]),
    "unknown_tensor_type": ([put(T["w.q"][4], "<I", 4)], "w.q.type", T["w.q"][4]),  # 4 was Q4_2, long removed
    "tensor_offset_past_end": ([put(T["w.q"][5], "<Q", 32 * 1024)], "w.q.offset", T["w.q"][5]),
    "misaligned_tensor_offset": ([put(T["w.b"][5], "<Q", 64 + 4)], "w.b.offset", T["w.b"][5]),
    # w.a holds bytes [0, 64) of the data: w.b there would alias its weights
    "overlapping_tensors": ([put(T["w.b"][5], "<Q", 32)], "w.b.offset", T["w.b"][5]),
    "n_dims_0": ([put(T["w.a"][2], "<I", 0)], "w.a.n_dims", T["w.a"][2]),
    "n_dims_9": ([put(T["w.a"][2], "<I", 9)], "w.a.n_dims", T["w.a"][2]),
    "zero_dimension": ([put(T["w.b"][3], "<Q", 0)], "w.b.shape", T["w.b"][3]),
    "row_not_whole_blocks": ([put(T["w.q"][3], "<Q", 48)], "w.q.shape", T["w.q"][3]),  # Q8_0 blocks are 32 wide
    "duplicate_tensor_name": ([put(T["w.b"][1] + 2, "c", b"a")], "w.a", T["w.b"][0]),
    "bad_utf8_key": ([put(KV["test.key_a"][1], "B", 0xFF)], "kv[3].key", KV["test.key_a"][0]),
    "bad_utf8_string": ([put(KV["general.name"][4], "B", 0xC3)], "general.name", KV["general.name"][3]),
    "bad_utf8_string_array": ([put(KV["tokenizer.ggml.tokens"][8], "B", 0x80)],
                              "tokenizer.ggml.tokens[1]", KV["tokenizer.ggml.tokens"][7]),
    "duplicate_key": ([put(KV["test.key_b"][1] + 9, "c", b"a")], "test.key_a", KV["test.key_b"][0]),
    # a key is text from the file: an error naming it must still be one printable line
    "control_characters_in_key": ([put(KV["test.key_a"][1] + 4, "c", b"\n"), put(KV["test.key_a"][2], "<I", 13)],
                                  "test\\nkey_a", KV["test.key_a"][2]),
    "deeply_nested_arrays": ([nested_arrays(1000)], "nest", 24 + 8 + 4 + 4),  # the outer array's element type
}

def bad_file_params() -> list:
    """BAD_FILES names as pytest params."""
    return list(BAD_FILES)


def write_bad_file(tmp_path: Path, case: str) -> tuple[Path, str, int | None]:
    """The small file damaged as BAD_FILES[case] says: its path and the (field, offset) the error must name."""
    path = tmp_path / f"{case}.gguf"
    write_small_gguf(path)
    data = bytearray(path.read_bytes())
    edits, field, offset = BAD_FILES[case]
    for edit in edits:
        edit(data)
    path.write_bytes(bytes(data))
    return path, field, offset


def open_expecting_gguf_error(path: Path) -> GGUFError:
    """The GGUFError opening `path` raises; any other outcome fails the test without a (possibly 2,000-frame) trace."""
    try:
        GGUFFile(path).close()
        problem = "opened without error"
    except GGUFError as e:
        return e
    except Exception as e:  # noqa: BLE001 - the point is to name whatever escaped
        problem = f"raised {type(e).__name__}: {str(e)[:200]}"
    pytest.fail(f"{path.name}: {problem}, expected GGUFError", pytrace=False)


# -- damaged files ----------------------------------------------------------------------------------------------------
def test_small_file_is_valid_and_matches_its_layout(tmp_path):
    layout = write_small_gguf(tmp_path / "small.gguf")
    with GGUFFile(tmp_path / "small.gguf") as f:
        assert f.file_size == layout.size
        assert f.metadata["tokenizer.ggml.tokens"] == ["a", "bb", "ccc"]
        assert f.metadata["test.ints"].tolist() == [1, 2, 3]
        assert {n: (t.type_name, t.shape) for n, t in f.tensors.items()} == \
            {"w.a": ("F32", (2, 8)), "w.b": ("F32", (4,)), "w.q": ("Q8_0", (2, 64))}
        assert f.tensors["w.q"].raw.shape == (2, 2 * 34)  # two Q8_0 blocks (32 elements, 34 bytes) per row


@pytest.mark.parametrize("case", bad_file_params())
def test_damaged_file_raises_gguf_error_naming_field_and_offset(tmp_path, case):
    path, field, offset = write_bad_file(tmp_path, case)
    error = open_expecting_gguf_error(path)
    where = f" at offset {offset}: " if offset is not None else ": "
    assert str(error).startswith(f"{path}: {field}{where}"), str(error)
    assert error.offset == offset and "\n" not in str(error)


def test_directory_and_missing_path_raise_gguf_error(tmp_path):
    for path in (tmp_path, tmp_path / "missing.gguf"):
        with pytest.raises(GGUFError, match=f"^{re.escape(str(path))}: file: "):
            GGUFFile(path)


def test_random_single_byte_corruptions_parse_or_raise_gguf_error(tmp_path):
    clean = tmp_path / "clean.gguf"
    write_small_gguf(clean)
    data, path = clean.read_bytes(), tmp_path / "fuzzed.gguf"
    rng = np.random.default_rng(20240611)
    started, parsed = time.monotonic(), 0
    for _ in range(200):
        damaged = bytearray(data)
        damaged[rng.integers(len(damaged))] = rng.integers(256)
        path.write_bytes(bytes(damaged))
        try:
            with GGUFFile(path):
                parsed += 1
        except GGUFError:
            pass
    assert 0 < parsed < 200  # both outcomes were exercised
    assert time.monotonic() - started < 5
