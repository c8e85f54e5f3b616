"""Which device a model runs on: what CUDA GPU there is (`probe_cuda`) and the choice for "auto", "cpu" or "cuda"
(`choose_device`), each with one readable reason.

`auto` takes a CUDA GPU when there is one, numba-cuda can drive it and the model fits its free memory, else the
CPU. numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1: the kernels run as Python on the host, for tests without a
GPU) is never a GPU for `auto`; `device="cuda"` uses it, so tests can drive the CUDA backend. Asking for "cuda"
where there is none is one UnsupportedError naming what is missing.

numba.cuda is imported only when a probe runs (it loads the CUDA driver), never when edgeinfer is imported.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from edgeinfer.errors import InvalidArgument, UnsupportedError

if TYPE_CHECKING:
    from edgeinfer.arch.decoder import DecoderWeights
    from edgeinfer.backends import Backend

__all__ = ["DEVICES", "CudaProbe", "DeviceChoice", "choose_device", "cuda_weight_bytes", "gpu_margin",
           "probe_cuda"]

DEVICES = ("auto", "cpu", "cuda")
GIB = 1 << 30
INSTALL_HINT = "pip install 'edgeinfer[cuda]'"
# GPU memory kept free: the CUDA context and module images when the probe read NVML (numba's figure already counts
# a context), allocator rounding, and a display or another process taking some meanwhile.
GPU_MARGIN_FRACTION = 0.05
GPU_MARGIN_FLOOR = 512 << 20
# bytes per value of each float ggml type in the CUDA layout (kernels_cuda.layout): F32 and BF16 as float32, F16 as
# float16; the quantized types become int8 values with a float32 scale and offset per group of 32 columns (16 for
# Q2_K, Q3_K, Q6_K): 1 + 8/16 bytes per value at most, the bound used here
FLOAT_BYTES_PER_VALUE = {0: 4, 1: 2, 30: 4}
QUANT_BYTES_PER_VALUE = 1.5


@dataclass(frozen=True)
class CudaProbe:
    """What this process can see of a CUDA GPU. Bytes; None where unknown.

    available: a real GPU that numba-cuda can drive; reason: why not, or how it was read; simulator: numba-cuda's
    simulator is on (NUMBA_ENABLE_CUDASIM=1), which runs CUDA kernels on the host and is not a GPU."""

    available: bool
    reason: str
    name: str | None = None
    total_bytes: int | None = None
    free_bytes: int | None = None
    simulator: bool = False


def _simulator_on() -> bool:
    try:
        from numba.core import config  # numba is a dependency; this reads NUMBA_ENABLE_CUDASIM (and its yaml file)

        return bool(config.ENABLE_CUDASIM)
    except Exception:  # noqa: BLE001 (a broken numba: then the environment variable alone says)
        return os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


def _numba_cuda_installed() -> bool:
    """numba-cuda (NVIDIA's CUDA target, module numba_cuda) is installed; numba's own deprecated numba.cuda does not
    count: the CUDA backend is written for numba-cuda."""
    return importlib.util.find_spec("numba_cuda") is not None


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0].rstrip(".") if text else type(error).__name__


def _probe_numba_cuda() -> CudaProbe:
    from numba import cuda

    if not cuda.is_available():
        try:
            why = _first_line(cuda.cuda_error()) if cuda.cuda_error() is not None else "no CUDA driver or GPU found"
        except Exception:  # noqa: BLE001
            why = "no CUDA driver or GPU found"
        return CudaProbe(False, f"no CUDA GPU: {why}")
    device = cuda.get_current_device()
    name = device.name.decode() if isinstance(device.name, bytes) else str(device.name)
    free, total = cuda.current_context().get_memory_info()
    return CudaProbe(True, "read through numba-cuda", name, int(total), int(free))


def _probe_nvml() -> CudaProbe | None:
    """The first GPU as NVML sees it (nvidia-ml-py's module pynvml), or None without the module; it cannot run
    the backend, so never `available`: the reason says what to install."""
    if importlib.util.find_spec("pynvml") is None:
        return None
    import pynvml

    try:
        pynvml.nvmlInit()
    except Exception as e:  # noqa: BLE001 (NVMLError_LibraryNotFound, DriverNotLoaded, ...)
        return CudaProbe(False, f"no CUDA GPU: no NVIDIA driver ({_first_line(e)}); numba-cuda not installed")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            return CudaProbe(False, "no CUDA GPU: the NVIDIA driver sees none; numba-cuda not installed")
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        name = name.decode() if isinstance(name, bytes) else str(name)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return CudaProbe(False, f"numba-cuda not installed (an {name} is present)", name, int(memory.total),
                         int(memory.free))
    finally:
        pynvml.nvmlShutdown()


def probe_cuda() -> CudaProbe:
    """The CUDA GPU this process could run on, read through numba-cuda if installed, else nvidia-ml-py (which can
    name a GPU but not run it); never raises: a failure is an unavailable probe whose reason says why."""
    try:
        if _simulator_on():
            return CudaProbe(False, "numba-cuda's simulator (NUMBA_ENABLE_CUDASIM=1), not a GPU", simulator=True)
        if _numba_cuda_installed():
            return _probe_numba_cuda()
        return _probe_nvml() or CudaProbe(False, "no CUDA GPU: numba-cuda not installed")
    except Exception as e:  # noqa: BLE001 (a driver error, a half-installed package: the CPU still runs)
        return CudaProbe(False, f"no CUDA GPU: the probe failed ({_first_line(e)})")


def gpu_margin(total_bytes: int) -> int:
    """GPU bytes a plan leaves free: 5% of the GPU's memory, at least 512 MiB."""
    return max(int(total_bytes * GPU_MARGIN_FRACTION), GPU_MARGIN_FLOOR)


def cuda_weight_bytes(weights: DecoderWeights) -> int:
    """Bytes the CUDA backend's layout of these weights takes on the GPU (an upper bound for quantized matrices: int8
    values with a scale and offset per 16 values; float ones as the layout keeps them; norms and biases as
    float32). A tied LM head (the embedding itself) counts once."""
    seen, total = set(), 0
    matrices = [weights.token_embd, weights.output]
    vectors = [weights.output_norm]
    for layer in weights.layers:
        for value in vars(layer).values():
            (vectors if hasattr(value, "dtype") else matrices).append(value)
    for m in matrices:
        if m is None or id(m) in seen:
            continue
        seen.add(id(m))
        per_value = FLOAT_BYTES_PER_VALUE.get(m.ggml_type, QUANT_BYTES_PER_VALUE)
        total += int(m.n_rows * m.n_cols * per_value)
    return total + sum(4 * int(v.size) for v in vectors if v is not None)


@dataclass(frozen=True)
class DeviceChoice:
    """Where a model runs: name "cpu" or "cuda", the backend that runs it, and why (one line, "cuda: NVIDIA H200,
    139 GiB free"). free_bytes / total_bytes: the GPU memory to plan against, None where the host's memory is what
    counts (the CPU, and the simulator)."""

    name: str
    backend: Backend
    reason: str
    gpu_name: str | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None

    @property
    def on_gpu(self) -> bool:
        return self.free_bytes is not None

    @property
    def summary(self) -> str:
        """The choice for a start line: "cpu (no CUDA GPU: numba-cuda not installed)"."""
        return f"{self.name} ({self.reason.partition(': ')[2]})"


def check_device(device) -> str:
    """`device` if it is one of DEVICES; TypeError / InvalidArgument naming the argument otherwise."""
    if not isinstance(device, str):
        raise TypeError(f"device must be a str ({', '.join(map(repr, DEVICES))}), not {type(device).__name__}")
    if device not in DEVICES:
        raise InvalidArgument(f"device must be {', '.join(map(repr, DEVICES))}; got {device!r}")
    return device


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB" if n < 10 * GIB else f"{n / GIB:.0f} GiB"


def _cpu_backend() -> Backend:
    from edgeinfer.backends.cpu import CPUBackend

    return CPUBackend()


def _cuda_backend() -> Backend:
    """The CUDA backend; UnsupportedError (naming the install) where it cannot be had."""
    try:
        from edgeinfer.backends.cuda import CUDABackend
    except ImportError as e:  # a release without it, or a dependency of it missing
        raise UnsupportedError(f"the CUDA backend cannot be loaded ({_first_line(e)}): {INSTALL_HINT}") from None
    try:
        return CUDABackend()
    except UnsupportedError:
        raise
    except Exception as e:  # noqa: BLE001 (a driver or toolkit error of numba-cuda's: one line, not a traceback)
        raise UnsupportedError(f"the CUDA backend could not start: {_first_line(e)}") from None


def choose_device(requested: str, model_bytes: int, kv_bytes: int, *, probe: CudaProbe | None = None,
                  cpu_backend: Callable[[], Backend] = _cpu_backend,
                  cuda_backend: Callable[[], Backend] = _cuda_backend) -> DeviceChoice:
    """The device for `requested` ("auto", "cpu" or "cuda") and a model whose weights take model_bytes on a GPU and
    whose smallest useful KV cache (and scratch) kv_bytes.

    auto: the GPU if there is a real one (not the simulator), numba-cuda drives it and model_bytes + kv_bytes fit
    its free memory less the margin (`gpu_margin`); else the CPU, the reason saying why. cuda: the GPU, or the
    simulator where it is on; UnsupportedError naming what is missing (GPU, driver, numba-cuda) otherwise (whether
    a context fits is the budget's to say). probe: `probe_cuda()` when None; the backend factories are for tests."""
    check_device(requested)
    if requested == "cpu":
        return DeviceChoice("cpu", cpu_backend(), "cpu: asked for")
    probe = probe or probe_cuda()
    if requested == "cuda":
        if probe.simulator:
            return DeviceChoice("cuda", cuda_backend(), f"cuda: {probe.reason}")
        if not probe.available:
            raise UnsupportedError(f"device cuda: {probe.reason}; it needs an NVIDIA GPU, its driver and numba-cuda "
                               f"({INSTALL_HINT})")
        return _on_gpu(cuda_backend(), probe, "asked for")
    if probe.simulator:
        return DeviceChoice("cpu", cpu_backend(), f"cpu: {probe.reason}")
    if not probe.available:
        return DeviceChoice("cpu", cpu_backend(), f"cpu: {probe.reason}")
    need = model_bytes + kv_bytes + gpu_margin(probe.total_bytes)
    if need > probe.free_bytes:
        return DeviceChoice("cpu", cpu_backend(), f"cpu: model needs {_gib(need)} (with its smallest KV cache and "
                                                  f"a margin), GPU has {_gib(probe.free_bytes)} free")
    try:
        backend = cuda_backend()
    except UnsupportedError as e:
        return DeviceChoice("cpu", cpu_backend(), f"cpu: {e}")
    return _on_gpu(backend, probe)


def _on_gpu(backend: Backend, probe: CudaProbe, why: str = "") -> DeviceChoice:
    reason = f"cuda: {probe.name}, {_gib(probe.free_bytes)} free" + (f" ({why})" if why else "")
    return DeviceChoice("cuda", backend, reason, probe.name, probe.free_bytes, probe.total_bytes)
