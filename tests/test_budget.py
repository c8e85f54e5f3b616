"""The budget manager on simulated machines: expectations are worked out from the rules here, by hand.

Machines come through the SystemProbe interface; real models give the footprints (marked slow: they open the GGUF
files), a synthetic footprint covers the rules in the fast suite.
"""
import json
from dataclasses import dataclass, replace

import pytest

from edgeinfer import budget
from edgeinfer.budget import (ModelFootprint, SystemProbe, SystemState, format_plan, make_plan, plan_for_model,
                              power_changed, read_system_state, threads_for_power, usable_memory)
from edgeinfer.errors import BudgetError, InvalidArgument
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, KV_TYPES, KVCache

MB, GB = 1 << 20, 1 << 30
MODELS = ["smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-0.5b-instruct"]


@dataclass
class SimulatedProbe(SystemProbe):
    """A machine made of plain values."""

    total: int
    available: int
    physical: int
    logical: int
    cgroup: tuple = (None, None)  # (limit, usage)
    quota: float | None = None
    battery_state: tuple = (None, None)  # (percent, plugged_in)
    temperature: float | None = None
    rss: int = 0

    def memory(self):
        return self.total, self.available

    def cgroup_memory(self):
        return self.cgroup

    def cpu_counts(self):
        return self.physical, self.logical

    def cpu_quota(self):
        return self.quota

    def cpu_freq_mhz(self):
        return 1800.0

    def battery(self):
        return self.battery_state

    def max_temperature_c(self):
        return self.temperature

    def process_rss(self):
        return self.rss


# A Raspberry Pi 4 with 2 GB running a desktop: about 1.1 GB available, 4 cores, no battery.
PI = SimulatedProbe(total=2 * GB, available=1126 * MB, physical=4, logical=4, temperature=62.0)
# An 8 GB laptop with a browser open, unplugged at 15%.
LAPTOP = SimulatedProbe(total=8 * GB, available=2560 * MB, physical=4, logical=8, battery_state=(15.0, False))
# A 64 GB, 16-core desktop.
DESKTOP = SimulatedProbe(total=64 * GB, available=50 * GB, physical=16, logical=32)
# A container limited to 1 GB (100 MB in use) and 2 CPUs, on a 64 GB 16-core host.
CONTAINER = SimulatedProbe(total=64 * GB, available=50 * GB, physical=16, logical=32, cgroup=(1 * GB, 100 * MB),
                           quota=2.0)

# usable memory by the rule: min(available, limit - usage) - max(10% of total, min(256 MB, total / 8))
USABLE = {
    "pi": 1126 * MB - 256 * MB,  # 10% of 2 GB is 205 MB < the 256 MB floor (= 1/8 of 2 GB, so not scaled down)
    "laptop": 2560 * MB - int(8 * GB * 0.10),
    "desktop": 50 * GB - int(64 * GB * 0.10),
    "container": (1 * GB - 100 * MB) - 128 * MB,  # total is the 1 GB limit: 10% = 102 MB < floor 256 -> 1/8 = 128
}
# threads by the rule: physical cores, one left above four, capped by the quota, halved in saver
THREADS = {"pi": 4, "laptop": 4 // 2, "desktop": 16 - 1, "container": 2}
BATCH = {"pi": 256, "laptop": 128, "desktop": 256, "container": 256}  # the laptop is saver: on battery below 30%
MACHINES = {"pi": PI, "laptop": LAPTOP, "desktop": DESKTOP, "container": CONTAINER}


def expected_ctx(fp: ModelFootprint, usable: int, n_batch: int) -> int | None:
    """The rule by hand: what is left after the fixed parts, in whole 256-position steps of KV cache, capped at
    min(trained, 8192); None (refused) below 512."""
    fixed = fp.weights_bytes + fp.runtime_bytes + fp.tokenizer_bytes + fp.scratch_bytes(n_batch)
    fits = (usable - fixed) // fp.kv_bytes_per_token // 256 * 256
    if fits < 512:
        return None
    return min(fits, fp.trained_context, 8192)


def synthetic(**changes) -> ModelFootprint:
    """A SmolLM2-sized footprint with round numbers: 100 MB weights, 40 KB per position, 150 + 30 MB runtime."""
    fp = ModelFootprint(name="tiny.gguf", weights_bytes=100 * MB, kv_bytes_per_token=40 * 1024, kv_linear=True,
                        trained_context=8192, activation_bytes_per_token=20_000, n_vocab=50_000,
                        tokenizer_bytes=30 * MB, runtime_bytes=150 * MB)
    return replace(fp, **changes)


def state(probe: SystemProbe) -> SystemState:
    return read_system_state(probe)


# ---------------------------------------------------------------- reading the machine

def test_read_system_state_takes_every_value_from_the_probe():
    s = state(LAPTOP)
    assert (s.total_memory, s.available_memory, s.physical_cores, s.logical_cores) == (8 * GB, 2560 * MB, 4, 8)
    assert (s.battery_percent, s.plugged_in, s.on_battery, s.low_battery) == (15.0, False, True, True)
    assert s.cgroup_memory_limit is None and s.max_temperature_c is None and s.cpu_freq_mhz == 1800.0
    c = state(CONTAINER)
    assert (c.cgroup_memory_limit, c.cgroup_memory_usage, c.cpu_quota) == (1 * GB, 100 * MB, 2.0)


def test_a_probe_without_sensors_gives_none_and_still_plans():
    def fail(self):
        raise OSError("no such sensor")

    sensors = ("memory", "cgroup_memory", "cpu_counts", "cpu_quota", "cpu_freq_mhz", "battery", "max_temperature_c",
               "process_rss")
    broken = type("Broken", (SystemProbe,), dict.fromkeys(sensors, fail))()
    s = read_system_state(broken)
    assert s.total_memory is None and s.physical_cores is None and s.battery_percent is None
    assert s.process_rss == 0
    plan = make_plan(synthetic(), s)
    assert plan.n_ctx == 8192 and plan.n_threads == 1 and plan.memory_available_bytes is None
    assert "not checked" in plan.reasons["memory"]


def test_the_real_machine_reads_without_raising():
    s = read_system_state()
    assert s.total_memory and s.available_memory and s.logical_cores


def _cgroup_tree(tmp_path, proc_line, files):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    (tmp_path / "proc_cgroup").write_text(proc_line)
    probe = SystemProbe()
    probe.cgroup_root, probe.proc_cgroup = tmp_path / "cg", tmp_path / "proc_cgroup"
    return probe


def test_cgroup_v2_limit_usage_less_inactive_file_and_cpu_max(tmp_path):
    probe = _cgroup_tree(tmp_path, "0::/app/worker\n", {
        "cg/cgroup.controllers": "cpu memory",
        "cg/app/memory.max": str(2 * GB), "cg/app/memory.current": str(300 * MB), "cg/app/memory.stat": "",
        "cg/app/cpu.max": "max 100000",
        "cg/app/worker/memory.max": "max", "cg/app/worker/memory.current": str(200 * MB),
        "cg/app/worker/memory.stat": f"anon 1\ninactive_file {50 * MB}\n",
        "cg/app/worker/cpu.max": "150000 100000",
    })
    assert probe.cgroup_memory() == (2 * GB, 300 * MB)  # the ancestor's limit binds; "max" is no limit
    assert probe.cpu_quota() == 1.5


def test_cgroup_v1_limit_and_cfs_quota(tmp_path):
    probe = _cgroup_tree(tmp_path, "4:memory:/box\n1:cpu,cpuacct:/box\n0::/\n", {
        "cg/memory/box/memory.limit_in_bytes": str(GB), "cg/memory/box/memory.usage_in_bytes": str(400 * MB),
        "cg/memory/box/memory.stat": f"cache 1\ntotal_inactive_file {100 * MB}\n",
        "cg/memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "cg/cpu,cpuacct/box/cpu.cfs_quota_us": "-1", "cg/cpu,cpuacct/box/cpu.cfs_period_us": "100000",
    })
    assert probe.cgroup_memory() == (GB, 300 * MB)
    assert probe.cpu_quota() is None


# ---------------------------------------------------------------- memory and context, fast (synthetic footprint)

def test_margin_is_ten_percent_with_a_floor_that_shrinks_on_small_boards():
    assert usable_memory(state(DESKTOP))[0] == USABLE["desktop"]
    assert usable_memory(state(PI))[0] == USABLE["pi"]
    assert usable_memory(state(CONTAINER))[0] == USABLE["container"]
    tiny = SimulatedProbe(total=1 * GB, available=800 * MB, physical=4, logical=4)
    assert usable_memory(state(tiny))[0] == 800 * MB - 128 * MB


def test_memory_this_process_already_holds_is_not_counted_twice():
    fp = synthetic()
    plain = make_plan(fp, state(PI))
    holding = make_plan(fp, state(replace(PI, rss=500 * MB)))  # credit capped at runtime + tokenizer
    assert holding.memory_available_bytes - plain.memory_available_bytes == 180 * MB
    assert "already holds" in holding.reasons["memory"]


def test_context_is_the_largest_256_multiple_that_fits():
    fp = synthetic()
    s = state(replace(PI, available=700 * MB))  # usable 444 MB: (444 - 280 - 6.7 scratch) MB / 40 KB = 4026
    plan = make_plan(fp, s)
    assert plan.n_ctx == expected_ctx(fp, 444 * MB, 256) == 3840
    assert plan.n_ctx % 256 == 0 and plan.memory_total_bytes <= plan.memory_available_bytes
    assert "fits in memory" in plan.reasons["n_ctx"]


def test_context_capped_at_trained_and_at_the_default_ceiling():
    assert make_plan(synthetic(trained_context=2048), state(DESKTOP)).n_ctx == 2048
    big = make_plan(synthetic(trained_context=131072), state(DESKTOP))
    assert big.n_ctx == 8192 and "default ceiling" in big.reasons["n_ctx"]
    odd = make_plan(synthetic(trained_context=5000), state(DESKTOP))
    assert odd.n_ctx == 4864  # rounded down to a multiple of 256


def test_explicit_context_wins_when_it_fits_even_past_the_ceiling():
    plan = make_plan(synthetic(trained_context=32768), state(DESKTOP), n_ctx=20000)
    assert plan.n_ctx == 20000 and plan.reasons["n_ctx"].startswith("asked for")


def test_explicit_context_too_large_names_need_and_available():
    fp = synthetic()
    with pytest.raises(BudgetError) as e:
        make_plan(fp, state(PI), n_ctx=32768)
    msg = str(e.value)
    kv_mb = round(32768 * 40 * 1024 / MB)
    assert f"n_ctx=32768 needs {kv_mb} MB of KV cache" in msg
    assert f"{round(USABLE['pi'] / MB)} MB available" in msg and "\n" not in msg


def test_smallest_context_not_fitting_is_refused():
    fp = synthetic()
    s = state(SimulatedProbe(total=1 * GB, available=128 * MB + 300 * MB, physical=4, logical=4))
    with pytest.raises(BudgetError, match=r"smallest context \(512 positions\) needs 20 MB of KV cache.*"
                                          r"300 MB available"):
        make_plan(fp, s)


def test_weights_larger_than_memory_are_refused():
    fp = synthetic(weights_bytes=2 * GB)
    with pytest.raises(BudgetError, match=r"the model alone needs \d+ MB \(weights 2048 MB.*870 MB available"):
        make_plan(fp, state(PI))
    with pytest.raises(BudgetError, match="weights 2048 MB"):
        make_plan(fp, state(PI), n_ctx=512)


def test_tight_memory_shrinks_the_prefill_batch():
    fp = synthetic(activation_bytes_per_token=1 * MB)  # 256 MB of scratch at n_batch 256
    fixed = 280 * MB + fp.scratch_bytes(64) + fp.kv_bytes(512)  # fits with n_batch 64, not with 128
    s = state(SimulatedProbe(total=4 * GB, available=fixed + 410 * MB, physical=4, logical=4))
    plan = make_plan(fp, s)
    assert (plan.n_batch, plan.n_ctx) == (64, 512) and "memory is tight" in plan.reasons["n_batch"]


def test_the_search_follows_a_kv_cache_that_is_not_linear(monkeypatch):
    """When local layers get ring buffers, KVCache.nbytes_for stops being linear; the plan must still follow it."""
    from edgeinfer.arch.decoder import DecoderConfig

    cfg = DecoderConfig(arch="llama", n_layers=2, d_model=64, n_heads=2, n_kv_heads=1, head_dim=32, value_dim=32,
                        d_ff=128, n_vocab=1000, context_length=8192, norm_eps=1e-6, rope_base=1e4, rope_dims=32,
                        rope_style=0)
    monkeypatch.setattr(budget.KVCache, "nbytes_for",
                        staticmethod(lambda c, n, n_seq=1, kv_type="f32": n_seq * min(n, 1024) * MB))
    fp = replace(synthetic(), config=cfg, kv_bytes_per_token=MB, kv_linear=False)
    assert fp.kv_bytes(8192) == 1024 * MB
    plugged = state(replace(LAPTOP, battery_state=(None, None)))  # usable 1741 MB
    assert make_plan(fp, plugged).n_ctx == 8192  # a linear estimate would stop at 1280


# ---------------------------------------------------------------- threads and power

def test_threads_by_machine_and_power_mode():
    assert make_plan(synthetic(), state(PI)).n_threads == THREADS["pi"]
    assert make_plan(synthetic(), state(DESKTOP)).n_threads == 15
    assert make_plan(synthetic(), state(DESKTOP), power="performance").n_threads == 16
    saver = make_plan(synthetic(), state(DESKTOP), power="saver")
    assert (saver.n_threads, saver.n_batch, saver.power_mode) == (7, 128, "saver")
    assert make_plan(synthetic(), state(CONTAINER), power="performance").n_threads == 2  # the quota still caps
    assert make_plan(synthetic(), state(DESKTOP), n_threads=3).n_threads == 3
    single = SimulatedProbe(total=GB, available=GB // 2, physical=1, logical=1)
    assert make_plan(synthetic(), state(single), power="saver").n_threads == 1


def test_auto_power_follows_the_battery():
    low = make_plan(synthetic(), state(LAPTOP))
    assert (low.power_mode, low.n_threads, low.n_batch) == ("saver", 2, 128)
    assert "15%" in low.reasons["power"]
    charged = make_plan(synthetic(), state(replace(LAPTOP, battery_state=(80.0, False))))
    assert (charged.power_mode, charged.n_threads) == ("balanced", 4)
    plugged = make_plan(synthetic(), state(replace(LAPTOP, battery_state=(15.0, True))))
    assert (plugged.power_mode, plugged.n_threads) == ("balanced", 4)


def test_a_hot_cpu_backs_off_one_thread():
    hot = make_plan(synthetic(), state(replace(DESKTOP, temperature=90.0)))
    assert hot.n_threads == 14 and "90 C" in hot.reasons["n_threads"]
    assert make_plan(synthetic(), state(replace(DESKTOP, temperature=84.0))).n_threads == 15


def test_power_flip_between_turns():
    unplugged, plugged = state(LAPTOP), state(replace(LAPTOP, battery_state=(15.0, True)))
    assert power_changed(unplugged, plugged) and power_changed(plugged, unplugged)
    assert not power_changed(unplugged, state(replace(LAPTOP, battery_state=(14.0, False))))
    assert power_changed(state(replace(LAPTOP, battery_state=(31.0, False))), unplugged)  # crossed 30%
    assert not power_changed(state(DESKTOP), state(replace(DESKTOP, temperature=95.0)))
    assert threads_for_power(unplugged) == 2 and threads_for_power(plugged) == 4
    assert threads_for_power(unplugged, n_threads=3) == 3
    assert threads_for_power(plugged, power="saver") == 2


# ---------------------------------------------------------------- output

def test_json_and_text():
    plan = make_plan(synthetic(), state(PI))
    data = json.loads(json.dumps(plan.to_json()))
    assert {"n_ctx", "n_threads", "memory_total_bytes", "n_batch", "power_mode", "memory", "reasons"} <= set(data)
    assert set(data["memory"]) >= {"weights", "kv_cache", "scratch", "runtime"}
    assert data["memory_total_bytes"] == sum(data["memory"].values())
    text = format_plan(plan)
    assert "plan for tiny.gguf" in text and "kv_cache" in text and " MB" in text
    for reason in plan.reasons.values():
        assert reason in text


# ---------------------------------------------------------------- the three real models

@pytest.fixture(scope="module")
def footprints():
    from conftest import model_path
    from edgeinfer.arch import load_decoder
    from edgeinfer.gguf_reader import GGUFFile

    out = {}
    for name in MODELS:
        with GGUFFile(model_path(name)) as gguf:
            out[name] = ModelFootprint.from_gguf(gguf, load_decoder(gguf)[0])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("machine", list(MACHINES))
@pytest.mark.parametrize("name", MODELS)
def test_real_models_on_simulated_machines(footprints, name, machine):
    fp = footprints[name]
    expected = expected_ctx(fp, USABLE[machine], BATCH[machine])
    if expected is None:
        with pytest.raises(BudgetError, match="MB available"):
            make_plan(fp, state(MACHINES[machine]))
        return
    plan = make_plan(fp, state(MACHINES[machine]))
    assert (plan.n_ctx, plan.n_threads, plan.n_batch) == (expected, THREADS[machine], BATCH[machine])
    assert plan.memory_total_bytes <= plan.memory_available_bytes


@pytest.mark.slow
def test_real_models_what_each_machine_runs(footprints):
    """The outcomes in words, as a check on the hand rule itself."""
    smol, gemma, qwen = (footprints[n] for n in MODELS)
    assert make_plan(smol, state(PI)).n_ctx == 8192  # a 2 GB board runs SmolLM2 with its full context
    assert make_plan(qwen, state(PI), kv_type="f32").n_ctx < 8192  # ... and Qwen with what is left in f32,
    assert make_plan(qwen, state(PI), kv_type="f16").n_ctx == 8192  # its full context in f16 (the default)
    for fp in (smol, gemma, qwen):
        assert make_plan(fp, state(DESKTOP)).n_ctx == 8192
    tiny_board = SimulatedProbe(total=1 * GB, available=600 * MB, physical=4, logical=4)
    with pytest.raises(BudgetError, match="the model alone needs"):
        make_plan(qwen, state(tiny_board))


@pytest.mark.slow
def test_container_refuses_32k_qwen_but_plans_a_context_that_fits(footprints):
    qwen = footprints["qwen2.5-coder-0.5b-instruct"]
    with pytest.raises(BudgetError) as e:
        make_plan(qwen, state(CONTAINER), n_ctx=32768)
    need_kv = round(qwen.kv_bytes(32768) / MB)
    assert f"n_ctx=32768 needs {need_kv} MB of KV cache" in str(e.value)
    assert f"{round(USABLE['container'] / MB)} MB available" in str(e.value)
    plan = make_plan(qwen, state(CONTAINER))
    assert 512 <= plan.n_ctx < 32768 and plan.memory_total_bytes <= USABLE["container"]
    assert f"(n_ctx={plan.n_ctx} would fit)" in str(e.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_kv_bytes_match_the_cache_the_engine_allocates(footprints, name):
    from conftest import model_path
    from edgeinfer.arch import load_decoder
    from edgeinfer.backends.cpu import CPUBackend
    from edgeinfer.engine import Engine
    from edgeinfer.gguf_reader import GGUFFile

    fp = footprints[name]
    assert fp.kv_linear
    with GGUFFile(model_path(name)) as gguf:
        cfg, weights = load_decoder(gguf)
        weights = CPUBackend().prepare(cfg, weights, gguf.path)
        engine = Engine(cfg, weights, n_ctx=256)
        assert engine.cache.nbytes == fp.kv_bytes_per_token * 256 == fp.kv_bytes(256)
        del engine, weights


@pytest.mark.slow
def test_plan_for_model_reads_metadata_only(monkeypatch):
    from conftest import model_path

    def no_cache(*args, **kwargs):
        raise AssertionError("planning allocated a KV cache")

    monkeypatch.setattr(budget.KVCache, "__init__", no_cache)
    plan = plan_for_model(model_path("smollm2-135m-instruct"), state=state(DESKTOP))
    assert (plan.n_ctx, plan.n_threads, plan.model) == (8192, 15, "SmolLM2-135M-Instruct.Q4_1.gguf")


def test_a_cache_of_several_sequences_is_planned_with_all_of_them():
    fp = synthetic()
    one = make_plan(fp, state(DESKTOP), n_ctx=2048)
    four = make_plan(fp, state(DESKTOP), n_ctx=2048, n_seq=4)
    assert (one.n_seq, four.n_seq) == (1, 4)
    assert four.memory["kv_cache"] == 4 * one.memory["kv_cache"] == 4 * fp.kv_bytes(2048)


# ---------------------------------------------------------------- KV-cache types

def test_each_kv_type_plans_its_own_bytes():
    fp = synthetic(kv_type="f32")  # 40 KB per position in f32
    for kv_type in KV_TYPES:
        plan = make_plan(fp, state(DESKTOP), n_ctx=2048, kv_type=kv_type)
        per_value = KV_TYPES[kv_type][1]
        assert plan.kv_type == kv_type
        assert plan.kv_bytes_per_position == 40 * 1024 * per_value / 4
        assert plan.memory["kv_cache"] == 2048 * 40 * 1024 * per_value / 4
        assert plan.kv_fraction_of_f32 == per_value / 4
        assert plan.reasons["kv_type"].startswith("asked for")
    f16 = make_plan(fp, state(DESKTOP), n_ctx=2048, kv_type="f16")
    assert "50% of f32's bytes (40 MB against 80 MB in f32)" in f16.reasons["kv_type"]


def test_q8_0_cache_is_at_most_30_percent_of_f32_and_the_plan_says_so():
    plan = make_plan(synthetic(kv_type="f32"), state(DESKTOP), n_ctx=8192, kv_type="q8_0")
    assert plan.kv_fraction_of_f32 == 1.125 / 4 <= 0.30  # int8 values + a float32 scale per 32 = 28%
    assert "28% of f32's bytes (90 MB against 320 MB in f32)" in plan.reasons["kv_type"]
    text = format_plan(plan)
    assert "kv cache   q8_0" in text and "28% of f32's bytes" in text
    data = json.loads(json.dumps(plan.to_json()))
    assert (data["kv_type"], data["kv_fraction_of_f32"]) == ("q8_0", 0.28125)
    assert data["memory"]["kv_cache"] == 8192 * 40 * 1024 * 1.125 / 4 == data["kv_bytes_per_position"] * 8192


def test_without_kv_type_the_plan_takes_the_default_and_says_why():
    plan = make_plan(synthetic(), state(DESKTOP))
    assert plan.kv_type == DEFAULT_KV_TYPE
    assert plan.reasons["kv_type"].startswith(f"the default ({budget.DEFAULT_KV_TYPE_WHY[DEFAULT_KV_TYPE]})")
    asked = make_plan(synthetic(), state(DESKTOP), kv_type=DEFAULT_KV_TYPE)
    assert asked.kv_type == DEFAULT_KV_TYPE and asked.reasons["kv_type"].startswith("asked for")
    assert asked.memory == plan.memory


def test_a_compact_cache_affords_a_longer_context():
    fp = synthetic(kv_type="f32")
    s = state(replace(PI, available=700 * MB))  # usable 444 MB: 3840 positions in f32 (see above)
    for kv_type in KV_TYPES:
        plan = make_plan(fp, s, kv_type=kv_type)
        assert plan.n_ctx == expected_ctx(fp.with_kv_type(kv_type), 444 * MB, 256)
        assert f"KB of {kv_type} KV cache per position" in plan.reasons["n_ctx"]
    assert [make_plan(fp, s, kv_type=t).n_ctx for t in ("f32", "f16", "q8_0")] == [3840, 7936, 8192]  # 157 MB / 20 KB


def test_a_bad_kv_type_is_refused_naming_it():
    with pytest.raises(InvalidArgument, match=r"kv_type='q4_0': expected one of f32, f16, q8_0"):
        make_plan(synthetic(), state(DESKTOP), kv_type="q4_0")
    from edgeinfer.arch.decoder import DecoderConfig

    cfg = DecoderConfig(arch="llama", n_layers=2, d_model=96, n_heads=2, n_kv_heads=1, head_dim=48, value_dim=48,
                        d_ff=128, n_vocab=1000, context_length=8192, norm_eps=1e-6, rope_base=1e4, rope_dims=48,
                        rope_style=0)
    fp = replace(synthetic(), config=cfg, kv_type="f32")
    with pytest.raises(InvalidArgument, match=r"kv_type='q8_0' needs head sizes that are multiples of 32"):
        make_plan(fp, state(DESKTOP), kv_type="q8_0")
    assert make_plan(fp, state(DESKTOP), kv_type="f16").memory["kv_cache"] == KVCache.nbytes_for(
        cfg, 8192, kv_type="f16")


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_real_models_plan_the_bytes_each_kv_type_allocates(footprints, name):
    fp = footprints[name]
    f32 = make_plan(fp, state(DESKTOP), n_ctx=512, kv_type="f32").memory["kv_cache"]
    for kv_type in KV_TYPES:
        plan = make_plan(fp, state(DESKTOP), n_ctx=512, kv_type=kv_type, n_seq=2)
        allocated = KVCache(fp.config, 512, 2, kv_type).nbytes  # the cache alone: no weights needed
        assert plan.memory["kv_cache"] == allocated == 2 * f32 * plan.kv_fraction_of_f32
        assert plan.kv_bytes_per_position * 512 * 2 == allocated
