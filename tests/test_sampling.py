"""Sampling rules, each on a hand-made logit vector with hand-computed survivors, then the whole chain."""
import math

import numpy as np
import pytest

from edgeinfer.errors import InvalidArgument
from edgeinfer.sampling import (
    Sampler,
    SamplingParams,
    apply_penalties,
    apply_temperature,
    greedy,
    min_p,
    sample_dist,
    top_k,
    top_p,
)


def f32(*values):
    return np.array(values, dtype=np.float32)


def ids_of(n):
    return np.arange(n, dtype=np.int64)


# log-probabilities of [0.0625, 0.5, 0.125, 0.25, 0.0625]: sorted, ids 1, 3, 2, 0, 4 with p .5 .25 .125 .0625 .0625
DYADIC = np.log(f32(0.0625, 0.5, 0.125, 0.25, 0.0625)).astype(np.float32)


def top_p_reference(logits, p):
    """Plain numpy top-p: full sort (ties by id), shortest prefix reaching p. float32 sums in llama.cpp's
    order (softmax over the vocabulary in id order, then the sorted running sum), so boundaries agree."""
    e = np.exp(logits - logits.max(), dtype=np.float32)
    probs = e / np.cumsum(e)[-1]
    order = np.lexsort((np.arange(len(logits)), -logits))
    cum = np.cumsum(probs[order])
    return order[: int(np.argmax(cum >= np.float32(p))) + 1]


class FixedRng:
    """Stands in for np.random.Generator: random() returns a chosen u."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


# ---------------------------------------------------------------- penalties

LOGITS6 = f32(2.0, -1.0, 0.5, 3.0, -2.0, 0.0)
RECENT6 = [3, 3, 0, 1, 1, 5]  # the last 4 are 0, 1, 1, 5: token 3 falls outside penalty_last_n=4


def test_repeat_penalty_divides_positive_and_multiplies_negative_logits():
    _, out = apply_penalties(ids_of(6), LOGITS6, RECENT6, penalty_last_n=4, repeat_penalty=2.0)
    # 0: 2/2; 1: -1*2 (count 2, still once); 5: 0*2; 3 is outside the window
    np.testing.assert_array_equal(out, f32(1.0, -2.0, 0.5, 3.0, -2.0, 0.0))


def test_presence_and_frequency_penalties_subtract():
    _, out = apply_penalties(ids_of(6), LOGITS6, RECENT6, penalty_last_n=4,
                             repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # 0: 1 - (1*0.5 + 0.25); 1: -2 - (2*0.5 + 0.25); 5: 0 - (0.5 + 0.25)
    np.testing.assert_array_equal(out, f32(0.25, -3.25, 0.5, 3.0, -2.0, -0.75))
    np.testing.assert_array_equal(LOGITS6, f32(2.0, -1.0, 0.5, 3.0, -2.0, 0.0))  # input untouched


def test_penalty_window_zero_disables_and_minus_one_takes_everything():
    ids, out = apply_penalties(ids_of(6), LOGITS6, RECENT6, penalty_last_n=0, repeat_penalty=2.0)
    assert out is LOGITS6
    _, out = apply_penalties(ids_of(6), LOGITS6, RECENT6, penalty_last_n=-1,
                             repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    # token 3 now counts twice: 3/2 - (2*0.5 + 0.25)
    np.testing.assert_array_equal(out, f32(0.25, -3.25, 0.5, 0.25, -2.0, -0.75))


def test_penalties_on_a_candidate_subset_in_any_order():
    ids = np.array([4, 1, 0], dtype=np.int64)
    _, out = apply_penalties(ids, f32(-2.0, -1.0, 2.0), RECENT6, penalty_last_n=4,
                             repeat_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    np.testing.assert_array_equal(out, f32(-2.0, -3.25, 0.25))


# ---------------------------------------------------------------- top-k

def test_top_k_keeps_the_k_best_sorted_with_ties_to_the_lower_id():
    logits = f32(0.1, 0.5, 0.3, 0.5, -1.0)
    assert top_k(ids_of(5), logits, 2)[0].tolist() == [1, 3]
    assert top_k(ids_of(5), logits, 3)[0].tolist() == [1, 3, 2]
    assert top_k(ids_of(5), logits, 1)[0].tolist() == [1]
    assert top_k(ids_of(5), logits, 10)[0].tolist() == [1, 3, 2, 0, 4]
    np.testing.assert_array_equal(top_k(ids_of(5), logits, 3)[1], f32(0.5, 0.5, 0.3))
    ids, out = top_k(ids_of(5), logits, 0)  # disabled: unchanged
    assert ids.tolist() == [0, 1, 2, 3, 4] and out is logits
    # ties straddling the cut: the lower ids of the tied group get in
    assert top_k(ids_of(5), f32(1.0, 0.2, 0.2, 0.2, 0.9), 3)[0].tolist() == [0, 4, 1]


def test_top_k_on_a_full_size_vocabulary_matches_a_full_sort():
    logits = np.random.default_rng(7).standard_normal(262_144).astype(np.float32)
    ids, out = top_k(ids_of(len(logits)), logits, 40)
    expected = np.lexsort((np.arange(len(logits)), -logits))[:40]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(out, logits[expected])


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 1000, 49_152 + 7])
def test_top_k_kernel_matches_its_reference(n):
    """kernels_cpu.logits.top_k_order against its definition, np.lexsort((ids, -logits))[:k]: every k from 1 past n,
    on distinct values, many ties (at the cut too), -0.0 beside 0.0, rows masked to -inf but for a few tokens (fewer
    than k: the -inf ones fill up by id), all -inf, and candidate ids in any order."""
    from kernels_cpu.logits import top_k_order

    rng = np.random.default_rng(n)
    distinct = rng.standard_normal(n).astype(np.float32)
    tied = (np.round(distinct * 2) / 2).astype(np.float32)
    signed_zeros = np.where(rng.random(n) < 0.5, np.float32(-0.0), np.float32(0.0)).astype(np.float32)
    masked = np.full(n, -np.inf, np.float32)
    few = rng.choice(n, min(n, 5), replace=False)
    masked[few] = distinct[few]
    rows = {"distinct": distinct, "tied": tied, "signed zeros": signed_zeros, "masked": masked,
            "all -inf": np.full(n, -np.inf, np.float32)}
    id_orders = {"in order": np.arange(n, dtype=np.int64), "shuffled": rng.permutation(n).astype(np.int64)}
    for k in sorted({1, 2, 3, 40, 64, 65, n - 1, n, n + 5} - {0}):
        for row_name, logits in rows.items():
            for ids_name, ids in id_orders.items():
                expected = np.lexsort((ids, -logits))[:k]
                np.testing.assert_array_equal(top_k_order(logits, ids, k), expected,
                                              err_msg=f"k={k}, {row_name}, ids {ids_name}")
    assert top_k_order(distinct, id_orders["in order"], 0).size == 0


def test_top_k_kernel_is_compiled_once_and_warmed_up():
    """The sampler passes read-only ids, other callers writable arrays: one compiled signature serves both (a
    second would cost a first run seconds at some later token), and sampling.warm_up loads it with the other
    compiled passes."""
    from edgeinfer.sampling import warm_up
    from kernels_cpu.logits import top_k_order

    warm_up()
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    read_only = ids_of(100)
    read_only.flags.writeable = False
    assert top_k_order(logits, ids_of(100), 3).tolist() == top_k_order(logits, read_only, 3).tolist()
    assert len(top_k_order.signatures) == 1


@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 151_936])
def test_log_normalizer_kernel_matches_its_reference(n):
    """kernels_cpu.logits.log_normalizer against float64 numpy's log(sum(exp(x))) (shifted by the maximum), on rows
    of small, ordinary and large spread, with -inf entries (masked tokens), and lengths off the 16-lane step."""
    from kernels_cpu.logits import log_normalizer

    rng = np.random.default_rng(n)
    for scale in (0.01, 3.0, 40.0):
        x = (rng.standard_normal(n) * scale).astype(np.float32)
        if n > 2:
            x[rng.choice(n, n // 3, replace=False)] = -np.inf
            x[0] = 1.0  # a finite maximum
        x64 = x.astype(np.float64)
        expected = x64.max() + np.log(np.exp(x64 - x64.max()).sum())
        assert log_normalizer(x) == pytest.approx(expected, rel=1e-7, abs=1e-7), scale


# ---------------------------------------------------------------- top-p

def test_top_p_keeps_the_shortest_prefix_reaching_p():
    assert top_p(ids_of(5), DYADIC, 0.7)[0].tolist() == [1, 3]  # 0.5, 0.75
    assert top_p(ids_of(5), DYADIC, 0.8)[0].tolist() == [1, 3, 2]  # 0.875
    assert top_p(ids_of(5), DYADIC, 0.9)[0].tolist() == [1, 3, 2, 0]  # 0.9375
    assert top_p(ids_of(5), DYADIC, 0.0)[0].tolist() == [1]  # llama.cpp always keeps at least one
    assert top_p(ids_of(5), DYADIC, 0.7, min_keep=3)[0].tolist() == [1, 3, 2]
    ids, out = top_p(ids_of(5), DYADIC, 1.0)  # disabled: unchanged
    assert ids.tolist() == [0, 1, 2, 3, 4] and out is DYADIC


@pytest.mark.parametrize("peak", [8.0, 0.0], ids=["best-256-suffice", "needs-wider-look"])
def test_top_p_on_a_large_unsorted_vocabulary_matches_a_full_sort(peak):
    logits = np.random.default_rng(3).standard_normal(50_000).astype(np.float32)
    logits[np.arange(0, 50_000, 997)] += peak
    ids, _ = top_p(ids_of(len(logits)), logits, 0.9)
    np.testing.assert_array_equal(ids, top_p_reference(logits, 0.9))


# ---------------------------------------------------------------- min-p

def test_min_p_drops_tokens_below_min_p_times_the_best():
    # p: id0 .0625, id1 .5, id2 .125, id3 .25, id4 .0625; survivors keep their order
    assert min_p(ids_of(5), DYADIC, 0.3)[0].tolist() == [1, 3]  # threshold .15
    assert min_p(ids_of(5), DYADIC, 0.2)[0].tolist() == [1, 2, 3]  # threshold .1
    assert min_p(ids_of(5), DYADIC, 0.1)[0].tolist() == [0, 1, 2, 3, 4]  # threshold .05
    assert min_p(ids_of(5), DYADIC, 1.0)[0].tolist() == [1]
    assert min_p(ids_of(5), DYADIC, 0.3, min_keep=3)[0].tolist() == [1, 3, 2]
    ids, out = min_p(ids_of(5), DYADIC, 0.0)  # disabled: unchanged
    assert ids.tolist() == [0, 1, 2, 3, 4] and out is DYADIC


# ---------------------------------------------------------------- temperature, greedy, dist

def test_temperature_scales_logits():
    logits = f32(2.0, 1.0, -1.0)
    np.testing.assert_array_equal(apply_temperature(ids_of(3), logits, 0.5)[1], f32(4.0, 2.0, -2.0))
    np.testing.assert_array_equal(apply_temperature(ids_of(3), logits, 2.0)[1], f32(1.0, 0.5, -0.5))
    np.testing.assert_array_equal(logits, f32(2.0, 1.0, -1.0))


@pytest.mark.parametrize("temperature", [0.0, -1.0])
def test_temperature_zero_or_below_keeps_only_the_greedy_token(temperature):
    ids, out = apply_temperature(ids_of(4), f32(1.0, 3.0, 3.0, 2.0), temperature)
    assert ids.tolist() == [1] and out.tolist() == [3.0]


def test_greedy_takes_the_argmax_with_ties_to_the_lowest_id():
    assert greedy(ids_of(4), f32(1.0, 3.0, 3.0, 2.0)) == 1
    assert greedy(np.array([5, 2, 7]), f32(3.0, 3.0, 1.0)) == 2


@pytest.mark.parametrize("u, expected", [(0.0, 1), (0.49, 1), (0.6, 3), (0.8, 2), (0.9, 0), (0.999, 4)])
def test_dist_walks_the_candidates_in_order_until_the_mass_reaches_u(u, expected):
    ids, logits = top_k(ids_of(5), DYADIC, 5)  # ids 1, 3, 2, 0, 4; cumulative .5 .75 .875 .9375 1
    assert sample_dist(ids, logits, FixedRng(u)) == expected


# ---------------------------------------------------------------- the chain

def test_sampler_greedy_sees_the_penalties():
    params = SamplingParams(temperature=0.0, repeat_penalty=1.1)
    sampler = Sampler(params, 3)
    logits = f32(1.0, 5.0, 4.9)
    assert sampler.sample(logits, []) == 1
    assert sampler.sample(logits, [1]) == 2  # 5 / 1.1 < 4.9


def test_chain_runs_top_k_before_top_p():
    # top_k=3 first: three tokens at 1/3 each, 0.6 is reached by two. top_p first would keep three.
    sampler = Sampler(SamplingParams(top_k=3, top_p=0.6, min_p=0.0, temperature=1.0), 4)
    ids, probs = sampler.distribution(f32(0.0, 0.0, 0.0, 0.0))
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(probs, [0.5, 0.5])


def test_chain_runs_top_p_and_min_p_before_temperature():
    logits = f32(0.0, -1.0, -3.5)  # at T=1: p = .715 .263 .022, p / p_max = 1 .368 .030
    # min_p 0.05 drops id 2 at T=1 (at T=2 its ratio would be .17); T=2 then applies to the two survivors
    ids, probs = Sampler(SamplingParams(top_p=1.0, min_p=0.05, temperature=2.0), 3).distribution(logits)
    assert ids.tolist() == [0, 1]
    np.testing.assert_allclose(probs, [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(0.5))], rtol=1e-6)
    # top_p 0.7 is reached by id 0 alone at T=1 (at T=2 its p would be .56)
    ids, probs = Sampler(SamplingParams(top_p=0.7, min_p=0.0, temperature=2.0), 3).distribution(logits)
    assert ids.tolist() == [0] and probs.tolist() == [1.0]


def test_chain_runs_penalties_before_top_k():
    sampler = Sampler(SamplingParams(top_k=1, repeat_penalty=2.0, temperature=1.0, seed=0), 3)
    assert sampler.sample(f32(4.0, 3.0, 1.0), [0]) == 1  # 4 / 2 < 3


def test_sample_does_not_modify_logits():
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    before = logits.copy()
    Sampler(SamplingParams(repeat_penalty=1.3, presence_penalty=0.5, seed=1), 100).sample(logits, [1, 2, 3])
    np.testing.assert_array_equal(logits, before)


def test_a_sampler_reusing_its_penalty_buffer_samples_as_fresh_ones():
    """A Sampler writes penalized logits into a buffer it keeps (no fresh vocabulary-sized array per sample): each
    sample is the one a sampler without history of earlier samples would take, given the same generator state."""
    rng = np.random.default_rng(3)
    params = SamplingParams(temperature=0.0, repeat_penalty=1.5, presence_penalty=0.7, frequency_penalty=0.2)
    kept = Sampler(params, 500)
    history = list(rng.integers(0, 500, 40))
    for _ in range(30):
        logits = rng.standard_normal(500).astype(np.float32)
        ids, penalized = apply_penalties(kept._ids, logits, history, repeat_penalty=1.5, presence_penalty=0.7,
                                         frequency_penalty=0.2)
        assert kept.sample(logits, history) == Sampler(params, 500).sample(logits, history) == \
            int(ids[np.argmax(penalized)])
        history.append(int(rng.integers(0, 500)))


def _generate(seed, n_steps=200, n_vocab=1000):
    """Tokens drawn from a fixed pseudo-random logits sequence, feeding each token back as history."""
    logits_rng = np.random.default_rng(99)
    sampler = Sampler(SamplingParams(seed=seed, repeat_penalty=1.2, frequency_penalty=0.1), n_vocab)
    tokens = []
    for _ in range(n_steps):
        logits = (logits_rng.standard_normal(n_vocab) * 2).astype(np.float32)
        tokens.append(sampler.sample(logits, tokens))
    return tokens


def test_same_seed_gives_the_same_tokens_and_a_different_seed_differs():
    assert _generate(42) == _generate(42)
    assert _generate(42) != _generate(43)


def test_unseeded_sampler_reports_a_seed_that_replays_it():
    first = Sampler(SamplingParams(), 50)
    replay = Sampler(SamplingParams(seed=first.seed), 50)
    logits = np.random.default_rng(5).standard_normal(50).astype(np.float32)
    assert [first.sample(logits) for _ in range(50)] == [replay.sample(logits) for _ in range(50)]


def test_sampling_frequencies_match_the_filtered_softmax():
    # by position in rank: top_k 6 drops -3, -6; top_p .95 then keeps 5 (cumulative .923 at 4, .979 at 5);
    # min_p .2 drops 0.0 (needs >= 2 + ln .2 = 0.39); temperature .8 applies to 2, 1.5, 1, .5
    ranked = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0, -6.0])
    token_of_rank = np.array([5, 2, 7, 0, 3, 6, 1, 4])
    logits = np.empty(8, dtype=np.float32)
    logits[token_of_rank] = ranked
    sampler = Sampler(SamplingParams(top_k=6, top_p=0.95, min_p=0.2, temperature=0.8, seed=1234), 8)
    expected = np.zeros(8)
    survivors = token_of_rank[:4]
    weights = np.exp(ranked[:4] / 0.8)
    expected[survivors] = weights / weights.sum()
    ids, probs = sampler.distribution(logits)
    assert ids.tolist() == survivors.tolist()
    np.testing.assert_allclose(probs, expected[survivors], rtol=1e-5)

    n = 8_000
    counts = np.bincount([sampler.sample(logits) for _ in range(n)], minlength=8)
    assert counts[expected == 0].sum() == 0
    observed, wanted = counts[survivors], n * expected[survivors]
    chi2 = float(((observed - wanted) ** 2 / wanted).sum())
    assert chi2 < 25.0, (chi2, observed, wanted)  # 3 degrees of freedom: P(chi2 > 25) ~ 2e-5


# ---------------------------------------------------------------- validation

def test_defaults_are_llama_cpp_defaults():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.presence_penalty, p.frequency_penalty, p.penalty_last_n) == (1.0, 0.0, 0.0, 64)


@pytest.mark.parametrize("field, value", [
    ("top_p", -0.1), ("top_p", 1.5), ("min_p", -0.01), ("min_p", 2.0), ("temperature", float("nan")),
    ("temperature", float("inf")), ("repeat_penalty", 0.0), ("repeat_penalty", -1.0),
    ("presence_penalty", float("inf")), ("penalty_last_n", -2), ("seed", -2),
])
def test_bad_params_raise_invalid_argument_naming_the_field(field, value):
    with pytest.raises(InvalidArgument, match=field):  # an EdgeInferError and a ValueError
        SamplingParams(**{field: value})


@pytest.mark.parametrize("field, value", [
    ("frequency_penalty", "0.1"), ("temperature", None), ("top_k", 1.5), ("top_k", True), ("seed", 1.0),
])
def test_params_of_the_wrong_kind_raise_type_error_naming_the_field(field, value):
    with pytest.raises(TypeError, match=field):
        SamplingParams(**{field: value})


def test_seed_minus_one_means_random_as_in_llama_cpp():
    seeds = {Sampler(SamplingParams(seed=-1), 10).seed for _ in range(3)}
    assert len(seeds) == 3 and all(s >= 0 for s in seeds)
    assert Sampler(SamplingParams(seed=7), 10).seed == 7


def test_sampler_rejects_bad_vocab_size_and_logits_shape():
    with pytest.raises(ValueError, match="n_vocab"):
        Sampler(SamplingParams(), 0)
    with pytest.raises(ValueError, match="shape"):
        Sampler(SamplingParams(), 10).sample(np.zeros(11, dtype=np.float32), [])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_logits_raise_invalid_argument_not_index_error(temperature, bad):
    logits = np.zeros(10, dtype=np.float32)
    logits[[3, 6]] = bad
    with pytest.raises(InvalidArgument, match=r"2 of 10 are NaN or \+inf \(the first at token id 3\)"):
        Sampler(SamplingParams(temperature=temperature, repeat_penalty=1.1), 10).sample(logits, [3, 4])
    with pytest.raises(InvalidArgument, match="every one is -inf"):
        Sampler(SamplingParams(temperature=temperature), 10).sample(np.full(10, -np.inf, np.float32), [])


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_minus_inf_masks_a_token(temperature):
    logits = np.full(10, -np.inf, dtype=np.float32)
    logits[[2, 7]] = [1.0, 3.0]
    sampler = Sampler(SamplingParams(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=3), 10)
    drawn = {sampler.sample(logits, [2]) for _ in range(50)}
    assert drawn <= {2, 7} and 7 in drawn


def test_sampler_greedy_ties_go_to_the_lowest_id_and_bad_rows_are_refused():
    sampler = Sampler(SamplingParams(temperature=0.0), 5)
    assert sampler.sample(f32(1.0, 4.0, -np.inf, 4.0, 2.0)) == 1
    for bad in (f32(1.0, np.nan, 0.0, 0.0, 0.0), f32(0.0, 0.0, np.inf, 0.0, 0.0), f32(*[-np.inf] * 5)):
        with pytest.raises(InvalidArgument):
            sampler.sample(bad)


def test_all_finite_sees_nan_and_both_infinities():
    from edgeinfer.sampling import all_finite

    assert all_finite(np.zeros((2, 3), np.float32))
    for value in (np.nan, np.inf, -np.inf):
        rows = np.zeros((2, 3), np.float32)
        rows[1, 2] = value
        assert not all_finite(rows)


def test_all_finite_kernel_matches_numpy():
    """kernels_cpu.logits.all_finite_flat against its reference, np.isfinite(x).all(): extreme finite values,
    subnormals, and one non-finite value at random places (the vectorized loop's head, body and tail)."""
    from kernels_cpu.logits import all_finite_flat

    rng = np.random.default_rng(3)
    for n in (1, 15, 16, 17, 1000, 262_144):
        x = (rng.standard_normal(n) * 1e3).astype(np.float32)
        x[rng.integers(n)] = np.finfo(np.float32).max
        x[rng.integers(n)] = -np.finfo(np.float32).max
        x[rng.integers(n)] = np.float32(1e-45)  # subnormal
        assert all_finite_flat(x) == np.isfinite(x).all()
        for value in (np.nan, np.inf, -np.inf):
            for where in {0, n // 2, n - 1}:
                y = x.copy()
                y[where] = value
                assert all_finite_flat(y) == np.isfinite(y).all() == False  # noqa: E712


def test_row_summaries_match_numpy():
    """kernels_cpu.logits.row_summaries (a server step's per-row argmax and finiteness, in one pass) against
    np.argmax (the first of a tie) and np.isfinite(row).all(), with ties, -inf masks and non-finite values."""
    from kernels_cpu.logits import row_summaries

    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((7, 1000)) * 10).astype(np.float32)
    rows[1, [10, 500]] = 99.0  # a tie: the first
    rows[2, :] = -np.inf
    rows[2, 999] = 1.0  # masked but the last
    rows[3, 5] = np.nan
    rows[4, 7] = np.inf
    rows[5, 0] = np.float32(1e30)  # the largest at index 0
    rows[6, :] = -np.inf  # every token masked
    best, finite = np.zeros(7, np.int64), np.zeros(7, np.bool_)
    row_summaries(rows, best, finite)
    np.testing.assert_array_equal(finite, np.isfinite(rows).all(axis=1))
    for r in np.flatnonzero(~np.isnan(rows).any(axis=1)):
        assert best[r] == np.argmax(rows[r]), r
    # the largest value is found per chunk of 256, then in one chunk: ties across chunks, -0.0 against 0.0, a
    # largest value in the tail past the last whole chunk, +-inf, rows shorter than a chunk
    for trial in range(300):
        n = int(rng.integers(1, 1200))
        rows = rng.integers(-3, 3, (3, n)).astype(np.float32)
        rows[0, rng.integers(0, n, 3)] = -0.0
        rows[1, rng.integers(0, n)] = np.inf if trial % 3 == 0 else rows[1].max()
        if trial % 4 == 0:
            rows[2, :] = -np.inf
        best, finite = np.zeros(3, np.int64), np.zeros(3, np.bool_)
        row_summaries(rows, best, finite)
        np.testing.assert_array_equal(best, np.argmax(rows, axis=1), err_msg=f"trial {trial}, {n} values")
        np.testing.assert_array_equal(finite, np.isfinite(rows).all(axis=1))


@pytest.mark.parametrize("n", [1, 7, 8, 33, 49152, 151936])
def test_masking_by_a_grammars_bits_matches_numpy(n):
    """kernels_cpu.logits.masked_by_bits (a grammar's allowed tokens, llguidance's little-endian bitmask) against
    the numpy reference it replaced: unpackbits, then where."""
    from kernels_cpu.logits import masked_by_bits

    rng = np.random.default_rng(n)
    logits = rng.standard_normal(n).astype(np.float32)
    logits[rng.integers(0, n)] = -np.inf  # a token masked already stays masked
    for density in (0.0, 0.01, 0.5, 1.0):
        bits = np.packbits(rng.random(n + 5) < density, bitorder="little")  # bytes past n: whatever is there
        want = np.where(np.unpackbits(bits, bitorder="little")[:n].astype(bool), logits, np.float32(-np.inf))
        out = np.full(n, 7.0, np.float32)
        masked_by_bits(logits, bits, out)
        assert np.array_equal(out, want)


def test_a_known_argmax_gives_the_same_tokens():
    """Sampler.sample with the row's argmax given (the server's step finds it for every row at once) picks what it
    picks without: greedy, with penalties (which may move the argmax) and sampled with a seed."""
    rng = np.random.default_rng(8)
    for params in (SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, repeat_penalty=1.5),
                   SamplingParams(temperature=0.9, seed=3, top_k=20)):
        plain, hinted = Sampler(params, 500), Sampler(params, 500)
        history = [1, 2, 3]
        for _ in range(20):
            logits = rng.standard_normal(500).astype(np.float32)
            logits[history[-1]] = 4.0  # the penalized token is the raw argmax
            token = plain.sample(logits, history)
            assert hinted.sample(logits, history, best=int(np.argmax(logits))) == token
            history.append(token)
