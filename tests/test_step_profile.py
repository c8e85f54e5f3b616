"""tools.step_profile: copies of a model's compiled forward with one role made a no-op, timed in turns."""
import sys

import numpy as np
import pytest

from conftest import model_path


def test_a_copy_without_attention_computes_without_it_and_the_profile_has_every_asked_role():
    import edgeinfer
    from kernels_cpu.forward import make_scratch
    from tools.step_profile import copies, format_profile, profile

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=64, n_threads=1) as m:
        tables, engine = m.engine.runner.tables, m.engine
        forwards = copies(sys.modules[m.engine.runner._compiled.__module__], ["attention"])
        assert set(forwards) == {"full", "attention"} and forwards["full"] is m.engine.runner._compiled
        engine.prefill([1, 504, 3458, 282])
        logits = {}
        for name, forward in forwards.items():
            out = np.zeros((1, m.n_vocab), np.float32)
            scratch = make_scratch(tables.hyper, 1)
            forward(*tables.arguments(np.array([33]), np.array([4]), np.array([0]), np.array([0]), engine.cache.k,
                                      engine.cache.v, scratch, out))
            logits[name] = out[0]
        np.testing.assert_array_equal(logits["full"], engine.forward([33], [0], [4], [0])[0])  # the model's own
        assert not np.array_equal(logits["attention"], logits["full"])  # attention really left out

    result = profile(model_path("smollm2-135m-instruct"), rows=2, depth=8, threads=1, rounds=1, calls=2,
                     roles=["attention"])
    for head in ("with_head", "without_head"):
        assert set(result[head]) == {"full", "attention"} and min(result[head].values()) > 0
    text = format_profile(result)
    assert "| without attention |" in text and "LM head" in text
    with pytest.raises(ValueError, match="unknown roles"):
        profile(model_path("smollm2-135m-instruct"), roles=["lm_tail"])
