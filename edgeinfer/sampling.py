"""Token sampling with llama.cpp's defaults and sampler order.

The chain is llama.cpp's default (`common_params_sampling::samplers` in common/common.h, built by
`common_sampler_init` in common/sampling.cpp), restricted to the samplers edgeinfer implements:

    penalties -> top_k -> top_p -> min_p -> temperature -> dist

(llama.cpp also has dry, top_n_sigma, typical_p and xtc between these; all are disabled by its defaults.)
Each rule is a small pure function over a candidate set, a pair of equal-length arrays `(ids, logits)`:
`ids` int64 token ids, `logits` float32. They never modify their inputs and follow the semantics of
src/llama-sampling.cpp, float32 arithmetic included. Where llama.cpp leaves the order of equal logits to
`std::partial_sort`, edgeinfer breaks ties by the lower token id, so results are fully deterministic
(greedy included: llama.cpp keeps the first maximum in candidate order, which is the lowest id here).

Penalty window design: the `Sampler` keeps no token history. The caller passes the sequence so far
(prompt + generated, as llama-cli feeds the prompt into the sampler) to every `Sampler.sample` call; the
sampler looks at its last `penalty_last_n` tokens. This keeps the sampler free of state other than its
random generator, so rewinding or branching a generation needs nothing from it.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgeinfer.errors import InvalidArgument

# top_p on a large unsorted candidate set first tries the best 256 tokens, as llama.cpp does
_TOP_P_TRY = 256
_TOP_P_TRY_ABOVE = 1024
RANDOM_SEED = -1  # as llama.cpp's LLAMA_DEFAULT_SEED: draw a fresh seed
CHAT_REPEAT_PENALTY = 1.1  # chat's default (Ollama's); plain generation keeps llama.cpp's 1.0 (off)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token; defaults are llama.cpp's `common_params_sampling` defaults.

    temperature <= 0 means greedy (argmax, ties -> lowest id). top_k <= 0 disables top-k; top_p >= 1 and
    min_p <= 0 disable theirs. repeat_penalty (llama.cpp `penalty_repeat`) 1.0, presence_penalty
    (`penalty_present`) 0.0 and frequency_penalty (`penalty_freq`) 0.0 are off. penalty_last_n is how many
    of the most recent tokens the penalties look at: 0 disables them, -1 means all tokens passed in.
    seed None or -1 (llama.cpp's LLAMA_DEFAULT_SEED) draws a fresh random seed (see `Sampler.seed`).
    A value out of range raises InvalidArgument (a ValueError), one of the wrong kind TypeError; both name it.
    """

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        for name in ("temperature", "top_p", "min_p", "repeat_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"SamplingParams.{name} must be a number, not {type(value).__name__}")
            if not math.isfinite(value):
                raise InvalidArgument(f"SamplingParams.{name} must be a finite number, got {value!r}")
        for name in ("top_k", "penalty_last_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"SamplingParams.{name} must be an integer, not {type(value).__name__}")
        if not 0.0 <= self.top_p <= 1.0:
            raise InvalidArgument(f"SamplingParams.top_p must be in [0, 1], got {self.top_p!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidArgument(f"SamplingParams.min_p must be in [0, 1], got {self.min_p!r}")
        if self.repeat_penalty <= 0.0:
            raise InvalidArgument(f"SamplingParams.repeat_penalty must be > 0 (1.0 = off), got {self.repeat_penalty!r}")
        if self.penalty_last_n < -1:
            raise InvalidArgument(f"SamplingParams.penalty_last_n must be >= -1 (-1 = all), "
                                  f"got {self.penalty_last_n!r}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
                raise TypeError(f"SamplingParams.seed must be None or an integer, not {type(self.seed).__name__}")
            if self.seed < RANDOM_SEED:
                raise InvalidArgument(f"SamplingParams.seed must be >= 0, or -1 (or None) for a random seed, "
                                      f"got {self.seed!r}")


# ---------------------------------------------------------------- the rules, each over (ids, logits)


def _is_sorted_desc(logits: np.ndarray) -> bool:
    return bool(np.all(logits[:-1] >= logits[1:]))


def _softmax32(logits: np.ndarray) -> np.ndarray:
    """llama.cpp's `llama_sampler_softmax_impl`: float32 exp, sequential float32 sum, divide."""
    e = np.exp(logits - logits.max(), dtype=np.float32)
    return e / np.cumsum(e)[-1]


def apply_penalties(
    ids: np.ndarray,
    logits: np.ndarray,
    recent_tokens: Sequence[int],
    *,
    penalty_last_n: int = 64,
    repeat_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """llama.cpp's penalties sampler over the last `penalty_last_n` of `recent_tokens` (-1: all, 0: off).

    Each candidate seen `count` > 0 times in that window: logit / repeat_penalty if logit > 0, else
    logit * repeat_penalty; then minus count * frequency_penalty + presence_penalty. Returns `(ids, logits)`
    with the same order and length; `logits` is a new float32 array when anything changed, or `out` where given
    (a float32 array of the logits' shape that the caller keeps: a Sampler's, since a fresh vocabulary-sized array
    is fresh pages every time under the server's malloc settings: 347 us a sample of Qwen2.5's, 83 without them).
    """
    if penalty_last_n == 0 or (repeat_penalty == 1.0 and frequency_penalty == 0.0 and presence_penalty == 0.0):
        return ids, logits
    window = recent_tokens if penalty_last_n < 0 else recent_tokens[max(0, len(recent_tokens) - penalty_last_n):]
    window = np.asarray(window, dtype=np.int64)
    if window.size == 0:
        return ids, logits
    tokens, counts = np.unique(window, return_counts=True)
    # fast path: candidates are the full vocabulary in id order, so position == id (checks <= last_n entries)
    if tokens[0] >= 0 and tokens[-1] < len(ids) and np.array_equal(ids[tokens], tokens):
        positions = tokens
    else:
        positions = np.flatnonzero(np.isin(ids, tokens))
        if positions.size == 0:
            return ids, logits
        counts = counts[np.searchsorted(tokens, ids[positions])]
    if out is None or out.shape != logits.shape:
        out = np.array(logits, dtype=np.float32, copy=True)
    else:
        np.copyto(out, logits)
    old = out[positions]
    rep = np.float32(repeat_penalty)
    new = np.where(old <= 0, old * rep, old / rep)
    new -= counts.astype(np.float32) * np.float32(frequency_penalty) + np.float32(presence_penalty)
    out[positions] = new
    return ids, out


def top_k(ids: np.ndarray, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the `k` highest logits, sorted descending (ties: lower id first). k <= 0: unchanged.

    O(n) selection with np.argpartition, then a sort of the k survivors only.
    """
    if k <= 0:
        return ids, logits
    order = _top_k_order(ids, logits, k)
    return ids[order], logits[order]


def _top_k_order(ids: np.ndarray, logits: np.ndarray, k: int) -> np.ndarray:
    """Indices of the min(k, n) best candidates, best first (ties: lower id first): np.lexsort((ids, -logits))[:k],
    selected in compiled code (kernels_cpu.logits.top_k_order: a fifth of np.argpartition's time on a vocabulary)."""
    from kernels_cpu.logits import top_k_order

    return top_k_order(np.ascontiguousarray(logits, dtype=np.float32), np.ascontiguousarray(ids, dtype=np.int64),
                       int(k))


def top_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Keep the shortest highest-probability prefix whose softmax mass reaches `p` (at least `min_keep`).

    Probabilities are the softmax over the given candidates. Returns the survivors sorted descending.
    p >= 1: unchanged. As llama.cpp, a large unsorted set first looks only at its best 256; where those do
    not reach p, edgeinfer widens the look 16-fold at a time instead of sorting the whole vocabulary.
    """
    if p >= 1.0 or len(logits) == 0:
        return ids, logits
    probs = _softmax32(logits)  # in the given order, before sorting, as llama.cpp
    if _is_sorted_desc(logits):
        order = None
        n = _top_p_count(np.cumsum(probs), p, min_keep)
    else:
        k = _TOP_P_TRY if len(logits) > _TOP_P_TRY_ABOVE else len(logits)
        while True:
            order = _top_k_order(ids, logits, k)
            n = _top_p_count(np.cumsum(probs[order]), p, min_keep)
            if n is not None or k >= len(logits):
                break
            k *= 16
    if n is None:  # rounding kept the total mass below p: keep everything, as llama.cpp
        n = len(logits)
    if order is not None:
        ids, logits = ids[order], logits[order]
    return ids[:n], logits[:n]


def _top_p_count(cum: np.ndarray, p: float, min_keep: int) -> int | None:
    """1 + first index where the cumulative mass reaches p and at least min_keep are kept; None if none."""
    reached = np.flatnonzero(cum >= np.float32(p))
    reached = reached[reached + 1 >= min_keep]
    return int(reached[0]) + 1 if reached.size else None


def min_p(ids: np.ndarray, logits: np.ndarray, p: float, min_keep: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Drop candidates whose probability is below `p` times the most likely one's. p <= 0: unchanged.

    Done in logit space as llama.cpp: keep logit >= max_logit + log(p). Order is preserved. If fewer than
    `min_keep` would survive, the `min_keep` best are kept instead.
    """
    if p <= 0.0 or len(logits) == 0:
        return ids, logits
    min_logit = logits.max() + np.float32(math.log(p))
    keep = logits >= min_logit
    if np.count_nonzero(keep) >= min_keep:
        return ids[keep], logits[keep]
    return top_k(ids, logits, min_keep)


def apply_temperature(ids: np.ndarray, logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Divide logits by `temperature`; temperature <= 0 keeps only the greedy token."""
    if temperature <= 0.0:
        best = _greedy_index(ids, logits)
        return ids[best:best + 1], logits[best:best + 1]
    return ids, logits / np.float32(temperature)


def _greedy_index(ids: np.ndarray, logits: np.ndarray) -> int:
    best = np.flatnonzero(logits == logits.max())
    return int(best[np.argmin(ids[best])]) if best.size > 1 else int(best[0])


def greedy(ids: np.ndarray, logits: np.ndarray) -> int:
    """The token id with the highest logit; ties go to the lowest id."""
    return int(ids[_greedy_index(ids, logits)])


def sample_dist(ids: np.ndarray, logits: np.ndarray, rng: np.random.Generator) -> int:
    """llama.cpp's dist sampler: draw u in [0, 1) and return the first candidate whose cumulative
    softmax mass reaches u * total, walking the candidates in their given order. Uses one rng draw."""
    e = np.exp(logits - logits.max(), dtype=np.float32).astype(np.float64)
    cum = np.cumsum(e)
    i = int(np.searchsorted(cum, cum[-1] * rng.random(), side="left"))
    return int(ids[min(i, len(ids) - 1)])


# ---------------------------------------------------------------- the chain


def all_finite(logits: np.ndarray) -> bool:
    """Whether every logit is finite (one row or several), in one compiled pass that allocates nothing. (A
    vocabulary-sized temporary costs page faults on every step where large blocks are mmap'd: the server bounds
    glibc's mmap threshold to keep its RSS flat.)"""
    from kernels_cpu.logits import all_finite_flat

    return bool(all_finite_flat(np.ascontiguousarray(logits, dtype=np.float32).reshape(-1)))


@functools.lru_cache(maxsize=4)
def token_ids(n_vocab: int) -> np.ndarray:
    """0..n_vocab-1 (int64, read-only): the candidates' ids before any rule narrows them, made once per vocabulary
    size and shared by every sampler and the server's logprobs (not a vocabulary-sized array per request)."""
    ids = np.arange(n_vocab, dtype=np.int64)
    ids.flags.writeable = False
    return ids


def warm_up() -> None:
    """Compile (on a first run: seconds) or load from Numba's cache the sampler's compiled passes, so that a first
    sampled token does not wait for them (chat and the server call this while they load)."""
    from kernels_cpu.logits import all_finite_flat, log_normalizer, row_summaries, top_k_order

    row = np.zeros((1, 64), np.float32)
    all_finite_flat(row[0])
    log_normalizer(row[0])  # logprobs
    row_summaries(row, np.empty(1, np.int64), np.empty(1, bool))
    top_k_order(row[0], np.arange(64, dtype=np.int64), 1)


def _check_samplable(logits: np.ndarray) -> int:
    """InvalidArgument unless some logit is finite and none is NaN or +inf (-inf masks a token, as in llama.cpp);
    returns the argmax (the first largest: the lowest id of a tie), which greedy sampling takes."""
    best = int(np.argmax(logits))
    if np.isfinite(logits[best]):  # the usual case: argmax would have found a NaN or +inf, and an all -inf row has
        return best                # none finite
    bad = np.isnan(logits) | (logits == np.inf)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InvalidArgument(f"logits: {int(bad.sum())} of {len(logits)} are NaN or +inf (the first at token id "
                              f"{first}): nothing can be sampled from them")
    if not np.isfinite(logits).any():
        raise InvalidArgument("logits: every one is -inf: nothing can be sampled from them")


class Sampler:
    """Runs llama.cpp's default chain: penalties -> top_k -> top_p -> min_p -> temperature -> dist.

    Owns a numpy Generator seeded from `params.seed` (a fresh random seed if None or -1, kept in `self.seed` so
    a run can be replayed). Same seed and same (logits, recent_tokens) sequence give the same tokens.
    Logits may hold -inf (a masked token) but not NaN or +inf: those raise InvalidArgument, never an IndexError.
    """

    def __init__(self, params: SamplingParams, n_vocab: int):
        if isinstance(n_vocab, bool) or not isinstance(n_vocab, (int, np.integer)) or n_vocab <= 0:
            raise InvalidArgument(f"n_vocab must be a positive integer, got {n_vocab!r}")
        self.params = params
        self.n_vocab = int(n_vocab)
        random = params.seed is None or params.seed == RANDOM_SEED
        self.seed = int(np.random.SeedSequence().entropy) if random else int(params.seed)
        self._rng = np.random.default_rng(self.seed)
        self._ids = token_ids(self.n_vocab)
        # the penalized logits of the last sample (np.empty: no page is touched unless penalties are on)
        self._penalized = np.empty(self.n_vocab, np.float32)

    def distribution(self, logits: np.ndarray, recent_tokens: Sequence[int] = ()) -> tuple[np.ndarray, np.ndarray]:
        """The final candidates and their probabilities, after every rule: `(ids int64, probs float32)`.

        `logits`: float32 shape (n_vocab,), not modified. `recent_tokens`: the sequence so far (prompt +
        generated); only its last `penalty_last_n` are used. Candidates are in the order dist walks them.
        """
        ids, lg = self._filtered(logits, recent_tokens)
        return ids, _softmax32(lg)

    def sample(self, logits: np.ndarray, recent_tokens: Sequence[int] = (), best: int | None = None) -> int:
        """Pick the next token id from `logits` (float32, shape (n_vocab,), not modified).

        `recent_tokens`: the sequence so far (prompt + generated); the penalties look at its last
        `penalty_last_n`. Greedy (temperature <= 0) does not consume randomness. `best`: the row's argmax where
        the caller has it already, with every logit known finite (a server step finds both for all its rows in one
        compiled pass: kernels_cpu.logits.row_summaries).
        """
        ids, lg = self._filtered(logits, recent_tokens, best)
        if self.params.temperature <= 0.0:
            return int(ids[0])
        return sample_dist(ids, lg, self._rng)

    def random(self) -> float:
        """One draw in [0, 1) from this sampler's generator (speculative sampling's acceptance tests use it, so a
        seeded run stays reproducible)."""
        return float(self._rng.random())

    def _filtered(self, logits: np.ndarray, recent_tokens: Sequence[int],
                  best: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        p = self.params
        logits = np.asarray(logits, dtype=np.float32)
        if logits.shape != (self.n_vocab,):
            raise InvalidArgument(f"logits must have shape ({self.n_vocab},), got {logits.shape}")
        if best is None:
            best = _check_samplable(logits)
        ids, lg = apply_penalties(
            self._ids, logits, recent_tokens, penalty_last_n=p.penalty_last_n, repeat_penalty=p.repeat_penalty,
            frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty, out=self._penalized,
        )
        if p.temperature <= 0.0:  # top_k/top_p/min_p always keep the argmax, so skip straight to it; the candidates
            if lg is not logits:  # are every id in order here, so the first largest is the lowest id of a tie
                best = int(np.argmax(lg))  # (logits unpenalized: the check's argmax already)
            return ids[best:best + 1], lg[best:best + 1]
        ids, lg = top_k(ids, lg, p.top_k)
        ids, lg = top_p(ids, lg, p.top_p)
        ids, lg = min_p(ids, lg, p.min_p)
        return apply_temperature(ids, lg, p.temperature)
