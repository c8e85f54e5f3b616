"""Repacked weights (edgeinfer.backends.cpu_repack): made once per model file, cached atomically, memory-mapped, run by
the CPU backend; the architecture's views are never changed."""
import os
import zlib

import numpy as np
import pytest

from conftest import model_path
from edgeinfer.arch import load_decoder as load_views
from edgeinfer.backends.cpu import CPUBackend, CPURunner
from edgeinfer.backends.cpu_repack import _layout, cache_path, layout_digest, packable, read_record, record_path, repack_weights
from edgeinfer.engine import Engine
from edgeinfer.gguf_reader import GGUFFile
from kernels_cpu import forward as fw
from kernels_cpu.matvec_q8 import REPACKED
from kernels_cpu.repack import repack
from tools.perplexity import log_softmax


def load_decoder(gguf, repack: bool = True):
    """The config and the CPU backend's runner of the model (weights repacked, or the file's own layouts)."""
    cfg, views = load_views(gguf)
    return cfg, CPUBackend(repack=repack).prepare(cfg, views, gguf.path)


@pytest.fixture
def smollm2():
    with GGUFFile(model_path("smollm2-135m-instruct")) as gguf:
        yield gguf


def test_cache_file_is_made_once_and_mapped(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, runner = load_decoder(smollm2)
    views, repacked = runner.weights, runner.repacked
    files = sorted((tmp_path / "repacked").iterdir())
    # the data and its record, no temporary file left behind
    assert [f.suffix for f in files] == [".bin", ".json"] and record_path(files[0]) == files[1]
    record = read_record(files[0])
    assert record["model"] == os.path.realpath(smollm2.path) and record["bytes"] == files[0].stat().st_size
    assert record["crc32"] == zlib.crc32(repacked.buffer)
    first_mtime = files[0].stat().st_mtime_ns
    ffn_up = views.layers[3].ffn_up
    assert repacked.get(ffn_up).type_id == REPACKED + ffn_up.ggml_type
    assert np.array_equal(repacked.array(ffn_up), repack(ffn_up.ggml_type, ffn_up.raw)[1])
    assert not repacked.buffer.flags.writeable
    heads = runner.tables.head_mats
    assert views.token_embd.offset == views.output.offset  # SmolLM2's LM head is tied to the embedding, yet
    assert heads[fw.H_EMBED]["buffer"] == fw.IN_FILE  # embedding rows are looked up in the file's own layout
    assert heads[fw.H_OUTPUT]["buffer"] == fw.IN_PACKED  # and the head is computed from the repacked copy

    _, again = load_decoder(smollm2)
    assert files[0].stat().st_mtime_ns == first_mtime  # mapped, not rewritten
    assert np.array_equal(again.repacked.array(again.weights.layers[3].ffn_up), repacked.array(ffn_up))
    matrices = packable(views)
    assert len(matrices) == 7 * 30 + 1 and len({m.offset for _, m in matrices}) == len(matrices)


def test_the_cache_key_names_which_matrix_lies_where(smollm2):
    """A new weight field reorders the matrices while the buffer keeps its size: the cache must not be reused."""
    _, views = load_views(smollm2)
    matrices = packable(views)
    offsets, size = _layout(matrices)
    reordered = [matrices[1], matrices[0]] + matrices[2:]
    assert _layout(reordered)[1] == size
    assert layout_digest(reordered, offsets) != layout_digest(matrices, offsets)
    assert cache_path(smollm2.path, size, layout_digest(reordered, offsets)) != \
        cache_path(smollm2.path, size, layout_digest(matrices, offsets))


def test_stale_cache_files_are_removed(smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, runner = load_decoder(smollm2)
    current = runner.repacked.cache_file
    stale = current.with_name(current.name.rsplit(".", 2)[0] + ".0123456789abcdef.bin")
    other_model = current.with_name("other-model.12345678.0123456789abcdef.bin")
    stale.write_bytes(b"old layout"), other_model.write_bytes(b"another model")
    current.unlink()
    load_decoder(smollm2)
    assert current.exists() and not stale.exists() and other_model.exists()


def test_wrong_size_cache_is_replaced(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, runner = load_decoder(smollm2)
    path = runner.repacked.cache_file
    del runner
    with open(path, "r+b") as f:
        f.truncate(1000)  # e.g. a disk that filled up under another tool
    capsys.readouterr()
    _, runner = load_decoder(smollm2)
    size = runner.repacked.buffer.shape[0]
    assert capsys.readouterr().err == f"warning: repacked cache {path} was damaged (1000 bytes, expected {size}); " \
                                      "rebuilt\n"
    assert os.path.getsize(path) == size
    attn_q = runner.weights.layers[0].attn_q
    assert np.array_equal(runner.repacked.array(attn_q), repack(attn_q.ggml_type, attn_q.raw)[1])


def test_damaged_cache_is_rebuilt_with_one_warning(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    prompt = [1, 504, 3458, 282, 260, 2915, 28]
    cfg, runner = load_decoder(smollm2)
    expected = Engine(cfg, runner, n_ctx=32, n_threads=1).prefill(prompt)
    path = runner.repacked.cache_file
    first = runner.repacked.get(runner.weights.layers[0].attn_q).offset
    del runner
    with open(path, "r+b") as f:  # flip bytes inside the first layer's query matrix
        f.seek(first + 4096)
        damaged = bytes(b ^ 0xFF for b in f.read(64))
        f.seek(first + 4096)
        f.write(damaged)
    capsys.readouterr()
    cfg, runner = load_decoder(smollm2)
    assert capsys.readouterr().err == f"warning: repacked cache {path} was damaged (checksum mismatch); rebuilt\n"
    assert np.array_equal(Engine(cfg, runner, n_ctx=32, n_threads=1).prefill(prompt), expected)
    load_decoder(smollm2)
    assert capsys.readouterr().err == ""  # the rebuilt file matches its record


def test_cache_without_record_is_rebuilt_quietly(smollm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    _, runner = load_decoder(smollm2)
    path = runner.repacked.cache_file
    record_path(path).unlink()  # as made by an older version, or a crash between the record and the data
    capsys.readouterr()
    _, again = load_decoder(smollm2)
    assert capsys.readouterr().err == "" and read_record(path)["crc32"] == zlib.crc32(again.repacked.buffer)


def test_unwritable_cache_falls_back_to_memory(smollm2, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("EDGEINFER_HOME", str(blocker))
    _, runner = load_decoder(smollm2)
    assert runner.repacked.get(runner.weights.layers[0].ffn_down) is not None
    assert not runner.repacked.buffer.flags.writeable
    assert not (blocker / "repacked").exists() and blocker.read_text() == ""
    load_decoder(smollm2)
    assert capsys.readouterr().err == (f"warning: EDGEINFER_HOME {blocker} is not a writable directory (it is a "
                                       f"file); caches are kept for this run only\n")  # once per process


def test_engine_gives_the_same_tokens_on_both_layouts(smollm2):
    cfg, raw_runner = load_decoder(smollm2, repack=False)
    packed_runner = CPURunner(cfg, raw_runner.weights, repack_weights(raw_runner.weights, smollm2.path))
    assert raw_runner.repacked.buffer is None and set(raw_runner.tables.layer_mats["buffer"].ravel()) == {fw.IN_FILE}
    prompt = [1, 504, 3458, 282, 260, 2915, 28]
    results = []
    for runner in (raw_runner, packed_runner):
        engine = Engine(cfg, runner, n_ctx=32, n_threads=1)
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
    from edgeinfer.backends import cpu, cpu_repack
    from edgeinfer.budget import plan_for_model
    from edgeinfer.model_info import summarize
    from tools.convert import convert

    def no_repacking(*args, **kwargs):
        raise AssertionError("repacked while only reading the model")

    monkeypatch.setenv("EDGEINFER_HOME", str(tmp_path))
    for module, name in ((cpu_repack, "repack_weights"), (cpu, "repack_weights"), (cpu_repack, "_pack_into")):
        monkeypatch.setattr(module, name, no_repacking)
    monkeypatch.setattr(cpu.CPUBackend, "prepare", no_repacking)
    plan_for_model(smollm2.path)
    summarize(smollm2)
    convert(smollm2.path, tmp_path / "out.gguf", "Q8_0", dry_run=True)
    assert not (tmp_path / "repacked").exists()
