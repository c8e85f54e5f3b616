"""Speculative decoding inside the server's scheduler: per request, exact (greedy answers with guesses equal those
without), counted in the metrics, a per-request choice over the server's, and a draft model kept per slot."""
import queue

import pytest

from conftest import model_path
from edgeinfer.engine import Engine
from edgeinfer.errors import InvalidArgument
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.serve.scheduler import Scheduler
from edgeinfer.serve.serve_request import DoneEvent, ServeRequest, TokenEvent

# text the answer repeats: prompt lookup finds its continuation (an answer that quotes its input)
QUOTE = ("Copy the text exactly.\n"
         "Text: The quick brown fox jumps over the lazy dog near the river bank every morning.\n"
         "Copy: The quick brown fox jumps over the lazy dog near the river bank every morning.\n"
         "Text: A red apple fell from the old tree onto the green grass below.\nCopy:")
PROMPTS = [QUOTE, "<ul>\n<li>one</li>\n<li>two</li>\n<li>three</li>\n</ul>\n<ul>\n<li>one</li>\n",
           "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1, 2, 3, 4, 5, 6, 7, 8,"]


@pytest.fixture(scope="module")
def model():
    import edgeinfer

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=256, n_threads=1, n_seq=4) as m:
        yield m


def run_requests(model, prompts, max_tokens, *, server_mode="off", modes=None, temperature=0.0, draft_engine=None,
                 top_logprobs=None, stop=(), ignore_eos=False):
    """Every prompt submitted at once to a fresh scheduler; [(token events, final event, request)]."""
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=3, speculative=server_mode,
                          draft_engine=draft_engine).start()
    try:
        pending = []
        for i, prompt in enumerate(prompts):
            events = queue.Queue()
            r = ServeRequest(model.tokenize(prompt), Sampler(SamplingParams(temperature=temperature, seed=i),
                                                             model.n_vocab), max_tokens, list(stop), sink=events.put,
                             speculative=None if modes is None else modes[i], top_logprobs=top_logprobs,
                             ignore_eos=ignore_eos)
            scheduler.submit(r)
            pending.append((r, events))
        results = []
        for r, events in pending:
            tokens = []
            while isinstance(event := events.get(timeout=60), TokenEvent):
                tokens.append(event)
            results.append((tokens, event, r))
    finally:
        scheduler.close()
    return results, scheduler


def test_greedy_answers_with_prompt_lookup_equal_plain_ones(model):
    """Three concurrent requests; a stop string ends the list's answer inside a run of accepted guesses."""
    plain, _ = run_requests(model, PROMPTS, 24, top_logprobs=2, stop=["</ul>"])
    spec, scheduler = run_requests(model, PROMPTS, 24, server_mode="ngram", top_logprobs=2, stop=["</ul>"])
    assert [[t.token for t in tokens] for tokens, _, _ in spec] == [[t.token for t in tokens] for tokens, _, _ in plain]
    assert [r.text for _, _, r in spec] == [r.text for _, _, r in plain]
    assert [done.finish_reason for _, done, _ in spec] == [done.finish_reason for _, done, _ in plain]
    assert spec[1][1].finish_reason == "stop" and spec[1][2].text == "<li>two</li>\n<li>three</li>\n"
    assert all(isinstance(done, DoneEvent) for _, done, _ in spec)
    # guessed tokens carry the log-probabilities of the model's own rows
    assert [t.logprob for t in spec[0][0]] == pytest.approx([t.logprob for t in plain[0][0]], abs=1e-5)
    quote = spec[0][2].stats.speculation
    assert quote.drafted > 0 and quote.accepted >= 10  # the repeated sentence was guessed, not decoded
    totals = scheduler.speculation
    assert totals.drafted == sum(r.stats.speculation.drafted for _, _, r in spec)
    metrics = scheduler.metrics
    assert metrics.draft_tokens._value.get() == totals.drafted
    assert metrics.draft_tokens_accepted._value.get() == totals.accepted
    assert metrics.tokens_per_verify_pass._value.get() > 1.5
    assert b"edgeinfer_draft_tokens_accepted_total" in metrics.render()


@pytest.mark.parametrize("top_logprobs", [None, 2])
def test_with_ignore_eos_guesses_give_the_plain_answer_and_no_end_token(model, top_logprobs):
    """ignore_eos (benchmarks) rules the end-of-generation tokens out of verified rows too: masked in the step's
    buffer where nothing reads the rows raw afterwards, in a copy where logprobs do (of the raw logits)."""
    plain, _ = run_requests(model, PROMPTS, 40, ignore_eos=True, top_logprobs=top_logprobs)
    spec, scheduler = run_requests(model, PROMPTS, 40, server_mode="ngram", ignore_eos=True,
                                   top_logprobs=top_logprobs)
    tokens = [[t.token for t in events] for events, _, _ in spec]
    assert tokens == [[t.token for t in events] for events, _, _ in plain]
    assert all(len(t) == 40 for t in tokens) and not set(sum(tokens, [])) & set(model.tokenizer.eog_ids)
    assert scheduler.speculation.accepted > 0
    if top_logprobs:
        for (spec_events, _, _), (plain_events, _, _) in zip(spec, plain):  # of the raw logits: EOG tokens count
            assert [t.logprob for t in spec_events] == pytest.approx([t.logprob for t in plain_events], abs=1e-5)


def test_a_request_chooses_its_own_mode_and_sampling_still_runs(model):
    results, scheduler = run_requests(model, PROMPTS, 16, server_mode="ngram", modes=["off", "auto", None],
                                      temperature=0.7)
    off, _, default = (r.stats.speculation for _, _, r in results)
    assert off.drafted == 0 and default.drafted > 0
    assert all(len(tokens) == 16 or done.finish_reason == "stop" for tokens, done, _ in results)
    with pytest.raises(InvalidArgument, match="needs a draft model"):
        scheduler.submit(ServeRequest([1, 2], Sampler(SamplingParams(), model.n_vocab), 4, speculative="draft"))
    with pytest.raises(InvalidArgument, match="expected one of auto, ngram, draft, off"):
        scheduler.submit(ServeRequest([1, 2], Sampler(SamplingParams(), model.n_vocab), 4, speculative="fast"))


@pytest.mark.parametrize("mode", ["draft", "auto"])
def test_draft_model_per_slot_follows_each_request(model, mode):
    """The model as its own draft (an engine over the same weights with its own cache): every greedy guess is
    right, so each verify pass keeps all of them, and the answers are the plain ones. In auto mode each slot's
    drafter is the lookup, then the draft model on the slot's own draft sequence."""
    from edgeinfer.serve.batch_speculation import SlotDrafter
    from edgeinfer.speculative import LookupThenModel

    draft = Engine(model.config, model.runner, n_ctx=model.n_ctx, n_seq=4, n_threads=1)
    plain, _ = run_requests(model, PROMPTS[1:], 12)
    spec, scheduler = run_requests(model, PROMPTS[1:], 12, server_mode=mode, draft_engine=draft)
    assert [[t.token for t in tokens] for tokens, _, _ in spec] == [[t.token for t in tokens] for tokens, _, _ in plain]
    totals = scheduler.speculation
    if mode == "draft":
        assert totals.drafted > 0 and totals.accepted == totals.drafted
    else:
        r = ServeRequest([1, 2, 3], Sampler(SamplingParams(temperature=0), model.n_vocab), 4, speculative="auto")
        scheduler._start_drafting(r, 0)
        assert isinstance(r.drafter, LookupThenModel) and isinstance(r.drafter.model, SlotDrafter)


def test_serve_refuses_spec_draft_without_a_draft_model_before_loading(capsys):
    from edgeinfer.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "no-such-model", "--spec", "draft"])  # the model is not even looked up
    assert exit_info.value.code == 1
    assert capsys.readouterr().err == ("error: speculative='draft' needs a draft model: load(..., draft=MODEL) or "
                                       "--draft MODEL\n")


def test_in_a_batch_guesses_go_where_they_pay():
    """Rows slow every request of the step: the likely guesses go in, unlikely ones not even where a lone
    request would check them; a fixed mode gets its length; rows and room bound it all."""
    from edgeinfer.serve.batch_speculation import StepCost, plan_guesses

    cost = StepCost()
    for rows, seconds in [(4, 0.070), (12, 0.134), (4, 0.070), (20, 0.198)]:
        cost.observe(rows, seconds)
    base, per_row = cost.fitted()
    assert base == pytest.approx(0.038) and per_row == pytest.approx(0.008)
    assert plan_guesses([0.35], [12], [0.0], [None], 255, (base, per_row)) != [0]  # alone it would guess
    assert plan_guesses([0.98, 0.35, 0.6, 0.1], [12, 12, 3, 12], [0.0] * 4, [None] * 4, 255, (base, per_row)) == \
        [12, 0, 0, 0]
    assert plan_guesses([0.9, 0.7, 0.1], [2, 12, 12], [0.0] * 3, [None] * 3, 255, (base, per_row)) == [2, 1, 0]
    # a draft model's decode steps make its guesses dearer
    assert plan_guesses([0.9, 0.7, 0.1], [2, 12, 12], [0.0, 0.02, 0.0], [None] * 3, 255, (base, per_row)) == [2, 0, 0]
    assert plan_guesses([0.1, 0.9], [12, 12], [0.0, 0.0], [6, None], 8, (base, per_row)) == [6, 2]
    assert plan_guesses([0.9], [12], [0.0], [None], 255, None) == [0]  # nothing measured yet: a plain step first


def test_requests_writing_free_text_take_turns_scoring_their_free_guess(model, monkeypatch):
    """Alone, a request scores prompt lookup's free first guess on every plain step; among several, those whose last
    guess was wrong (or missing: free text) score it in turn, one a step, and one whose last guess was right (a
    count) every step."""
    seen = []
    draft = Scheduler._draft

    def spy(self, r, k, scored):
        seen.append((self._steps, r.seq, r.last_guess_right, k, scored))
        return draft(self, r, k, scored)

    monkeypatch.setattr(Scheduler, "_draft", spy)
    run_requests(model, ["Once upon a time, a little dog named"], 12, server_mode="auto")
    assert seen and all(score for *_, score in seen)
    seen.clear()
    run_requests(model, ["Once upon a time, a little dog named", "The history of the old city of", PROMPTS[2]], 40,
                 server_mode="auto")
    steps = {}
    for step, seq, right, k, score in seen:
        steps.setdefault(step, []).append((right, k, score))
    crowded = [rows for rows in steps.values() if len(rows) == 3]
    assert len(crowded) >= 10
    assert all(score for rows in crowded for right, k, score in rows if right)  # right last time: scored
    for rows in crowded:  # of the others, one a step at most (whose turn it is)
        assert sum(score for right, k, score in rows if not right) <= 1
    assert sum(not score for rows in crowded for *_, score in rows) > len(crowded)  # the story and the history wait
