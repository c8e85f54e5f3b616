"""Speculative decoding (edgeinfer.speculative): prompt-lookup drafts, the acceptance rule's exactness, and greedy
output unchanged on the three real models."""
import json
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_NAMES, load_reference, model_path
from edgeinfer.errors import InvalidArgument, UnsupportedError
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.prompt_lookup import NgramDrafter
from edgeinfer.speculative import SPECULATION_MODES, DraftLength, accept_draft


# ---------------------------------------------------------------- prompt lookup

def test_lookup_proposes_what_followed_the_latest_occurrence():
    drafter = NgramDrafter(max_ngram=3, min_ngram=2)
    context = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 6, 2, 3]
    # [2, 3] last occurred before the end at index 6-7, followed by 7, 8, 6
    assert drafter.propose(context, 3) == [7, 8, 6]
    assert drafter.propose(context, 10) == [7, 8, 6, 2, 3]  # up to the context's end


def test_a_longer_match_wins_over_a_more_recent_shorter_one():
    drafter = NgramDrafter(max_ngram=3, min_ngram=2)
    context = [5, 2, 3, 40, 41, 9, 2, 3, 50, 5, 2, 3]
    assert drafter.propose(context, 2) == [40, 41]  # [5, 2, 3] occurred at the start; [2, 3] alone more recently


def test_no_recurring_ngram_proposes_nothing():
    drafter = NgramDrafter(max_ngram=3, min_ngram=2)
    assert drafter.propose([1, 2, 3, 4, 5, 6], 4) == []
    assert drafter.propose([1, 2, 3, 4, 5, 6], 0) == []
    assert drafter.propose([7], 4) == []


def test_the_index_follows_a_growing_context_and_rebuilds_for_another():
    drafter = NgramDrafter(max_ngram=2, min_ngram=2)
    context = [1, 2, 3]
    assert drafter.propose(context, 2) == []
    context += [1, 2]
    assert drafter.propose(context, 2) == [3, 1]
    assert drafter.propose([9, 8, 7, 9, 8], 1) == [7]  # not an extension: indexed afresh


def test_the_index_of_a_list_grown_in_place_equals_one_made_from_copies():
    """A generation's history is one list appended to step by step: the index follows it without comparing it
    whole; the guesses are those of a drafter given a fresh copy of it every time, and a list cut back is indexed
    afresh."""
    rng = np.random.default_rng(0)
    tokens = [int(t) for t in rng.integers(0, 6, 300)]
    in_place, copied, history = NgramDrafter(), NgramDrafter(), tokens[:20]
    for t in tokens[20:]:
        assert in_place.propose(history, 4) == copied.propose(list(history), 4)
        history.append(t)
    del history[100:]
    history += [7, 8, 9]
    assert in_place.propose(history, 4) == NgramDrafter().propose(list(history), 4) == []


def test_a_copy_resumes_past_a_renamed_token():
    """Rewriting with x renamed: after the new name the last tokens occur nowhere, and the copy goes on just past
    the source's x (a substitution), or at it while the new name takes more tokens than the old (insertions)."""
    X, Y1, Y2 = 90, 91, 92
    source = [10, 11, X, 12, 13, 14, X, 15, 16, 17]
    drafter = NgramDrafter(max_ngram=3, min_ngram=2)
    context = source + [10, 11]
    assert drafter.propose(context, 3) == [X, 12, 13]  # (10, 11) recurs
    context.append(Y1)  # the model renames: its first guess was wrong
    assert drafter.propose(context, 3) == [12, 13, 14]  # substitution: past the source's X
    context.append(Y2)  # the new name takes a second token
    assert drafter.propose(context, 3) == [12, 13, 14]  # insertion: the source waits
    context += [12, 13, 14]
    assert drafter.propose(context, 3) == [Y1, Y2, 15]  # in step again, the source's next X written as renamed


def _replay(drafter, prompt, output, k=12):
    """Greedy verify passes over a known output: (first guesses of each pass, passes)."""
    context, i, proposals = list(prompt) + output[:1], 1, []
    while i < len(output):
        draft = drafter.propose(context, k)
        proposals.append((i, draft))
        right = 0
        while right < len(draft) and i + right < len(output) and draft[right] == output[i + right]:
            right += 1
        context += output[i:i + right + 1]
        i += right + 1
    return proposals


def test_a_rewrite_follows_the_source_line_not_the_previous_rewritten_one():
    """Lines `step_i = len * x + i` rewritten with x renamed: after the new name, the latest occurrence of the last
    tokens is the previous rewritten line (which goes on with the old i); the copy followed goes on with the source
    line's, and wins. Once the copy is back in step past the new name, later copies write it for x."""
    STEP, EQ, LEN, TIMES, X, PLUS, NL, Y, END = 1, 2, 3, 4, 5, 6, 7, 8, 9

    def line(i, name):
        return [STEP, 10 + i, EQ, LEN, TIMES, name, PLUS, 10 + i, NL]

    prompt = [t for i in range(8) for t in line(i, X)] + [END]
    output = [t for i in range(8) for t in line(i, Y)]
    proposals = _replay(NgramDrafter(max_ngram=3, min_ngram=2), prompt, output)
    assert proposals[2] == (6, line(0, X)[6:] + line(1, X)[:9])  # the source, until the model renames X
    # the source line's number, not line 0's; back in step past the new name, the copy writes it for X
    assert proposals[3] == (15, line(1, X)[6:] + line(2, Y)[:9])
    for i, draft in proposals[4:]:
        assert draft[:len(output) - i] == output[i:i + 12]  # X renamed in every later line: all guesses right
    assert [i for i, _ in proposals[4:]] == list(range(15 + 13, len(output), 13))


def test_words_inserted_before_a_token_are_no_rename():
    THE, COMMA = 50, 51
    source = [20, 21, 22, THE, 23, 24, 25, 26, THE, 27, 28, 29, 30, 31]
    output = [20, 21, 22, COMMA, THE, 23, 24, 25, 26, THE, 27, 28, 29, 30]
    proposals = dict(_replay(NgramDrafter(max_ngram=3, min_ngram=2), source + [1], output))
    assert proposals[5][:6] == [23, 24, 25, 26, THE, 27]  # ", the" once for "the" is not "the" renamed


def test_the_copy_learns_that_the_model_inserts_words_before_the_source_token():
    """Past a wrong guess the source goes on after the token (a substitution) or at it (words inserted before it,
    ', the' for 'the'): both are candidates, and the one right wins the next such place."""
    THE, COMMA = 50, 51
    source = [20, 21, 22, THE, 23, 24, 25, 26, 27, 28, 29, THE, 30, 31, 32, 33, 34, 35]
    output = [20, 21, 22, COMMA, THE, 23, 24, 25, 26, 27, 28, 29, COMMA, THE, 30, 31, 32, 33]
    proposals = dict(_replay(NgramDrafter(max_ngram=3, min_ngram=2), source + [1], output))
    assert proposals[4][0] == 23  # the first time, a substitution is guessed
    assert proposals[13][:4] == [THE, 30, 31, 32]  # the second, the insertion that was right the first time


def test_a_rename_the_model_does_not_keep_is_dropped():
    X, Y = 52, 53

    def line(first, name):
        return [first, first + 1, name] + list(range(first + 2, first + 14))

    source = line(100, X) + line(200, X) + line(300, X)
    output = line(100, Y) + line(200, X) + line(300, X)
    proposals = dict(_replay(NgramDrafter(max_ngram=3, min_ngram=2), source + [1], output))
    assert proposals[16][:3] == [201, Y, 202]  # renamed in the first line: the copy of the second says Y
    assert proposals[31][:3] == [301, X, 302]  # the model kept X there: the rename is dropped


def test_the_copy_followed_moves_to_where_the_n_gram_is_right():
    """A summary skips part of its source: the copy followed is wrong there, the n-gram finds the new place."""
    source = list(range(100, 130))
    output = source[:5] + source[15:25]
    proposals = dict(_replay(NgramDrafter(max_ngram=3, min_ngram=2), source + [1], output))
    assert proposals[2] == source[2:14]  # copying from the start
    assert proposals[6] == source[6:18]  # the model skipped: the copy takes 115 for a replaced 105
    assert proposals[7] == source[17:29]  # wrong again, it yields to the n-gram (115, 116)


def test_a_source_that_is_seldom_right_keeps_its_guesses_to_itself():
    drafter = NgramDrafter(max_ngram=2, min_ngram=2)
    context = [1, 2, 3, 4, 1, 2]
    proposals = []
    for token in range(100, 140):  # free text: every guess is wrong, nothing recurs
        proposals.append(drafter.propose(context, 2))
        context.append(token)
    assert proposals[0] == [3, 4]
    assert all(p == [] for p in proposals[-10:])  # the copy is given up or its guesses withheld


REPLAY = Path(__file__).parent / "data" / "spec_replay_qwen2.5.json"
# Qwen2.5 Q4_K_M at 2 threads: a pass's milliseconds by rows (DraftLength's costs, measured live on the summary)
QWEN_PASS_MS = {1: 15.0, 2: 15.5, 4: 17.3, 8: 24.5, 13: 37.0}


@pytest.mark.parametrize("task, mode, floor", [("rewrite", "ngram", 9.0), ("rewrite", "auto", 8.5),
                                               ("quote", "ngram", 11.5), ("quote_with_commas", "ngram", 9.5),
                                               ("summarize", "ngram", 4.8), ("summarize", "auto", 3.6)])
def test_replayed_bench_tasks_keep_their_tokens_per_verify_pass(task, mode, floor):
    """Qwen2.5's greedy answers to the bench tasks (bench_spec.record_tasks), replayed through prompt lookup: a floor
    under the tokens a verify pass yields (before the copy was aligned, renames learned and insertions followed,
    rewrite gave 6.4 with ngram and 5.5 with auto, quote_with_commas 6.4, summarize 4.4 and 3.3)."""
    from edgeinfer.bench_spec import replay_lookup

    recorded = json.loads(REPLAY.read_text())["tasks"][task]
    result = replay_lookup(recorded["prompt"], recorded["output"], mode, QWEN_PASS_MS)
    assert result["tokens_per_pass"] >= floor, result


def test_the_words_source_finds_the_copy_across_whitespace_and_case():
    """A summary joining two paragraphs writes ' In' where its source has '\n\n', 'In' (other tokens, no n-gram of
    tokens recurs): the words (whitespace and case aside) find where the source goes on."""
    VALLEY, DOT, BREAK, IN, SPACE_IN, YEAR, THE, RAILWAY, REACHED, FERRY, CAP_THE = range(1, 12)
    classes = np.zeros(20, np.int32)
    for token, word in ((VALLEY, 1), (DOT, 2), (IN, 3), (SPACE_IN, 3), (YEAR, 4), (THE, 5), (CAP_THE, 5),
                        (RAILWAY, 6), (REACHED, 7), (FERRY, 8)):
        classes[token] = word  # BREAK: whitespace only, class 0
    source = [THE, VALLEY, DOT, BREAK, IN, YEAR, THE, RAILWAY, REACHED, FERRY]
    context = source + [15, THE, VALLEY, DOT, SPACE_IN]
    assert NgramDrafter(max_ngram=3, min_ngram=2).propose(context, 4) == []  # tokens alone: nothing recurs
    drafter = NgramDrafter(max_ngram=3, min_ngram=2, word_classes=classes)
    assert drafter.propose(context, 4) == [YEAR, THE, RAILWAY, REACHED]
    # 'The railway reached' starting a sentence: the source's ' the railway reached' goes on with ' ferry'
    assert drafter.propose(source + [16, CAP_THE, RAILWAY, REACHED], 1) == [FERRY]


@pytest.mark.slow
def test_a_replayed_summary_drafts_more_with_the_words_source():
    """Qwen2.5's summary joins the source's paragraphs (' In' for '\n\n', 'In') and starts sentences where the
    source had none ('The ferry' for '... the ferry'): with its tokenizer's word classes, prompt lookup finds the
    copy again (replayed: 4.84 -> 6.25 tokens per verify pass with ngram, 3.66 -> 4.29 with auto)."""
    from edgeinfer.bench_spec import replay_lookup
    from edgeinfer.gguf_reader import GGUFFile
    from edgeinfer.tokenizer import Tokenizer

    with GGUFFile(model_path("qwen2.5-coder-0.5b-instruct")) as f:
        tokenizer = Tokenizer.from_metadata(f.metadata)
    recorded = json.loads(REPLAY.read_text())["tasks"]
    summary = recorded["summarize"]
    ngram = replay_lookup(summary["prompt"], summary["output"], "ngram", QWEN_PASS_MS, tokenizer=tokenizer)
    auto = replay_lookup(summary["prompt"], summary["output"], "auto", QWEN_PASS_MS, tokenizer=tokenizer)
    assert ngram["tokens_per_pass"] >= 6.0 and auto["tokens_per_pass"] >= 4.1, (ngram, auto)
    story = recorded["story"]  # free text: auto still costs nothing
    assert replay_lookup(story["prompt"], story["output"], "auto", QWEN_PASS_MS,
                         tokenizer=tokenizer)["speedup"] >= 0.98


def test_a_replayed_story_with_auto_costs_nothing():
    from edgeinfer.bench_spec import replay_lookup

    recorded = json.loads(REPLAY.read_text())["tasks"]["story"]
    result = replay_lookup(recorded["prompt"], recorded["output"], "auto", QWEN_PASS_MS)
    assert result["speedup"] >= 0.98, result


def test_a_replayed_story_in_ngram_mode_proposes_little():
    """Free text: each source is right now and then, what the lookup picks seldom is; it then keeps its guesses
    (before that gate, 506 guesses in 179 passes, 12 right)."""
    from edgeinfer.bench_spec import replay_lookup

    recorded = json.loads(REPLAY.read_text())["tasks"]["story"]
    assert replay_lookup(recorded["prompt"], recorded["output"], "ngram", QWEN_PASS_MS)["drafted"] < 200


class _CountingModelDrafter:
    """A draft model stand-in: guesses 900, 901, ... and counts its proposals."""

    cheap = False

    def __init__(self):
        self.calls = 0

    def propose(self, context, k):
        self.calls += 1
        return list(range(900, 900 + k))


def test_auto_with_a_draft_model_takes_the_lookups_copy_where_it_has_one():
    from edgeinfer.speculative import LookupThenModel, draft_or_free_guess

    model = _CountingModelDrafter()
    drafter = LookupThenModel(NgramDrafter(max_ngram=3, min_ngram=2), model)
    source = [1, 2, 3, 4, 5, 6]
    assert drafter.propose(source + [7, 1, 2], 3) == [3, 4, 5]  # the copy: the model is not asked
    assert model.calls == 0
    assert drafter.propose([10, 11, 12, 13], 3) == [900, 901, 902]  # nothing recurs: the model's guesses
    assert model.calls == 1
    # a plain pass scores the lookup's free guess, never a draft model step
    assert draft_or_free_guess(drafter, source + [7, 1, 2], 0) == ([], 3)
    assert draft_or_free_guess(drafter, [20, 21, 22], 0) == ([], None)
    assert model.calls == 1


def test_draft_length_drafts_when_guesses_are_right_and_stops_when_they_are_not():
    length = DraftLength(max_draft=8)
    assert length.choose() == 0  # nothing measured yet
    length.observe_pass(1, 0.010)
    length.observe_pass(5, 0.020)  # 2.5 ms per extra row
    for _ in range(20):
        length.observe_guesses(4, 4)
    assert length.choose() >= 6
    assert length.pass_cost(9) == pytest.approx(0.030)  # extended along the measured line
    for _ in range(40):
        length.observe_guesses(1, 0)
    assert length.choose() == 0
    assert DraftLength(max_draft=5, fixed=3).choose() == 3


def test_draft_length_sees_that_a_short_draft_costs_more_than_its_share_of_a_long_one():
    """Two rows can cost far more than one row plus a per-row share of a long pass (the kernels switch from one
    row to tiles): a measured 2-row pass is used as it is, not read off the long pass's slope."""
    length = DraftLength(max_draft=12)
    length.observe_pass(1, 0.010)
    length.observe_pass(13, 0.040)  # 2.5 ms per extra row on average
    length.right, length.wrong = 5.0, 5.0  # a = 0.5
    assert length.pass_cost(2) == pytest.approx(0.0125)
    assert length.choose() > 0  # 1.5 tokens for 12.5 ms beats 1 for 10
    length.observe_pass(2, 0.017)  # measured: the jump to tiles
    assert length.pass_cost(3) == pytest.approx(0.017 + 0.023 / 11)
    assert length.choose() == 0  # 1.5 tokens for 17 ms, 1.75 for 19 ms: plain decoding is faster


# ---------------------------------------------------------------- the acceptance rule is exact

N_VOCAB = 12


def _emitted_distribution(params: SamplingParams, logits: np.ndarray, guess: int, draft_probs=None,
                          trials: int = 20000) -> np.ndarray:
    """How often each token comes out first of a verify pass with one guess."""
    sampler = Sampler(params, N_VOCAB)
    rows = np.stack([logits, logits])
    counts = np.zeros(N_VOCAB)
    for _ in range(trials):
        counts[accept_draft(sampler, rows, [0, 1], [guess], draft_probs)[0]] += 1
    return counts / trials


def _target(params: SamplingParams, logits: np.ndarray) -> np.ndarray:
    ids, probs = Sampler(params, N_VOCAB).distribution(logits, [0, 1])
    p = np.zeros(N_VOCAB)
    p[ids] = probs
    return p


LOGITS = np.array([2.0, 1.5, 1.4, 0.3, -0.5, 0.9, 1.1, -2.0, 0.0, 0.7, 1.45, -1.0], np.float32)
PARAMS = SamplingParams(temperature=0.9, top_k=8, top_p=0.97, min_p=0.02, seed=11)


@pytest.mark.parametrize("guess", [0, 2, 7], ids=["likely guess", "middling guess", "guess outside top-k"])
def test_a_prompt_lookup_guess_leaves_the_sampled_distribution_unchanged(guess):
    p = _target(PARAMS, LOGITS)
    seen = _emitted_distribution(PARAMS, LOGITS, guess)
    assert 0.5 * np.abs(seen - p).sum() < 0.02, (seen, p)


def test_a_draft_models_guess_leaves_the_sampled_distribution_unchanged():
    p = _target(PARAMS, LOGITS)
    q = np.exp(-0.5 * np.arange(N_VOCAB))[::-1].copy()
    q /= q.sum()  # a poor draft: most mass where the target has little
    # a draft model's guess is drawn from q: weigh what comes out after each guess by its chance
    seen = sum(q[g] * _emitted_distribution(PARAMS, LOGITS, g, q[None], trials=3000) for g in range(N_VOCAB))
    assert 0.5 * np.abs(seen - p).sum() < 0.02, (seen, p)


def test_greedy_acceptance_keeps_guesses_up_to_the_first_wrong_one():
    sampler = Sampler(SamplingParams(temperature=0), N_VOCAB)
    rows = np.zeros((4, N_VOCAB), np.float32)
    for i, best in enumerate([3, 5, 7, 9]):
        rows[i, best] = 1.0
    assert accept_draft(sampler, rows, [1], [3, 5, 7]) == [3, 5, 7, 9]  # all right: the bonus token too
    assert accept_draft(sampler, rows, [1], [3, 4, 7]) == [3, 5]  # the model's token where the guess was wrong


# ---------------------------------------------------------------- on the real models

REPEATING = ("Copy this list exactly:\napple banana cherry date elderberry fig grape\n"
             "apple banana cherry date elderberry fig grape\nCopy:\n")


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model(request):
    import edgeinfer

    m = edgeinfer.load(model_path(request.param), n_ctx=512, seed=0)
    yield request.param, m
    m.close()


@pytest.mark.slow
def test_greedy_output_is_the_same_with_speculation(model):
    name, m = model
    prompts = [p["tokens"] for p in load_reference(name)["prompts"][:2]] + [m.tokenize(REPEATING)]
    drafted = 0
    for prompt in prompts:
        plain = m.generate(list(prompt), max_tokens=40, temperature=0)
        for mode in ("ngram", "auto"):
            assert m.generate(list(prompt), max_tokens=40, temperature=0, speculative=mode) == plain, mode
            drafted += m.last_stats.speculation.drafted
    assert drafted > 0  # the repeating prompt gives the lookup something to guess


def test_every_pass_is_one_forward_after_rejected_guesses_too(model, monkeypatch):
    """A verify pass after guesses were rejected finds the cache holding the context plus those guesses: it drops
    them and evaluates in one forward pass (it took a second, over the last token alone, until session 12: Qwen2.5's
    13-row pass cost 54 ms instead of 37)."""
    from edgeinfer.generation import CachedEngine

    _, m = model
    forwards_per_pass = []
    engine_forward, extend_with = type(m.engine).forward, CachedEngine.extend_with

    def counted_forward(self, *args, **kwargs):
        counted_forward.calls += 1
        return engine_forward(self, *args, **kwargs)

    counted_forward.calls = 0

    def counted_extend_with(self, sequence, draft):
        counted_forward.calls = 0
        rows = extend_with(self, sequence, draft)
        forwards_per_pass.append(counted_forward.calls)
        return rows

    monkeypatch.setattr(type(m.engine), "forward", counted_forward)
    monkeypatch.setattr(CachedEngine, "extend_with", counted_extend_with)
    m.generate(REPEATING + "banana cherry fig apple", max_tokens=40, temperature=0, speculative="ngram")
    spec = m.last_stats.speculation
    assert spec.verify_steps and spec.accepted < spec.drafted  # guesses were checked, and some rejected
    assert forwards_per_pass and set(forwards_per_pass) == {1}, forwards_per_pass


def test_a_seeded_sample_is_the_same_text_with_and_without_speculation(model):
    """Guesses are kept where they equal the row's sample, drawn as plain decoding draws it: for a seed, the same
    text whether prompt lookup guessed or not (and guesses were checked and accepted on the way)."""
    _, m = model
    settings = dict(max_tokens=32, temperature=0.5, top_k=20, repeat_penalty=1.05, seed=5)
    plain = m.generate(REPEATING, speculative="off", **settings)
    assert m.generate(REPEATING, speculative="ngram", **settings) == plain
    assert m.last_stats.speculation.accepted > 0


@pytest.mark.slow
def test_sampling_with_speculation_is_reproducible_for_a_seed(model):
    _, m = model
    runs = [m.generate(REPEATING, max_tokens=24, temperature=0.7, seed=3, speculative="ngram") for _ in range(2)]
    assert runs[0] == runs[1]


def test_speculation_modes_are_checked(model):
    _, m = model
    with pytest.raises(InvalidArgument, match="speculative='fast'"):
        m.stream("hi", speculative="fast")
    with pytest.raises(TypeError, match="speculative"):
        m.stream("hi", speculative=1)
    with pytest.raises(UnsupportedError, match="generate_batch does not speculate"):
        m.generate_batch(["hi"], speculative="ngram")


def test_cli_choices_are_the_speculation_modes():
    from edgeinfer.cli import DEFAULT_SPECULATION as CLI_DEFAULT, SPECULATION_MODES as CLI_MODES
    from edgeinfer.speculative import DEFAULT_SPECULATION

    assert CLI_MODES == SPECULATION_MODES
    assert CLI_DEFAULT == DEFAULT_SPECULATION


@pytest.mark.slow
def test_spec_bench_compares_each_mode_with_off():
    import edgeinfer
    from edgeinfer.bench_spec import format_spec_bench, run_spec_bench

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=1024) as m:
        rows = run_spec_bench(m, ["ngram"], threads=[1], reps=1, max_tokens=24, tasks=("quote",))
    assert [(r["task"], r["mode"]) for r in rows] == [("quote", "off"), ("quote", "ngram")]
    assert rows[0]["speedup"] == pytest.approx(1.0) and rows[1]["speedup"] > 0
    assert rows[0]["tokens"] == rows[1]["tokens"] > 0  # greedy: the same text in both modes
    table = format_spec_bench(rows)
    assert "| quote         | ngram |       1 |" in table


@pytest.mark.slow
def test_a_draft_model_of_the_same_vocabulary_speeds_nothing_wrong():
    """The model as its own draft: every greedy guess is right, and the text is plain decoding's."""
    import edgeinfer

    path = model_path("smollm2-135m-instruct")
    with edgeinfer.load(path, n_ctx=512, draft=path) as m:
        plain = m.generate(REPEATING, max_tokens=30, temperature=0)
        assert m.generate(REPEATING, max_tokens=30, temperature=0, speculative="draft") == plain
        spec = m.last_stats.speculation
        assert spec.drafted > 0 and spec.accepted == spec.drafted
        assert m.generate(REPEATING, max_tokens=30, temperature=0, speculative="auto") == plain
        draft = m.draft
    assert draft.closed  # closed with its target


@pytest.mark.slow
def test_a_draft_model_of_another_vocabulary_is_refused():
    import edgeinfer

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=128) as m:
        with pytest.raises(InvalidArgument, match="draft model: its vocabulary has 151936 tokens, the model's 49152"):
            m.use_draft(model_path("qwen2.5-coder-0.5b-instruct"))
        with pytest.raises(InvalidArgument, match="speculative='draft' needs a draft model"):
            m.stream("hi", speculative="draft")
