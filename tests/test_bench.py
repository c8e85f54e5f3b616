"""`edgeinfer bench`: context sizing for depths, the bytes a decode step reads (weights + the KV cache it attends to),
and a small run at two depths checked row by row (the depth prefilled once, each test at positions d..)."""
import json

import pytest
from cli_helpers import run_edgeinfer
from conftest import model_path

from edgeinfer.arch.decoder import DecoderConfig
from edgeinfer.bench import (READ_HEADER, BenchError, bench_context, cache_bytes_per_step, format_bench, row_name,
                             run_bench)
from edgeinfer.engine import Engine
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, KV_TYPES, KVCache

SMOLLM2 = "smollm2-135m-instruct"


def test_context_fits_the_largest_depth_plus_the_larger_test():
    assert bench_context(512, 128) == 512 + 16
    assert bench_context(512, 128, depths=(0, 4096)) == 4096 + 512 + 16
    assert bench_context(0, 64, depths=(4096,)) == 4096 + 64 + 16
    assert bench_context(4096, 0, 4096) == 4096  # -p may go up to the context
    with pytest.raises(BenchError, match=r"-n 64 at -d 4096 \(4160 positions\) is larger than the context of 4096"):
        bench_context(0, 64, 4096, depths=(0, 4096))
    with pytest.raises(BenchError, match=r"-d values must be >= 0"):
        bench_context(8, 8, depths=(-1,))


def test_row_names_follow_llama_bench():
    assert (row_name("pp", 512), row_name("tg", 64, 4096)) == ("pp512", "tg64 @ d4096")


def test_cache_bytes_a_step_reads_by_hand():
    cfg = DecoderConfig(arch="gemma3", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, value_dim=32,
                        d_ff=128, n_vocab=1000, context_length=8192, norm_eps=1e-6, rope_base=1e4, rope_dims=32,
                        rope_style=0, sliding_window=4, local_layers=(True, False))
    for kv_type in KV_TYPES:
        per_layer_position = KVCache.nbytes_for(cfg, 1, kv_type=kv_type) / 2  # K and V of one layer
        # steps at positions 2..5 attend to 3, 4, 5, 6 positions; the local layer to at most its window of 4
        expected = ((3 + 4 + 4 + 4) + (3 + 4 + 5 + 6)) * per_layer_position / 4
        assert cache_bytes_per_step(cfg, kv_type, 2, 4) == pytest.approx(expected)
    assert KVCache.nbytes_for(cfg, 1, kv_type="q8_0") / KVCache.nbytes_for(cfg, 1, kv_type="f32") == 1.125 / 4


@pytest.fixture
def prefills(monkeypatch):
    """(tokens, positions held before) of every Engine.prefill call."""
    calls = []
    original = Engine.prefill

    def spy(self, tokens, *args, **kwargs):
        calls.append((len(tokens), self.n_past))
        return original(self, tokens, *args, **kwargs)

    monkeypatch.setattr(Engine, "prefill", spy)
    return calls


def test_a_small_run_at_two_depths(prefills):
    result = run_bench(model_path(SMOLLM2), prompt_tokens=8, gen_tokens=4, threads=(1,), reps=1, depths=(0, 32),
                       batches=(1, 2), process=False)
    rows = result["rows"]
    assert [(r["test"], r["depth"], r["batch"]) for r in rows] == [
        ("pp8", 0, 1), ("tg4", 0, 1), ("tg4", 0, 2), ("pp8 @ d32", 32, 1), ("tg4 @ d32", 32, 1), ("tg4 @ d32", 32, 2)]
    assert {r["kv_type"] for r in rows} == {DEFAULT_KV_TYPE} and result["n_ctx"] == 32 + 8 + 16
    # the depth prefilled once (not timed); every pp8 (warm-up and timed) runs after the positions its depth holds
    assert prefills.count((32, 0)) == 1
    assert [held for n, held in prefills if n == 8] == [0, 0, 32, 32]
    weights, per_position = result["weight_bytes_per_step"], result["kv_bytes_per_position"][DEFAULT_KV_TYPE]
    wall = result["memory_wall"]["1"]
    for r in rows:
        assert len(r["samples"]) == 1 and r["mean"] > 0
        if r["test"].startswith("pp"):
            assert "read_bytes_per_step" not in r
            continue
        # 4 steps at positions d..d+3 attend to d+1..d+4 positions: d + 2.5 on average, for each sequence
        assert r["read_bytes_per_step"] == {"weights": weights, "kv_cache": round(r["batch"] * (r["depth"] + 2.5)
                                                                                  * per_position)}
        steps_per_second = r["mean"] / r["batch"]
        assert r["read_gb_per_s"] == pytest.approx(sum(r["read_bytes_per_step"].values()) * steps_per_second / 1e9)
        assert r["wall_fraction"] == pytest.approx(r["read_gb_per_s"] / wall["gb_per_s"])
    text = format_bench(result)
    # the memory read rate at each thread count: measured before and after its tests at each depth, in this run
    assert list(result["memory_wall"]) == ["1"] and len(wall["readings"]) == 4 and min(wall["readings"]) > 0
    assert wall["gb_per_s"] == pytest.approx(sum(wall["readings"]) / 4) and wall["buffer_bytes"] <= 256 << 20
    assert "memory read wall, measured in this run" in text and f"1 thread {wall['gb_per_s']:.1f} GB/s" in text
    percent = f"{100 * rows[1]['wall_fraction']:.0f}%"
    assert f"| {percent:>4} |" in next(line for line in text.splitlines() if "| tg4 " in line)
    assert READ_HEADER in text and "GB/s" in text and "| tg4 @ d32 |" in text
    assert f"{DEFAULT_KV_TYPE} {per_position / 1024:.0f} KB" in text
    line = next(line for line in text.splitlines() if "tg4 @ d32" in line and "|     2 |" in line)
    assert f"{weights / 1e6:.0f} + {2 * 34.5 * per_position / 1e6:.1f}" in line


def test_bench_command_with_depth_and_kv_type():
    result = run_edgeinfer("bench", str(model_path(SMOLLM2)), "-p", "4", "-n", "2", "-r", "1", "-t", "1", "-d", "0,8",
                           "--kv-type", "f32", "--no-process", "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)["rows"]
    assert [(r["test"], r["kv_type"]) for r in rows] == [("pp4", "f32"), ("tg2", "f32"), ("pp4 @ d8", "f32"),
                                                         ("tg2 @ d8", "f32")]


def test_the_wall_probe_takes_at_most_an_eighth_of_the_memory_available(monkeypatch):
    """On a small device the read probe's buffer shrinks (a 256 MiB buffer could not be had there)."""
    from types import SimpleNamespace

    import psutil

    from edgeinfer.bench import MemoryWall

    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=80 << 20))
    wall = MemoryWall()
    wall.measure(1)
    assert wall.as_dict()["1"]["buffer_bytes"] == 10 << 20 and wall.gb_per_s(1) > 0
