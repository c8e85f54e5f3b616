"""Device choice (edgeinfer.backends.devices): the CUDA probe, auto/cpu/cuda with fake probes and backends, the
budget planning against GPU memory, and the device through load, run, plan and bench on this GPU-less machine."""
from __future__ import annotations

import json
import sys
import types

import pytest

from cli_helpers import assert_one_error_line, run_edgeinfer
from edgeinfer.backends import devices
from edgeinfer.backends.devices import CudaProbe, DeviceChoice, choose_device, cuda_weight_bytes, probe_cuda
from edgeinfer.budget import BudgetError, ModelFootprint, SystemState, format_plan, make_plan, plan_on_device
from edgeinfer.errors import InvalidArgument, UnsupportedError
from tiny_gguf import write_tiny_llama

GIB = 1 << 30
MB = 1 << 20
NO_CUDA_ENV = {"NUMBA_ENABLE_CUDASIM": "0"}  # the test suite turns the simulator on for the kernel tests


class FakeBackend:
    """Stands in for a backend: the choice only constructs it and reads its name."""

    max_threads = 1

    def __init__(self, name: str):
        self.name = name


def fakes(**probe) -> dict:
    """choose_device's keyword arguments for a probe of these fields and fake backends."""
    return {"probe": CudaProbe(**probe), "cpu_backend": lambda: FakeBackend("cpu"),
            "cuda_backend": lambda: FakeBackend("cuda")}


H200 = {"available": True, "reason": "read through numba-cuda", "name": "NVIDIA H200", "total_bytes": 141 * GIB,
        "free_bytes": 139 * GIB}


# ---------------------------------------------------------------- choose_device with fakes

def test_auto_takes_a_gpu_the_model_fits():
    choice = choose_device("auto", 2 * GIB, GIB // 2, **fakes(**H200))
    assert (choice.name, choice.backend.name) == ("cuda", "cuda") and choice.on_gpu
    assert choice.reason == "cuda: NVIDIA H200, 139 GiB free"
    assert (choice.free_bytes, choice.total_bytes, choice.gpu_name) == (139 * GIB, 141 * GIB, "NVIDIA H200")


def test_auto_falls_back_to_the_cpu_when_the_model_does_not_fit():
    small = {**H200, "name": "GeForce", "total_bytes": 8 * GIB, "free_bytes": int(7.8 * GIB)}
    choice = choose_device("auto", int(8.5 * GIB), GIB // 10, **fakes(**small))
    assert (choice.name, choice.backend.name) == ("cpu", "cpu") and not choice.on_gpu
    assert choice.reason.startswith("cpu: model needs 9.1 GiB") and "GPU has 7.8 GiB free" in choice.reason


def test_auto_without_numba_cuda_or_under_the_simulator_picks_the_cpu():
    missing = choose_device("auto", 1, 1, **fakes(available=False, reason="no CUDA GPU: numba-cuda not installed"))
    assert (missing.name, missing.reason) == ("cpu", "cpu: no CUDA GPU: numba-cuda not installed")
    sim = choose_device("auto", 1, 1, **fakes(available=False, reason="numba-cuda's simulator", simulator=True))
    assert sim.name == "cpu" and "simulator" in sim.reason


def test_auto_takes_the_cpu_when_the_cuda_backend_cannot_load():
    def broken():
        raise UnsupportedError("the CUDA backend cannot be loaded (no module): pip install 'edgeinfer[cuda]'")

    choice = choose_device("auto", 1, 1, **{**fakes(**H200), "cuda_backend": broken})
    assert choice.name == "cpu" and "cannot be loaded" in choice.reason


def test_a_cuda_backend_that_fails_to_start_is_an_unsupported_error(monkeypatch):
    fake = types.ModuleType("edgeinfer.backends.cuda")

    class CUDABackend:
        def __init__(self):
            raise RuntimeError("CUDA_ERROR_NO_BINARY_FOR_GPU\nmore detail")

    fake.CUDABackend = CUDABackend
    monkeypatch.setitem(sys.modules, "edgeinfer.backends.cuda", fake)
    with pytest.raises(UnsupportedError, match="could not start: CUDA_ERROR_NO_BINARY_FOR_GPU$"):
        choose_device("cuda", 1, 1, probe=CudaProbe(**H200))
    auto = choose_device("auto", 1, 1, probe=CudaProbe(**H200), cpu_backend=lambda: FakeBackend("cpu"))
    assert auto.name == "cpu" and "could not start" in auto.reason


def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(UnsupportedError, match=r"no CUDA driver.*pip install 'edgeinfer\[cuda\]'"):
        choose_device("cuda", 1, 1, **fakes(available=False, reason="no CUDA GPU: no CUDA driver found"))


def test_cuda_under_the_simulator_uses_it_and_cpu_is_the_cpu():
    sim = choose_device("cuda", 1, 1, **fakes(available=False, reason="numba-cuda's simulator", simulator=True))
    assert (sim.name, sim.backend.name, sim.on_gpu) == ("cuda", "cuda", False)  # host memory: no GPU to plan for
    cpu = choose_device("cpu", 1, 1, **fakes(**H200))
    assert (cpu.name, cpu.reason) == ("cpu", "cpu: asked for")


@pytest.mark.parametrize("bad, error", [("gpu", InvalidArgument), ("CUDA", InvalidArgument), (0, TypeError)])
def test_unknown_device_names_the_argument(bad, error):
    with pytest.raises(error, match="device"):
        choose_device(bad, 1, 1, **fakes(**H200))


# ---------------------------------------------------------------- probe_cuda

def test_probe_says_simulator_when_it_is_on(monkeypatch):
    monkeypatch.setattr(devices, "_simulator_on", lambda: True)
    probe = probe_cuda()
    assert probe.simulator and not probe.available and "simulator" in probe.reason


def test_probe_without_numba_cuda_or_nvml(monkeypatch):
    monkeypatch.setattr(devices, "_simulator_on", lambda: False)
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: None)
    assert probe_cuda() == CudaProbe(False, "no CUDA GPU: numba-cuda not installed")


def test_probe_names_a_gpu_nvml_sees_but_numba_cuda_cannot_drive(monkeypatch):
    monkeypatch.setattr(devices, "_simulator_on", lambda: False)
    monkeypatch.setattr(devices.importlib.util, "find_spec", lambda name: object() if name == "pynvml" else None)
    memory = types.SimpleNamespace(total=24 * GIB, free=20 * GIB)
    fake = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None, nvmlDeviceGetCount=lambda: 1,
                                 nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA L4",
                                 nvmlDeviceGetMemoryInfo=lambda h: memory)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    probe = probe_cuda()
    assert not probe.available and (probe.name, probe.free_bytes) == ("NVIDIA L4", 20 * GIB)
    assert "numba-cuda not installed" in probe.reason


def test_probe_never_raises(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(devices, "_simulator_on", lambda: False)
    monkeypatch.setattr(devices, "_numba_cuda_installed", lambda: True)
    monkeypatch.setattr(devices, "_probe_numba_cuda", boom)
    probe = probe_cuda()
    assert not probe.available and "driver exploded" in probe.reason


# ---------------------------------------------------------------- the budget against GPU memory

def footprint() -> ModelFootprint:
    """A model of 400 MB on the GPU and 1 MB of KV cache per position."""
    return ModelFootprint(name="m.gguf", weights_bytes=300 * MB, kv_bytes_per_token=MB, kv_linear=True,
                          trained_context=32768, activation_bytes_per_token=4096, n_vocab=1000,
                          tokenizer_bytes=10 * MB)


HOST = SystemState(total_memory=64 * GIB, available_memory=60 * GIB, physical_cores=8, logical_cores=16)


def gpu(free: int, total: int = 8 * GIB) -> DeviceChoice:
    return DeviceChoice("cuda", FakeBackend("cuda"), "cuda: Fake GPU", "Fake GPU", free, total)


def test_plan_on_a_gpu_fits_its_free_memory():
    plan = make_plan(footprint(), HOST, device=gpu(2 * GIB), device_weights_bytes=400 * MB)
    # 2048 MB free - 512 MB margin - 400 MB weights - scratch: 1,024 positions of 1 MB (in steps of 256)
    assert (plan.device, plan.n_ctx, plan.n_threads) == ("cuda", 1024, 1)
    assert set(plan.memory) == {"weights", "kv_cache", "scratch"} and plan.memory["weights"] == 400 * MB
    assert set(plan.host_memory) == {"runtime", "tokenizer"}
    assert plan.memory_available_bytes == 2 * GIB - 512 * MB and "Fake GPU" in plan.reasons["memory"]
    text = format_plan(plan)
    assert "device     cuda" in text and "GPU memory:" in text and "host memory:" in text
    on_cpu = make_plan(footprint(), HOST)
    assert on_cpu.n_ctx == 8192 and on_cpu.device == "cpu" and "device" not in on_cpu.reasons


def test_plan_on_a_gpu_refuses_a_context_that_does_not_fit():
    with pytest.raises(BudgetError, match="m.gguf on Fake GPU: n_ctx=4096"):
        make_plan(footprint(), HOST, n_ctx=4096, device=gpu(2 * GIB), device_weights_bytes=400 * MB)
    with pytest.raises(BudgetError, match="on Fake GPU"):
        make_plan(footprint(), HOST, device=gpu(700 * MB), device_weights_bytes=400 * MB)


def test_plan_on_device_auto_weighs_the_gpu():
    small = {**H200, "name": "Small GPU", "total_bytes": 2 * GIB, "free_bytes": 2 * GIB}
    weights = types.SimpleNamespace(token_embd=None, output=None, output_norm=None, layers=[])  # 0 bytes of weights
    choice, plan = plan_on_device(footprint(), HOST, weights, **fakes(**small))
    assert (choice.name, plan.device) == ("cuda", "cuda") and plan.reasons["device"] == "cuda: Small GPU, 2.0 GiB free"
    assert plan.n_ctx == 1280  # (2048 - 512 MB margin - scratch) MB of KV cache at 1 MB a position, in steps of 256
    choice, plan = plan_on_device(footprint(), HOST, weights, n_ctx=4096, **fakes(**small))  # 4 GB of KV cache
    assert (choice.name, plan.device, plan.n_ctx) == ("cpu", "cpu", 4096) and "model needs" in choice.reason


def test_cuda_weight_bytes_counts_the_device_layout(tmp_path):
    from edgeinfer.arch import load_decoder
    from edgeinfer.gguf_reader import GGUFFile

    with GGUFFile(write_tiny_llama(tmp_path / "tiny.gguf")) as gguf:
        _, weights = load_decoder(gguf)
        matrices = [weights.token_embd] + [m for layer in weights.layers for m in vars(layer).values()
                                           if hasattr(m, "ggml_type")]
        if weights.output is not weights.token_embd:
            matrices.append(weights.output)
        per_value = {0: 4, 1: 2}  # F32, F16 as they are; the tiny model's quantized types: at most 1 + 8/16
        want = sum(m.n_rows * m.n_cols * per_value.get(m.ggml_type, 1.5) for m in matrices)
        vectors = 4 * sum(v.size for layer in weights.layers for v in vars(layer).values() if hasattr(v, "dtype"))
        assert cuda_weight_bytes(weights) == int(want) + vectors + 4 * weights.output_norm.size


# ---------------------------------------------------------------- through the API and the CLI (no GPU here)

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("devices") / "tiny.gguf")


def test_load_rejects_an_unknown_device(tiny):
    from edgeinfer.api import load

    with pytest.raises(InvalidArgument, match="device must be 'auto', 'cpu', 'cuda'; got 'gpu'"):
        load(str(tiny), device="gpu")


def test_load_auto_runs_on_the_cpu_and_says_why(tiny, monkeypatch):
    from edgeinfer.api import load

    monkeypatch.setattr(devices, "probe_cuda", lambda: CudaProbe(False, "no CUDA GPU: numba-cuda not installed"))
    with load(str(tiny), n_ctx=64) as model:
        assert (model.device.name, model.device.backend.name, model.plan.device) == ("cpu", "cpu", "cpu")
        assert model.device.reason == "cpu: no CUDA GPU: numba-cuda not installed"
        assert "device=cpu" in repr(model)
    with pytest.raises(UnsupportedError, match=r"pip install 'edgeinfer\[cuda\]'"):
        load(str(tiny), n_ctx=64, device="cuda")


def test_run_device_cuda_without_a_gpu_is_one_error_line(tiny):
    result = run_edgeinfer("run", str(tiny), "hello", "-n", "2", "--device", "cuda", env=NO_CUDA_ENV)
    assert_one_error_line(result, "cuda", "pip install 'edgeinfer[cuda]'")


@pytest.mark.slow
def test_run_device_auto_says_cpu_on_the_stats_line(tiny):
    result = run_edgeinfer("run", str(tiny), "hello", "-n", "2", "--temp", "0", "--device", "auto",
                           env=NO_CUDA_ENV)
    assert result.returncode == 0, result.stderr
    stats = [line for line in result.stderr.splitlines() if line.startswith("prompt ")]
    assert len(stats) == 1 and "| device: cpu (no CUDA GPU: " in stats[0], result.stderr


def test_serve_device_cuda_without_a_gpu_stops_with_one_error_line(tiny):
    result = run_edgeinfer("serve", str(tiny), "--port", "0", "--device", "cuda", env=NO_CUDA_ENV, timeout=120)
    assert result.returncode == 1 and "listening on" in result.stdout
    assert_one_error_line(result, "device cuda", "edgeinfer[cuda]")


def test_serve_start_lines_say_the_device(tiny):
    from edgeinfer.serve.app import ServerState
    from edgeinfer.serve.server import ServeOptions, _load

    lines = []
    served = _load(tiny, ServeOptions(parallel=1, n_ctx=32, device="cpu"), ServerState(), "tiny", lines.append)
    try:
        assert served.model.device.name == "cpu"
        assert "  device     cpu              cpu: asked for" in lines[0].splitlines()
    finally:
        served.scheduler.close()
        served.model.close()


def test_plan_device_cuda_json_errors_without_a_gpu(tiny):
    assert_one_error_line(run_edgeinfer("plan", str(tiny), "--device", "cuda", "--json", env=NO_CUDA_ENV),
                          "device cuda", "edgeinfer[cuda]")
    result = run_edgeinfer("plan", str(tiny), "--device", "auto", "--json", env=NO_CUDA_ENV)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["device"] == "cpu" and plan["reasons"]["device"].startswith("cpu: no CUDA GPU")


def test_bench_json_has_the_device(tiny):
    from edgeinfer.bench import format_bench, run_bench

    result = run_bench(str(tiny), prompt_tokens=4, gen_tokens=2, threads=(1,), reps=1, process=False, device="cpu")
    assert result["device"] == {"name": "cpu", "reason": "cpu: asked for"}
    assert all(row["device"] == "cpu" for row in result["rows"])
    assert "device: cpu (asked for)" in format_bench(result)


def test_cli_device_choices_match_the_devices():
    from edgeinfer.cli import DEVICE_CHOICES

    assert DEVICE_CHOICES == devices.DEVICES


@pytest.mark.slow
def test_cuda_under_the_simulator_generates_the_cpus_greedy_tokens(tiny):
    pytest.importorskip("edgeinfer.backends.cuda", reason="the CUDA backend is not in this checkout")
    if not probe_cuda().simulator:
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (tests/conftest.py sets it for the CUDA tests)")
    from edgeinfer.api import load

    answers = {}
    for device in ("cpu", "cuda"):
        with load(str(tiny), n_ctx=32, device=device) as model:
            assert model.device.name == device and model.plan.device == device
            tokens = model.tokenize("hello world")
            answers[device] = model.generate(tokens, max_tokens=3, temperature=0)
    assert answers["cuda"] == answers["cpu"]


@pytest.mark.slow
def test_bench_process_figures_load_on_the_device(tiny):
    from edgeinfer.bench import process_figures

    figures = process_figures(str(tiny), "edgeinfer", 64, 1, 2, "cpu")
    assert "error" not in figures and figures["peak_rss_bytes"] > 0, figures
    assert "device must be" in process_figures(str(tiny), "edgeinfer", 64, 1, 2, "gpu")["error"]
