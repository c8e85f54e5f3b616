"""The CUDA backend against the CPU backend: the same tiny models' logits through the seam (prepare, allocate_cache,
forward), in numba-cuda's simulator (tests/conftest.py) or on a GPU; its KV cache's record keeping and storage;
the refusal without numba-cuda; importing edgeinfer never loads numba.cuda."""
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pip install 'edgeinfer[cuda]')")

from edgeinfer.arch import load_decoder  # noqa: E402
from edgeinfer.backends.cpu import CPUBackend  # noqa: E402
from edgeinfer.backends.cuda import CUDABackend  # noqa: E402
from edgeinfer.engine import Engine  # noqa: E402
from edgeinfer.errors import UnsupportedError  # noqa: E402
from edgeinfer.gguf_reader import GGUFFile  # noqa: E402
from tiny_families import write_family  # noqa: E402
from tiny_gguf import write_tiny_llama  # noqa: E402

PROMPT = [5, 40, 77, 100, 3, 9]


def kl(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row of two logit arrays."""
    p, q = (np.asarray(a, np.float64) for a in (p_logits, q_logits))
    lp = p - p.max(1, keepdims=True) - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True))
    lq = q - q.max(1, keepdims=True) - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True))
    return (np.exp(lp) * (lp - lq)).sum(1)


def run_steps(backend, cfg, weights, path, kv_type) -> np.ndarray:
    """Logits of a prefill of 6 tokens (every row), 2 decode steps, then one step of 2 sequences (sequence 0 and a
    copy of its first 4 positions), stacked: (6 + 2 + 2, n_vocab)."""
    runner = backend.prepare(cfg, weights, path, use_cache=False)
    cache = backend.allocate_cache(cfg, 16, 2, kv_type)
    out = []

    def step(tokens, positions, seqs, logit_rows):
        logits = np.zeros((len(logit_rows), cfg.n_vocab), np.float32)
        runner.forward(np.array(tokens, np.int64), np.array(positions, np.int64), np.array(seqs, np.int64),
                       np.array(logit_rows, np.int64), cache, logits, 1)
        out.append(logits)

    step(PROMPT, range(6), [0] * 6, range(6))
    step([11], [6], [0], [0])
    step([12], [7], [0], [0])
    cache.record(0, PROMPT + [11, 12])
    second = cache.allocate()
    cache.copy_prefix(0, second, 4)
    step([13, 14], [8, 4], [0, second], [0, 1])
    return np.concatenate(out)


def check_parity(path, kv_type):
    with GGUFFile(path) as gguf:
        cfg, weights = load_decoder(gguf)
        cpu = run_steps(CPUBackend(), cfg, weights, path, kv_type)
        gpu = run_steps(CUDABackend(), cfg, weights, path, kv_type)
    assert np.all(np.isfinite(gpu))
    assert kl(cpu, gpu).max() <= 0.01
    assert (cpu.argmax(1) == gpu.argmax(1)).mean() >= 0.9


@pytest.mark.slow
def test_tiny_llama_matches_the_cpu_backend_f16(tmp_path):
    check_parity(write_tiny_llama(tmp_path / "llama.gguf"), "f16")


@pytest.mark.slow
def test_gemma2_window_softcaps_post_norms_match_the_cpu_backend(tmp_path):
    """gemma2: sliding window (48, on alternate layers), attention and final soft-caps, post-norms, GeGLU, tied
    embedding, embedding scale."""
    check_parity(write_family(tmp_path / "gemma2.gguf", "gemma2", "Q8_0"), "f16")


@pytest.mark.slow
def test_qwen3_qk_norms_match_the_cpu_backend_q8_0_cache(tmp_path):
    """qwen3: per-head Q/K norms, heads of 32 (a q8_0 cache). (F16 weights: test_cuda_kernels' linear tests; their
    float16 arithmetic is slow in the simulator.)"""
    check_parity(write_family(tmp_path / "qwen3.gguf", "qwen3", "Q8_0"), "q8_0")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = write_tiny_llama(tmp_path_factory.mktemp("cuda") / "llama.gguf")
    with GGUFFile(path) as gguf:
        cfg, weights = load_decoder(gguf)
        yield cfg, weights, path


def test_the_engine_runs_on_the_cuda_backend(tiny_llama):
    """Through the engine (only the seam): a prompt's logits equal the runner's for the same rows."""
    cfg, weights, path = tiny_llama
    backend = CUDABackend()
    engine = Engine(cfg, backend.prepare(cfg, weights, path), n_ctx=16, backend=backend)
    last = engine.prefill([5, 40, 77])
    assert engine.n_past == 3 and engine.cache.tokens(0) == [5, 40, 77]
    with GGUFFile(path) as gguf:
        cfg2, weights2 = load_decoder(gguf)
        cpu = Engine(cfg2, CPUBackend().prepare(cfg2, weights2, path, use_cache=False), n_ctx=16).prefill([5, 40, 77])
    assert kl(cpu[None], last[None]).max() <= 0.01


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_cuda_cache_keeps_the_record_and_moves_device_storage(tiny_llama, kv_type):
    cfg, _, _ = tiny_llama
    if kv_type == "q8_0":
        cfg = type(cfg)(**{**cfg.__dict__, "head_dim": 32, "value_dim": 32})
    cache = CUDABackend().allocate_cache(cfg, 8, 3, kv_type)
    assert cache.nbytes == cache.nbytes_for(cfg, 8, 3, kv_type)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((cfg.n_layers, 5, cfg.n_kv_heads, cfg.head_dim)).astype(np.float32)
    v = rng.standard_normal((cfg.n_layers, 5, cfg.n_kv_heads, cfg.value_dim)).astype(np.float32)
    assert cache.restore(0, [1, 2, 3, 4, 5], k, v)
    tokens, k0, v0 = cache.export(0)
    assert tokens == [1, 2, 3, 4, 5]
    tolerance = 0.02 if kv_type == "q8_0" else 1e-3
    np.testing.assert_allclose(k0, k, atol=tolerance * 4)
    second = cache.allocate()
    cache.copy_prefix(0, second, 3)
    tokens, k1, v1 = cache.export(second)
    assert tokens == [1, 2, 3]
    np.testing.assert_array_equal(k1, k0[:, :3])
    np.testing.assert_array_equal(v1, v0[:, :3])
    cache.truncate(0, 2)
    assert cache.length(0) == 2 and cache.length(second) == 3
    assert not cache.restore(second, list(range(9)), np.zeros((1, 9, 1, 1)), np.zeros((1, 9, 1, 1)))


def test_without_numba_cuda_the_backend_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "numba_cuda", None)  # as if not installed: importing it raises ImportError
    with pytest.raises(UnsupportedError, match=r"pip install 'edgeinfer\[cuda\]'"):
        CUDABackend()


def test_importing_edgeinfer_does_not_load_numba_cuda():
    code = ("import sys, edgeinfer, edgeinfer.api, edgeinfer.engine, edgeinfer.backends.cuda; "
            "print('numba.cuda' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
