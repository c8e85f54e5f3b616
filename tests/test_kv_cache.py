"""The KV cache of sequences (edgeinfer.kv_cache) and the one forward pass over it (Engine.forward / decode_batch).

Every comparison is exact: rows of different sequences never meet, and a token's logits do not depend on how it is
batched (the tile kernels take the matvec kernels' per-block steps), so batched and alone are bit-identical.
"""
import numpy as np
import pytest

from conftest import model_path

PROMPTS = [[1, 504, 3458, 282], [1, 9, 1789, 33, 2001, 17], [1, 4522], [1, 77, 78, 79, 80, 81, 82, 83, 84]]
STEPS = 6


@pytest.fixture(scope="module")
def model():
    import edgeinfer
    from edgeinfer.engine import Engine

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=64, n_threads=1) as m:
        m.batch_engine = Engine(m.config, m.runner, n_ctx=64, n_threads=1, n_seq=4)
        yield m


def greedy_alone(engine, prompt, steps=STEPS):
    """Greedy tokens and each step's logits for one prompt in sequence 0 of a fresh cache."""
    engine.reset()
    logits = engine.prefill(prompt)
    tokens, rows = [], [logits]
    for _ in range(steps):
        tokens.append(int(np.argmax(logits)))
        logits = engine.decode(tokens[-1])
        rows.append(logits)
    return tokens, rows


def test_four_sequences_decoded_together_equal_each_alone(model):
    engine = model.batch_engine
    alone = [greedy_alone(engine, p) for p in PROMPTS]
    cache = engine.cache
    engine.reset()
    seqs = [0] + [cache.allocate() for _ in range(3)]
    logits = [engine.prefill(p, seq=s) for p, s in zip(PROMPTS, seqs)]
    tokens = [[] for _ in PROMPTS]
    for step in range(STEPS):
        for i in range(4):
            np.testing.assert_array_equal(logits[i], alone[i][1][step])
            tokens[i].append(int(np.argmax(logits[i])))
        batch = engine.decode_batch([t[-1] for t in tokens], seqs)
        logits = list(batch)
    assert tokens == [a[0] for a in alone]
    for i, s in enumerate(seqs):
        assert cache.tokens(s) == PROMPTS[i] + tokens[i]
    for s in seqs[1:]:
        cache.free(s)


def test_prefix_copy_then_divergence(model):
    engine = model.batch_engine
    cache = engine.cache
    shared = PROMPTS[3]
    engine.reset()
    engine.prefill(shared)
    fork = cache.allocate()
    cache.copy_prefix(0, fork)
    assert cache.tokens(fork) == shared
    # each continues differently from the shared prefix; each equals evaluating its whole text alone
    a, b = engine.decode(11), engine.decode(12, seq=fork)
    np.testing.assert_array_equal(a, greedy_alone(engine, shared + [11], 0)[1][0])
    cache.copy_prefix(fork, 0, len(shared))  # sequence 0 back to the shared prefix, then on as the fork went
    np.testing.assert_array_equal(engine.decode(12), b)
    cache.free(fork)


def test_truncating_one_sequence_leaves_the_others_intact(model):
    engine = model.batch_engine
    cache = engine.cache
    engine.reset()
    other = cache.allocate()
    engine.prefill(PROMPTS[0])
    engine.prefill(PROMPTS[1], seq=other)
    before = engine.decode(5, seq=other)
    cache.truncate(other, len(PROMPTS[1]))  # forget the decoded token of `other` again
    cache.truncate(0, 2)
    engine.prefill([900, 901, 902, 903, 904])  # overwrites sequence 0's positions 2..6
    assert cache.tokens(0) == PROMPTS[0][:2] + [900, 901, 902, 903, 904]
    np.testing.assert_array_equal(engine.decode(5, seq=other), before)
    cache.free(other)


def test_forward_batch_of_mixed_rows_equals_the_parts(model):
    """One forward holding a prompt chunk of one sequence and a decode row of another."""
    engine = model.batch_engine
    cache = engine.cache
    engine.reset()
    other = cache.allocate()
    engine.prefill(PROMPTS[1], seq=other)
    expected_decode = engine.decode(7, seq=other)
    cache.truncate(other, len(PROMPTS[1]))
    expected_prompt = engine.prefill(PROMPTS[0], all_logits=True)
    engine.reset()
    n0 = len(PROMPTS[0])
    tokens = PROMPTS[0] + [7]
    seqs = [0] * n0 + [other]
    positions = list(range(n0)) + [len(PROMPTS[1])]
    logits = engine.forward(tokens, seqs, positions, np.arange(n0 + 1))
    np.testing.assert_array_equal(logits[:n0], expected_prompt)
    np.testing.assert_array_equal(logits[n0], expected_decode)
    cache.free(other)


def test_cache_bookkeeping_refuses_what_it_cannot_do(model):
    from edgeinfer.errors import EdgeInferError
    from edgeinfer.kv_cache import ContextFull

    engine = model.batch_engine
    cache = engine.cache
    with pytest.raises(ValueError, match="sequence 3 is not allocated"):
        cache.tokens(3)
    seqs = [cache.allocate() for _ in range(3)]
    with pytest.raises(EdgeInferError, match="all 4 sequences"):
        cache.allocate()
    for s in seqs:
        cache.free(s)
    engine.reset()
    with pytest.raises(ContextFull):
        engine.prefill(list(range(1, 66)))
    with pytest.raises(ValueError, match="distinct sequences"):
        engine.decode_batch([1, 2], [0, 0])


@pytest.mark.slow
def test_generate_batch_equals_each_prompt_alone():
    """More prompts than sequences (continuous refill), each with its own settings and stop rule."""
    import edgeinfer

    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,", "Water is"]
    settings = dict(max_tokens=[12, 16, 3, 20, 0], temperature=[0, 0, 0, 0.8, 0], seed=7,
                    stop=[None, ["\n\n"], None, [" 9"], None])
    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=64, n_threads=1, n_seq=3) as model:
        before = model.generate("Water is", max_tokens=4, temperature=0)
        batch = model.generate_batch(prompts, **settings)
        alone = [model.generate(p, max_tokens=settings["max_tokens"][i], temperature=settings["temperature"][i],
                                seed=7, stop=settings["stop"][i]) for i, p in enumerate(prompts)]
        assert batch == alone and batch[4] == "" and all(batch[:4])
        assert [s.stop_reason for s in model.last_batch_stats][4] == "length"
        with pytest.raises(edgeinfer.InvalidArgument, match="max_tokens has 2 values for 5 prompts"):
            model.generate_batch(prompts, max_tokens=[1, 2])
        assert model.generate("Water is", max_tokens=4, temperature=0) == before  # the single stream is intact


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_export_restore_and_prefix_copy_through_key_blocks(kv_type):
    """Keys lie in blocks of 16 positions: a length that ends inside a block survives export, restore into another
    sequence and a prefix copy, position for position."""
    from types import SimpleNamespace

    from edgeinfer.kv_cache import KVCache, decode, encode

    cfg = SimpleNamespace(n_layers=2, n_kv_heads=3, head_dim=64, value_dim=32)
    cache = KVCache(cfg, n_ctx=50, n_seq=3, kv_type=kv_type)
    assert cache.k[0].shape[3:] == (4, 64, 16) and cache.v[0].shape[3:] == (50, 32)
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2, 37, 3, 64)).astype(np.float32)
    v = rng.standard_normal((2, 37, 3, 32)).astype(np.float32)
    seq = cache.allocate()
    assert cache.restore(seq, list(range(37)), k, v)
    tokens, k_back, v_back = cache.export(seq)
    assert tokens == list(range(37))
    np.testing.assert_array_equal(k_back, decode(kv_type, *encode(kv_type, k)))
    np.testing.assert_array_equal(v_back, decode(kv_type, *encode(kv_type, v)))
    other = cache.allocate()
    cache.copy_prefix(seq, other, 21)
    _, k_prefix, v_prefix = cache.export(other)
    np.testing.assert_array_equal(k_prefix, k_back[:, :21])
    np.testing.assert_array_equal(v_prefix, v_back[:, :21])
    assert not cache.restore(seq, list(range(51)), k, v)  # more positions than the context: refused, unchanged


def test_map_pages_maps_an_empty_cache_and_refuses_one_that_holds_positions():
    """A server maps its whole cache while it loads (kernels_cpu.memory_pages), not during its first requests."""
    from types import SimpleNamespace

    import psutil

    from edgeinfer.kv_cache import KVCache

    cfg = SimpleNamespace(n_layers=4, n_kv_heads=2, head_dim=64, value_dim=64)
    cache = KVCache(cfg, n_ctx=16384, n_seq=4, kv_type="f16")  # 64 MiB, only reserved so far
    process = psutil.Process()
    before = process.memory_info().rss
    cache.map_pages(n_threads=2 if psutil.cpu_count() >= 2 else 1)
    assert process.memory_info().rss - before >= 0.9 * cache.nbytes  # every page is there now
    assert not any(a.any() for a in cache._stored_arrays())  # and still all zeros
    cache.record(0, [1, 2, 3])
    with pytest.raises(ValueError, match="before any sequence holds positions"):
        cache.map_pages()
