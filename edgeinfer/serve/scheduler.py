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
its event loop): `TokenEvent`s, then one `DoneEvent` or `ErrorEvent` (a request and its events:
edgeinfer.serve.serve_request).

Speculative decoding (edgeinfer.speculative), per request: a decoding request that speculates puts its guesses
(prompt lookup over its own history, or the draft model's continuation) in rows after its last sampled token, at
the next positions of its own sequence, in the same forward pass as everyone else's rows; `accept_draft` keeps
the guesses the model agrees with (exactly: greedy answers are unchanged, sampled ones follow the same
distribution), the sequence is cut back past the rejected rows, and each kept token goes through the request's
stop rules and sink like a plainly sampled one. Each request has its own `DraftLength` (auto tunes it from that
request's acceptance); in auto, the guesses are planned for the whole step, since each row slows every request
in it (edgeinfer.serve.batch_speculation). The draft model, if any, has its own cache with one sequence per slot.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgeinfer.engine import Engine
from edgeinfer.errors import EdgeInferError, InvalidArgument
from edgeinfer.generation import common_prefix_length, non_finite_logits
from edgeinfer.serve.batch_speculation import SlotDrafter, StepCost, plan_guesses
from edgeinfer.serve.metrics import ServeMetrics
from edgeinfer.serve.serve_request import FINISH_REASONS, DoneEvent, ErrorEvent, Event, ServeRequest
from edgeinfer.prompt_lookup import word_classes
from edgeinfer.speculative import (DraftModelDrafter, LookupThenModel, SpeculationStats, accept_draft,
                                   check_speculation, draft_or_free_guess, drafting_for)
from edgeinfer.tokenizer import Tokenizer
from kernels_cpu.logits import row_summaries

log = logging.getLogger("edgeinfer.serve")

DEFAULT_CHUNK = 128  # prompt tokens per step while other requests decode: one step stays under ~0.2 s on 2 cores


class QueueFull(EdgeInferError):
    """Every slot is busy and the waiting queue is full; retry later."""


@dataclass
class Slot:
    seq: int
    request: ServeRequest | None = None
    last_used: float = 0.0


class Scheduler:
    """Runs requests on `n_slots` sequences of an engine's cache (default: all but sequence 0, the single-stream
    API's) from its own thread; `close` gives them back."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, *, name: str = "model", n_slots: int | None = None,
                 max_queue: int = 64, chunk: int = DEFAULT_CHUNK, metrics: ServeMetrics | None = None,
                 speculative: str = "off", draft_engine: Engine | None = None):
        """speculative: each request's speculation mode unless it names its own (ServeRequest.speculative);
        draft_engine: the draft model's engine (same vocabulary, checked by the caller) with a cache of at least
        as many sequences as this one's, of at least its positions."""
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.speculative = check_speculation(speculative, draft_engine is not None)
        self.draft_engine = draft_engine
        if self.speculative in ("ngram", "auto"):
            word_classes(tokenizer)  # prompt lookup's, made now: on the first request they would hold every stream
                                     # up (0.12 s at 151k tokens)
        cache = engine.cache
        n_slots = cache.n_seq - 1 if n_slots is None else int(n_slots)
        if n_slots < 1:
            raise EdgeInferError("the scheduler needs at least one sequence besides sequence 0 (n_seq >= 2)")
        if draft_engine is not None and (draft_engine.cache.n_seq < cache.n_seq or draft_engine.n_ctx < engine.n_ctx):
            raise EdgeInferError(f"the draft model's cache has {draft_engine.cache.n_seq} sequences of "
                                 f"{draft_engine.n_ctx} positions; the scheduler needs {cache.n_seq} of {engine.n_ctx}")
        self.slots = [Slot(cache.allocate()) for _ in range(n_slots)]
        # the draft cache's sequence of each slot: the same number, so a slot's draft follows its own tokens
        self._draft_seqs = [draft_engine.cache.allocate() for _ in self.slots] if draft_engine is not None else []
        self.speculation = SpeculationStats()  # every request's guesses since the start
        self.step_cost = StepCost()
        self._steps = 0  # forward passes made (whose turn it is to score a free guess: _step)
        self.max_queue, self.chunk = int(max_queue), max(1, int(chunk))
        self.metrics = metrics or ServeMetrics()
        self.eog = frozenset(tokenizer.eog_ids)
        self._eog_ids = np.array(sorted(self.eog), dtype=np.int64)
        self._logits = np.empty((0, engine.cfg.n_vocab), np.float32)  # the forward's logits, reused step after step
        self._row_best, self._row_finite = np.empty(0, np.int64), np.empty(0, np.bool_)  # per row: argmax, finite
        # a step's token events, handed to their sinks all at once when the step's Python is done (_deliver)
        self._outbox: list[tuple[Callable[[Event], None], Event]] = []
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
        if request.speculative is not None:
            check_speculation(request.speculative, self.draft_engine is not None)
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
            for seq in self._draft_seqs:
                self.draft_engine.cache.free(seq)

    # -- the loop -----------------------------------------------------------------------------------------------
    def _run(self) -> None:
        # this thread makes the engine's forwards (the draft model's too): where the runner can, they run on it,
        # with no hand-off to another thread at each step (edgeinfer.backends: hosting)
        hosting = getattr(self.engine.runner, "hosting", None)
        with hosting() if hosting is not None else contextlib.nullcontext():
            self._loop()

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    if not self._stopping and not self._waiting and not self._running():
                        self._deliver()  # the last step's events: nothing else will send them
                    while not self._stopping and not self._waiting and not self._running():
                        self._wake.wait()
                    if self._stopping:
                        break
                try:
                    self._admit()
                    if self._running():
                        self._step()
                except Exception as e:  # a fault outside the parts that end one request (sampling) or one batch
                    # (the forward): end what was in flight, never the thread (later requests would wait forever)
                    log.exception("scheduler step failed")
                    self._fail_running(f"internal error in the scheduler: {type(e).__name__}")
        finally:
            self._fail_all("the server is shutting down")
            self._deliver()

    def _deliver(self) -> None:
        """Hand the events queued since the last delivery to their sinks, in order. Called when the scheduler is
        about to let go of the GIL (the forward pass, or a wait): the HTTP layer's event loop, which a sink wakes,
        then finds it free, where at the step's first event it would have passed the GIL back and forth with the
        scheduler's Python for the rest of the step."""
        outbox, self._outbox = self._outbox, []
        for sink, event in outbox:
            sink(event)

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
                r = self._waiting.popleft()
                try:
                    self._place(r)
                except Exception as e:  # the request must hear of it: it has left the queue
                    log.exception("placing a request failed")
                    for slot in self.slots:
                        if slot.request is r:
                            slot.request = None
                        if slot.request is None:  # a prefix copy may have stopped half-way: cache nothing
                            self.engine.cache.truncate(slot.seq, 0)
                    r.sink(ErrorEvent(f"internal error in the scheduler: {type(e).__name__}"))
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
        self._start_drafting(r, self.slots.index(target))
        target.request = r
        self.metrics.prompt_tokens.inc(len(r.prompt))
        self.metrics.cached_tokens.inc(keep)
        if r.max_tokens <= 0:  # nothing to generate: done without evaluating anything
            r.stats.stop_reason, r.stream = "length", None
            r.sink(DoneEvent("length", "", len(r.prompt), 0, keep))
            self._release(target, "length")

    def _start_drafting(self, r: ServeRequest, slot_index: int) -> None:
        """Give r its drafter and draft length for its speculation mode (none when off)."""
        mode = r.speculative if r.speculative is not None else self.speculative
        if r.constraint is not None:
            mode = "off"  # the grammar would have to follow each guess and be rolled back with the rejected ones
        drafter, r.draft_length = drafting_for(mode, self.draft_engine, self.tokenizer)
        if isinstance(drafter, DraftModelDrafter):  # that one drafts on the draft model's sequence 0: use the slot's
            drafter = SlotDrafter(self.draft_engine, self._draft_seqs[slot_index])
        elif isinstance(drafter, LookupThenModel):
            drafter.model = SlotDrafter(self.draft_engine, self._draft_seqs[slot_index])
        r.drafter, r.free_guess = drafter, None

    def _plan(self, decoding: list[Slot]) -> list[int]:
        """How many guesses each decoding request checks in this step: alone, its DraftLength's choice (which knows
        the cost of each pass size it used); among others, batch_speculation.plan_guesses."""
        requests = [s.request for s in decoding]
        if len(requests) == 1 and requests[0].drafter is not None:
            r = requests[0]
            return [min(r.draft_length.choose(), self.engine.cache.room(r.seq) - 1,
                        r.max_tokens - r.stats.generated_tokens - 1, self.engine.max_rows - 1)]
        most = [0 if r.drafter is None else
                min(r.draft_length.max_draft, self.engine.cache.room(r.seq) - 1,  # the last guess needs a position
                    r.max_tokens - r.stats.generated_tokens - 1)  # more would be thrown away
                for r in requests]
        return plan_guesses([r.draft_length.acceptance if r.drafter else 0.0 for r in requests], most,
                            [getattr(r.drafter, "seconds_per_guess", 0.0) for r in requests],
                            [r.draft_length.fixed if r.drafter else 0 for r in requests],
                            self.engine.max_rows - len(decoding), self.step_cost.fitted())

    def _draft(self, r: ServeRequest, k: int, scored: bool) -> list[int]:
        """The guesses r checks in this step (k asked for; fewer where the lookup finds less); on a plain step of
        prompt lookup where `scored`, notes its free first guess instead."""
        if r.drafter is None or (k == 0 and not scored):
            r.free_guess = None
            return []
        draft, r.free_guess = draft_or_free_guess(r.drafter, r.history, k)
        if k == 0 and r.free_guess is None:
            r.last_guess_right = False  # the lookup found nothing to follow
        return draft

    def _step(self) -> None:
        """One forward pass: the decode rows (each with its guesses), then prompt chunks in the rows left; then
        sample (or accept guesses) and emit."""
        cache = self.engine.cache
        tokens, seqs, positions, logit_rows, owners = [], [], [], [], []  # owners: (slot, its guesses or None)
        decoding = [s for s in self.slots if s.request is not None and s.request.next_token is not None]
        self._steps += 1
        for i, (slot, k) in enumerate(zip(decoding, self._plan(decoding))):
            r = slot.request
            # On a plain step a request scores prompt lookup's free first guess where its last one was right, else
            # in turn, one such request a step (alone: every step). A lookup in each of 8 requests every step took
            # 110 us of SmolLM2's 4 ms 8-row step (15-30 us each in an interpreter the forward left cold), mostly
            # for requests writing free text, whose guesses are seldom right (or missing) and whose acceptance needs
            # no more than an estimate; in turn, 8 greedy paragraphs made 270 lookups in 128 steps, not 983.
            draft = self._draft(r, k, scored=r.last_guess_right or (self._steps + i) % len(decoding) == 0)
            n, start = 1 + len(draft), cache.length(slot.seq)
            tokens += [r.next_token, *draft]
            seqs += [slot.seq] * n
            positions += range(start, start + n)
            logit_rows += range(len(tokens) - n, len(tokens))
            owners.append((slot, draft))
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
                owners.append((slot, None))
        self.metrics.step_rows.observe(len(tokens))
        self._deliver()
        started = time.perf_counter()
        try:
            if self._logits.shape[0] < len(logit_rows):  # grown as needed, then reused: no page faults per step
                self._logits = np.empty((len(logit_rows), self._logits.shape[1]), np.float32)
                self._row_best, self._row_finite = np.empty(len(logit_rows), np.int64), np.empty(len(logit_rows), bool)
            logits = self.engine.forward(tokens, seqs, positions, logit_rows, out=self._logits[:len(logit_rows)])
        except Exception as e:  # a bug or a broken engine: fail this batch, keep serving the others
            log.exception("forward pass failed")
            for slot in {id(s): s for s in [*decoding, *(c[0] for c in chunks)]}.values():
                cache.truncate(slot.seq, 0)  # what it stored is unknown
                self._fail(slot, f"internal error in the forward pass: {type(e).__name__}")
            return
        seconds = time.perf_counter() - started
        if not chunks and len(decoding) > 1:  # (a step with prompt chunks is no decode step: it would mislead)
            self.step_cost.observe(len(tokens), seconds)
        elif not chunks and decoding and decoding[0].request.drafter is not None:
            decoding[0].request.draft_length.observe_pass(len(tokens), seconds)
        for slot, draft in owners[:len(decoding)]:
            cache.record(slot.seq, [slot.request.next_token, *draft])
        for slot, first, n in chunks:
            cache.record(slot.seq, slot.request.prompt[first:first + n])
            slot.request.prefilled += n
        now = time.perf_counter()
        best, finite = self._row_best[:len(logits)], self._row_finite[:len(logits)]
        row_summaries(logits, best, finite)
        row = 0
        for slot, draft in owners:
            first, r, rows = row, slot.request, logits[row:row + 1 + len(draft or ())]
            row += len(rows)
            if r.cancelled:
                self._release(slot, "cancelled")
            elif not finite[first:row].all():
                error = non_finite_logits(self.name, cache.length(slot.seq) - len(rows))
                cache.truncate(slot.seq, 0)  # its keys and values may be NaN too: never reuse them
                self._fail(slot, str(error))
            else:
                try:
                    if draft:
                        self._accept(slot, rows, draft, now)
                    else:
                        token = self._emit(slot, rows[0], now, best=int(best[first]))
                        if r.free_guess is not None:
                            r.last_guess_right = token == r.free_guess
                            r.draft_length.observe_guesses(1, int(r.last_guess_right))
                except Exception as e:  # a sampler or grammar failure ends this request only
                    log.exception("sampling failed")
                    if slot.request is r:  # (not if it had ended already: its end is on its way)
                        self._fail(slot, f"sampling failed: {e}")
        slot_tokens = sum(cache.length(s.seq) for s in self.slots)
        self.metrics.kv_usage.set(slot_tokens / (self.n_slots * self.n_ctx))

    def _accept(self, slot: Slot, rows: np.ndarray, draft: list[int], now: float) -> None:
        """A verify pass's result: the guesses the model agrees with and its own token after them, each emitted;
        the sequence cut back past the rejected guesses."""
        r, cache = slot.request, self.engine.cache
        # the rows are the step buffer's: read raw afterwards only where logprobs are asked for
        masked = r.eog_ruled_out(rows, self._eog_ids, r.top_logprobs is None) if r.ignore_eos else rows
        ready = accept_draft(r.sampler, masked, r.history, draft)
        right = len(ready) - 1
        cache.truncate(slot.seq, cache.length(slot.seq) - len(draft) + right)  # keeps the accepted guesses
        r.draft_length.observe_guesses(min(right + 1, len(draft)), right)
        r.last_guess_right = right > 0
        for stats in (r.stats.speculation, self.speculation):
            stats.drafted, stats.accepted, stats.verify_steps = (stats.drafted + len(draft), stats.accepted + right,
                                                                 stats.verify_steps + 1)
        self.metrics.observe_speculation(len(draft), right, self.speculation)
        for i, token in enumerate(ready):
            # token i goes at the position after the cached ones less the accepted guesses still to come after it
            self._emit(slot, rows[i], now, chosen=token, room=cache.room(slot.seq) + right - i)
            if r.done:
                break

    def _emit(self, slot: Slot, logits: np.ndarray, now: float, chosen: int | None = None,
              room: int | None = None, best: int | None = None) -> int | None:
        """Sample the request's next token from logits (or take `chosen`, a token accept_draft picked from them)
        and send it (and the end, if it ended); the token, None for an end-of-generation one. best: the logits'
        argmax (all finite)."""
        r = slot.request
        room = self.engine.cache.room(slot.seq) if room is None else room
        token, events = r.step(logits, self.eog, self._eog_ids, room, chosen, writable=True, best=best)
        if token is not None:
            if r.next_token is None and r.stats.generated_tokens == 1:
                r.stats.time_to_first_token = now - r.submitted_at
                self.metrics.ttft.observe(r.stats.time_to_first_token)
            else:
                self.metrics.inter_token.observe(now - r.last_token_at)
            r.last_token_at = now
            self.metrics.generated_tokens.inc()
        r.next_token = None if r.done else token
        self._outbox += [(r.sink, event) for event in events]
        if r.done:
            self._release(slot, FINISH_REASONS[r.stats.stop_reason])
        return token

    def _release(self, slot: Slot, reason: str) -> None:
        """The slot is free for the next request; its tokens stay for prefix reuse."""
        slot.request, slot.last_used = None, time.perf_counter()
        self.metrics.finished.labels(reason).inc()
        self.metrics.running.set(len(self._running()))

    def _fail(self, slot: Slot, message: str) -> None:
        self._deliver()  # its tokens before its error
        slot.request.sink(ErrorEvent(message))
        self._release(slot, "error")

    def _fail_running(self, message: str) -> None:
        """End every running request with an error; their sequences keep nothing (what they hold is unknown)."""
        for slot in self.slots:
            if slot.request is not None:
                self.engine.cache.truncate(slot.seq, 0)
                self._fail(slot, message)

    def _fail_all(self, message: str) -> None:
        for slot in self.slots:
            if slot.request is not None:
                self._fail(slot, message)
        with self._wake:
            while self._waiting:
                self._waiting.popleft().sink(ErrorEvent(message))
            self.metrics.queue_depth.set(0)
