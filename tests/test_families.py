"""Parity with llama.cpp on a tiny random-weight model of each architecture family (tests/tiny_families.py), F16 and
Q8_0 weights, against llama.cpp's logits at every position of a ~300-token prompt (tests/data/families, recorded by
tests/record_family_references.py).

Done-when of the architectures issue: tokenization equal to llama.cpp's; mean KL(llama.cpp || ours) over all
positions <= 0.01; argmax equal at >= 98% of the positions where llama.cpp's own top-2 margin exceeds 0.1 (random
weights give many near-ties). The prompt runs past the sliding windows, the Llama 3 factors' original context and
SmolLM3's NoPE layers, so each position-dependent detail shows.
"""
from pathlib import Path

import numpy as np
import pytest

from tiny_families import CONTEXT, FAMILIES, PROMPT, WEIGHT_TYPES, write_family

DATA = Path(__file__).parent / "data" / "families"
MARGIN = 0.1
MAX_MEAN_KL, MIN_AGREEMENT = 0.01, 0.98


def reference(name: str, weight_type: str) -> dict:
    with np.load(DATA / f"{name}-{weight_type}.npz") as d:
        return {"tokens": d["tokens"].tolist(), "logits": d["logits"].astype(np.float32)}


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def compare(ours: np.ndarray, theirs: np.ndarray) -> tuple[float, float]:
    """(mean KL(theirs || ours) over positions, argmax agreement where theirs has a top-2 margin > MARGIN)."""
    lt, lo = log_softmax(theirs), log_softmax(ours)
    kl = np.sum(np.exp(lt) * (lt - lo), axis=-1)
    top2 = np.sort(theirs, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > MARGIN
    agree = ours.argmax(-1)[clear] == theirs.argmax(-1)[clear]
    return float(kl.mean()), float(agree.mean())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("families")


@pytest.mark.parametrize("weight_type", list(WEIGHT_TYPES))
@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_matches_llama_cpp(model_dir, name, weight_type):
    import edgeinfer

    ref = reference(name, weight_type)
    path = write_family(model_dir / f"{name}-{weight_type}.gguf", name, weight_type)
    with edgeinfer.load(path, n_ctx=CONTEXT, seed=0, kv_type="f32") as model:
        assert model.tokenize(PROMPT) == ref["tokens"]
        assert len(ref["tokens"]) >= 256
        logits = model.logits(ref["tokens"])
    kl, agreement = compare(logits, ref["logits"])
    print(f"{name} {weight_type}: mean KL {kl:.5f}, argmax agreement {agreement:.4f}")
    assert kl <= MAX_MEAN_KL
    assert agreement >= MIN_AGREEMENT


def test_llama3_without_its_rope_factors_would_not_match(model_dir):
    """The Llama 3 case is sensitive to the factors: the same weights with plain RoPE are far from llama.cpp's."""
    import edgeinfer

    ref = reference("llama3", "F16")
    path = write_family(model_dir / "llama3-plain.gguf", "llama3", "F16", drop=("rope_freqs.weight",))
    with edgeinfer.load(path, n_ctx=CONTEXT, seed=0, kv_type="f32") as model:
        kl, agreement = compare(model.logits(ref["tokens"]), ref["logits"])
    assert kl > 10 * MAX_MEAN_KL or agreement < 0.9
