"""`edgeinfer frontier`: the grid's arguments, energy meters on made-up sysfs trees, the variant cache, a Ctrl-C
that keeps what was measured, and a miniature run end to end (tiny model, 2 variants: JSON, CSV and PNG)."""
import csv
import io
import json
import struct
from pathlib import Path

import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from edgeinfer.errors import InvalidArgument
from edgeinfer.frontier import energy
from edgeinfer.frontier.measure import MeasureSettings
from edgeinfer.frontier.run import FrontierSpec, Progress, run_frontier
from edgeinfer.frontier.variants import (VariantCache, WeightVariant, cached_variant_dirs, parse_kv_types,
                                         parse_prunes, parse_types, variant_grid)
from tiny_gguf import write_tiny_llama

TINY_RUN = ["--types", "F16,Q8_0", "-t", "1", "--ctx", "128", "-p", "32", "-n", "8", "-r", "1", "--ttft-tokens", "32",
            "--ppl-ctx", "64", "--chunks", "2"]
TINY_SETTINGS = MeasureSettings(n_ctx=128, prompt_tokens=32, gen_tokens=8, reps=1, ttft_tokens=32, ppl_ctx=64,
                                chunks=2, text=(Path(__file__).parents[1] / "edgeinfer/frontier/default_text.txt")
                                .read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("frontier") / "tiny.gguf")


# ---------------------------------------------------------------- arguments and the grid


def test_grid_arguments_parse_and_refuse_by_name():
    assert parse_types("f16, q8_0,F16") == ("F16", "Q8_0")
    assert parse_prunes("0,0.1,0.1") == (0.0, 0.1)
    assert parse_kv_types("f16,q8_0") == ("f16", "q8_0")
    grid = variant_grid(("F16", "Q4_0"), (0.0, 0.2), ("f16",), (1, 2))
    assert len(grid) == 8 and grid[-1].label == "Q4_0-prune0.2/f16/t2"
    for call, text, fragment in ((parse_types, "Q3_XL", "unknown type 'Q3_XL'"), (parse_types, "F16,", "--types"),
                                 (parse_prunes, "1.5", "out of range"), (parse_prunes, "nan", "out of range"),
                                 (parse_prunes, "x", "not a number"), (parse_kv_types, "q4", "unknown KV")):
        with pytest.raises(InvalidArgument, match=fragment):
            call(text)


@pytest.mark.parametrize("args, fragments", [
    (["--types", "F16,Q3_XL"], ["--types", "Q3_XL"]),
    (["--prune", "0,1.2"], ["--prune", "out of range"]),
    (["--max-memory", "6XB"], ["--max-memory", "6XB"]),
    (["--kv-types", "f8"], ["--kv-types", "f8"]),
    (["--plot", "frontier.jpg"], ["--plot", ".png or .svg"]),
    (["--ttft-tokens", "600", "--ctx", "512"], ["--ttft-tokens"]),
    (["--text", "/nonexistent/text.txt"], ["--text", "cannot read"]),
])
def test_cli_refuses_bad_arguments_in_one_line_before_any_work(tiny, args, fragments):
    assert_one_error_line(run_edgeinfer("frontier", str(tiny), *args), *fragments)


def test_cli_refuses_a_missing_source(tmp_path):
    assert_one_error_line(run_edgeinfer("frontier", str(tmp_path / "none.gguf")), "none.gguf")


# ---------------------------------------------------------------- energy


def _write(path: Path, text) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(text))


def test_rapl_sums_packages_ignores_subzones_and_handles_a_wrap(tmp_path):
    _write(tmp_path / "intel-rapl:0/energy_uj", 1_000_000)
    _write(tmp_path / "intel-rapl:0/max_energy_range_uj", 10_000_000)
    _write(tmp_path / "intel-rapl:0:0/energy_uj", 5)  # a core subzone: part of package 0, not counted again
    _write(tmp_path / "intel-rapl:1/energy_uj", 0)
    meter = energy.RaplMeter(tmp_path)
    assert [z.name for z in meter.zones] == ["intel-rapl:0", "intel-rapl:1"]
    start = meter.start()
    _write(tmp_path / "intel-rapl:0/energy_uj", 500_000)  # wrapped: 10 J range, 9.5 J used
    _write(tmp_path / "intel-rapl:1/energy_uj", 2_000_000)
    assert meter.joules(start) == pytest.approx(9.5 + 2.0)
    assert isinstance(energy.pick_meter(10, powercap=tmp_path, power_supply=tmp_path / "none"), energy.RaplMeter)


def test_battery_counts_only_while_discharging(tmp_path, monkeypatch):
    _write(tmp_path / "BAT0/status", "Discharging")
    _write(tmp_path / "BAT0/current_now", 1_000_000)  # 1 A
    _write(tmp_path / "BAT0/voltage_now", 12_000_000)  # at 12 V: 12 W
    _write(tmp_path / "BAT1/status", "Charging")
    _write(tmp_path / "BAT1/power_now", 50_000_000)
    meter = energy.BatteryMeter(tmp_path)
    assert [b.name for b in meter.batteries] == ["BAT0"]
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(energy.time, "perf_counter", lambda: next(clock))
    start = meter.start()
    assert meter.joules(start) == pytest.approx(24.0)  # 12 W for 2 s
    _write(tmp_path / "BAT0/status", "Full")
    assert not energy.BatteryMeter(tmp_path).available


def test_estimate_is_cpu_time_times_watts_and_is_the_fallback(tmp_path):
    seconds = iter([3.0, 4.5])
    meter = energy.CpuTimeEstimate(watts=8, cpu_seconds=lambda: next(seconds))
    assert meter.joules(meter.start()) == pytest.approx(12.0) and meter.source == "estimated"
    chosen = energy.pick_meter(7, powercap=tmp_path / "no", power_supply=tmp_path / "no")
    assert isinstance(chosen, energy.CpuTimeEstimate) and chosen.watts == 7
    assert energy.cost_per_1k_tokens(3600, 0.5) == pytest.approx(0.5)  # 3.6 MJ per 1K tokens = 1 kWh
    assert energy.cost_per_1k_tokens(None, 0.5) is None


# ---------------------------------------------------------------- the variant cache


def test_variants_are_made_once_reused_and_pruned_when_the_source_goes(tiny, tmp_path, monkeypatch):
    import tools.convert

    source = tmp_path / "source.gguf"
    source.write_bytes(tiny.read_bytes())
    cache = VariantCache(source)
    made = cache.make(WeightVariant("Q8_0"))
    assert made == cache.directory / "Q8_0" / "model.gguf" and made.is_file()
    assert cache.directory.parent.name == "frontier" and cache.directory.name == cache.digest
    monkeypatch.setattr(tools.convert, "convert", lambda *a, **k: pytest.fail("converted again"))
    assert VariantCache(source).make(WeightVariant("Q8_0")) == made  # same bytes, same digest: reused
    assert dict(cached_variant_dirs())[cache.directory] == ""
    source.unlink()
    assert "which is gone" in dict(cached_variant_dirs())[cache.directory]
    result = run_edgeinfer("prune", "--dry-run")
    assert f"would remove {cache.directory}" in result.stdout and "which is gone" in result.stdout


# ---------------------------------------------------------------- interruption and the miniature run


class InterruptSecondGroup(Progress):
    def __init__(self):
        self.groups = []

    def step(self, variant, text):
        if "/" in variant and variant not in self.groups:
            self.groups.append(variant)
            if len(self.groups) == 2:
                raise KeyboardInterrupt


@pytest.mark.slow
def test_ctrl_c_keeps_what_was_measured(tiny):
    result = run_frontier(FrontierSpec(str(tiny), ("F16", "Q8_0"), (0.0,), ("f16",), (1,), TINY_SETTINGS),
                          InterruptSecondGroup())
    assert result["interrupted"] and result["not_measured"] == ["Q8_0/f16/t1"]
    (row,) = result["variants"]
    assert row["label"] == "F16/f16/t1" and row["decode_tok_s"] > 0 and row["kl"] is not None and row["pareto"]


@pytest.fixture(scope="module")
def mini_run(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier-out")
    result = run_edgeinfer("frontier", str(tiny), *TINY_RUN, "--json", str(out / "f.json"), "--csv",
                           str(out / "f.csv"), "--plot", str(out / "f.png"), "--max-kl", "1", "--price-kwh", "0.3")
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.mark.slow
def test_miniature_frontier_writes_json_csv_and_png(mini_run, tiny):
    out, result = mini_run
    data = json.loads((out / "f.json").read_text())
    assert data["source"] == str(tiny.resolve()) and data["reference"] == "F16" and not data["interrupted"]
    rows = {r["label"]: r for r in data["variants"]}
    assert set(rows) == {"F16/f16/t1", "Q8_0/f16/t1"} and data["not_measured"] == []
    for r in rows.values():
        assert r["error"] is None and r["file_bytes"] > 0 and r["peak_rss_bytes"] > r["kv_cache_bytes"] > 0
        assert r["prefill_tok_s"] > 0 and r["decode_tok_s"] > 0 and r["ttft_s"] > 0 and r["ppl"] > 0
        assert 0 <= r["kl"] < 0.1 and 0 <= r["top1"] <= 1 and r["energy_source"] == "estimated"
        assert r["cost_per_1k_tokens"] is not None and isinstance(r["pareto"], bool)
    assert rows["F16/f16/t1"]["file_bytes"] > rows["Q8_0/f16/t1"]["file_bytes"]
    assert any(r["pareto"] for r in rows.values())
    assert data["choice"]["best"] in rows and data["choice"]["commands"][0].startswith("edgeinfer run ")
    table = list(csv.DictReader(io.StringIO((out / "f.csv").read_text())))
    assert [r["label"] for r in table] == [r["label"] for r in data["variants"]]
    assert float(table[0]["decode_tok_s"]) == pytest.approx(data["variants"][0]["decode_tok_s"])
    png = (out / "f.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert (width, height) == (1080, 720)  # 9 x 6 inches at 120 dpi
    assert "F16/f16/t1" in result.stdout and "best:" in result.stdout and "edgeinfer serve" in result.stdout


@pytest.mark.slow
def test_a_stored_frontier_picks_what_plan_and_load_run(mini_run, tiny, tmp_path):
    """Item 4: `plan MODEL --frontier FILE.json` and `load(MODEL, frontier=FILE)` take the stored variant that fits
    this machine (the tiny variants all fit: the best quality, F16, under the default power state), with its KV type
    and threads; a frontier of another model is refused by name."""
    import edgeinfer
    from edgeinfer.frontier.choose import frontier_variant_of

    out, _ = mini_run
    stored = out / "f.json"
    path, kv_type, n_threads, why = frontier_variant_of(tiny, stored, "performance", None, None)
    assert "F16" in Path(path).parent.name and kv_type == "f16" and n_threads == 1 and "frontier variant" in why
    plan = run_edgeinfer("plan", str(tiny), "--frontier", str(stored), "--power", "performance", "--json")
    assert plan.returncode == 0, plan.stderr
    summary = json.loads(plan.stdout)
    assert summary["frontier"]["path"] == path and summary["kv_type"] == "f16"
    with edgeinfer.load(tiny, frontier=stored, power="performance", n_ctx=64) as model:
        assert str(model.gguf.path) == path and model.frontier_choice.split(":")[0] == why.split(":")[0]
        assert model.plan.kv_type == "f16" and model.engine.n_threads == 1
    other = tmp_path / "other.gguf"
    write_tiny_llama(other)
    with pytest.raises(InvalidArgument, match="measured on tiny.gguf"):
        edgeinfer.load(other, frontier=stored)
    assert_one_error_line(run_edgeinfer("plan", str(other), "--frontier", str(stored)), "measured on tiny.gguf")


def test_a_childs_peak_rss_is_its_own_not_its_parents():
    """getrusage's ru_maxrss survives fork + exec on Linux: every measuring child reported the 1.3 GB its parent
    had reached converting variants. The child's figure must not hold the parent's peak."""
    import resource
    import subprocess
    import sys

    import numpy as np

    held = np.ones(400 << 20, np.uint8)  # the parent's peak: at least 400 MB (pages touched)
    parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    code = "from edgeinfer.frontier.measure import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    del held
    assert 0 < child_peak < parent_peak - (300 << 20)
