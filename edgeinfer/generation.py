"""Generation: the token loop over an engine, stop rules and streaming text.

`generate_tokens` is the loop (prefill the new part of the prompt, then sample and decode one token at a time);
`TextStream` turns the tokens into text pieces safe to show: whole UTF-8 characters only, and never any part of
a stop string (text that could still become a stop string is held back until it cannot).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

from edgeinfer.engine import Engine
from edgeinfer.sampling import Sampler
from edgeinfer.tokenizer import IncrementalDecoder, Tokenizer


@dataclass
class GenerationStats:
    """Figures of the last generation: token counts and seconds."""

    prompt_tokens: int = 0
    prompt_tokens_evaluated: int = 0  # the part not already in the KV cache
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    time_to_first_token: float = 0.0
    stop_reason: str = ""  # "eog", "stop", "length" or "context"

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens_evaluated / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        # the first generated token comes from the prefill; each later one is a decode step
        steps = max(self.generated_tokens - 1, 0)
        return steps / self.decode_seconds if self.decode_seconds else 0.0


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class CachedEngine:
    """An engine plus the token ids its KV cache holds, so a new prompt re-evaluates only what differs."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.tokens: list[int] = []

    def reset(self) -> None:
        self.engine.reset()
        self.tokens = []

    def evaluate_prompt(self, prompt: Sequence[int]) -> tuple:
        """Logits after the whole prompt, evaluating only the tokens past the longest common prefix with the cache.

        Returns (logits, n_evaluated)."""
        keep = common_prefix_length(self.tokens, prompt)
        if keep == len(prompt):
            keep -= 1  # the last prompt token must be evaluated again to get its logits
        self.engine.truncate(keep)
        del self.tokens[keep:]
        new = list(prompt[keep:])
        logits = self.engine.prefill(new)
        self.tokens.extend(new)
        return logits, len(new)

    def decode(self, token: int):
        logits = self.engine.decode(token)
        self.tokens.append(token)
        return logits


def generate_tokens(cached: CachedEngine, sampler: Sampler, prompt: Sequence[int], max_tokens: int,
                    eog_ids: Iterable[int], stats: GenerationStats) -> Iterator[int]:
    """Yield sampled tokens until an end-of-generation token, max_tokens, or a full context.

    The caller may stop iterating at any time (a stop string); the cache then holds what was evaluated."""
    eog = frozenset(eog_ids)
    engine = cached.engine
    stats.prompt_tokens = len(prompt)
    t0 = time.perf_counter()
    logits, stats.prompt_tokens_evaluated = cached.evaluate_prompt(prompt)
    stats.prefill_seconds = time.perf_counter() - t0
    history = list(prompt)
    decode_start = time.perf_counter()
    for i in range(max_tokens):
        token = sampler.sample(logits, history)
        if i == 0:
            stats.time_to_first_token = time.perf_counter() - t0
        if token in eog:
            stats.stop_reason = "eog"
            return
        history.append(token)
        stats.generated_tokens += 1
        yield token
        if i + 1 == max_tokens:
            break
        if engine.n_past >= engine.n_ctx:
            stats.stop_reason = "context"
            return
        logits = cached.decode(token)
        stats.decode_seconds = time.perf_counter() - decode_start
    stats.stop_reason = "length"


class TextStream:
    """Turns tokens into text pieces, holding back anything that may be the start of a stop string."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in stop if s]
        self.pending = ""  # decoded text not yet shown
        self.stopped = False

    def push(self, token: int) -> str:
        """Text that is now safe to show after `token` ('' if it is held back); sets `stopped` at a stop string."""
        self.pending += self.decoder.add(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation."""
        if not self.stopped:
            self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        cut = min((i for i in (self.pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, self.pending, self.stopped = self.pending[:cut], "", True
            return text
        hold = 0 if final else self._partial_stop_length()
        text = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return text

    def _partial_stop_length(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(s[:n]):
                    best = n
                    break
        return best
