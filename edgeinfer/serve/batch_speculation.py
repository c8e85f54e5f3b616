"""Speculative decoding inside the scheduler's batch: how many guesses each request checks in a step, and the
draft model's sequence per slot.

Alone, a request's best draft length trades its own tokens per pass against the pass's cost
(edgeinfer.speculative.DraftLength). In a batch, every row a request adds slows the step for every request in it,
so the guesses are planned for the whole step (`plan_guesses`): the next guess of the request most likely to keep
it, per second it costs, goes in while it raises the step's expected tokens per second. A step's cost is fitted
over the batch steps seen (`StepCost`: from 2 rows on, the kernels' tiles make it close to a line); a draft
model's guesses also cost its decode steps (`SlotDrafter` measures them).
"""
from __future__ import annotations

import heapq
import time
from typing import Sequence

import numpy as np

from edgeinfer.engine import Engine
from edgeinfer.generation import common_prefix_length


class StepCost:
    """Seconds of a forward pass as base + per_row * rows, fitted by least squares over the passes observed
    (recent ones weigh more: other requests come and go)."""

    DECAY = 0.95  # per observed pass
    PRIOR_SHARE = 0.25  # a row's share of a one-row pass before two row counts were seen (as DraftLength's)

    def __init__(self):
        self._w = self._x = self._y = self._xx = self._xy = 0.0  # decayed sums of 1, rows, s, rows^2, rows*s

    def observe(self, rows: int, seconds: float) -> None:
        d = self.DECAY
        self._w, self._x, self._y = self._w * d + 1.0, self._x * d + rows, self._y * d + seconds
        self._xx, self._xy = self._xx * d + rows * rows, self._xy * d + rows * seconds

    def fitted(self) -> tuple[float, float] | None:
        """(base seconds, seconds per row), or None before any pass was observed."""
        if self._w == 0.0:
            return None
        mean_rows, mean_seconds = self._x / self._w, self._y / self._w
        spread = self._xx / self._w - mean_rows ** 2
        if spread < 0.25:  # (nearly) one row count seen: its cost does not separate base and rows
            per_row = self.PRIOR_SHARE * mean_seconds / (1.0 + self.PRIOR_SHARE * (mean_rows - 1.0))
        else:
            per_row = max((self._xy / self._w - mean_rows * mean_seconds) / spread, 0.0)
        return max(mean_seconds - per_row * mean_rows, 0.0), per_row


def plan_guesses(acceptance: Sequence[float], most: Sequence[int], extra_seconds: Sequence[float],
                 fixed: Sequence[int | None], rows_left: int, cost: tuple[float, float] | None) -> list[int]:
    """Guesses for each decoding request of a step (each has one row already).

    acceptance: each request's chance that a guess is right; most: the guesses it may check (room, max_tokens);
    extra_seconds: what drafting one guess costs it (a draft model's decode step; 0 for prompt lookup);
    fixed: a request's fixed draft length (the explicit modes), None to plan it (auto); rows_left: rows the step
    may still take; cost: StepCost.fitted(), None: no pass measured yet (planned requests do not guess).
    A request's j-th guess yields a token with probability a^j; guesses go in best gain per second first while
    that gain beats the step's expected tokens per second."""
    plan = [0] * len(most)
    for i, k in enumerate(fixed):
        if k is not None:
            plan[i] = min(k, most[i], rows_left)
            rows_left -= plan[i]
    if cost is None:
        return plan
    base, per_row = cost
    rows = len(most) + sum(plan)
    expected = len(most) + sum(sum(acceptance[i] ** j for j in range(1, k + 1)) for i, k in enumerate(plan))
    seconds = base + per_row * rows + sum(k * extra_seconds[i] for i, k in enumerate(plan))
    candidates = []  # (-gain per second of the next guess, request)
    for i, k in enumerate(fixed):
        if k is None and most[i] > 0 and acceptance[i] > 0.0:
            candidates.append((-acceptance[i] / (per_row + extra_seconds[i] + 1e-12), i))
    heapq.heapify(candidates)
    while candidates and rows_left > 0:
        ratio, i = heapq.heappop(candidates)
        gain, dt = acceptance[i] ** (plan[i] + 1), per_row + extra_seconds[i]
        if gain * seconds <= expected * dt:  # not even the best guess left raises the step's tokens per second
            break
        plan[i] += 1
        rows_left -= 1
        expected, seconds = expected + gain, seconds + dt
        if plan[i] < most[i]:
            heapq.heappush(candidates, (ratio * acceptance[i], i))
    return plan


class SlotDrafter:
    """The draft model's greedy continuation of a slot's context, on the draft cache's sequence for that slot:
    each proposal first evaluates what the context gained since the last one (after cutting the sequence back to
    what it shares with the context: the rejected guesses go), then drafts k tokens, one decode step each.
    `seconds_per_guess`: what a guess costs, measured (0 until the first proposal)."""

    cheap = False  # proposing costs decode steps of the draft model: no free guesses on plain passes

    def __init__(self, engine: Engine, seq: int):
        self.engine, self.seq = engine, seq
        self.seconds_per_guess = 0.0
        # each guess's logits, in one row kept for the slot: a fresh vocabulary-sized array per decode step is fresh
        # pages every time under the server's malloc settings (edgeinfer.serve.server.bound_malloc_growth)
        self._row = np.empty((1, engine.cfg.n_vocab), np.float32)

    def propose(self, context: list[int], k: int) -> list[int]:
        cache, seq = self.engine.cache, self.seq
        k = min(k, self.engine.n_ctx - len(context))
        if k <= 0:
            return []
        started = time.perf_counter()
        keep = min(common_prefix_length(cache.tokens(seq), context), len(context) - 1)  # the last: for its logits
        cache.truncate(seq, keep)
        logits = self.engine.prefill(context[keep:], seq=seq)
        guesses = [int(np.argmax(logits))]
        while len(guesses) < k:
            guesses.append(int(np.argmax(self.engine.decode(guesses[-1], seq=seq, out=self._row))))
        per_guess = (time.perf_counter() - started) / k
        self.seconds_per_guess = per_guess if not self.seconds_per_guess else \
            0.8 * self.seconds_per_guess + 0.2 * per_guess
        return guesses
