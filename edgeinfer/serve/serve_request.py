"""A generation request of the server and the events it gives: `ServeRequest` (a `BatchRequest` with a sink for
its events, a grammar, logprobs and speculation settings; its `step` turns a row of logits into a token and its
events, as the scheduler and the in-process API both take them), `TokenEvent`, `DoneEvent`, `ErrorEvent`.
The scheduler (edgeinfer.serve.scheduler) runs requests; the HTTP layer and the in-process API turn their events
into OpenAI's answers (edgeinfer.serve.responses).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from edgeinfer.batch_generation import BatchRequest
from edgeinfer.sampling import token_ids
from edgeinfer.speculative import DraftLength
from kernels_cpu.logits import log_normalizer, top_k_order

FINISH_REASONS = {"eog": "stop", "stop": "stop", "length": "length", "context": "length"}  # ours -> OpenAI's


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
    speculative: str | None = None  # "auto", "ngram", "draft" or "off" (edgeinfer.speculative); None: the server's
    cancelled: bool = False
    # kept by the scheduler
    prefilled: int = 0  # prompt tokens the sequence holds
    cached_tokens: int = 0
    next_token: int | None = None  # sampled, to evaluate in the next step
    submitted_at: float = 0.0
    last_token_at: float = 0.0
    drafter: Any = None  # NgramDrafter or SlotDrafter while it speculates, else None
    draft_length: DraftLength | None = None
    free_guess: int | None = None  # the lookup's first guess on a plain step: was it right? (a free estimate)
    last_guess_right: bool = True  # whether the last guess scored was right (a request that guesses well scores
                                   # its free guess every step; the others in turn: Scheduler._step)
    eog_free_row: np.ndarray | None = None  # with ignore_eos: where logits are copied without the EOG tokens

    def cancel(self) -> None:
        """Stop this request (the client went away): it leaves the batch at the next step. Thread-safe."""
        self.cancelled = True

    def step(self, logits: np.ndarray, eog: frozenset[int], eog_ids: np.ndarray, room: int,
             chosen: int | None = None, writable: bool = False,
             best: int | None = None) -> tuple[int | None, list[TokenEvent | DoneEvent]]:
        """One token from the logits after the history, as the scheduler and the in-process API both take it:
        sampled from the logits masked by the grammar (and the end-of-generation tokens with ignore_eos), or
        `chosen` (a token accept_draft picked from them); the stop rules of BatchRequest.sample_next; the output
        ended once the grammar is complete; log-probabilities of the raw logits when asked for. room: positions
        left in the sequence. Returns (the token, None for an end-of-generation one; the events: a TokenEvent for
        a token, then a DoneEvent if the request ended). writable: the logits are the caller's scratch (the
        scheduler's step buffer), so ignore_eos may mask them in place where nothing reads them raw. best: the raw
        logits' argmax, every one of them finite (the scheduler has it for every row: kernels_cpu.logits)."""
        if chosen is None:
            # masking the grammar's tokens may move the argmax; masking the end-of-generation ones only if it is one
            if best is not None and (self.constraint is not None or (self.ignore_eos and best in eog)):
                best = None
            masked = logits if self.constraint is None else self.constraint.mask(logits)
            if self.ignore_eos:  # the grammar's mask is a copy already; the raw row only where logprobs read it
                masked = self.eog_ruled_out(masked, eog_ids,
                                            masked is not logits or (writable and self.top_logprobs is None))
            token, text = self.sample_next(masked, eog, room, best)
        else:
            token, text = self.take(chosen, eog, room)
        events: list[TokenEvent | DoneEvent] = []
        if token is not None:
            if self.constraint is not None:
                self.constraint.accept(token)
                if self.constraint.complete and not self.done:  # only an end-of-generation token could follow
                    text += self.end("eog")
            event = TokenEvent(token, text)
            if self.top_logprobs is not None:  # of the raw logits at the token's position, guessed or sampled
                event.logprob, event.top_logprobs = token_logprobs(logits, token, self.top_logprobs)
            events.append(event)
            text = ""
        if self.done:
            events.append(DoneEvent(FINISH_REASONS[self.stats.stop_reason], text, len(self.prompt),
                                    self.stats.generated_tokens, self.cached_tokens))
        return token, events

    def eog_ruled_out(self, logits: np.ndarray, eog_ids: np.ndarray, scratch: bool) -> np.ndarray:
        """logits (a row or several) with the end-of-generation tokens ruled out (ignore_eos): in place where they
        are `scratch` (the caller's to overwrite: nothing reads them raw afterwards), else in a copy kept for the
        request. A fresh vocabulary-sized copy each time was fresh pages under the server's malloc settings (13 MB
        for a verify pass of 12 guesses of Gemma 3's 262k tokens), and a copy of a 262k-token row a quarter of a
        step's Python time."""
        if scratch:
            logits[..., eog_ids] = -np.inf
            return logits
        if self.eog_free_row is None or self.eog_free_row.shape != logits.shape:
            self.eog_free_row = np.empty_like(logits)
        return without_eog(logits, eog_ids, self.eog_free_row)


def without_eog(logits: np.ndarray, eog_ids: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """A copy of logits (one row or several; into `out` if given) with the end-of-generation tokens ruled out
    (ignore_eos)."""
    out = np.empty_like(logits) if out is None else out
    np.copyto(out, logits)
    out[..., eog_ids] = -np.inf
    return out


def token_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the model's distribution (log-softmax of the raw logits, as OpenAI's
    logprobs) and the `top` most likely tokens with theirs, best first (ties: lower id first); in compiled passes
    (kernels_cpu.logits: log_normalizer, top_k_order)."""
    row = np.ascontiguousarray(logits, dtype=np.float32)
    log_z = log_normalizer(row)
    best = []
    if top > 0:
        best = [(int(i), float(np.float64(row[i]) - log_z)) for i in top_k_order(row, token_ids(len(row)), top)]
    return float(np.float64(row[token]) - log_z), best
