"""Batched generation: several prompts decoded together, each in its own sequence of the KV cache.

Decode on a CPU is bound by reading the weights; one forward pass over B sequences reads them once, so B answers
cost little more than one. `BatchGenerator` keeps up to `n_seq` requests running: a new request's prompt is
prefilled into a free sequence, then every step samples one token for each running request and evaluates all of
those tokens in one `Engine.decode_batch`. A request that ends (end-of-generation token, stop string, max_tokens, a
full context) frees its sequence for the next one waiting (continuous batching). Each request has its own sampler
and stop rules, and its tokens are exactly those it would get alone: rows of different sequences never meet in the
forward pass, and a token's logits do not depend on how it was batched. One request's step (sample, stop rules,
text: `BatchRequest.sample_next`) is shared with the server's scheduler (`edgeinfer.serve.scheduler`).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgeinfer.engine import Engine
from edgeinfer.generation import GenerationStats, TextStream, non_finite_logits
from edgeinfer.sampling import Sampler, all_finite
from edgeinfer.tokenizer import Tokenizer


@dataclass
class BatchRequest:
    """One prompt of a batch: its token ids, sampler, limits and stop strings; `text` and `stats` fill in."""

    prompt: list[int]
    sampler: Sampler
    max_tokens: int
    stop: Sequence[str] = ()
    text: str = ""
    stats: GenerationStats = field(default_factory=GenerationStats)
    # while running
    seq: int = -1
    history: list[int] = field(default_factory=list)
    stream: TextStream | None = None
    logits: np.ndarray | None = None

    def begin(self, tokenizer: Tokenizer) -> None:
        """Get ready to generate: the history is the prompt, the text stream empty."""
        self.history = list(self.prompt)
        self.stats.prompt_tokens = len(self.prompt)
        self.stream = TextStream(tokenizer, self.stop)

    @property
    def done(self) -> bool:
        return self.stream is None

    def sample_next(self, logits: np.ndarray, eog: frozenset[int], room: int,
                    best: int | None = None) -> tuple[int | None, str]:
        """One generation step from the logits after the history: sample a token, apply the stop rules.

        room: positions left in the request's sequence; best: the logits' argmax, all of them finite, where the
        caller knows it (Sampler.sample). Returns (the token sampled, None for an end-of-generation token; the text
        it released, also added to `text`). Afterwards either `done` (stats.stop_reason says why) or the token must
        be evaluated next."""
        return self.take(self.sampler.sample(logits, self.history, best), eog, room)

    def take(self, token: int, eog: frozenset[int], room: int) -> tuple[int | None, str]:
        """sample_next for a token chosen already (by the speculative acceptance rule): the same stop rules,
        history and text."""
        if token in eog:
            text = self._finish("eog")
            self.text += text
            return None, text
        self.history.append(token)
        self.stats.generated_tokens += 1
        text = self.stream.push(token)
        if self.stream.stopped:
            text += self._finish("stop")
        elif self.stats.generated_tokens >= self.max_tokens:
            text += self._finish("length")
        elif room == 0:
            text += self._finish("context")
        self.text += text
        return token, text

    def end(self, reason: str) -> str:
        """End the request now (a rule of the caller's: a grammar complete); the text the stream still held, also
        added to `text`."""
        rest = self._finish(reason)
        self.text += rest
        return rest

    def _finish(self, reason: str) -> str:
        """End the request; the text the stream still held."""
        rest = self.stream.finish()
        self.stats.stop_reason, self.stream = reason, None
        return rest


class BatchGenerator:
    """Runs requests over an engine's sequences until all are done (see the module docstring)."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, eog_ids, name: str = "model"):
        self.engine, self.tokenizer, self.name = engine, tokenizer, name
        self.eog = frozenset(eog_ids)

    def run(self, requests: list[BatchRequest]) -> list[BatchRequest]:
        """Generate every request's text (request.text, request.stats); returns the requests."""
        cache = self.engine.cache
        waiting, running = deque(requests), []
        free = [cache.allocate() for _ in range(cache.n_seq - 1)] + [0]
        try:
            while waiting or running:
                while waiting and free:
                    request = waiting.popleft()
                    if self._start(request, free.pop()):
                        running.append(request)
                    else:
                        free.append(request.seq)
                self._step(running)
                for request in [r for r in running if r.done]:
                    running.remove(request)
                    free.append(request.seq)
        finally:
            for seq in range(1, cache.n_seq):
                cache.free(seq)
            cache.free(0)
        return requests

    def _start(self, request: BatchRequest, seq: int) -> bool:
        """Prefill the request's prompt into sequence seq; False if it is already done (max_tokens 0)."""
        request.seq = seq
        request.stats.prompt_tokens = request.stats.prompt_tokens_evaluated = len(request.prompt)
        if request.max_tokens <= 0:
            request.stats.stop_reason = "length"
            return False
        request.begin(self.tokenizer)
        self.engine.cache.truncate(seq, 0)
        request.logits = self._finite(self.engine.prefill(request.prompt, seq=seq), request)
        return True

    def _step(self, running: list[BatchRequest]) -> None:
        """Sample one token for each running request; evaluate those that go on, together."""
        going = []
        for r in running:
            token, _ = r.sample_next(r.logits, self.eog, self.engine.cache.room(r.seq))
            if not r.done:
                going.append((r, token))
        if going:
            logits = self.engine.decode_batch([t for _, t in going], [r.seq for r, _ in going])
            for (r, _), row in zip(going, logits):
                r.logits = self._finite(row, r)

    def _finite(self, logits: np.ndarray, r: BatchRequest) -> np.ndarray:
        if not all_finite(logits):
            raise non_finite_logits(self.name, len(r.history) - 1)
        return logits
