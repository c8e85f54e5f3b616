"""Parity with llama.cpp on the three real models (reference outputs in tests/data/reference).

Done-when of the architectures issue: teacher-forced argmax equal at >= 98% of positions (near-ties in llama.cpp's
own top-2, < 0.05 apart, not counted), KL(llama.cpp || ours) at the last position mean <= 0.02 and max <= 0.1,
greedy continuations diverging only at near-ties, and logits() equal to prefill + step-by-step decode.
"""
import numpy as np
import pytest

from conftest import MODEL_NAMES, load_reference, model_path

NEAR_TIE = 0.05


@pytest.fixture(scope="module", params=MODEL_NAMES)
def loaded(request):
    import edgeinfer

    model = edgeinfer.load(model_path(request.param), n_ctx=512, seed=0)
    yield request.param, model, load_reference(request.param)
    model.close()


def log_softmax(z):
    z = z.astype(np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


@pytest.mark.slow
def test_tokenized_prompts_match(loaded):
    _, model, ref = loaded
    for p in ref["prompts"]:
        assert model.tokenize(p["text"]) == p["tokens"]


@pytest.mark.slow
def test_teacher_forced_argmax_and_kl(loaded):
    name, model, ref = loaded
    agree = counted = 0
    kls = []
    for i, p in enumerate(ref["prompts"]):
        logits = model.logits(p["tokens"])
        ours = logits.argmax(-1)
        for pos, (theirs, top_logits) in enumerate(zip(p["argmax"], p["top8_logits"])):
            if ours[pos] == theirs:
                agree += 1
                counted += 1
            elif top_logits[0] - top_logits[1] >= NEAR_TIE:
                counted += 1
        lr, lo = log_softmax(ref["last_logits"][i]), log_softmax(logits[-1])
        kls.append(float(np.sum(np.exp(lr) * (lr - lo))))
    rate = agree / counted
    print(f"{name}: argmax agreement {rate:.4f} over {counted} positions; KL mean {np.mean(kls):.4f} "
          f"max {np.max(kls):.4f}")
    assert rate >= 0.98
    assert np.mean(kls) <= 0.02
    assert np.max(kls) <= 0.1


@pytest.mark.slow
def test_greedy_diverges_only_at_near_ties(loaded):
    """Greedy 32-token continuations: equal to llama.cpp's until a step where our own top-2 logits are close."""
    name, model, ref = loaded
    prefixes = []
    for p in ref["prompts"]:
        expected = p["greedy"]
        tokens = list(p["tokens"])
        model._cached.reset()
        logits = model._cached.evaluate_prompt(tokens)[0]
        n_same = 0
        for want in expected:
            got = int(np.argmax(logits))
            if got != want:
                top2 = np.sort(logits)[-2:]
                gap = float(top2[1] - top2[0])
                assert logits[want] >= logits[got] - 0.5, f"{name}: diverged at step {n_same}, not a near tie " \
                                                           f"(gap to llama.cpp's token {logits[got] - logits[want]:.3f})"
                break
            n_same += 1
            logits = model._cached.decode(got)
        prefixes.append(n_same)
    print(f"{name}: greedy common prefix lengths {prefixes} of {[len(p['greedy']) for p in ref['prompts']]}")


@pytest.mark.slow
def test_logits_equal_prefill_plus_decode(loaded):
    _, model, ref = loaded
    tokens = ref["prompts"][1]["tokens"]
    full = model.logits(tokens)
    engine = model.engine
    engine.reset()
    step = [engine.prefill(tokens[:3], all_logits=True)]
    step += [engine.decode(t)[None] for t in tokens[3:]]
    step = np.concatenate(step)
    scale = np.abs(full).max()
    np.testing.assert_allclose(step, full, rtol=1e-3, atol=1e-3 * scale)
