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
  (q(d) = 1): it is kept with probability p(d), else the token is drawn from p without d. That is sampling the row
  as plain decoding does and keeping d if it is the sample, which `accept_draft` does: a seeded generation is the
  same text with and without speculation.

Drafts come from prompt lookup (edgeinfer.prompt_lookup: the continuation of the latest earlier occurrence of the
context's last tokens, the big win when the answer repeats its input: code edits, quotes, summaries, tool output) or
from a smaller model of the same vocabulary (`DraftModelDrafter`); auto mode with a draft model takes the lookup's
where it has a copy, else the model's (`LookupThenModel`).
`DraftLength` picks k from the measured acceptance rate and the measured cost of a verify pass, and drafts nothing
when speculation does not pay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from edgeinfer.errors import InvalidArgument
from edgeinfer.prompt_lookup import NgramDrafter, word_classes
from edgeinfer.sampling import Sampler

SPECULATION_MODES = ("auto", "ngram", "draft", "off")
# On by default (run, chat, serve, the API): auto guesses only where the measured acceptance and pass cost say it
# pays, and never changes the output (greedy, or sampled with a seed). Measured (turn 2, session 12, 2 threads):
# free text 0.985-1.01x (sampled stories), 0.99x (serve, 1 client) and 1.01-1.24x (8 clients); grounded tasks 2-4x.
DEFAULT_SPECULATION = "auto"
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


def drafting_for(mode: str, draft_model=None, tokenizer=None):
    """(drafter or None, DraftLength) for a generation in this mode; with the tokenizer, prompt lookup also finds
    the source by its words (word_classes)."""
    if mode == "off":
        return None, DraftLength()
    if mode == "draft":
        return DraftModelDrafter(draft_model), DraftLength(fixed=MODEL_DRAFT)
    # the word classes are made on the first proposal, not here: a generation's first token does not wait for them
    lookup = NgramDrafter(word_classes=(lambda: word_classes(tokenizer)) if tokenizer is not None else None)
    if mode == "auto" and draft_model is not None:
        return LookupThenModel(lookup, DraftModelDrafter(draft_model)), DraftLength()
    return lookup, DraftLength(fixed=NGRAM_DRAFT if mode == "ngram" else None)


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


def draft_or_free_guess(drafter, context: Sequence[int], k: int) -> tuple[list[int], int | None]:
    """The guesses a pass checks: k > 0 asks the drafter for up to k; on a plain pass (k = 0) a cheap drafter's
    (prompt lookup's) first guess is returned beside no draft, to be scored against the token the pass samples
    (a free estimate of acceptance). Returns (draft, free guess or None)."""
    if k > 0:
        return drafter.propose(context, k), None
    if drafter.cheap:
        return [], drafter.free_guess(context)
    return [], None


class LookupThenModel:
    """Auto mode with a draft model: prompt lookup's guesses where it finds a copy to follow (they cost nothing to
    make, and where the answer repeats the prompt they are right far more often than a small model), else the draft
    model's. Plain passes score the lookup's free first guess only (the draft model's would cost a decode step).
    `model`: DraftModelDrafter, or the server's SlotDrafter."""

    cheap = True  # free guesses: the lookup's

    def __init__(self, lookup: NgramDrafter, model):
        self.lookup, self.model = lookup, model

    @property
    def seconds_per_guess(self) -> float:
        """What a guess may cost (the draft model's, where the server measures it)."""
        return getattr(self.model, "seconds_per_guess", 0.0)

    def free_guess(self, context: Sequence[int]) -> int | None:
        return self.lookup.free_guess(context)

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        return self.lookup.propose(context, k) or self.model.propose(context, k)


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
    guess would have been on plain steps, which costs nothing to check), and a pass over n rows costs t(n) seconds,
    measured for each n used (a running mean) and read off the line through the nearest measured n's elsewhere: a
    pass of 2 rows can cost far more than one row plus a per-row share of a 13-row pass (the kernels switch from
    one-row to tiled), so one slope would misjudge short drafts. k maximizes the expected tokens per second,
    (1 - a^(k+1)) / (1 - a) / t(1 + k); 0 (plain decoding) where nothing beats one token per t(1). t(n) includes
    what drafting costs (a draft model's decode steps). `fixed` (the explicit modes) skips all this and asks for
    that many guesses every pass."""

    PRIOR_ROW_SHARE = 0.25  # an extra row's cost, as a share of a one-row pass, before any verify pass is measured

    def __init__(self, max_draft: int = 12, fixed: int | None = None):
        self.max_draft, self.fixed = max_draft, fixed
        self.right, self.wrong = 1.0, 1.0  # a weak prior: a = 0.5 before anything is seen
        self.pass_seconds: dict[int, float] = {}  # rows -> running mean of a pass's seconds

    @property
    def acceptance(self) -> float:
        return self.right / (self.right + self.wrong)

    @property
    def t1(self) -> float | None:
        """Seconds of a one-row pass (None before one is measured)."""
        return self.pass_seconds.get(1)

    def pass_cost(self, rows: int) -> float:
        """Expected seconds of a pass of `rows` rows (needs t1): measured, else on the line through the nearest
        measured row counts below and above, else extended from the two largest below."""
        measured = self.pass_seconds
        if rows in measured:
            return measured[rows]
        below = [n for n in measured if n < rows]
        above = [n for n in measured if n > rows]
        lo = max(below)
        if above:
            hi = min(above)
        else:
            lower = [n for n in below if n != lo]
            if not lower:
                return measured[1] * (1.0 + self.PRIOR_ROW_SHARE * (rows - 1))
            lo, hi = max(lower), lo
        slope = max(measured[hi] - measured[lo], 0.0) / (hi - lo)
        return measured[lo] + slope * (rows - lo)

    def choose(self) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.t1 is None:
            return 0  # measure a plain step first
        a = min(self.acceptance, 0.999)
        best_k, best_rate = 0, 1.0 / self.t1
        for k in range(1, self.max_draft + 1):
            rate = (1.0 - a ** (k + 1)) / (1.0 - a) / self.pass_cost(1 + k)
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
        old = self.pass_seconds.get(rows)
        self.pass_seconds[rows] = seconds if old is None else 0.8 * old + 0.2 * seconds


def accept_draft(sampler: Sampler, rows: np.ndarray, context: Sequence[int], draft: Sequence[int],
                 draft_probs: np.ndarray | None = None) -> list[int]:
    """The tokens a verify pass yields: the accepted guesses, then one token of the model's own.

    rows (len(draft) + 1, n_vocab): the model's logits after `context`, after context + draft[:1], ...;
    draft_probs (len(draft), n_vocab): the draft distributions the guesses were drawn from (None: each guess a
    point mass, as prompt lookup's and a greedy draft model's).

    Point-mass guesses: each row is sampled as plain decoding samples it, and the guess is kept if it is that
    sample. That is the standard acceptance rule for q = a point mass (kept with probability p(guess), else a
    token drawn from p without the guess: the residual max(p - q, 0)), and it draws from the sampler's generator
    exactly as plain decoding does, so a seeded generation is the same text with and without speculation (greedy:
    no draws at all). Other draft distributions: the standard rule with its residual."""
    out: list[int] = []
    here = list(context)  # the context each row's sampler sees: context + out, kept as one growing list
    for i, guess in enumerate(draft):
        if draft_probs is None:
            token = sampler.sample(rows[i], here)
            out.append(token)
            here.append(token)
            if token != guess:
                return out
            continue
        ids, probs = sampler.distribution(rows[i], here)
        p = np.zeros(sampler.n_vocab, np.float64)
        p[ids] = probs
        q = np.asarray(draft_probs[i], np.float64)
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
