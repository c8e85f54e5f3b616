"""Generation: the token loop over an engine, stop rules and streaming text.

`generate_tokens` is the loop (prefill the new part of the prompt, then sample and decode one token at a time, or
check several guessed tokens per pass: edgeinfer.speculative);
`TextStream` turns the tokens into text pieces safe to show: whole UTF-8 characters only, and never any part of
a stop string (text that could still become a stop string is held back until it cannot).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np

from edgeinfer.engine import Engine
from edgeinfer.errors import ModelError
from edgeinfer.sampling import Sampler, all_finite
from edgeinfer.speculative import (SpeculationStats, accept_draft, check_speculation, draft_or_free_guess,
                                   drafting_for)
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
    speculation: SpeculationStats = field(default_factory=SpeculationStats)

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
    """An engine's single stream (sequence 0 of its KV cache), so a new prompt re-evaluates only what differs from
    the tokens the cache holds (the cache keeps that record: `tokens`).

    Every evaluation checks its logits: NaN or inf (damaged weights, a damaged repacked cache, NaN norms or epsilon)
    raise ModelError naming `name` (the model file) and the position, and the positions just evaluated are dropped."""

    def __init__(self, engine: Engine, name: str = "model"):
        self.engine = engine
        self.name = name

    @property
    def tokens(self) -> list[int]:
        """The token ids the cache holds, by position (a copy)."""
        return self.engine.cache.tokens(0)

    def reset(self) -> None:
        self.engine.reset()

    def evaluate_prompt(self, prompt: Sequence[int]) -> tuple:
        """Logits after the whole prompt, evaluating only the tokens past the longest common prefix with the cache.

        Returns (logits (n_vocab,) float32, n_evaluated)."""
        keep = common_prefix_length(self.tokens, prompt)
        if keep == len(prompt):
            keep -= 1  # the last prompt token must be evaluated again to get its logits
        self.truncate(keep)
        new = list(prompt[keep:])
        logits = self.engine.prefill(new)
        self._check_finite(logits, self.engine.n_past - 1, keep)
        return logits, len(new)

    def evaluate_all(self, tokens: Sequence[int]) -> np.ndarray:
        """Logits (len(tokens), n_vocab) float32 of every position of `tokens`, evaluated on a fresh context."""
        self.reset()
        logits = self.engine.prefill(tokens, all_logits=True)
        self._check_finite(logits, 0, 0)
        return logits

    def decode(self, token: int) -> np.ndarray:
        """Logits (n_vocab,) after evaluating one more token."""
        logits = self.engine.decode(token)
        self._check_finite(logits, self.engine.n_past - 1, self.engine.n_past - 1)
        return logits

    def extend_to(self, sequence: Sequence[int]) -> np.ndarray:
        """Logits (n_vocab,) after `sequence`: one decode step when the cache holds sequence[:-1] (the usual case;
        rejected guesses after it are dropped), else evaluation past the longest common prefix (another generation
        used the cache in between). Prefill and decode logits are bit-identical, so both give the same next token."""
        n = len(sequence) - 1
        if self.engine.cache.holds_prefix(0, sequence[:n]):
            self.truncate(n)
            return self.decode(sequence[n])
        return self.evaluate_prompt(sequence)[0]

    def extend_with(self, sequence: Sequence[int], draft: Sequence[int]) -> np.ndarray:
        """Logits (1 + len(draft), n_vocab) after `sequence`, after sequence + draft[:1], ... in one forward pass
        where the cache holds sequence[:-1] (and perhaps guesses of an earlier pass after it, rejected and dropped
        here: the usual case after a rejection, which must not cost a second pass)."""
        n = len(sequence) - 1
        if not draft:
            return self.extend_to(sequence)[None]
        if self.engine.cache.holds_prefix(0, sequence[:n]):
            self.truncate(n)
            logits = self.engine.prefill([sequence[n], *draft], all_logits=True)
            self._check_finite(logits, n, n)
            return logits
        first = self.evaluate_prompt(sequence)[0]
        rest = self.engine.prefill(list(draft), all_logits=True)
        self._check_finite(rest, len(sequence), len(sequence))
        return np.concatenate([first[None], rest])

    def truncate(self, n: int) -> None:
        """Keep only the first n cached positions."""
        self.engine.truncate(n)

    def _check_finite(self, logits: np.ndarray, first_position: int, keep: int) -> None:
        """ModelError unless every logit is finite; logits' rows are positions first_position, first_position + 1..."""
        if all_finite(logits):
            return
        rows = logits.reshape(-1, logits.shape[-1])
        position = first_position + int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        self.truncate(keep)  # their keys and values may be NaN too: never reuse them
        raise non_finite_logits(self.name, position)


def non_finite_logits(name: str, position: int) -> ModelError:
    """The error for NaN or inf logits of model file `name` at a position."""
    return ModelError(f"{name}: logits are not finite at position {position} (NaN/inf: damaged weights or "
                      f"hyper-parameters)")


def generate_tokens(acquire: Callable[[], ContextManager[CachedEngine]], sampler: Sampler, prompt: Sequence[int],
                    max_tokens: int, eog_ids: Iterable[int], stats: GenerationStats,
                    speculative: str = "off", draft_model=None, tokenizer=None) -> Iterator[int]:
    """Yield sampled tokens until an end-of-generation token, max_tokens, or a full context.

    acquire() gives the CachedEngine for exclusive use (the model's lock) for one evaluation at a time; it is not
    held while a token is with the caller, so other generations may use the cache in between. This one keeps its
    own history and re-evaluates it where the cache no longer holds it, so its tokens are those it would get alone.
    The caller may stop iterating at any time (a stop string); the cache then holds what was evaluated.

    speculative "auto", "ngram" or "draft" checks guesses (prompt lookup's, or draft_model's: an edgeinfer Model of
    the same vocabulary) in each pass (edgeinfer.speculative): the same tokens when greedy, a sample of the same
    distribution when sampling."""
    check_speculation(speculative, draft_model is not None)
    eog = frozenset(eog_ids)
    history = list(prompt)
    stats.prompt_tokens = len(history)
    drafter, length = drafting_for(speculative, draft_model, tokenizer)
    t0 = time.perf_counter()
    with acquire() as cached:
        n_ctx = cached.engine.n_ctx
        logits, stats.prompt_tokens_evaluated = cached.evaluate_prompt(history)
    stats.prefill_seconds = time.perf_counter() - t0
    if max_tokens == 0:
        stats.stop_reason = "length"
        return
    decode_start = time.perf_counter()
    ready = [sampler.sample(logits, history)]  # sampled tokens not yet yielded (accepted guesses, then one more)
    stats.time_to_first_token = time.perf_counter() - t0
    guess = None  # the lookup's first guess on a plain step: was it right? (a free estimate of acceptance)
    while True:
        for token in ready:
            if token in eog:
                stats.stop_reason = "eog"
                return
            history.append(token)
            stats.generated_tokens += 1
            yield token
            if stats.generated_tokens == max_tokens:
                stats.stop_reason = "length"
                return
        if guess is not None:
            length.observe_guesses(1, int(ready[0] == guess))
        if len(history) > n_ctx:  # every position holds an earlier token: the last one cannot be evaluated
            stats.stop_reason = "context"
            return
        room = min(n_ctx - len(history), max_tokens - stats.generated_tokens - 1)
        k = min(length.choose(), room) if drafter else 0
        started = time.perf_counter()  # a pass's cost includes drafting its guesses
        draft, guess = draft_or_free_guess(drafter, history, k) if drafter else ([], None)
        with acquire() as cached:
            rows = cached.extend_with(history, draft)
        length.observe_pass(len(rows), time.perf_counter() - started)
        if draft:
            ready = accept_draft(sampler, rows, history, draft)
            right = len(ready) - 1
            length.observe_guesses(min(right + 1, len(draft)), right)
            spec = stats.speculation
            spec.drafted, spec.accepted, spec.verify_steps = spec.drafted + len(draft), spec.accepted + right, \
                spec.verify_steps + 1
        else:
            ready = [sampler.sample(rows[0], history)]
        stats.decode_seconds = time.perf_counter() - decode_start


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
