"""A pytest plugin that records, under numba-cuda's simulator, every CUDA kernel launch's (module, kernel, argument
types), so tools.cuda_compile_check can compile the same specializations for a real GPU with NVVM (no GPU needed).

The simulator runs kernels as Python, so code that CUDA cannot compile (a numpy call, an object, a float64
constant where the arithmetic should be float32) passes its tests; compiling what the tests launch catches that.
Use: python -m pytest -p tools.cuda_capture tests/test_cuda_kernels.py tests/test_cuda_backend.py, with
EDGEINFER_CUDA_CAPTURE=FILE (JSON lines, one per distinct launch).
"""
from __future__ import annotations

import json
import os

import numpy as np

_seen: set[str] = set()


def _type_of(arg) -> str:
    """The numba type a real launch would give the argument, as text numba.types can read back."""
    array = getattr(arg, "_ary", arg)  # the simulator's device arrays wrap a numpy array
    if isinstance(array, np.ndarray):
        if array.ndim == 0:
            return str(np.dtype(array.dtype).name)
        # device arrays are C-contiguous unless sliced; a non-contiguous view types as layout A
        layout = "C" if array.flags.c_contiguous else "A"
        return f"Array({np.dtype(array.dtype).name}, {array.ndim}, '{layout}')"
    if isinstance(arg, (bool, np.bool_)):
        return "boolean"
    if isinstance(arg, (int, np.integer)):
        return "int64" if isinstance(arg, int) else np.dtype(type(arg)).name
    if isinstance(arg, (float, np.floating)):
        return "float64" if isinstance(arg, float) else np.dtype(type(arg)).name
    raise TypeError(f"cannot record an argument of type {type(arg).__name__}")


def pytest_configure(config):
    path = os.environ.get("EDGEINFER_CUDA_CAPTURE")
    if not path:
        return
    from numba.cuda.simulator import kernel

    launch = kernel.FakeCUDAKernel.__call__

    def recording_call(self, *args):
        if not self._device and not kernel._kernel_context:
            record = json.dumps({"module": self.fn.__module__, "kernel": self.fn.__name__,
                                 "args": [_type_of(a) for a in args]})
            if record not in _seen:
                _seen.add(record)
                with open(path, "a") as f:
                    f.write(record + "\n")
        return launch(self, *args)

    kernel.FakeCUDAKernel.__call__ = recording_call
