"""The budget manager: how much context and how many threads this machine can give a model, decided before loading.

Sections, top to bottom: the machine (`SystemState`, read through a replaceable `SystemProbe`); the model's cost
(`ModelFootprint`: weights, KV cache per position, scratch, runtime); the plan (`make_plan` applies the rules and
says why for each number; `BudgetError` when nothing fits); the chat's mid-session power adaptation; output and the
entry points (`plan_on_device` chooses the device, edgeinfer.backends.devices, then plans: on a GPU the weights, KV
cache and scratch must fit its free memory, the runtime and tokenizer the host's).
Nothing here allocates a KV cache: `KVCache.nbytes_for` says what the engine will allocate, so the plan follows it.
Memory figures in messages are MB of 2**20 bytes, as `free -m` and `top` show them.
"""
from __future__ import annotations

import os
import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from edgeinfer.arch import load_decoder
from edgeinfer.arch.decoder import DecoderConfig, DecoderWeights
from edgeinfer.backends.devices import DeviceChoice, check_device, choose_device, cuda_weight_bytes, gpu_margin
from edgeinfer.engine import KVCache
from edgeinfer.errors import BudgetError
from edgeinfer.kv_cache import DEFAULT_KV_TYPE, KV_TYPES, check_kv_type
from edgeinfer.gguf_reader import GGUFFile

__all__ = ["BudgetError", "ModelFootprint", "Plan", "SystemProbe", "SystemState", "format_plan", "make_plan",
           "plan_for_model", "plan_on_device", "power_changed", "read_system_state", "resolve_power", "threads_for_power",
           "usable_memory"]

MB = 1 << 20
POWER_MODES = ("saver", "balanced", "performance")
LOW_BATTERY_PERCENT = 30  # auto mode on battery below this: saver
HOT_CELSIUS = 85  # at or above: one thread fewer (most laptop CPUs throttle from 90-100 C)
MARGIN_FRACTION = 0.10  # of the memory this process may use: room for other programs' growth and our estimate's error
MARGIN_FLOOR = 256 * MB  # ... but at least this much,
MARGIN_FLOOR_SHARE = 8  # ... unless that exceeds 1/8 of the memory: a 1 GB board keeps 128 MB, not a quarter
CTX_STEP = 256  # a chosen context is a multiple of this (the prefill batch)
CTX_MIN = 512  # below this a chat turn with its template barely fits; refuse rather than plan a useless context
# Default context ceiling: 8192 holds a long chat (~6,000 words) yet costs at most a few hundred MB of KV cache
# for these models. A 32k context costs 4x that memory, and filling it means a prefill of minutes on a CPU.
CTX_CEILING = 8192
N_BATCH = 256  # prefill positions per batch
N_BATCH_SAVER = 128
N_BATCH_MIN = 32
# Why the default KV-cache type is the default (the plan's reason when kv_type is not asked for).
DEFAULT_KV_TYPE_WHY = {
    "f16": "half of f32's bytes at f32's parity with llama.cpp on every model; q8_0 is smaller still but loses "
           "accuracy on models whose keys have large channel offsets (Qwen2.5)",
}


# ================================================================ the machine

@dataclass(frozen=True)
class SystemState:
    """What the machine offers right now. Bytes, cores, MHz, percent, Celsius; None where the platform cannot say."""

    total_memory: int | None
    available_memory: int | None
    cgroup_memory_limit: int | None = None  # the binding limit of this process's cgroup (or an ancestor's)
    cgroup_memory_usage: int | None = None  # that cgroup's usage, less the page cache the kernel can drop
    physical_cores: int | None = None
    logical_cores: int | None = None  # the ones this process may run on (CPU affinity)
    cpu_quota: float | None = None  # cgroup CPU quota in cores (cpu.max / cfs_quota_us), None when unlimited
    cpu_freq_mhz: float | None = None
    battery_percent: float | None = None
    plugged_in: bool | None = None  # None: no battery
    max_temperature_c: float | None = None
    process_rss: int = 0  # what the planning process already holds (counted in "used" already)

    @property
    def on_battery(self) -> bool:
        return self.plugged_in is False

    @property
    def low_battery(self) -> bool:
        return self.on_battery and self.battery_percent is not None and self.battery_percent < LOW_BATTERY_PERCENT

    @property
    def hot(self) -> bool:
        return self.max_temperature_c is not None and self.max_temperature_c >= HOT_CELSIUS


_UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as PAGE_COUNTER_MAX (9223372036854771712)


class SystemProbe:
    """Reads the real machine: one method per sensor, plain values out. Tests replace it with a simulated machine.

    Methods may raise or return None; `read_system_state` turns any failure into None."""

    cgroup_root = Path("/sys/fs/cgroup")
    proc_cgroup = Path("/proc/self/cgroup")  # lines "id:controllers:path"; controllers "" for cgroup v2

    def memory(self) -> tuple[int, int]:
        """(total, available) bytes of RAM."""
        import psutil

        vm = psutil.virtual_memory()
        return int(vm.total), int(vm.available)

    def cgroup_memory(self) -> tuple[int | None, int | None]:
        """(limit, usage) bytes of the tightest memory limit among this process's cgroup and its ancestors."""
        best = (None, None)
        for d in self._cgroup_dirs("memory"):
            if (d / "memory.max").exists():  # v2
                limit, usage = _read_limit(d / "memory.max"), _read_int(d / "memory.current")
                stat_key = "inactive_file"
            else:  # v1
                limit, usage = _read_limit(d / "memory.limit_in_bytes"), _read_int(d / "memory.usage_in_bytes")
                stat_key = "total_inactive_file"
            if limit is None:
                continue
            usage = max(0, (usage or 0) - _read_stat(d / "memory.stat", stat_key))
            if best[0] is None or limit - usage < best[0] - best[1]:
                best = (limit, usage)
        return best

    def cpu_counts(self) -> tuple[int | None, int | None]:
        """(physical, logical) cores this process may use."""
        import psutil

        logical = psutil.cpu_count(logical=True)
        if hasattr(os, "sched_getaffinity"):
            logical = len(os.sched_getaffinity(0))
        physical = psutil.cpu_count(logical=False)
        if physical and logical:
            physical = min(physical, logical)
        return physical, logical

    def cpu_quota(self) -> float | None:
        """The tightest cgroup CPU quota in cores (cgroup v2 cpu.max, v1 cpu.cfs_quota_us); None if unlimited."""
        quotas = []
        for d in self._cgroup_dirs("cpu"):
            if (d / "cpu.max").exists():
                quota, _, period = (d / "cpu.max").read_text().partition(" ")
            elif (d / "cpu.cfs_quota_us").exists():
                quota, period = (d / "cpu.cfs_quota_us").read_text(), (d / "cpu.cfs_period_us").read_text()
            else:
                continue
            if quota.strip() not in ("max", "-1") and int(period) > 0:
                quotas.append(int(quota) / int(period))
        return min(quotas) if quotas else None

    def cpu_freq_mhz(self) -> float | None:
        import psutil

        freq = psutil.cpu_freq()
        return float(freq.current) if freq and freq.current else None

    def battery(self) -> tuple[float | None, bool | None]:
        """(percent, plugged_in); (None, None) without a battery."""
        import psutil

        b = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
        if b is None:
            return None, None
        return float(b.percent), (None if b.power_plugged is None else bool(b.power_plugged))

    def max_temperature_c(self) -> float | None:
        import psutil

        if not hasattr(psutil, "sensors_temperatures"):
            return None
        temps = [t.current for sensors in psutil.sensors_temperatures().values() for t in sensors
                 if t.current is not None and 0 < t.current < 150]  # drop unwired sensors reading 0 or 255
        return max(temps) if temps else None

    def process_rss(self) -> int | None:
        import psutil

        return int(psutil.Process().memory_info().rss)

    def _cgroup_dirs(self, controller: str) -> list[Path]:
        """This process's cgroup directory for `controller` and its ancestors, leaf first (v2 or v1 layout)."""
        try:
            lines = self.proc_cgroup.read_text().splitlines()
        except OSError:
            return []
        for line in lines:
            _, controllers, rel = line.split(":", 2)
            if controllers == "" and (self.cgroup_root / "cgroup.controllers").exists():
                base = self.cgroup_root  # v2 unified hierarchy
            elif controller in controllers.split(","):
                base = self.cgroup_root / controllers
            else:
                continue
            leaf = base / rel.lstrip("/")
            if not leaf.is_dir():  # in a cgroup namespace the path may not resolve: the mount root is ours
                leaf = base
            return [leaf, *[p for p in leaf.parents if p.is_relative_to(base)]]
        return []


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _read_limit(path: Path) -> int | None:
    value = _read_int(path)  # "max" reads as None
    return value if value is not None and value < _UNLIMITED else None


def _read_stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _safe(read: Callable, default=None):
    try:
        value = read()
    except Exception:  # a missing sensor, a permission error, a platform psutil does not cover: all "unknown"
        return default
    return default if value is None else value


def read_system_state(probe: SystemProbe | None = None) -> SystemState:
    """The machine's state through `probe` (the real machine by default); never raises, unknowns are None."""
    probe = probe or SystemProbe()
    total, available = _safe(probe.memory, (None, None))
    limit, usage = _safe(probe.cgroup_memory, (None, None))
    physical, logical = _safe(probe.cpu_counts, (None, None))
    percent, plugged = _safe(probe.battery, (None, None))
    return SystemState(
        total_memory=total, available_memory=available if available is not None else total,
        cgroup_memory_limit=limit, cgroup_memory_usage=usage, physical_cores=physical, logical_cores=logical,
        cpu_quota=_safe(probe.cpu_quota), cpu_freq_mhz=_safe(probe.cpu_freq_mhz), battery_percent=percent,
        plugged_in=plugged if percent is not None else None, max_temperature_c=_safe(probe.max_temperature_c),
        process_rss=_safe(probe.process_rss, 0))


# ================================================================ the model's cost

# The runtime: Python, numpy, numba, llvmlite and the compiled kernels loaded from numba's on-disk cache. Measured
# as peak RSS (VmHWM) of a process that loaded each model with n_ctx=1024 and generated 4 tokens after prompts of
# 2 and 290 tokens, less the GGUF's resident pages (from /proc/self/smaps), the KV cache, the tokenizer (below)
# and the planned scratch: 168-182, 164-174, 147-155 MB for SmolLM2, Gemma 3, Qwen2.5 (2 threads, Python 3.11,
# numba 0.68, compiled decode step). About 100 MB of it is shared libraries (libllvmlite, numpy), the rest heap.
# Not planned for: a run that compiles the kernels (first run, or after a kernel changed) peaks up to ~280 MB
# higher, once (SmolLM2 at n_ctx 8192: 944 MB against 670 MB warm).
RUNTIME_BYTES = 170 * MB
# The tokenizer's Python tables (token strings, the id dict, BPE merge ranks), measured as the growth of anonymous
# memory while GGUFFile parsed the metadata and Tokenizer.from_metadata built them: SmolLM2 (49,152 tokens, 48,900
# merges) 33 MB, Gemma 3 (262,144 tokens, no merges) 103 MB, Qwen2.5 (151,936 tokens, 151,387 merges) 96 MB.
# Per token 410 bytes and per merge 260 bytes match the three within 6%.
TOKENIZER_BYTES_PER_TOKEN = 410
TOKENIZER_BYTES_PER_MERGE = 260
# Per vocabulary entry at each step: the logits (float32, prefill's and decode's) and the sampler's working arrays
# (ids int64, a penalized copy, argpartition indices, masks).
LOGITS_BYTES_PER_TOKEN = 32


@dataclass(frozen=True)
class ModelFootprint:
    """What a model costs in memory, by part, before anything is allocated. Bytes.

    The KV-cache figures are for `kv_type`; `with_kv_type` gives the same model's footprint with another type.
    Not counted: `Model.logits(tokens)` (scoring) holds len(tokens) x n_vocab float32 logits on top."""

    name: str
    weights_bytes: int  # the whole file: memory-mapped, and every weight is read for every token, so resident
    kv_bytes_per_token: int  # KVCache.nbytes_for(cfg, 1, kv_type=kv_type)
    kv_linear: bool  # nbytes_for(cfg, n) == n * kv_bytes_per_token (False once local layers use ring buffers)
    trained_context: int
    activation_bytes_per_token: int  # float32 prefill activations per batch position
    n_vocab: int
    tokenizer_bytes: int
    runtime_bytes: int = RUNTIME_BYTES
    config: DecoderConfig | None = field(default=None, repr=False, compare=False)
    n_seq: int = 1  # sequences the KV cache holds, n_ctx positions each (batched generation)
    kv_type: str = DEFAULT_KV_TYPE  # element type of the KV cache (edgeinfer.kv_cache.KV_TYPES)

    @classmethod
    def from_gguf(cls, gguf: GGUFFile, cfg: DecoderConfig, kv_type: str = DEFAULT_KV_TYPE) -> "ModelFootprint":
        """The footprint of an opened GGUF whose config load_decoder built; reads metadata only."""
        check_kv_type(kv_type, cfg)
        kv_one = KVCache.nbytes_for(cfg, 1, kv_type=kv_type)
        linear = all(KVCache.nbytes_for(cfg, n, kv_type=kv_type) == n * kv_one
                     for n in (CTX_STEP, CTX_CEILING, cfg.context_length))
        merges = gguf.get("tokenizer.ggml.merges")
        n_merges = 0 if merges is None else len(merges)
        # live at once in a layer, at most: the embedding rows, residual x, its norm and the block output (d_model
        # each), gate and up (d_ff each), queries and attention output (n_heads x head_dim, value_dim)
        per_position = cfg.d_model * 4 + cfg.d_ff * 2 + cfg.n_heads * (cfg.head_dim + cfg.value_dim)
        return cls(name=Path(gguf.path).name, weights_bytes=int(gguf.file_size), kv_bytes_per_token=kv_one,
                   kv_linear=linear, trained_context=cfg.context_length,
                   activation_bytes_per_token=per_position * 4, n_vocab=cfg.n_vocab,
                   tokenizer_bytes=cfg.n_vocab * TOKENIZER_BYTES_PER_TOKEN + n_merges * TOKENIZER_BYTES_PER_MERGE,
                   config=cfg, kv_type=kv_type)

    def with_kv_type(self, kv_type: str) -> "ModelFootprint":
        """This footprint with a KV cache of kv_type (InvalidArgument naming it if the type is unknown, or q8_0
        does not fit the model's head sizes). Without a config, the per-position bytes scale by bytes per value."""
        check_kv_type(kv_type, self.config)
        if kv_type == self.kv_type:
            return self
        if self.config is not None:
            per_position = KVCache.nbytes_for(self.config, 1, kv_type=kv_type)
        else:
            per_position = int(self.kv_bytes_per_token * KV_TYPES[kv_type][1] / KV_TYPES[self.kv_type][1])
        return dataclasses.replace(self, kv_type=kv_type, kv_bytes_per_token=per_position)

    def kv_bytes(self, n_ctx: int, kv_type: str | None = None) -> int:
        """KV-cache bytes for n_ctx positions (in kv_type, default the footprint's): the engine's own figure when
        the config is known."""
        if kv_type is not None and kv_type != self.kv_type:
            return self.with_kv_type(kv_type).kv_bytes(n_ctx)
        if self.config is not None:
            return KVCache.nbytes_for(self.config, n_ctx, self.n_seq, kv_type=self.kv_type)
        return self.n_seq * n_ctx * self.kv_bytes_per_token

    def scratch_bytes(self, n_batch: int) -> int:
        """Working memory of a prefill batch of n_batch positions plus one position's logits and sampling."""
        return n_batch * self.activation_bytes_per_token + self.n_vocab * LOGITS_BYTES_PER_TOKEN

    def breakdown(self, n_ctx: int, n_batch: int) -> dict[str, int]:
        """Bytes by part for a context of n_ctx positions and prefill batches of n_batch."""
        return {"weights": self.weights_bytes, "kv_cache": self.kv_bytes(n_ctx),
                "scratch": self.scratch_bytes(n_batch), "runtime": self.runtime_bytes,
                "tokenizer": self.tokenizer_bytes}


# ================================================================ the plan

@dataclass
class Plan:
    """The numbers a model runs with on this machine, and why (one readable reason per choice)."""

    model: str
    n_ctx: int
    n_threads: int
    n_batch: int
    n_seq: int  # sequences the KV cache holds (n_ctx positions each)
    power_mode: str  # resolved: "saver", "balanced" or "performance"
    memory: dict[str, int]  # bytes by part: weights, kv_cache, scratch, runtime, tokenizer
    memory_total_bytes: int
    memory_available_bytes: int | None  # usable: free memory less the safety margin; None if unreadable
    reasons: dict[str, str]  # keys: memory, n_ctx, n_threads, n_batch, power, kv_type
    kv_type: str = DEFAULT_KV_TYPE  # element type of the KV cache
    kv_bytes_per_position: int = 0  # all layers, K and V, of one sequence, in kv_type
    kv_fraction_of_f32: float = 1.0  # the cache's bytes over those of an f32 cache of the same positions
    device: str = "cpu"  # where the model runs: "cpu" or "cuda" (reasons["device"] says why, when it was chosen)
    # on a GPU: `memory` holds what lies there (weights in the backend's layout, KV cache, scratch) and
    # memory_available_bytes is the GPU's usable memory; these parts stay in host memory. Empty on the CPU.
    host_memory: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


def _mb(n: int | float) -> int:
    return int(round(n / MB))


def usable_memory(state: SystemState, resident: int = 0) -> tuple[int | None, str]:
    """(bytes a model may use, why): min(available, cgroup limit - usage) less the safety margin, plus `resident`
    (what this process already holds of the runtime, counted as used already). None when memory is unreadable."""
    if state.available_memory is None:
        return None, "memory could not be read: not checked"
    free, where = state.available_memory, "available"
    total = state.total_memory or state.available_memory
    limit = state.cgroup_memory_limit
    if limit is not None:
        total = min(total, limit)
        headroom = limit - (state.cgroup_memory_usage or 0)
        if headroom < free:
            free, where = headroom, f"left under the cgroup limit of {_mb(limit)} MB"
    margin = max(int(total * MARGIN_FRACTION), min(MARGIN_FLOOR, total // MARGIN_FLOOR_SHARE))
    usable = max(0, free - margin + resident)
    reason = f"{_mb(free)} MB {where}, less a {_mb(margin)} MB safety margin"
    if resident:
        reason += f", plus {_mb(resident)} MB of runtime this process already holds"
    return usable, reason


def resolve_power(power: str, state: SystemState) -> tuple[str, str]:
    """("saver" | "balanced" | "performance", why) for power="auto" or an explicit mode; why starts "<mode>: "."""
    if power in POWER_MODES:
        return power, f"{power}: asked for"
    if power != "auto":
        raise ValueError(f"power must be auto, {', '.join(POWER_MODES)}; got {power!r}")
    if state.low_battery:
        return "saver", f"saver: on battery at {state.battery_percent:.0f}% (below {LOW_BATTERY_PERCENT}%)"
    if state.on_battery:
        return "balanced", f"balanced: on battery at {state.battery_percent:.0f}% (saver below {LOW_BATTERY_PERCENT}%)"
    return "balanced", "balanced: plugged in" if state.plugged_in else "balanced: no battery"


def _threads(state: SystemState, mode: str) -> tuple[int, str]:
    """Compute threads for a resolved power mode, and why."""
    cores = state.physical_cores or state.logical_cores or 1
    if mode == "performance" or cores <= 4:
        n, why = cores, [f"all {cores} physical cores" + (" (performance)" if mode == "performance" else "")]
    else:
        n, why = cores - 1, [f"{cores - 1} of {cores} physical cores (one left for the system)"]
    if state.cpu_quota is not None and n > max(1, int(state.cpu_quota)):
        # a thread beyond the quota gets throttled, and every parallel loop then waits for it
        n = max(1, int(state.cpu_quota))
        why.append(f"capped at the cgroup CPU quota of {state.cpu_quota:g} cores")
    if mode == "saver" and n > 1:
        n //= 2
        why.append("halved to save power")
    if state.hot and n > 1:
        n -= 1
        why.append(f"one fewer: CPU at {state.max_temperature_c:.0f} C")
    return n, ", ".join(why)


def threads_for_power(state: SystemState, *, power: str = "auto", n_threads: int | None = None) -> int:
    """Compute threads for the machine's current power state (an explicit n_threads wins); the chat calls this
    between turns when `power_changed` says so, and sets `engine.n_threads`."""
    if n_threads:
        return int(n_threads)
    return _threads(state, resolve_power(power, state)[0])[0]


def power_changed(old: SystemState, new: SystemState) -> bool:
    """Whether the thread count may need to follow: plugged in or out, or the battery crossed the low threshold.
    Temperature is left out on purpose: it swings from turn to turn and would make the thread count flap."""
    return old.plugged_in != new.plugged_in or old.low_battery != new.low_battery


def make_plan(footprint: ModelFootprint, state: SystemState, *, n_ctx: int | None = None,
              n_threads: int | None = None, power: str = "auto", n_seq: int = 1, kv_type: str | None = None,
              device: DeviceChoice | None = None, device_weights_bytes: int | None = None) -> Plan:
    """Choose context length, threads, prefill batch and KV-cache type for a model on a machine; BudgetError if it
    cannot fit; InvalidArgument for an unknown kv_type (or q8_0 on head sizes it does not fit).

    Explicit n_ctx / n_threads win (n_ctx only if it fits). Otherwise: the largest context that fits, a multiple
    of 256 between 512 and min(trained, 8192); physical cores (one left free above four, the cgroup quota caps),
    halved in saver mode (asked for, or auto on battery below 30%), one fewer when the CPU is hot. With n_seq > 1
    the KV cache holds n_seq sequences of n_ctx positions each (batched generation). kv_type None: the default
    (DEFAULT_KV_TYPE); the cache is planned in the chosen type, so a compact type affords a longer context.
    device: where the model runs (None: the CPU, no device reason); on a GPU (`device.on_gpu`) the context and
    slots are planned against its free memory less `gpu_margin`, with the weights at device_weights_bytes (their
    size in the backend's layout; default the file's), one host thread (the GPU computes), and BudgetError the
    same way when they do not fit; the runtime and tokenizer must still fit the host's memory."""
    if n_ctx is not None and n_ctx < 1:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    if n_threads is not None and n_threads < 1:
        raise ValueError(f"n_threads must be positive, got {n_threads}")
    fp = footprint.with_kv_type(DEFAULT_KV_TYPE if kv_type is None else kv_type)
    fp = dataclasses.replace(fp, n_seq=int(n_seq)) if n_seq != fp.n_seq else fp
    reasons = {}
    if device is not None:
        reasons["device"] = device.reason
    on_device = device is not None and device.name != "cpu"
    mode, reasons["power"] = resolve_power(power, state)
    if n_threads:
        threads, reasons["n_threads"] = int(n_threads), "asked for"
    elif on_device:
        threads, reasons["n_threads"] = 1, f"one host thread: the {device.name} device computes"
    else:
        threads, reasons["n_threads"] = _threads(state, mode)
    resident = min(state.process_rss or 0, fp.runtime_bytes + fp.tokenizer_bytes)
    usable, reasons["memory"] = usable_memory(state, resident)
    host_memory = {}
    if device is not None and device.on_gpu:
        host_memory = {"runtime": fp.runtime_bytes, "tokenizer": fp.tokenizer_bytes}
        _refuse_host(fp.name, host_memory, usable)
        usable, reasons["memory"] = _gpu_usable(device)
        full_name = fp.name  # the fit below names the GPU in its refusals
        fp = dataclasses.replace(fp, name=f"{fp.name} on {device.gpu_name}", runtime_bytes=0, tokenizer_bytes=0,
                                 weights_bytes=fp.weights_bytes if device_weights_bytes is None
                                 else int(device_weights_bytes))
    batch = N_BATCH_SAVER if mode == "saver" else N_BATCH
    if n_ctx is not None:
        ctx, batch = _fit_explicit(fp, usable, int(n_ctx), batch)
        reasons["n_ctx"] = "asked for"
        if ctx > fp.trained_context:
            reasons["n_ctx"] += f", beyond the trained context of {fp.trained_context}: quality may drop"
    else:
        ctx, batch, reasons["n_ctx"] = _fit_auto(fp, usable, batch)
    reasons["n_batch"] = _batch_reason(batch, mode)
    if fp.kv_linear:
        reasons["n_ctx"] += f"; {fp.kv_bytes_per_token / 1024:.0f} KB of {fp.kv_type} KV cache per position"
    memory = fp.breakdown(ctx, batch)
    fraction = memory["kv_cache"] / fp.kv_bytes(ctx, "f32")
    reasons["kv_type"] = _kv_type_reason(fp.kv_type, kv_type is not None, memory["kv_cache"], fraction)
    if host_memory:
        memory = {part: size for part, size in memory.items() if part not in host_memory}
        fp = dataclasses.replace(fp, name=full_name)
    return Plan(model=fp.name, n_ctx=ctx, n_threads=threads, n_batch=batch, n_seq=fp.n_seq, power_mode=mode,
                memory=memory,
                memory_total_bytes=sum(memory.values()), memory_available_bytes=usable, reasons=reasons,
                kv_type=fp.kv_type, kv_bytes_per_position=fp.kv_bytes_per_token, kv_fraction_of_f32=fraction,
                device="cpu" if device is None else device.name, host_memory=host_memory)


def _gpu_usable(device: DeviceChoice) -> tuple[int, str]:
    """(GPU bytes a model may use, why): its free memory less `gpu_margin`."""
    margin = gpu_margin(device.total_bytes or device.free_bytes)
    return max(0, device.free_bytes - margin), (f"{device.gpu_name}: {_mb(device.free_bytes)} MB free, less a "
                                                f"{_mb(margin)} MB safety margin")


def _refuse_host(name: str, host_parts: dict[str, int], usable: int | None) -> None:
    """BudgetError if what stays in host memory while a GPU computes (runtime, tokenizer) does not fit there."""
    need = sum(host_parts.values())
    if usable is not None and need > usable:
        raise BudgetError(f"{name}: the runtime and tokenizer need {_mb(need)} MB of host memory; "
                          f"{_mb(usable)} MB available")


def _kv_type_reason(kv_type: str, asked: bool, cache_bytes: int, fraction: float) -> str:
    """Why this KV-cache type, and what it costs against f32: "asked for; 28% of f32's bytes (36 MB of 128 MB)"."""
    why = "asked for" if asked else f"the default ({DEFAULT_KV_TYPE_WHY.get(kv_type, 'the runtime default')})"
    if kv_type == "f32":
        return f"{why}; {_mb(cache_bytes)} MB"
    return (f"{why}; {fraction:.0%} of f32's bytes ({_mb(cache_bytes)} MB against {_mb(cache_bytes / fraction)} MB "
            f"in f32)")


def _batch_that_fits(fp: ModelFootprint, usable: int, n_ctx: int, batch: int) -> int | None:
    """The prefill batch for n_ctx positions: `batch`, halved while memory is tight; None if even 32 does not fit."""
    while batch >= N_BATCH_MIN:
        if _total(fp, n_ctx, batch) <= usable:
            return batch
        batch //= 2
    return None


def _total(fp: ModelFootprint, n_ctx: int, n_batch: int) -> int:
    return sum(fp.breakdown(n_ctx, n_batch).values())


def _refuse_without_context(fp: ModelFootprint, usable: int) -> None:
    """BudgetError if the model does not fit even before any context (weights, runtime, smallest scratch)."""
    fixed = _total(fp, 0, N_BATCH_MIN)
    if fixed > usable:
        raise BudgetError(f"{fp.name}: the model alone needs {_mb(fixed)} MB (weights {_mb(fp.weights_bytes)} MB, "
                          f"runtime {_mb(fp.runtime_bytes + fp.tokenizer_bytes)} MB) before any context; "
                          f"{_mb(usable)} MB available")


def _fit_explicit(fp: ModelFootprint, usable: int | None, n_ctx: int, batch: int) -> tuple[int, int]:
    if usable is None:
        return n_ctx, batch
    fitting = _batch_that_fits(fp, usable, n_ctx, batch)
    if fitting:
        return n_ctx, fitting
    _refuse_without_context(fp, usable)
    try:
        hint = f" (n_ctx={_fit_auto(fp, usable, batch)[0]} would fit)"  # what the plan would choose by itself
    except BudgetError:
        hint = ""
    raise BudgetError(f"{fp.name}: n_ctx={n_ctx} needs {_mb(fp.kv_bytes(n_ctx))} MB of KV cache, "
                      f"{_mb(_total(fp, n_ctx, N_BATCH_MIN))} MB in all; {_mb(usable)} MB available{hint}")


def _fit_auto(fp: ModelFootprint, usable: int | None, batch: int) -> tuple[int, int, str]:
    trained = fp.trained_context
    cap = min(trained, CTX_CEILING)
    cap_why = "the trained context" if cap == trained else (
        f"the default ceiling (trained {trained}: longer costs memory and prefill time a chat rarely needs)")
    if cap >= CTX_STEP:
        cap = cap // CTX_STEP * CTX_STEP
    low = min(CTX_MIN, cap)
    if usable is None:
        return cap, batch, f"{cap_why}; memory unknown"
    b = _batch_that_fits(fp, usable, low, batch)
    if b is None:
        _refuse_without_context(fp, usable)
        raise BudgetError(f"{fp.name}: the smallest context ({low} positions) needs {_mb(fp.kv_bytes(low))} MB "
                          f"of KV cache, {_mb(_total(fp, low, N_BATCH_MIN))} MB in all; {_mb(usable)} MB available")
    ctx = _largest_fitting(fp, usable, low, cap, b)
    if ctx == cap:
        return ctx, b, cap_why
    return ctx, b, f"the most that fits in memory, in steps of {CTX_STEP} (at most {cap} otherwise)"


def _largest_fitting(fp: ModelFootprint, usable: int, low: int, high: int, n_batch: int) -> int:
    """The largest n_ctx in low + k * CTX_STEP <= high whose total fits, given that low fits. A search over the
    engine's own figure, so a KV cache that is not linear in n_ctx is planned right too."""
    lo, hi = 0, (high - low) // CTX_STEP  # steps above low; the total grows with n_ctx
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _total(fp, low + mid * CTX_STEP, n_batch) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return low + lo * CTX_STEP


def _batch_reason(batch: int, mode: str) -> str:
    base = N_BATCH_SAVER if mode == "saver" else N_BATCH
    if batch == base:
        return "halved to save power" if mode == "saver" else "the default"
    return f"down from {base}: memory is tight"


# ================================================================ output and the one-call entry point

def format_plan(plan: Plan) -> str:
    """The plan as text: each choice with its reason, then the memory by part in MB."""
    available = "unknown" if plan.memory_available_bytes is None else f"{_mb(plan.memory_available_bytes)} MB"
    rows = [("context", f"{plan.n_ctx} positions", "n_ctx"), ("threads", plan.n_threads, "n_threads"),
            ("batch", f"{plan.n_batch} positions", "n_batch"), ("power", plan.power_mode, "power"),
            ("kv cache", plan.kv_type, "kv_type")]
    if "device" in plan.reasons:
        rows.insert(0, ("device", plan.device, "device"))
    lines = [f"plan for {plan.model}"]
    lines += [f"  {label:<10} {value:<16} {plan.reasons[key]}" for label, value, key in rows]
    where = "GPU memory" if plan.host_memory else "memory"
    lines.append(f"{where}: {_mb(plan.memory_total_bytes)} MB of {available} usable ({plan.reasons['memory']})")
    lines += [f"  {part:<10} {_mb(size):>6} MB" for part, size in plan.memory.items()]
    if plan.host_memory:
        lines.append("host memory:")
        lines += [f"  {part:<10} {_mb(size):>6} MB" for part, size in plan.host_memory.items()]
    return "\n".join(lines)


def plan_on_device(footprint: ModelFootprint, state: SystemState, weights: DecoderWeights | None, *,
                   device: str = "auto", n_ctx: int | None = None, n_threads: int | None = None,
                   power: str = "auto", n_seq: int = 1, kv_type: str | None = None,
                   **choose) -> tuple[DeviceChoice, Plan]:
    """Choose the device (edgeinfer.backends.devices.choose_device: "auto", "cpu" or "cuda"), then plan on it.

    auto weighs the weights in the CUDA layout (`cuda_weight_bytes`; weights may be None only for device="cpu")
    and the KV cache of n_ctx positions (or the smallest context) with the smallest scratch against the GPU's free
    memory. choose: keyword arguments for choose_device (a probe, backend factories: tests)."""
    check_device(device)
    gpu_weights = fp_kv = 0  # unused on the CPU
    if device != "cpu":
        fp = footprint.with_kv_type(DEFAULT_KV_TYPE if kv_type is None else kv_type)
        fp = dataclasses.replace(fp, n_seq=int(n_seq))
        gpu_weights = cuda_weight_bytes(weights)
        smallest = n_ctx or min(CTX_MIN, fp.trained_context)
        fp_kv = fp.kv_bytes(smallest) + fp.scratch_bytes(N_BATCH_MIN)
    choice = choose_device(device, gpu_weights, fp_kv, **choose)
    plan = make_plan(footprint, state, n_ctx=n_ctx, n_threads=n_threads, power=power, n_seq=n_seq, kv_type=kv_type,
                     device=choice, device_weights_bytes=None if device == "cpu" else gpu_weights)
    return choice, plan


def plan_for_model(path_or_gguf: str | os.PathLike | GGUFFile, *, n_ctx: int | None = None,
                   n_threads: int | None = None, power: str = "auto", state: SystemState | None = None,
                   kv_type: str | None = None, device: str = "auto") -> Plan:
    """Plan for a GGUF file (path or opened) on `device` ("auto", "cpu" or "cuda", see `plan_on_device`): reads
    its metadata and tensor headers, never repacks or uploads weights, never allocates the KV cache.
    `state` defaults to the real machine's; kv_type None is the default type."""
    check_device(device)
    gguf = path_or_gguf if isinstance(path_or_gguf, GGUFFile) else GGUFFile(path_or_gguf)
    try:
        cfg, weights = load_decoder(gguf)
        footprint = ModelFootprint.from_gguf(gguf, cfg)
        return plan_on_device(footprint, state or read_system_state(), weights, device=device, n_ctx=n_ctx,
                              n_threads=n_threads, power=power, kv_type=kv_type)[1]
    finally:
        if gguf is not path_or_gguf:
            gguf.close()
