"""The backend seam (edgeinfer.backends): the engine needs prepare, allocate_cache and forward and nothing else;
architectures only describe; adding an architecture is adding one file that the runtime and the converter both read."""
import ast
import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

import edgeinfer
from conftest import model_path
from edgeinfer.arch import ARCHITECTURES, discover, load_decoder
from edgeinfer.arch.decoder import DecoderWeights, LayerWeights, QuantMatrix
from edgeinfer.backends.cpu import CPUBackend
from edgeinfer.engine import Engine
from edgeinfer.gguf_reader import GGUFFile

ROOT = Path(edgeinfer.__file__).parent


class SeamOnly:
    """Fails a test on any use of an attribute its class does not define (what lies beyond the seam)."""

    def __getattr__(self, name):
        raise AssertionError(f"the engine used {type(self).__name__}.{name}, which is not part of the seam")


class FakeRunner(SeamOnly):
    def __init__(self, runner, calls):
        self._runner, self._calls = runner, calls

    def forward(self, tokens, positions, seqs, logit_rows, cache, logits, n_threads):
        self._calls.append(("forward", tokens.tolist(), positions.tolist(), seqs.tolist(), logit_rows.tolist(),
                            cache, n_threads))
        self._runner.forward(tokens, positions, seqs, logit_rows, cache, logits, n_threads)


class FakeBackend(SeamOnly):
    """The CPU backend seen only through the seam, with every call recorded."""

    name = "fake"

    def __init__(self):
        self._cpu, self.calls = CPUBackend(), []

    @property
    def max_threads(self):
        return self._cpu.max_threads

    def prepare(self, cfg, weights, model_path, use_cache=True):
        self.calls.append(("prepare", model_path))
        return FakeRunner(self._cpu.prepare(cfg, weights, model_path, use_cache), self.calls)

    def allocate_cache(self, cfg, n_ctx, n_seq, kv_type):
        cache = self._cpu.allocate_cache(cfg, n_ctx, n_seq, kv_type)
        self.calls.append(("allocate_cache", n_ctx, n_seq, kv_type, cache))
        return cache


@pytest.fixture(scope="module")
def smollm2():
    with GGUFFile(model_path("smollm2-135m-instruct")) as gguf:
        cfg, views = load_decoder(gguf)
        yield gguf, cfg, views


def run_everything(engine: Engine) -> list[np.ndarray]:
    """Logits of every kind of batch the engine builds: prefill in chunks, decode, decode of two sequences."""
    second = engine.cache.allocate()
    out = [engine.prefill(list(range(100, 110))), engine.decode(7), engine.prefill([1, 2, 3], seq=second)]
    out.append(engine.decode_batch([8, 9], [0, second]))
    engine.warm_up()
    out.append(engine.decode(10))
    return out


def test_a_backend_is_all_the_engine_needs(smollm2):
    gguf, cfg, views = smollm2
    fake = FakeBackend()
    engine = Engine(cfg, fake.prepare(cfg, views, gguf.path), n_ctx=32, n_batch=4, n_threads=1, n_seq=2,
                    kv_type="f32", backend=fake)
    got = run_everything(engine)
    cpu = CPUBackend()
    expected = run_everything(Engine(cfg, cpu.prepare(cfg, views, gguf.path), n_ctx=32, n_batch=4, n_threads=1,
                                     n_seq=2, kv_type="f32", backend=cpu))
    for a, b in zip(got, expected, strict=True):
        assert np.array_equal(a, b)

    assert fake.calls[0] == ("prepare", gguf.path)
    assert fake.calls[1][:4] == ("allocate_cache", 32, 2, "f32")
    cache = fake.calls[1][4]
    assert cache is engine.cache
    forwards = fake.calls[2:]
    assert {c[0] for c in forwards} == {"forward"} and all(c[5] is cache and c[6] == 1 for c in forwards)
    # (tokens, positions, seqs, logit rows) of each call: the prompt in chunks of n_batch = 4, then decode steps
    assert [c[1:5] for c in forwards[:4]] == [
        ([100, 101, 102, 103], [0, 1, 2, 3], [0, 0, 0, 0], []),
        ([104, 105, 106, 107], [4, 5, 6, 7], [0, 0, 0, 0], []),
        ([108, 109], [8, 9], [0, 0], [1]),
        ([7], [10], [0], [0])]
    assert forwards[5][1:5] == ([8, 9], [11, 3], [0, 1], [0, 1])  # one step of two sequences is one call


def test_engine_and_architectures_stay_above_the_seam():
    """engine.py computes nothing itself (no kernels, no Numba); architectures import no backend."""
    def imported(path: Path) -> set[str]:
        tree = ast.parse(path.read_text())
        names = {a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
        return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}

    assert not {m for m in imported(ROOT / "engine.py") if m.startswith(("kernels_cpu", "numba"))}
    for path in (ROOT / "arch").glob("*.py"):
        assert not {m for m in imported(path) if m.startswith(("edgeinfer.backends", "edgeinfer.engine"))}, path
    fields = {f.name for cls in (QuantMatrix, LayerWeights, DecoderWeights) for f in dataclasses.fields(cls)}
    assert not {f for f in fields if "packed" in f or "kernel" in f}  # no backend layout in the description


def test_tools_read_the_architecture_list_of_edgeinfer_arch():
    from tools.convert import SUPPORTED_ARCHS
    from tools.export_hf import HF_ARCH
    from tools.hf_checkpoint import ARCHITECTURES as HF_SOURCES

    assert set(ARCHITECTURES) == {"llama", "qwen2", "gemma3", "qwen3", "gemma2", "granite", "olmo2", "smollm3",
                                  "phi3"}
    assert set(SUPPORTED_ARCHS) == set(ARCHITECTURES)
    # the Hugging Face converter takes every family (each declares its HF names); the exporter the first three
    converted = {arch for arch, module in ARCHITECTURES.items() if module.HF_ARCHITECTURES}
    assert converted == set(ARCHITECTURES)
    assert {module.ARCH for module in HF_SOURCES.values()} == converted
    assert set(HF_ARCH) == {"llama", "qwen2", "gemma3"}
    for arch in HF_ARCH:
        module = ARCHITECTURES[arch]
        hf_class, model_type, model_arch = HF_ARCH[arch]
        assert HF_SOURCES[hf_class].ARCH == arch  # an export converts back to the same architecture
        assert (model_type, model_arch.name) == (module.HF_MODEL_TYPE, module.GGUF_MODEL_ARCH)
    assert HF_ARCH["gemma3"][1] == "gemma3_text"  # Gemma 3's text-only model type, as transformers names it


ARCH_FILE = '''
from edgeinfer.arch.llama import HF_CONVERT, config_from_gguf
ARCH = "tinyllama"
HF_ARCHITECTURES = ("TinyLlamaForCausalLM",)
HF_MODEL_TYPE = "tinyllama"
GGUF_MODEL_ARCH = "LLAMA"
'''


def make_package(root: Path, name: str, files: dict[str, str]):
    (root / name).mkdir()
    (root / name / "__init__.py").write_text("")
    for file, text in files.items():
        (root / name / file).write_text(text)
    return __import__(name)


def test_an_architecture_is_one_file(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    package = make_package(tmp_path, "archs_one_file", {"tinyllama.py": ARCH_FILE, "helper.py": "X = 1\n"})
    found = discover(package)
    assert list(found) == ["tinyllama"] and found["tinyllama"].HF_MODEL_TYPE == "tinyllama"  # helper.py: no ARCH

    broken = make_package(tmp_path, "archs_broken", {"half.py": 'ARCH = "half"\nHF_MODEL_TYPE = "half"\n'})
    with pytest.raises(ImportError, match="archs_broken.half does not define HF_ARCHITECTURES, GGUF_MODEL_ARCH, "
                                          "HF_CONVERT, config_from_gguf"):
        discover(broken)
    twice = make_package(tmp_path, "archs_twice", {"a.py": ARCH_FILE, "b.py": ARCH_FILE})
    with pytest.raises(ImportError, match="'tinyllama' is defined by both archs_twice.a and archs_twice.b"):
        discover(twice)
    for name in [n for n in sys.modules if n.startswith("archs_")]:
        monkeypatch.delitem(sys.modules, name)
