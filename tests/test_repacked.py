"""Repacked weights (edgeinfer.repacked): made once per model file, cached atomically, memory-mapped, used by the engine."""
import os
import zlib

import numpy as np
import pytest

from conftest import model_path
from edgeinfer.arch import load_decoder as load_views
from edgeinfer.backends.cpu import prepare_weights
from edgeinfer.engine import Engine
from edgeinfer.gguf_reader import GGUFFile
from edgeinfer.repacked import cache_path, packable, read_record, record_path, repack_weights
from kernels_cpu.matvec_q8 import REPACKED
from kernels_cpu.repack import repack
from tools.perplexity import log_softmax


def load_decoder(gguf, repack: bool = True):
    """The config and weights as the CPU backend runs them (repacked), or the plain views."""
    cfg, views = load_views(gguf)
    return cfg, prepare_weights(views, gguf.path) if repack else views


@pytest.fixture
def smollm2():
    with GGUFFile(model_path("smollm2-135m-instruct")) as gguf:
        yield gguf


def test_cache_file_is_made_once_and_mapped(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, weights = load_decoder(smollm2)
    files = sorted((tmp_path / "repacked").iterdir())
    # the data and its record, no temporary file left behind
    assert [f.suffix for f in files] == [".bin", ".json"] and record_path(files[0]) == files[1]
    record = read_record(files[0])
    assert record["model"] == os.path.realpath(smollm2.path) and record["bytes"] == files[0].stat().st_size
    assert record["crc32"] == zlib.crc32(weights.packed_bytes)
    first_mtime = files[0].stat().st_mtime_ns
    ffn_up = weights.layers[3].ffn_up
    assert ffn_up.packed_type == REPACKED + ffn_up.ggml_type and ffn_up.kernel_type == ffn_up.packed_type
    assert np.array_equal(ffn_up.packed, repack(ffn_up.ggml_type, ffn_up.raw)[1])
    assert not weights.packed_bytes.flags.writeable
    assert weights.token_embd.packed is None  # embedding rows are looked up in the file's own layout
    assert weights.output.packed is not None  # the tied head is computed from the repacked copy

    _, again = load_decoder(smollm2)
    assert files[0].stat().st_mtime_ns == first_mtime  # mapped, not rewritten
    assert np.array_equal(again.layers[3].ffn_up.packed, ffn_up.packed)
    matrices = packable(weights)
    assert len(matrices) == 7 * 30 + 1 and len({m.offset for _, m in matrices}) == len(matrices)


def test_stale_cache_files_are_removed(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, weights = load_decoder(smollm2)
    current = cache_path(smollm2.path, weights.packed_bytes.shape[0])
    stale = current.with_name(current.name.rsplit(".", 2)[0] + ".0123456789abcdef.bin")
    other_model = current.with_name("other-model.12345678.0123456789abcdef.bin")
    stale.write_bytes(b"old layout"), other_model.write_bytes(b"another model")
    current.unlink()
    load_decoder(smollm2)
    assert current.exists() and not stale.exists() and other_model.exists()


def test_wrong_size_cache_is_replaced(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, weights = load_decoder(smollm2)
    path = cache_path(smollm2.path, weights.packed_bytes.shape[0])
    del weights
    with open(path, "r+b") as f:
        f.truncate(1000)  # e.g. a disk that filled up under another tool
    capsys.readouterr()
    _, weights = load_decoder(smollm2)
    assert capsys.readouterr().err == f"warning: repacked cache {path} was damaged (1000 bytes, expected " \
                                      f"{weights.packed_bytes.shape[0]}); rebuilt\n"
    assert os.path.getsize(path) == weights.packed_bytes.shape[0]
    assert np.array_equal(weights.layers[0].attn_q.packed,
                          repack(weights.layers[0].attn_q.ggml_type, weights.layers[0].attn_q.raw)[1])


def test_damaged_cache_is_rebuilt_with_one_warning(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    prompt = [1, 504, 3458, 282, 260, 2915, 28]
    cfg, weights = load_decoder(smollm2)
    expected = Engine(cfg, weights, n_ctx=32, n_threads=1).prefill(prompt)
    path = cache_path(smollm2.path, weights.packed_bytes.shape[0])
    first = weights.layers[0].attn_q.packed_offset
    del weights
    with open(path, "r+b") as f:  # flip bytes inside the first layer's query matrix
        f.seek(first + 4096)
        damaged = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(first + 4096)
        f.write(damaged)
    capsys.readouterr()
    cfg, weights = load_decoder(smollm2)
    assert capsys.readouterr().err == f"warning: repacked cache {path} was damaged (checksum mismatch); rebuilt\n"
    assert np.array_equal(Engine(cfg, weights, n_ctx=32, n_threads=1).prefill(prompt), expected)
    load_decoder(smollm2)
    assert capsys.readouterr().err == ""  # the rebuilt file matches its record


def test_cache_without_record_is_rebuilt_quietly(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, weights = load_decoder(smollm2)
    path = cache_path(smollm2.path, weights.packed_bytes.shape[0])
    record_path(path).unlink()  # as made by an older version, or a crash between the record and the data
    capsys.readouterr()
    _, again = load_decoder(smollm2)
    assert capsys.readouterr().err == "" and read_record(path)["crc32"] == zlib.crc32(again.packed_bytes)


def test_unwritable_cache_falls_back_to_memory(smollm2, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("EDGEINFER_HOME", str(blocker))
    _, weights = load_decoder(smollm2)
    assert weights.layers[0].ffn_down.packed is not None and not weights.packed_bytes.flags.writeable
    assert not (blocker / "repacked").exists() and blocker.read_text() == ""
    load_decoder(smollm2)
    assert capsys.readouterr().err == (f"warning: EDGEINFER_HOME {blocker} is not a writable directory (it is a "
                                       f"file); caches are kept for this run only\n")  # once per process


def test_engine_gives_the_same_tokens_on_both_layouts(smollm2):
    cfg, raw_weights = load_decoder(smollm2, repack=False)
    packed_weights = repack_weights(raw_weights, smollm2.path)
    prompt = [1, 504, 3458, 282, 260, 2915, 28]
    results = []
    for weights in (raw_weights, packed_weights):
        engine = Engine(cfg, weights, n_ctx=32, n_threads=1)
        prefill_logits = engine.prefill(prompt)
        decode_logits = engine.decode(int(np.argmax(prefill_logits)))
        results.append((prefill_logits, decode_logits))
    for raw_logits, packed_logits in zip(*results):
        # the same arithmetic summed in another order: float32 rounding apart in each matvec, but a rounding
        # difference can flip an activation's int8 rounding in the next layer, so after 30 layers the logits
        # differ by up to ~0.5 (measured); the distributions stay as close as llama.cpp's and ours
        assert np.argmax(raw_logits) == np.argmax(packed_logits)
        p, q = log_softmax(raw_logits[None])[0], log_softmax(packed_logits[None])[0]
        assert float(np.sum(np.exp(p) * (p - q))) < 0.01


def test_reading_a_model_never_repacks(smollm2, tmp_path, monkeypatch):
    """plan, info and convert read metadata and tensor headers: only what runs a model prepares its weights."""
    from edgeinfer.budget import plan_for_model
    from edgeinfer.model_info import summarize

    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, views = load_views(smollm2)
    plan_for_model(smollm2.path)
    summarize(smollm2)
    assert views.packed_bytes is None and all(lw.ffn_up.packed is None for lw in views.layers)
    assert not (tmp_path / "repacked").exists()
