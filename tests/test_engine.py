"""Engine entry points beyond prefill/decode (which the parity tests cover)."""
import os

import numpy as np
import pytest

import edgeinfer
from conftest import MODEL_NAMES, model_path


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


@pytest.mark.slow
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_a_prompt_split_anywhere_gives_the_same_logits(name):
    """The prefix cache evaluates only what follows a reused prefix: the last token's logits must be bit for bit those
    of the whole prompt at once, wherever the split falls (inside or at the edge of a prefill chunk, past Gemma 3's
    window, one token of prefix or one of rest), and those of decoding the last tokens one by one."""
    tokens = np.random.default_rng(0).integers(1000, 30000, size=700).tolist()
    with edgeinfer.load(model_path(name), n_ctx=1024, n_threads=2) as model:
        engine = model.engine
        whole = engine.prefill(tokens)
        for split in (1, 255, 257, 600, 699):
            engine.reset()
            engine.prefill(tokens[:split])
            assert np.array_equal(engine.prefill(tokens[split:]), whole), split
        engine.reset()
        engine.prefill(tokens[:696])
        for token in tokens[696:]:
            last = engine.decode(token)
        assert np.array_equal(last, whole)


def test_forward_writes_into_a_given_buffer():
    """The server reuses one logits buffer step after step (Engine.forward(out=)): the same values as a fresh array,
    and a buffer of the wrong shape is refused by name."""
    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=16, n_threads=1) as model:
        engine = model.engine
        engine.reset()
        fresh = engine.forward([1, 504, 3458], [0, 0, 0], [0, 1, 2], [1, 2])
        engine.reset()
        out = np.full((2, model.n_vocab), np.nan, np.float32)
        assert engine.forward([1, 504, 3458], [0, 0, 0], [0, 1, 2], [1, 2], out=out) is out
        assert np.array_equal(out, fresh)
        with pytest.raises(ValueError, match="out must be"):
            engine.forward([1], [0], [3], [0], out=out)
        # decode too (a draft model's guesses, one kept row per slot)
        engine.reset()
        engine.prefill([1, 504])
        row = np.full((1, model.n_vocab), np.nan, np.float32)
        decoded = engine.decode(3458, out=row)
        assert np.shares_memory(decoded, row) and np.array_equal(decoded, fresh[1])


_TWO_THREADS = """
import threading, numpy as np, edgeinfer, numba
prompts = [[1, 504, 3458, 282] * 40, [1, 2683, 314, 260] * 40]
models = [edgeinfer.load(PATH, n_ctx=256, n_threads=2) for _ in prompts]
alone = [m.engine.prefill(p) for m, p in zip(models, prompts)]
together = [None, None]
def run(i):
    for _ in range(5):
        models[i].engine.reset()
        together[i] = models[i].engine.prefill(prompts[i])
threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
assert numba.threading_layer() == "workqueue"
print("same" if all(np.array_equal(a, b) for a, b in zip(alone, together)) else "different")
"""


def test_two_threads_forwarding_at_once_take_turns():
    """Two models forwarding from two threads at once (the forward runs without the GIL) take turns: Numba's
    workqueue threading layer, the one left where neither OpenMP nor TBB is installed, aborts the process when two
    threads launch parallel regions at once. Each gets what it gets alone."""
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_THREADING_LAYER="workqueue")
    script = f"PATH = {str(model_path('smollm2-135m-instruct'))!r}\n" + _TWO_THREADS
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-1] == "same"
