"""The tiled (flash) attention kernel over a KV cache of sequences, for every cache type, against the numpy reference.

The reference reads the cache decoded to float32 (edgeinfer.kv_cache.decode), as the kernel widens each row, so
every case is compared at float32 precision.
Shapes cover the kernel's paths: one row on the calling thread, prompt blocks of one sequence (more rows than a job
takes), a decode batch of several sequences, long caches whose keys are split across threads and merged, GQA
groups, sliding windows.
"""
import numba
import numpy as np
import pytest

from edgeinfer.kv_cache import KV_TYPES, decode, encode, to_key_blocks
from kernels_cpu import ops_reference as ref
from kernels_cpu import attention
from kernels_cpu.attention import attention_rows, make_partials

SCALE = 0.2


def cache_pair(kv_type, x, keys=False):
    """One layer's cache as the kernel takes it: (values, scales) of shape (1, n_seq, n_kv, n_ctx, dim) from x of
    shape (n_seq, n_ctx, n_kv, dim); keys in blocks of 16 positions (1, n_seq, n_kv, n_ctx / 16, dim, 16)."""
    values, scales = (np.ascontiguousarray(a) for a in encode(kv_type, x.transpose(0, 2, 1, 3)[None]))
    if keys:
        values, scales = to_key_blocks(values), to_key_blocks(scales)
    if kv_type != "q8_0":
        scales = np.zeros((1,) * values.ndim, np.float32)
    return values, scales


def expected_rows(kv_type, q, positions, seqs, k, v, window, softcap=0.0):
    """The reference over the cache decoded to float32; for a q8_0 cache the queries (scaled) rounded through q8_0
    as well, as the kernel scores q8_0 keys in int8 (llama.cpp does the same)."""
    kd = decode(kv_type, *encode(kv_type, k))
    vd = decode(kv_type, *encode(kv_type, v))
    out = []
    for i, (p, s) in enumerate(zip(positions, seqs)):
        qi = q[i:i + 1] * np.float32(SCALE)
        if kv_type == "q8_0":
            qi = decode("q8_0", *encode("q8_0", qi))
        out.append(ref.attention(qi.astype(np.float32), kd[s, :p + 1], vd[s, :p + 1], positions[i:i + 1], 1.0,
                                 window, softcap))
    return np.concatenate(out)


def run_kernel(kv_type, q, positions, seqs, k, v, window, threads, softcap=0.0):
    out = np.full((len(seqs), q.shape[1], v.shape[-1]), np.nan, dtype=np.float32)
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        attention_rows(q, positions, seqs, cache_pair(kv_type, k, keys=True), cache_pair(kv_type, v), 0, SCALE,
                       window, out, make_partials(q.shape[1], v.shape[-1]), threads, softcap)
    finally:
        numba.set_num_threads(previous)
    return out


def random_case(rng, n_seq, n_ctx, n_heads, n_kv, d_k=64, d_v=64):
    k = rng.standard_normal((n_seq, n_ctx, n_kv, d_k)).astype(np.float32)
    v = rng.standard_normal((n_seq, n_ctx, n_kv, d_v)).astype(np.float32)
    return k, v


CASES = {  # name -> (n_seq, n_ctx, positions, seqs)
    "one row, short cache": (1, 16, [9], [0]),
    "decode batch of sequences": (3, 40, [30, 5, 0, 39], [0, 2, 1, 1 + 1]),
    "prompt block": (2, 300, list(range(200, 290)), [1] * 90),
    "prompt after prompt, two sequences": (2, 160, list(range(100, 140)) + list(range(0, 30)), [0] * 40 + [1] * 30),
    "one row, long cache (split keys)": (1, 3000, [2999], [0]),
    "decode batch, long caches (split keys)": (3, 2100, [2099, 1500, 700], [2, 0, 1]),
}


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_heads,n_kv,window", [(9, 3, 0), (4, 1, 70)])  # GQA groups of 3 and 4, full or windowed
def test_attention_matches_reference(kv_type, case, n_heads, n_kv, window):
    rng = np.random.default_rng(abs(hash((case, n_heads, window))) % 2**32)
    n_seq, n_ctx, positions, seqs = CASES[case]
    k, v = random_case(rng, n_seq, n_ctx, n_heads, n_kv)
    positions, seqs = np.array(positions, np.int64), np.array(seqs, np.int64)
    q = rng.standard_normal((len(seqs), n_heads, k.shape[-1])).astype(np.float32)
    expected = expected_rows(kv_type, q, positions, seqs, k, v, window)
    for threads in (1, 2):
        out = run_kernel(kv_type, q, positions, seqs, k, v, window, threads)
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5, err_msg=f"{threads} thread(s)")


def test_wide_heads_and_values_of_another_width():
    """Gemma's 256-wide heads, and values narrower than keys (value_length != key_length)."""
    rng = np.random.default_rng(7)
    k, v = random_case(rng, 1, 600, 4, 1, d_k=256, d_v=128)
    positions, seqs = np.array([599, 598], np.int64), np.array([0, 0], np.int64)
    positions = np.arange(560, 600, dtype=np.int64)
    seqs = np.zeros(40, np.int64)
    q = rng.standard_normal((40, 4, 256)).astype(np.float32)
    for kv_type in KV_TYPES:
        expected = expected_rows(kv_type, q, positions, seqs, k, v, 0)
        np.testing.assert_allclose(run_kernel(kv_type, q, positions, seqs, k, v, 0, 2), expected, rtol=2e-4,
                                   atol=2e-5, err_msg=kv_type)


# (head dim, query heads, KV heads, window, context): head dims 32-256, GQA ratios 1 to 8, query vectors per job that
# fill one, two or four SIMD vectors or leave lanes over, windows, caches to 8k positions
SHAPES = [(128, 8, 8, 0, 1200), (128, 8, 4, 300, 2500), (64, 14, 2, 0, 8192), (64, 16, 2, 1000, 4100),
          (256, 4, 1, 512, 1500), (32, 6, 6, 0, 700), (64, 12, 3, 0, 5000)]


@pytest.mark.parametrize("kv_type", list(KV_TYPES))
@pytest.mark.parametrize("d,n_heads,n_kv,window,n_ctx", SHAPES)
def test_random_shapes_match_reference(kv_type, d, n_heads, n_kv, window, n_ctx):
    """A prompt block at the end of the cache, one decode row and a row far back, on random inputs of each shape;
    then the block's last row alone, as a decode step runs it (a job of one row's GQA group: the kernels that read
    the cache's own type, e.g. Qwen2.5's group of 7 at once)."""
    rng = np.random.default_rng(d * 1000 + n_heads * 10 + n_kv)
    k, v = random_case(rng, 1, n_ctx, n_heads, n_kv, d_k=d, d_v=d)
    positions = np.concatenate([np.arange(n_ctx - 37, n_ctx), [n_ctx // 3, 5]]).astype(np.int64)
    seqs = np.zeros(len(positions), np.int64)
    q = rng.standard_normal((len(positions), n_heads, d)).astype(np.float32)
    expected = expected_rows(kv_type, q, positions, seqs, k, v, window)
    last = slice(36, 37)  # position n_ctx - 1
    for threads in (1, 2):
        np.testing.assert_allclose(run_kernel(kv_type, q, positions, seqs, k, v, window, threads), expected,
                                   rtol=3e-4, atol=3e-5, err_msg=f"{threads} thread(s)")
        np.testing.assert_allclose(run_kernel(kv_type, q[last], positions[last], seqs[last], k, v, window, threads),
                                   expected[last], rtol=3e-4, atol=3e-5, err_msg=f"a decode row, {threads} thread(s)")


def test_memory_does_not_grow_with_the_context():
    """No score matrix: the kernel's scratch is the fixed-size partials, whatever the cache length (it runs with
    a 16k-position cache and the same partials as a short one)."""
    rng = np.random.default_rng(3)
    k, v = random_case(rng, 1, 16384, 2, 1, d_k=32, d_v=32)
    q = rng.standard_normal((1, 2, 32)).astype(np.float32)
    positions, seqs = np.array([16383], np.int64), np.array([0], np.int64)
    expected = expected_rows("f32", q, positions, seqs, k, v, 0)
    np.testing.assert_allclose(run_kernel("f32", q, positions, seqs, k, v, 0, 2), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("case", ["prompt block", "one row, long cache (split keys)"])
def test_soft_capped_scores_match_reference(case):
    """Gemma 2's attention logit soft-cap (cap * tanh(score / cap)), with a cap small enough to bind: the scores of
    these inputs reach ~10, the cap is 2."""
    rng = np.random.default_rng(11)
    n_seq, n_ctx, positions, seqs = CASES[case]
    k, v = random_case(rng, n_seq, n_ctx, 4, 2)
    positions, seqs = np.array(positions, np.int64), np.array(seqs, np.int64)
    q = rng.standard_normal((len(seqs), 4, 64)).astype(np.float32) * 3
    expected = expected_rows("f32", q, positions, seqs, k, v, 0, softcap=2.0)
    assert not np.allclose(expected, expected_rows("f32", q, positions, seqs, k, v, 0), atol=1e-3)
    for threads in (1, 2):
        out = run_kernel("f32", q, positions, seqs, k, v, 0, threads, softcap=2.0)
        np.testing.assert_allclose(out, expected, rtol=2e-4, atol=2e-5, err_msg=f"{threads} thread(s)")


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])  # float keys (widened in a block); int8 keys (never widened)
@pytest.mark.parametrize("n_heads,n_kv,window", [(9, 3, 0), (4, 1, 700), (14, 2, 0)])
def test_a_rows_result_does_not_depend_on_batching_or_splitting(n_heads, n_kv, window, kv_type):
    """Bit for bit: a row alone, in a block of draft rows, on one thread (no split) and on two (its keys split into
    chunks that run in parallel and are merged after) gives the same result, because every path sums the same
    fixed chunk grid and merges it with the same function (speculative decoding compares logits exactly)."""
    rng = np.random.default_rng(5)
    k, v = random_case(rng, 1, 3000, n_heads, n_kv)
    q = rng.standard_normal((8, n_heads, 64)).astype(np.float32)
    positions, seqs = np.arange(2992, 3000, dtype=np.int64), np.zeros(8, np.int64)
    together = run_kernel(kv_type, q, positions, seqs, k, v, window, 1)
    for threads in (1, 2):
        assert np.array_equal(run_kernel(kv_type, q, positions, seqs, k, v, window, threads), together), threads
        for i in (0, 7):
            alone = run_kernel(kv_type, q[i:i + 1], positions[i:i + 1], seqs[i:i + 1], k, v, window, threads)
            assert np.array_equal(alone[0], together[i]), (threads, i)


def test_batches_of_more_than_16_rows_split_their_keys_when_jobs_are_few():
    """The partials hold PARTIAL_SLOTS (chunk, row) pairs, so a batch of n rows may split jobs of up to
    PARTIAL_SLOTS // n chunks: an agent's 20 new rows after a 500-token prefix (3 jobs of 3 chunks on 2 threads) run
    as 9 jobs; more rows leave fewer chunk slots; jobs enough for the threads, or one chunk, stay whole."""
    assert attention.split_plan(3, 3, attention.PARTIAL_SLOTS // 20, 2) == (3, 1)
    assert attention.split_plan(3, 40, attention.PARTIAL_SLOTS // 64, 2) == (0, 0)  # 16 slots for 64 rows
    assert attention.split_plan(3, 16, attention.PARTIAL_SLOTS // 64, 2) == (6, 3)
    assert attention.split_plan(16, 8, 64, 2) == (0, 0)
    assert attention.split_plan(3, 1, 64, 2) == (0, 0)


@pytest.mark.parametrize("kv_type", ["f16", "q8_0"])
def test_a_block_of_40_rows_is_the_same_split_on_two_threads(kv_type):
    """40 rows of one sequence (2 blocks of a GQA group of 3, 6 jobs) over 1,000 keys split into 4-chunk jobs on 2
    threads, merged on both threads: the same bits as on one thread (unsplit) and as a row alone."""
    rng = np.random.default_rng(9)
    k, v = random_case(rng, 1, 1024, 9, 3)
    q = rng.standard_normal((40, 9, 64)).astype(np.float32)
    positions, seqs = np.arange(960, 1000, dtype=np.int64), np.zeros(40, np.int64)
    assert attention.split_plan(6, 4, attention.PARTIAL_SLOTS // 40, 2) != (0, 0)
    one = run_kernel(kv_type, q, positions, seqs, k, v, 0, 1)
    assert np.array_equal(run_kernel(kv_type, q, positions, seqs, k, v, 0, 2), one)
    alone = run_kernel(kv_type, q[25:26], positions[25:26], seqs[25:26], k, v, 0, 2)
    assert np.array_equal(alone[0], one[25])


@pytest.mark.parametrize("kv_type", ["f32", "f16", "q8_0"])
def test_a_decode_step_of_many_sequences_is_the_same_on_two_threads(kv_type):
    """A decode step of 8 sequences over short caches runs its 24 jobs on both threads (attention.MANY_JOBS_WORK),
    each job on one thread as before: the same bits as on one thread, and as each sequence alone."""
    rng = np.random.default_rng(7)
    n_heads, n_kv, n_seq = 9, 3, 8
    lengths = rng.integers(20, 60, n_seq)
    k, v = random_case(rng, n_seq, 64, n_heads, n_kv)
    q = rng.standard_normal((n_seq, n_heads, 64)).astype(np.float32)
    positions, seqs = (lengths - 1).astype(np.int64), np.arange(n_seq, dtype=np.int64)
    assert n_seq * n_heads * 64 * int(lengths.min()) >= attention.MANY_JOBS_WORK
    one = run_kernel(kv_type, q, positions, seqs, k, v, 0, 1)
    assert np.array_equal(run_kernel(kv_type, q, positions, seqs, k, v, 0, 2), one)
    for i in (0, 5):
        alone = run_kernel(kv_type, q[i:i + 1], positions[i:i + 1], seqs[i:i + 1], k, v, 0, 2)
        assert np.array_equal(alone[0], one[i]), i
