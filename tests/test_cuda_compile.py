"""The CUDA kernels compile for real GPUs, without one: every specialization the simulator tests launch
(tests/data/cuda_launches.jsonl, recorded by tools.cuda_capture) through NVVM to PTX and ptxas to sm_80 / sm_90 code
(the simulator runs kernels as Python, so it passes code CUDA refuses); dp4a's arithmetic in the simulator."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pip install 'edgeinfer[cuda]')")

from numba.cuda.simulator.kernel import FakeCUDAKernel  # noqa: E402

import kernels_cuda.attention  # noqa: E402,F401 (their kernels are listed below)
import kernels_cuda.cache_ops  # noqa: E402,F401
import kernels_cuda.linear  # noqa: E402,F401
import kernels_cuda.ops  # noqa: E402,F401
from kernels_cuda.dot4 import dot4_reference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LAUNCHES = ROOT / "tests" / "data" / "cuda_launches.jsonl"
RECORD = ("EDGEINFER_CUDA_CAPTURE=tests/data/cuda_launches.jsonl python -m pytest -n 0 -p tools.cuda_capture "
          "tests/test_cuda_kernels.py tests/test_cuda_backend.py (after removing the file)")


def test_dot4_is_dp4a_arithmetic():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, (200, 4)).astype(np.int8)
    b = rng.integers(-128, 128, (200, 4)).astype(np.int8)
    c = rng.integers(-2**20, 2**20, 200).astype(np.int32)
    for i in range(200):
        packed_a, packed_b = int(a[i].view(np.int32)[0]), int(b[i].view(np.int32)[0])
        expected = int(c[i]) + int((a[i].astype(np.int64) * b[i].astype(np.int64)).sum())
        assert dot4_reference(packed_a, packed_b, int(c[i])) == expected
    assert dot4_reference(0x80808080, 0x80808080, 0) == 4 * 128 * 128  # -128 * -128, four times


def test_the_launch_record_covers_every_kernel():
    """A kernel added to kernels_cuda must be launched by the simulator tests and recorded, or it is never compiled."""
    kernels = {(module.__name__, name) for module in (kernels_cuda.attention, kernels_cuda.cache_ops,
                                                      kernels_cuda.linear, kernels_cuda.ops)
               for name, value in vars(module).items()
               if isinstance(value, FakeCUDAKernel) and not value._device and value.fn.__module__ == module.__name__}
    recorded = {(r["module"], r["kernel"]) for r in map(json.loads, LAUNCHES.read_text().splitlines())}
    assert kernels, "no kernels found: is numba.cuda the simulator?"
    missing = sorted(f"{m}.{k}" for m, k in kernels - recorded)
    assert not missing, f"kernels never recorded: {missing}; record again with {RECORD}"


@pytest.mark.slow
def test_every_recorded_launch_compiles_and_assembles_for_sm80_and_sm90():
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    done = subprocess.run([sys.executable, "-m", "tools.cuda_compile_check", str(LAUNCHES), "--cc", "8.0,9.0"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    lines = done.stdout.splitlines()
    assert done.returncode == 0, (f"{done.stdout}\n{done.stderr}\nA changed kernel signature needs a new record: "
                                  f"{RECORD}")
    assert "ptxas not found" not in done.stderr  # the test extra installs the toolkit's ptxas
    assert len([line for line in lines if line.startswith("ok ")]) == 2 * len(LAUNCHES.read_text().splitlines())
    assert all("assembled" in line for line in lines if line.startswith("ok "))
    quantized = [line for line in lines if "linear.linear_quantized" in line]
    assert quantized and all("dp4a" in line for line in quantized)  # int8 dots in one instruction each
