"""The server's scheduler in-process: continuous batching equals each request alone, chunked prefill, prefix reuse,
cancellation and the bounded queue."""
import queue
import time

import pytest

from conftest import model_path
from edgeinfer.errors import InvalidArgument
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.serve.scheduler import QueueFull, Scheduler
from edgeinfer.serve.serve_request import DoneEvent, ErrorEvent, ServeRequest, TokenEvent

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,",
           "Water is made of"]


@pytest.fixture(scope="module")
def model():
    import edgeinfer

    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=256, n_threads=1, n_seq=4) as m:
        yield m


def request(model, prompt, max_tokens, *, temperature=0.0, seed=None, stop=(), top_logprobs=None):
    tokens = model.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
    events = queue.Queue()
    r = ServeRequest(tokens, Sampler(SamplingParams(temperature=temperature, seed=seed), model.n_vocab),
                     max_tokens, list(stop), sink=events.put, top_logprobs=top_logprobs)
    return r, events


def collect(events, timeout=60):
    """(text, token events, the final event)."""
    text, tokens = "", []
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, TokenEvent):
            text += event.text
            tokens.append(event)
        else:
            return text + getattr(event, "text", ""), tokens, event


@pytest.mark.slow
def test_concurrent_requests_equal_each_alone(model):
    """Five requests on three slots (refill), prompts prefilled in chunks of 4 tokens between decode steps, one
    stop string and one sampled with a seed: each answer is what Model.generate gives alone."""
    settings = [dict(max_tokens=12), dict(max_tokens=20, stop=["\n\n"]), dict(max_tokens=3),
                dict(max_tokens=16, temperature=0.8, seed=7), dict(max_tokens=10)]
    alone = [model.generate(p, temperature=s.get("temperature", 0.0), seed=s.get("seed"), top_k=40, top_p=0.95,
                            min_p=0.05, max_tokens=s["max_tokens"], stop=s.get("stop")) for p, s in
             zip(PROMPTS, settings)]
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=3, chunk=4).start()
    try:
        pending = [request(model, p, **s) for p, s in zip(PROMPTS, settings)]
        for r, _ in pending:
            scheduler.submit(r)
        results = [collect(events) for _, events in pending]
    finally:
        scheduler.close()
    assert [text for text, _, _ in results] == alone
    assert all(isinstance(done, DoneEvent) for _, _, done in results)
    assert results[2][2].finish_reason == "length" and results[2][2].completion_tokens == 3
    rows = scheduler.metrics.step_rows.collect()[0].samples
    assert any(s.name.endswith("_sum") and s.value > 0 for s in rows)


@pytest.mark.slow
def test_prefix_reuse_reports_cached_tokens_and_keeps_the_answer(model):
    first = model.tokenize("You are a helpful assistant. Answer briefly. The capital of France is")
    second = first + model.tokenize(" Paris. The capital of Italy is", add_special=False)
    alone = model.generate(second, max_tokens=8, temperature=0)
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=2).start()
    try:
        r, events = request(model, first, 4)
        scheduler.submit(r)
        collect(events)
        r, events = request(model, second, 8)
        scheduler.submit(r)
        text, _, done = collect(events)
    finally:
        scheduler.close()
    assert done.cached_tokens >= len(first) and done.prompt_tokens == len(second)
    assert text == alone


@pytest.mark.slow
def test_cancelled_request_leaves_at_the_next_step(model):
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=1).start()
    try:
        r, events = request(model, PROMPTS[0], 200)
        scheduler.submit(r)
        assert isinstance(events.get(timeout=60), TokenEvent)
        r.cancel()
        deadline = time.time() + 10
        while scheduler.slots[0].request is not None and time.time() < deadline:
            time.sleep(0.01)
        assert scheduler.slots[0].request is None
        assert r.stats.generated_tokens < 50  # it stopped, long before max_tokens
        # the slot serves the next request
        r2, events2 = request(model, PROMPTS[1], 2)
        scheduler.submit(r2)
        assert isinstance(collect(events2)[2], DoneEvent)
    finally:
        scheduler.close()
    assert scheduler.metrics.finished.labels("cancelled")._value.get() == 1


@pytest.mark.slow
def test_logprobs_are_the_log_softmax_of_the_logits(model):
    import numpy as np

    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=1).start()
    try:
        r, events = request(model, PROMPTS[0], 3, top_logprobs=3)
        scheduler.submit(r)
        _, tokens, _ = collect(events)
    finally:
        scheduler.close()
    logits = model.logits(model.tokenize(PROMPTS[0]))[-1].astype(np.float64)
    expected = logits - (logits.max() + np.log(np.exp(logits - logits.max()).sum()))
    first = tokens[0]
    assert first.token == int(np.argmax(logits))
    assert first.logprob == pytest.approx(expected[first.token], abs=1e-6)
    assert [t for t, _ in first.top_logprobs] == list(np.argsort(-logits, kind="stable")[:3])
    assert first.top_logprobs[0][1] == pytest.approx(first.logprob)


def test_queue_is_bounded_and_bad_requests_are_refused(model):
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=1, max_queue=2)  # not started: nothing leaves
    waiting = [request(model, prompt, 4) for prompt in PROMPTS[:2]]
    for r, _ in waiting:
        scheduler.submit(r)
    with pytest.raises(QueueFull, match="2 requests are waiting"):
        scheduler.submit(request(model, PROMPTS[2], 4)[0])
    with pytest.raises(InvalidArgument, match="a slot holds 1 to 256"):
        scheduler.submit(request(model, [1] * 257, 4)[0])
    scheduler.close()  # those waiting are told, and the sequences go back to the cache
    assert all(isinstance(events.get_nowait(), ErrorEvent) for _, events in waiting)
    assert model.engine.cache.allocate() == 1
    model.engine.cache.free(1)


@pytest.mark.slow
def test_max_tokens_zero_and_shutdown_tell_the_client(model):
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=1).start()
    r, events = request(model, PROMPTS[0], 0)
    scheduler.submit(r)
    done = events.get(timeout=30)
    assert isinstance(done, DoneEvent) and done.finish_reason == "length" and done.completion_tokens == 0
    r, events = request(model, PROMPTS[0], 100)
    scheduler.submit(r)
    events.get(timeout=30)
    scheduler.close()
    last = None
    while not events.empty():
        last = events.get()
    assert isinstance(last, ErrorEvent) and "shutting down" in last.message


def test_a_known_argmax_that_is_masked_is_not_taken(model):
    """The scheduler hands each row's raw argmax to the request; with ignore_eos an end-of-generation argmax is
    masked, so the request samples the masked row instead of taking it."""
    import numpy as np

    tokenizer = model.tokenizer
    eog = frozenset(tokenizer.eog_ids)
    eog_ids = np.array(sorted(eog), dtype=np.int64)
    logits = np.zeros(model.n_vocab, np.float32)
    stop_token = min(eog)
    logits[stop_token], logits[42] = 10.0, 5.0
    for ignore_eos, want in ((True, 42), (False, None)):
        r, _ = request(model, PROMPTS[0], 4)
        r.ignore_eos = ignore_eos
        r.begin(tokenizer)
        token, _ = r.step(logits.copy(), eog, eog_ids, room=100, writable=True, best=stop_token)
        assert token == want  # None: the end-of-generation token ended the request


def test_a_fault_in_the_scheduler_ends_the_requests_in_flight_not_the_server(model, monkeypatch):
    """A bug outside the parts that end one request (sampling) or one batch (the forward) ends the requests then
    running, with an error they hear of, and the scheduler goes on serving the next ones; one in placing a request
    ends that request."""
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=2).start()
    try:
        alone, _ = request(model, PROMPTS[0], 6)
        scheduler.submit(alone)
        want = collect(_)[0]
        real_plan, real_place = Scheduler._plan, Scheduler._place
        faults = {"plan": 1, "place": 1}

        def plan(self, decoding):
            if faults["plan"]:
                faults["plan"] -= 1
                raise IndexError("a bug")
            return real_plan(self, decoding)

        def place(self, r):
            if faults["place"]:
                faults["place"] -= 1
                raise KeyError("another bug")
            return real_place(self, r)

        monkeypatch.setattr(Scheduler, "_place", place)
        r, events = request(model, PROMPTS[0], 6)
        scheduler.submit(r)
        assert isinstance(collect(events)[2], ErrorEvent)  # placing it failed: it hears of it, it does not wait
        monkeypatch.setattr(Scheduler, "_plan", plan)
        r, events = request(model, PROMPTS[0], 6)
        scheduler.submit(r)
        text, _, end = collect(events)
        assert isinstance(end, ErrorEvent) and "IndexError" in end.message
        r, events = request(model, PROMPTS[0], 6)
        scheduler.submit(r)
        text, _, end = collect(events)
        assert isinstance(end, DoneEvent) and text == want  # served as before, from a sequence that kept nothing
    finally:
        scheduler.close()


def test_a_fault_after_a_request_ended_leaves_its_end_and_the_others_alone(model, monkeypatch):
    """A failure in a step's sampling part after its request had ended (here: in releasing its slot) ends nothing
    more: that request's end stands, with no error after it, and the request beside it runs on."""
    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=2).start()
    real_release, faults = Scheduler._release, [1]

    def release(self, slot, reason):
        real_release(self, slot, reason)
        if reason == "length" and faults[0]:
            faults[0] -= 1
            raise RuntimeError("a bug after the end")

    monkeypatch.setattr(Scheduler, "_release", release)
    try:
        short, short_events = request(model, PROMPTS[0], 3)
        long, long_events = request(model, PROMPTS[1], 12)
        scheduler.submit(short)
        scheduler.submit(long)
        _, tokens, end = collect(short_events)
        assert isinstance(end, DoneEvent) and len(tokens) == 3
        time.sleep(0.2)
        assert short_events.empty()  # nothing after its end
        _, tokens, end = collect(long_events)
        assert isinstance(end, DoneEvent) and len(tokens) == 12
    finally:
        scheduler.close()
