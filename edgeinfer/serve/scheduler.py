"""Continuous batching for the server: one thread owns the engine and runs one forward pass per step over every
request holding a slot.

A slot is one sequence of the engine's KV cache (sequence 0 stays the single-stream API's). Each step evaluates
the token each decoding request sampled last (one row each) and, in the rows left, chunks of the prompts of
requests still prefilling (at most `chunk` prompt tokens while others decode, so their streams keep flowing; a
whole `n_batch` when nothing decodes). Requests join between steps and leave as soon as they end or are
cancelled; the slot they leave keeps its tokens, so a later prompt that shares a prefix with any slot (a system
prompt, the earlier turns of a chat) evaluates only the rest: from its own slot, or copied from another
(`KVCache.copy_prefix`). Waiting requests are bounded (`QueueFull`, which the HTTP layer turns into 429).

Each request's sampling and stop rules are `edgeinfer.batch_generation.BatchRequest.sample_next`, the step of
`Model.generate_batch`, and a row's logits do not depend on the batch it is in: greedy answers equal
`Model.generate` alone. Output goes to each request's `sink` (called on this thread; the HTTP layer hands it to
its event loop): `TokenEvent`s, then one `DoneEvent` or `ErrorEvent`.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeinfer.batch_generation import BatchRequest
from edgeinfer.engine import Engine
from edgeinfer.errors import EdgeInferError, InvalidArgument
from edgeinfer.generation import common_prefix_length, non_finite_logits
from edgeinfer.serve.metrics import ServeMetrics
from edgeinfer.tokenizer import Tokenizer

log = logging.getLogger("edgeinfer.serve")

DEFAULT_CHUNK = 128  # prompt tokens per step while other requests decode: one step stays under ~0.2 s on 2 cores
FINISH_REASONS = {"eog": "stop", "stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's


class QueueFull(EdgeInferError):
    """Every slot is busy and the waiting queue is full; retry later."""


@dataclass
class TokenEvent:
    """One generated token: its id, the text it released (may be empty: held back for a stop string or a partial
    UTF-8 character) and, when asked for, its log-probability and the top alternatives [(id, logprob)]."""

    token: int
    text: str
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


@dataclass
class DoneEvent:
    """The request ended: OpenAI's finish_reason, the text the stream still held, and token counts."""

    finish_reason: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass
class ErrorEvent:
    """The request failed (NaN logits, the server shutting down); message says why."""

    message: str


Event = TokenEvent | DoneEvent | ErrorEvent


@dataclass(eq=False)
class ServeRequest(BatchRequest):
    """A generation request for the scheduler; sink(event) receives its events (on the scheduler thread).
    top_logprobs: None for no log-probabilities, else how many alternatives to report with each token."""

    sink: Callable[[Event], None] = print
    top_logprobs: int | None = None
    constraint: Any = None  # edgeinfer.serve.structured.Constraint: a grammar the output must follow
    ignore_eos: bool = False  # llama-server's: never end at an end-of-generation token (benchmarks)
    cancelled: bool = False
    # kept by the scheduler
    prefilled: int = 0  # prompt tokens the sequence holds
    cached_tokens: int = 0
    next_token: int | None = None  # sampled, to evaluate in the next step
    submitted_at: float = 0.0
    last_token_at: float = 0.0

    def cancel(self) -> None:
        """Stop this request (the client went away): it leaves the batch at the next step. Thread-safe."""
        self.cancelled = True


@dataclass
class Slot:
    seq: int
    request: ServeRequest | None = None
    last_used: float = 0.0


class Scheduler:
    """Runs requests on `n_slots` sequences of an engine's cache (default: all but sequence 0, the single-stream
    API's) from its own thread; `close` gives them back."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, name: str = "model", n_slots: int | None = None,
                 max_queue: int = 64, chunk: int = DEFAULT_CHUNK, metrics: ServeMetrics | None = None):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        cache = engine.cache
        n_slots = cache.n_seq - 1 if n_slots is None else int(n_slots)
        if n_slots < 1:
            raise EdgeInferError("the scheduler needs at least one sequence besides sequence 0 (n_seq >= 2)")
        self.slots = [Slot(cache.allocate()) for _ in range(n_slots)]
        self.max_queue, self.chunk = int(max_queue), max(1, int(chunk))
        self.metrics = metrics or ServeMetrics()
        self.eog = frozenset(tokenizer.eog_ids)
        self._eog_ids = np.array(sorted(self.eog), dtype=np.int64)
        self._waiting: deque[ServeRequest] = deque()
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="edgeinfer-scheduler", daemon=True)

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    @property
    def n_ctx(self) -> int:
        """Positions of each slot (a prompt plus its completion must fit)."""
        return self.engine.n_ctx

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def submit(self, request: ServeRequest) -> None:
        """Queue a request; QueueFull when the queue is full, InvalidArgument if its prompt cannot fit a slot."""
        if not 1 <= len(request.prompt) <= self.n_ctx:
            raise InvalidArgument(f"the prompt has {len(request.prompt)} tokens: a slot holds 1 to {self.n_ctx}")
        with self._wake:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"all {self.n_slots} slots are busy and {len(self._waiting)} requests are waiting")
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self.metrics.queue_depth.set(len(self._waiting))
            self._wake.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (after the step under way); requests still waiting or running get an ErrorEvent."""
        with self._wake:
            if self._stopping:
                return
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
        else:  # never started
            self._fail_all("the server is shutting down")
        if not self._thread.is_alive():
            for slot in self.slots:
                self.engine.cache.free(slot.seq)

    # -- the loop -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopping and not self._waiting and not self._running():
                        self._wake.wait()
                    if self._stopping:
                        break
                self._admit()
                if self._running():
                    self._step()
        finally:
            self._fail_all("the server is shutting down")

    def _running(self) -> list[ServeRequest]:
        return [s.request for s in self.slots if s.request is not None]

    def _admit(self) -> None:
        """Drop cancelled requests; give idle slots to waiting requests, oldest first."""
        for slot in self.slots:
            if slot.request is not None and slot.request.cancelled:
                self._release(slot, "cancelled")
        with self._wake:
            for r in [r for r in self._waiting if r.cancelled]:
                self._waiting.remove(r)
                self.metrics.finished.labels("cancelled").inc()
            while self._waiting and any(s.request is None for s in self.slots):
                self._place(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
        self.metrics.running.set(len(self._running()))

    def _place(self, r: ServeRequest) -> None:
        """Put r in an idle slot, reusing the longest cached prefix of its prompt found in any slot."""
        cache = self.engine.cache
        lengths = {s.seq: common_prefix_length(cache.tokens(s.seq), r.prompt) for s in self.slots}
        source = max(self.slots, key=lambda s: (lengths[s.seq], s.request is None))
        idle = [s for s in self.slots if s.request is None]
        reuse = source.request is None and lengths[source.seq] > 0
        target = source if reuse else min(idle, key=lambda s: s.last_used)  # else the least recently used
        keep = min(lengths[source.seq], len(r.prompt) - 1)  # the last prompt token is evaluated for its logits
        if keep > lengths[target.seq]:  # a running request's (or another slot's) prefix is longer
            cache.copy_prefix(source.seq, target.seq, keep)
        cache.truncate(target.seq, keep)
        r.seq, r.prefilled, r.cached_tokens = target.seq, keep, keep
        r.stats.prompt_tokens, r.stats.prompt_tokens_evaluated = len(r.prompt), len(r.prompt) - keep
        r.begin(self.tokenizer)
        target.request = r
        self.metrics.prompt_tokens.inc(len(r.prompt))
        self.metrics.cached_tokens.inc(keep)
        if r.max_tokens <= 0:  # nothing to generate: done without evaluating anything
            r.stats.stop_reason, r.stream = "length", None
            r.sink(DoneEvent("length", "", len(r.prompt), 0, keep))
            self._release(target, "length")

    def _step(self) -> None:
        """One forward pass: the decode rows, then prompt chunks in the rows left; then sample and emit."""
        cache = self.engine.cache
        tokens, seqs, positions, logit_rows, owners = [], [], [], [], []
        decoding = [s for s in self.slots if s.request is not None and s.request.next_token is not None]
        for slot in decoding:
            tokens.append(slot.request.next_token)
            seqs.append(slot.seq)
            positions.append(cache.length(slot.seq))
            logit_rows.append(len(tokens) - 1)
            owners.append(slot)
        budget = self.engine.max_rows - len(tokens)
        if decoding:
            budget = min(budget, self.chunk)
        chunks = []
        for slot in self.slots:
            r = slot.request
            if r is None or r.next_token is not None or budget <= 0:
                continue
            n = min(budget, len(r.prompt) - r.prefilled)
            start = cache.length(slot.seq)
            tokens += r.prompt[r.prefilled:r.prefilled + n]
            seqs += [slot.seq] * n
            positions += range(start, start + n)
            budget -= n
            chunks.append((slot, r.prefilled, n))
            if r.prefilled + n == len(r.prompt):  # its last prompt token: its logits give the first token
                logit_rows.append(len(tokens) - 1)
                owners.append(slot)
        self.metrics.step_rows.observe(len(tokens))
        try:
            logits = self.engine.forward(tokens, seqs, positions, logit_rows)
        except Exception as e:  # a bug or a broken engine: fail this batch, keep serving the others
            log.exception("forward pass failed")
            for slot in {id(s): s for s in [*decoding, *(c[0] for c in chunks)]}.values():
                cache.truncate(slot.seq, 0)  # what it stored is unknown
                self._fail(slot, f"internal error in the forward pass: {type(e).__name__}")
            return
        for slot in decoding:
            cache.record(slot.seq, [slot.request.next_token])
        for slot, first, n in chunks:
            cache.record(slot.seq, slot.request.prompt[first:first + n])
            slot.request.prefilled += n
        now = time.perf_counter()
        for slot, row in zip(owners, logits):
            r = slot.request
            if r.cancelled:
                self._release(slot, "cancelled")
            elif not np.isfinite(row).all():
                error = non_finite_logits(self.name, cache.length(slot.seq) - 1)
                cache.truncate(slot.seq, 0)  # its keys and values may be NaN too: never reuse them
                self._fail(slot, str(error))
            else:
                try:
                    self._emit(slot, row, now)
                except Exception as e:  # a sampler or grammar failure ends this request only
                    log.exception("sampling failed")
                    self._fail(slot, f"sampling failed: {e}")
        slot_tokens = sum(cache.length(s.seq) for s in self.slots)
        self.metrics.kv_usage.set(slot_tokens / (self.n_slots * self.n_ctx))

    def _emit(self, slot: Slot, logits: np.ndarray, now: float) -> None:
        """Sample the request's next token from logits and send it (and the end, if it ended)."""
        r = slot.request
        masked = logits if r.constraint is None else r.constraint.mask(logits)
        if r.ignore_eos:
            masked = masked.copy()
            masked[self._eog_ids] = -np.inf
        token, text = r.sample_next(masked, self.eog, self.engine.cache.room(slot.seq))
        if token is not None and r.constraint is not None:
            r.constraint.accept(token)
            if r.constraint.complete and not r.done:  # only an end-of-generation token could follow
                text += r.end("eog")
        if token is not None:
            if r.next_token is None and r.stats.generated_tokens == 1:
                r.stats.time_to_first_token = now - r.submitted_at
                self.metrics.ttft.observe(r.stats.time_to_first_token)
            else:
                self.metrics.inter_token.observe(now - r.last_token_at)
            r.last_token_at = now
            self.metrics.generated_tokens.inc()
            event = TokenEvent(token, text)
            if r.top_logprobs is not None:
                event.logprob, event.top_logprobs = token_logprobs(logits, token, r.top_logprobs)
            r.sink(event)
            text = ""
        r.next_token = None if r.done else token
        if r.done:
            r.sink(DoneEvent(FINISH_REASONS[r.stats.stop_reason], text, len(r.prompt), r.stats.generated_tokens,
                             r.cached_tokens))
            self._release(slot, FINISH_REASONS[r.stats.stop_reason])

    def _release(self, slot: Slot, reason: str) -> None:
        """The slot is free for the next request; its tokens stay for prefix reuse."""
        slot.request, slot.last_used = None, time.perf_counter()
        self.metrics.finished.labels(reason).inc()
        self.metrics.running.set(len(self._running()))

    def _fail(self, slot: Slot, message: str) -> None:
        slot.request.sink(ErrorEvent(message))
        self._release(slot, "error")

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            if slot.request is not None:
                self._fail(slot, message)
        with self._wake:
            while self._waiting:
                self._waiting.popleft().sink(ErrorEvent(message))
            self.metrics.queue_depth.set(0)


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the model's distribution (log-softmax of the raw logits, as OpenAI's
    logprobs) and the `top` most likely tokens with theirs, best first."""
    x = logits.astype(np.float64)
    m = x.max()
    log_z = m + np.log(np.exp(x - m).sum())
    best = []
    if top > 0:
        ids = np.argpartition(-x, top - 1)[:top]
        ids = ids[np.lexsort((ids, -x[ids]))]
        best = [(int(i), float(x[i] - log_z)) for i in ids]
    return float(x[token] - log_z), best
