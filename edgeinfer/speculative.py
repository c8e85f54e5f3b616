"""Speculative decoding: guess several next tokens cheaply, check them all in one forward pass of the model.

Decode on a CPU is bound by reading the weights: a forward pass over 1 + k tokens of one sequence reads them once,
so checking k guessed tokens costs far less than k decode steps. Each step here evaluates the last sampled token
followed by a draft of k guesses, which gives the model's logits after each of them; the draft is then accepted
up to its first wrong guess and the model's own token is taken there, so a step yields 1 to k + 1 tokens.

Exactness (what the model says does not change):
- greedy: a guess is kept when it is the model's argmax at its position, so the tokens are the ones plain decoding
  gives (a token's logits are bit-identical however its positions are batched: kernels_cpu.forward);
- sampling: the standard speculative-sampling rule (Leviathan et al. 2023; Chen et al. 2023): a guess d drawn from
  a draft distribution q is kept with probability min(1, p(d) / q(d)), p the sampler's final distribution there
  (penalties, top-k/p, min-p and temperature applied); on rejection the token is drawn from max(p - q, 0),
  renormalized. Every emitted token is then distributed exactly as p. A prompt-lookup guess is a point mass
  (q(d) = 1): it is kept with probability p(d), else the token is drawn from p without d.

Drafts come from prompt lookup (`NgramDrafter`: the continuation of the latest earlier occurrence of the context's
last n tokens, the big win when the answer repeats its input: code edits, quotes, summaries, tool output) or from a
smaller model of the same vocabulary (`DraftModelDrafter`).
`DraftLength` picks k from the measured acceptance rate and the measured cost of a verify pass, and drafts nothing
when speculation does not pay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeinfer.errors import InvalidArgument
from edgeinfer.sampling import Sampler

SPECULATION_MODES = ("auto", "ngram", "draft", "off")
NGRAM_DRAFT, MODEL_DRAFT = 12, 6  # guesses per pass in modes "ngram" and "draft" (auto: chosen as it goes)


def check_speculation(mode, has_draft_model: bool = True) -> str:
    """The speculation mode, checked: "auto" (guesses where they pay: from the draft model if one is loaded, else
    prompt lookup), "ngram" (prompt lookup every pass), "draft" (the draft model every pass) or "off"."""
    if not isinstance(mode, str):
        raise TypeError(f"speculative must be one of {', '.join(SPECULATION_MODES)}, not {type(mode).__name__}")
    if mode not in SPECULATION_MODES:
        raise InvalidArgument(f"speculative={mode!r}: expected one of {', '.join(SPECULATION_MODES)}")
    if mode == "draft" and not has_draft_model:
        raise InvalidArgument("speculative='draft' needs a draft model: load(..., draft=MODEL) or --draft MODEL")
    return mode


def drafting_for(mode: str, draft_model=None):
    """(drafter or None, DraftLength) for a generation in this mode."""
    if mode == "off":
        return None, DraftLength()
    if mode == "draft" or (mode == "auto" and draft_model is not None):
        return DraftModelDrafter(draft_model), DraftLength(fixed=MODEL_DRAFT if mode == "draft" else None)
    return NgramDrafter(), DraftLength(fixed=NGRAM_DRAFT if mode == "ngram" else None)


def check_same_vocabulary(target, draft) -> None:
    """InvalidArgument unless the draft model's tokens and special ids are the target's (its guesses are token
    ids of the target's vocabulary); both are Tokenizers."""
    a, b = target.vocab, draft.vocab
    if a.n_vocab != b.n_vocab:
        raise InvalidArgument(f"draft model: its vocabulary has {b.n_vocab} tokens, the model's {a.n_vocab}")
    if a.tokens != b.tokens:
        first = next(i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y)
        raise InvalidArgument(f"draft model: token {first} is {b.tokens[first]!r}, the model's is {a.tokens[first]!r}"
                              f" (not the same vocabulary)")
    for role in sorted(set(a.ids) | set(b.ids)):
        if a.ids.get(role) != b.ids.get(role):
            raise InvalidArgument(f"draft model: its {role} token is {b.ids.get(role)}, the model's "
                                  f"{a.ids.get(role)}")


class NgramDrafter:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's last n tokens,
    trying n = max_ngram down to min_ngram (a longer match predicts better).

    Keeps an index of every n-gram's latest end position, extended as the context grows (a context that does not
    extend the indexed one, e.g. another generation, rebuilds it), so a proposal costs a few dictionary lookups
    whatever the context length."""

    cheap = True  # a proposal is a few dictionary lookups: plain passes check a free first guess

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._tokens: list[int] = []
        # n -> {n-gram: end index (exclusive) of its latest occurrence before the context's end}
        self._latest: dict[int, dict[tuple, int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k guessed tokens after `context` (fewer, or none, where no n-gram of it recurs)."""
        if k <= 0:
            return []
        self._index(context)
        tokens = self._tokens
        end = len(tokens)
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            start = self._latest[n].get(tuple(tokens[end - n:]))
            if start is not None:  # tokens[start - n:start] == the last n tokens, start < end
                return tokens[start:start + k]
        return []

    def _index(self, context: Sequence[int]) -> None:
        tokens = self._tokens
        if len(context) < len(tokens) or list(context[:len(tokens)]) != tokens:
            tokens.clear()
            for table in self._latest.values():
                table.clear()
        # the n-grams ending before the last position: the last one's own would match itself
        for i in range(len(tokens), len(context)):
            for n, table in self._latest.items():
                if i >= n:
                    table[tuple(tokens[i - n:i])] = i
            tokens.append(int(context[i]))


@dataclass
class SpeculationStats:
    """Counts over one generation: drafted and accepted guesses, verify passes."""

    drafted: int = 0
    accepted: int = 0
    verify_steps: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class DraftModelDrafter:
    """Guesses from a smaller model of the same vocabulary: its greedy continuation, k tokens, one decode step each.

    The draft model's cache follows the context through its own prefix cache (edgeinfer.generation.CachedEngine):
    after a pass where guesses were rejected, the next proposal drops them and evaluates what the context gained.
    Greedy guesses are point masses, so the acceptance rule needs no draft distributions."""

    cheap = False  # proposing costs decode steps of the draft model: no free guesses on plain passes

    def __init__(self, model):
        self.model = model  # an edgeinfer.api.Model

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        out: list[int] = []
        if k <= 0:
            return out
        room = self.model.n_ctx - len(context)
        with self.model._use() as cached:
            logits = cached.extend_to(list(context)) if room > 0 else None
            for i in range(min(k, room)):
                out.append(int(np.argmax(logits)))
                if i + 1 < min(k, room):
                    logits = cached.decode(out[-1])
        return out


class DraftLength:
    """How many guesses to check next, from what drafting has given so far.

    Model: each guess is right with probability a (estimated from every guess checked, and from what the first
    guess would have been on plain steps, which costs nothing to check), and a pass over 1 + k rows costs
    t1 + k * t_row seconds (both measured). k maximizes the expected tokens per second,
    (1 - a^(k+1)) / (1 - a) / (t1 + k t_row); 0 (plain decoding) where nothing beats one token per t1. t_row
    includes what drafting a guess costs (a draft model's decode step). `fixed` (the explicit modes) skips all
    this and asks for that many guesses every pass."""

    def __init__(self, max_draft: int = 12, fixed: int | None = None):
        self.max_draft, self.fixed = max_draft, fixed
        self.right, self.wrong = 1.0, 1.0  # a weak prior: a = 0.5 before anything is seen
        self.t1: float | None = None  # seconds of a one-row pass
        self.t_row: float | None = None  # seconds per extra row of a verify pass

    @property
    def acceptance(self) -> float:
        return self.right / (self.right + self.wrong)

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.t1 is None:
            return 0  # measure a plain step first
        a = min(self.acceptance, 0.999)
        t_row = self.t_row if self.t_row is not None else 0.25 * self.t1  # a guess before any verify pass
        best_k, best_rate = 0, 1.0 / self.t1
        for k in range(1, self.max_draft + 1):
            rate = (1.0 - a ** (k + 1)) / (1.0 - a) / (self.t1 + k * t_row)
            if rate > best_rate:
                best_k, best_rate = k, rate
        return best_k

    def observe_guesses(self, checked: int, right: int) -> None:
        """`checked` guesses were compared with the model's tokens; the first `right` were right."""
        decay = 0.95 ** checked  # recent text matters more: a quote ends, a rewrite begins
        self.right = self.right * decay + right
        self.wrong = self.wrong * decay + (checked - right)

    def observe_pass(self, rows: int, seconds: float) -> None:
        """A forward pass of `rows` rows took `seconds`."""
        if rows == 1:
            self.t1 = seconds if self.t1 is None else 0.8 * self.t1 + 0.2 * seconds
        elif self.t1 is not None:
            per_row = max(seconds - self.t1, 0.0) / (rows - 1)
            self.t_row = per_row if self.t_row is None else 0.8 * self.t_row + 0.2 * per_row


def accept_draft(sampler: Sampler, rows: np.ndarray, context: Sequence[int], draft: Sequence[int],
                 draft_probs: np.ndarray | None = None) -> list[int]:
    """The tokens a verify pass yields: the accepted guesses, then one token of the model's own.

    rows (len(draft) + 1, n_vocab): the model's logits after `context`, after context + draft[:1], ...;
    draft_probs (len(draft), n_vocab): the draft distributions the guesses were drawn from (None: each guess a
    point mass, as prompt lookup's). Uses the sampler's random generator (not at all when greedy)."""
    out: list[int] = []
    here = list(context)  # the context each row's sampler sees: context + out, kept as one growing list
    greedy = sampler.params.temperature <= 0.0
    for i, guess in enumerate(draft):
        if greedy:
            token = sampler.sample(rows[i], here)
            out.append(token)
            here.append(token)
            if token != guess:
                return out
            continue
        ids, probs = sampler.distribution(rows[i], here)
        p = np.zeros(sampler.n_vocab, np.float64)
        p[ids] = probs
        q = np.zeros(sampler.n_vocab, np.float64)
        if draft_probs is None:
            q[guess] = 1.0
        else:
            q[:] = draft_probs[i]
        if q[guess] > 0.0 and sampler.random() * q[guess] < p[guess]:  # u < p / q without dividing
            out.append(int(guess))
            here.append(int(guess))
            continue
        residual = np.maximum(p - q, 0.0)
        out.append(_draw(residual if residual.sum() > 0.0 else p, sampler))
        return out
    out.append(sampler.sample(rows[len(draft)], here))
    return out


def _draw(weights: np.ndarray, sampler: Sampler) -> int:
    """A token drawn with probability proportional to weights (float64, n_vocab)."""
    cum = np.cumsum(weights)
    i = int(np.searchsorted(cum, cum[-1] * sampler.random(), side="right"))
    return min(i, len(weights) - 1)
