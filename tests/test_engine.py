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
