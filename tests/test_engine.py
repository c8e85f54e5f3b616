"""Engine entry points beyond prefill/decode (which the parity tests cover)."""
import numpy as np

import edgeinfer
from conftest import model_path


def test_warm_up_leaves_the_cache_as_it_was():
    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=16, n_threads=1) as model:
        engine = model.engine
        engine.prefill([1, 504, 3458])
        engine.warm_up()
        assert engine.n_past == 3
        after_warm_up = engine.decode(282)
        engine.reset()
        engine.prefill([1, 504, 3458])
        assert np.array_equal(engine.decode(282), after_warm_up)
        engine.prefill(list(range(100, 111)))  # 15 of 16 positions used
        engine.warm_up()  # no room for the throw-away token: does nothing
        assert engine.n_past == 15


def test_logits_at_depth_do_not_depend_on_how_the_positions_were_batched():
    """At 600 and 900 cached tokens (past a prefill chunk, where attention could split a long key range across
    threads), a token's logits are the same evaluated in a prompt chunk, as one decode step, or among draft rows:
    speculative decoding and the prefix cache rely on it."""
    tokens = np.random.default_rng(0).integers(1000, 20000, size=900).tolist()
    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=1024, n_threads=2) as model:
        engine = model.engine
        for n in (600, 900):
            engine.reset()
            in_prompt = engine.prefill(tokens[:n])
            engine.reset()
            engine.prefill(tokens[:n - 1])
            alone = engine.decode(tokens[n - 1])
            engine.reset()
            engine.prefill(tokens[:n - 5])
            among_drafts = engine.prefill(tokens[n - 5:n], all_logits=True)[-1]
            assert np.array_equal(in_prompt, alone) and np.array_equal(in_prompt, among_drafts), n
