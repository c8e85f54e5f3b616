"""Parity with llama.cpp on a tiny random-weight model of each architecture family (tests/tiny_families.py), F16 and
Q8_0 weights, against llama.cpp's logits at every position of a ~300-token prompt (tests/data/families, recorded by
tests/record_family_references.py).

Done-when of the architectures issue: tokenization equal to llama.cpp's; mean KL(llama.cpp || ours) over all
positions <= 0.01; argmax equal at >= 98% of the positions where llama.cpp's own top-2 margin exceeds 0.1 (random
weights give many near-ties). The prompt runs past the sliding windows, the original contexts of the Llama 3 factors
and of YaRN, and SmolLM3's NoPE layers, so each position-dependent detail shows. Each family runs at the n_ctx its
reference was recorded with (Phi-3's long-rope factors depend on it: long at 1024, short at 512).
"""
from pathlib import Path

import numpy as np
import pytest

from tiny_families import FAMILIES, PROMPT, WEIGHT_TYPES, reference_name, write_family

DATA = Path(__file__).parent / "data" / "families"
MARGIN = 0.1
MAX_MEAN_KL, MIN_AGREEMENT = 0.01, 0.98


def reference(name: str, weight_type: str, n_ctx: int | None = None) -> dict:
    """llama.cpp's tokens and logits for the family at n_ctx (default: its first context)."""
    with np.load(DATA / reference_name(name, weight_type, n_ctx or FAMILIES[name].contexts[0])) as d:
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


RUNS = [(name, n_ctx) for name, f in FAMILIES.items() for n_ctx in f.contexts]


def run(path: Path, n_ctx: int, tokens: list[int]) -> np.ndarray:
    import edgeinfer

    with edgeinfer.load(path, n_ctx=n_ctx, seed=0, kv_type="f32") as model:
        return model.logits(tokens)


@pytest.mark.parametrize("weight_type", list(WEIGHT_TYPES))
@pytest.mark.parametrize("name, n_ctx", RUNS, ids=[f"{name}-ctx{n_ctx}" for name, n_ctx in RUNS])
def test_family_matches_llama_cpp(model_dir, name, n_ctx, weight_type):
    import edgeinfer

    ref = reference(name, weight_type, n_ctx)
    path = model_dir / f"{name}-{weight_type}.gguf"
    if not path.exists():
        write_family(path, name, weight_type)
    with edgeinfer.load(path, n_ctx=n_ctx, seed=0, kv_type="f32") as model:
        assert model.tokenize(PROMPT) == ref["tokens"]
        assert len(ref["tokens"]) >= 256
        logits = model.logits(ref["tokens"])
    kl, agreement = compare(logits, ref["logits"])
    print(f"{name} n_ctx {n_ctx} {weight_type}: mean KL {kl:.5f}, argmax agreement {agreement:.4f}")
    assert kl <= MAX_MEAN_KL
    assert agreement >= MIN_AGREEMENT


# family -> what is switched off (tensors or keys left out of the file): each case is sensitive to its scaling, the
# same weights without it are far from llama.cpp's logits
SWITCHED_OFF = {
    "llama3": ("rope_freqs.weight",),
    "llama-yarn": ("llama.rope.scaling.type",),  # the factor then scales linearly: no ramp, no magnitude
    "qwen3-yarn": ("qwen3.rope.scaling.type",),
    "phi3-longrope": ("phi3.rope.scaling.attn_factor",),
}


@pytest.mark.parametrize("name", list(SWITCHED_OFF))
def test_without_its_rope_scaling_would_not_match(model_dir, name):
    ref = reference(name, "F16")
    path = write_family(model_dir / f"{name}-off.gguf", name, "F16", drop=SWITCHED_OFF[name])
    kl, agreement = compare(run(path, FAMILIES[name].contexts[0], ref["tokens"]), ref["logits"])
    print(f"{name} without {SWITCHED_OFF[name]}: mean KL {kl:.4f}, argmax agreement {agreement:.4f}")
    assert kl > 10 * MAX_MEAN_KL or agreement < 0.9


def test_long_rope_factors_follow_the_context(model_dir):
    """Phi-3 long-rope's factors are chosen by n_ctx: run with the other context's choice, the logits are far from
    llama.cpp's at this one."""
    contexts = FAMILIES["phi3-longrope"].contexts
    path = write_family(model_dir / "phi3-longrope-choice.gguf", "phi3-longrope", "F16")
    for ours, theirs in zip(contexts, contexts[::-1]):
        ref = reference("phi3-longrope", "F16", theirs)
        kl, agreement = compare(run(path, ours, ref["tokens"]), ref["logits"])
        print(f"phi3-longrope at n_ctx {ours} against llama.cpp at {theirs}: KL {kl:.4f}, agreement {agreement:.4f}")
        assert kl > 10 * MAX_MEAN_KL or agreement < 0.9


@pytest.mark.parametrize("name, metadata, problem", [
    ("smollm3", {"smollm3.rope.scaling.type": "yarn", "smollm3.rope.scaling.factor": 2.0},
     "smollm3.rope.scaling.type = 'yarn': RoPE scaling whose magnitude differs between layers"),
    ("phi3", {"phi3.rope.scaling.attn_factor": 1.25},
     "phi3.rope.scaling.attn_factor = 1.25: RoPE scaling with a magnitude (1.25) on partly rotated heads (8 of 16"),
])
def test_rope_magnitude_the_attention_scale_cannot_hold_is_refused_by_name(model_dir, name, metadata, problem):
    """RoPE's magnitude (YaRN's 1 + 0.1 ln factor, long-rope's attn_factor, on cos and sin) is folded into the
    forward's one attention scale: SmolLM3's NoPE layers would need their own, and on partly rotated heads (Phi-4
    mini) only the rotated dims carry it, so such files are refused naming the key, not run approximately."""
    from edgeinfer.arch import load_decoder
    from edgeinfer.errors import UnsupportedError
    from edgeinfer.gguf_reader import GGUFFile

    path = write_family(model_dir / f"{name}-magnitude.gguf", name, "F16", metadata=metadata)
    with GGUFFile(path) as g, pytest.raises(UnsupportedError) as e:
        load_decoder(g)
    assert problem in str(e.value)
