"""A Model shared between threads (issue 11, item 3): every answer equals the answer the prompt gets alone.

Greedy sampling on SmolLM2 with one compute thread; each generation keeps its own history and re-evaluates it
through the prefix cache when another one ran in between, which is exact because prefill and decode logits are
bit-identical (checked first, since every other test here rests on it)."""
import threading

import numpy as np
import pytest

from conftest import model_path
from edgeinfer.api import Model
from edgeinfer.errors import ModelClosed

pytestmark = pytest.mark.slow
GREEDY = dict(temperature=0.0, max_tokens=8)
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
REPETITIONS = 20


@pytest.fixture(scope="module")
def model():
    with Model(model_path("smollm2-135m-instruct"), n_ctx=256, n_threads=1) as m:
        yield m


@pytest.fixture(scope="module")
def alone(model):
    """Each prompt's answer, generated with nothing else running."""
    return {p: model.generate(p, **GREEDY) for p in PROMPTS}


def test_prefill_and_decode_logits_are_bit_identical(model):
    tokens = model.tokenize("Once upon a time there was")
    all_logits = model.logits(tokens)
    with model._use() as cached:
        cached.reset()
        cached.evaluate_prompt(tokens[:3])
        decoded = [cached.decode(t) for t in tokens[3:]]
    assert all(np.array_equal(d, all_logits[i]) for i, d in enumerate(decoded, start=3))


def run_in_threads(model, prompts) -> list[str]:
    answers = [None] * len(prompts)
    errors = []
    start = threading.Barrier(len(prompts))

    def work(i):
        try:
            start.wait()
            answers[i] = model.generate(prompts[i], **GREEDY)
        except BaseException as e:  # a failure in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    return answers


@pytest.mark.parametrize("prompts", [[PROMPTS[0]] * 2, PROMPTS], ids=["same-prompt", "two-prompts"])
def test_two_threads_get_the_answers_they_get_alone(model, alone, prompts, monkeypatch):
    cached = model._cached
    evaluations = []
    evaluate_prompt = cached.evaluate_prompt
    monkeypatch.setattr(cached, "evaluate_prompt", lambda p: evaluations.append(len(p)) or evaluate_prompt(p))
    for _ in range(REPETITIONS):
        assert run_in_threads(model, prompts) == [alone[p] for p in prompts]
    # beyond each generation's own prompt: steps that found the other thread's tokens in the cache (interleaving)
    assert len(evaluations) > len(prompts) * REPETITIONS


def test_two_streams_interleaved_in_one_thread_get_their_own_answers(model, alone):
    a, b = (model.stream(p, **GREEDY) for p in PROMPTS)
    pieces = {0: [], 1: []}
    live = {0: a, 1: b}
    while live:  # one piece of each in turn: every step finds the cache holding the other one's history
        for i, stream in list(live.items()):
            try:
                pieces[i].append(next(stream))
            except StopIteration:
                del live[i]
    assert ["".join(pieces[0]), "".join(pieces[1])] == [alone[p] for p in PROMPTS]
    assert a.stats.generated_tokens == b.stats.generated_tokens == GREEDY["max_tokens"]


def test_chat_sessions_in_two_threads_answer_as_alone(model):
    def conversation():
        session = model.session(max_tokens=6, temperature=0.0)
        return [session.send("Hi, I am Ana."), session.send("What is my name?")]

    expected = conversation()
    answers, errors = [None, None], []

    def work(i):
        try:
            answers[i] = conversation()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and answers == [expected, expected]


def test_close_while_another_thread_generates():
    m = Model(model_path("smollm2-135m-instruct"), n_ctx=256, n_threads=1)
    started, outcome = threading.Event(), []

    def work():
        try:
            # greedy counting goes on: the stream does not end by itself before the close
            for _ in m.stream("1, 2, 3, 4, 5,", temperature=0.0, max_tokens=200):
                started.set()
            outcome.append("finished")
        except ModelClosed as e:
            outcome.append(e)
        except BaseException as e:
            outcome.append(("crashed", e))
        started.set()

    thread = threading.Thread(target=work)
    thread.start()
    assert started.wait(timeout=60)
    m.close()  # waits for the step under way, then the stream's next step raises ModelClosed
    thread.join(timeout=60)
    assert len(outcome) == 1 and isinstance(outcome[0], ModelClosed), outcome
