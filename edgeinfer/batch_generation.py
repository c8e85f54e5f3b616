"""Batched generation: several prompts decoded together, each in its own sequence of the KV cache.

Decode on a CPU is bound by reading the weights; one forward pass over B sequences reads them once, so B answers
cost little more than one. `BatchGenerator` keeps up to `n_seq` requests running: a new request's prompt is
prefilled into a free sequence, then every step samples one token for each running request and evaluates all of
those tokens in one `Engine.decode_batch`. A request that ends (end-of-generation token, stop string, max_tokens, a
full context) frees its sequence for the next one waiting (continuous batching). Each request has its own sampler
and stop rules, and its tokens are exactly those it would get alone: rows of different sequences never meet in the
forward pass, and a token's logits do not depend on how it was batched.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from edgeinfer.engine import Engine
from edgeinfer.generation import GenerationStats, TextStream, non_finite_logits
from edgeinfer.sampling import Sampler
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
                for request in [r for r in running if r.stream is None]:
                    running.remove(request)
                    free.append(request.seq)
        finally:
            for seq in range(1, cache.n_seq):
                cache.free(seq)
            cache.free(0)
        return requests

    def _start(self, request: BatchRequest, seq: int) -> bool:
        """Prefill the request's prompt into sequence seq; False if it is already done (max_tokens 0)."""
        request.seq, request.history = seq, list(request.prompt)
        request.stats.prompt_tokens = request.stats.prompt_tokens_evaluated = len(request.prompt)
        if request.max_tokens <= 0:
            request.stats.stop_reason = "length"
            return False
        self.engine.cache.truncate(seq, 0)
        request.logits = self._finite(self.engine.prefill(request.prompt, seq=seq), request)
        request.stream = TextStream(self.tokenizer, request.stop)
        return True

    def _step(self, running: list[BatchRequest]) -> None:
        """Sample one token for each running request; evaluate those that go on, together."""
        going = []
        for r in running:
            token = r.sampler.sample(r.logits, r.history)
            if token in self.eog:
                self._finish(r, "eog")
                continue
            r.history.append(token)
            r.stats.generated_tokens += 1
            r.text += r.stream.push(token)
            if r.stream.stopped:
                self._finish(r, "stop")
            elif r.stats.generated_tokens >= r.max_tokens:
                self._finish(r, "length")
            elif self.engine.cache.room(r.seq) == 0:
                self._finish(r, "context")
            else:
                going.append((r, token))
        if going:
            logits = self.engine.decode_batch([t for _, t in going], [r.seq for r, _ in going])
            for (r, _), row in zip(going, logits):
                r.logits = self._finite(row, r)

    def _finish(self, r: BatchRequest, reason: str) -> None:
        r.text += r.stream.finish()
        r.stats.stop_reason = reason
        r.stream = None

    def _finite(self, logits: np.ndarray, r: BatchRequest) -> np.ndarray:
        if not np.isfinite(logits).all():
            raise non_finite_logits(self.name, len(r.history) - 1)
        return logits
