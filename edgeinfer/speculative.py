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

Drafts come from prompt lookup (`NgramDrafter`: the continuation of the latest earlier occurrence of the context's
last n tokens, the big win when the answer repeats its input: code edits, quotes, summaries, tool output) or from a
smaller model of the same vocabulary (`DraftModelDrafter`); auto mode with a draft model takes the lookup's where it
has a copy, else the model's (`LookupThenModel`).
`DraftLength` picks k from the measured acceptance rate and the measured cost of a verify pass, and drafts nothing
when speculation does not pay.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgeinfer.errors import InvalidArgument
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


_WORD_CLASSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def word_classes(tokenizer) -> np.ndarray:
    """Per token id, a class shared by the tokens of one word whatever the whitespace before or after it and its
    case (' In', 'In', '\nin'); 0 for whitespace-only and empty (control) tokens. Made once per tokenizer (a pass
    over the vocabulary, 0.15 s for Qwen2.5's 151k tokens)."""
    classes = _WORD_CLASSES.get(tokenizer)
    if classes is None:
        ids: dict[str, int] = {"": 0}
        classes = np.array([ids.setdefault(piece.decode("utf-8", "replace").strip().lower(), len(ids))
                            for piece in tokenizer.all_token_bytes()], np.int32)
        _WORD_CLASSES[tokenizer] = classes
    return classes


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


class NgramDrafter:
    """Prompt lookup: the tokens that followed the most recent earlier occurrence of the context's last n tokens,
    trying n = max_ngram down to min_ngram (a longer match predicts better), or those of the copy being followed.

    The copy being followed (`_resume`) is where the source the model copies goes on: moved along with every pass,
    past a substituted token (an edit renames a variable: the model puts a new token where the source had another),
    or held while the model inserts tokens (the new name takes more tokens than the old). Where no n-gram recurs it
    is the only guess; where the latest n-gram occurrence is elsewhere (a rewrite's previous *written* line, which
    holds the old number, not the source line being copied), the two compete. After each pass every candidate is
    compared with what the model said: the one that would have been right longest wins the conflict and becomes the
    copy followed, and each source's recent wins decide the next conflict. A substituted token that the copy then
    goes on past is a rename: later copies write the source's token as the model did (until the model keeps one);
    where the model wrote words before the source's token instead (', the' for 'the'), the copy going on at that
    token is a candidate too. Each source's first guesses are scored (the copy in step, past an edit, at the token
    before which words were inserted, held for an insertion, the n-gram), and a source that is seldom right
    (resuming in free text) is kept to itself, as is any guess while the sources picked are seldom right: proposing
    costs a verify pass's extra rows.

    Where no n-gram of tokens recurs and word_classes (per token id, edgeinfer.speculative.word_classes) are given,
    the last WORDS words are looked up instead, whitespace and case aside: a summary that joins two paragraphs writes
    'valley. In' where its source has 'valley.\n\nIn' (other tokens: ' In' against '\n\n', 'In'), and begins a
    sentence with 'The' where the source goes on '... the ferry'. That source ("words") competes as the others.

    Keeps an index of every n-gram's latest end position, extended as the context grows (a context that does not
    extend the indexed one, e.g. another generation, rebuilds it), so a proposal costs a few dictionary lookups
    whatever the context length."""

    cheap = True  # a proposal is a few dictionary lookups: plain passes check a free first guess
    MIN_PRECISION = 0.25  # a source whose first guesses are right less often than this proposes nothing
    MAX_INSERTIONS = 4  # tokens the model may add in place of the source's one before the copy is given up
    COMPARED = 16  # tokens of each candidate copy compared with what the model said (at least the guesses)
    WORDS = 3  # words looked up by the "words" source (2 drafted as well on the replayed summary, worse on a story)

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2,
                 word_classes: np.ndarray | Callable[[], np.ndarray] | None = None):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._tokens: list[int] = []
        # n -> {n-gram: end index (exclusive) of its latest occurrence before the context's end}
        self._latest: dict[int, dict[tuple, int]] = {n: {} for n in range(min_ngram, max_ngram + 1)}
        self._classes = word_classes  # or a function that makes them, called on the first proposal
        self._words: list[int] = []  # the word classes of the context's tokens that are words, in order
        self._latest_words: dict[tuple, int] = {}  # the last WORDS words -> end index of their latest occurrence
        self._resume: int | None = None  # where the copy being followed goes on
        self._edited = False  # the copy followed was moved past a token the model replaced
        self._replaced: int | None = None  # where that token is: the copy goes on there if the model inserted words
        self._insertions = 0
        # source token -> what the model wrote in its place (a rename), applied to every copy's guesses
        self._renames: dict[int, tuple[int, ...]] = {}
        self._edit: tuple[int, int] | None = None  # (source token replaced, context index of its replacement)
        # (context length, {source: its copy}, the source picked or None) of the last proposal
        self._last: tuple[int, dict[str, _Copy], str | None] | None = None
        # decayed [right, wrong] first guesses of each source: the copy followed (in step, just past an edit, at the
        # token the edit replaced or held for an insertion: its place then a guess), the latest n-gram occurrence
        self._scores = {"copy": [1.0, 0.0], "resume": [1.0, 1.0], "inserted": [1.0, 1.0], "held": [1.0, 1.0],
                        "ngram": [1.0, 0.0], "words": [1.0, 0.0]}
        self._wins = {source: 0.0 for source in self._scores}  # decayed conflicts each source's guesses won
        self._chosen = [1.0, 0.0]  # decayed [right, wrong] first guesses of the source each proposal picks

    def free_guess(self, context: Sequence[int]) -> int | None:
        """The first guess after `context`, or None (what a plain pass scores against its own token)."""
        guesses = self.propose(context, 1)
        return guesses[0] if guesses else None

    def propose(self, context: Sequence[int], k: int) -> list[int]:
        """Up to k guessed tokens after `context` (fewer, or none, where no n-gram of it recurs)."""
        if k <= 0:
            return []
        self._index(context)
        self._learn()
        tokens = self._tokens
        end = len(tokens)
        starts: dict[str, int] = {}  # source -> where its copy starts; the copy followed first (it wins ties)
        if self._resume is not None and self._resume < end:
            starts["held" if self._insertions else "resume" if self._edited else "copy"] = self._resume
            if self._edited and self._replaced is not None and not self._insertions:
                starts["inserted"] = self._replaced  # or the model wrote a word before the source's token
        for n in range(min(self.max_ngram, end - 1), self.min_ngram - 1, -1):
            start = self._latest[n].get(tuple(tokens[end - n:]))
            if start is not None:  # tokens[start - n:start] == the last n tokens, start < end
                if start not in starts.values():
                    starts["ngram"] = start
                break
        else:
            start = self._word_match()
            if start is not None and start not in starts.values():
                starts["words"] = start
        if not starts:
            self._last = None
            return []
        found = {source: self._copy(start, max(k, self.COMPARED)) for source, start in starts.items()}
        trusted = [s for s in found if self._scores[s][0] >= self.MIN_PRECISION * sum(self._scores[s])]
        self._last = (end, found, None)
        if not trusted:
            return []
        # the most recent conflict winner; of equals the copy followed, unless it is held for an insertion it may have
        # misread (its guess after the edit was wrong already): then an n-gram occurrence
        order = {"copy": 4, "resume": 3, "inserted": 2, "ngram": 1, "words": 0, "held": -1}
        best = max(trusted, key=lambda s: (self._wins[s], order[s]))
        self._last = (end, found, best)
        right, wrong = self._chosen
        if right < self.MIN_PRECISION * (right + wrong):
            return []  # each source may be right now and then, but what the lookup picks seldom is (free text)
        return found[best].guesses[:k]

    def _word_match(self) -> int | None:
        """Where the latest earlier occurrence of the context's last WORDS words ends (the context ending in a word),
        or None."""
        tokens = self._tokens
        if self._classes is None or len(self._words) < self.WORDS or not self._classes[tokens[-1]]:
            return None
        return self._latest_words.get(tuple(self._words[-self.WORDS:]))

    def _copy(self, start: int, n: int) -> "_Copy":
        """The next n tokens of the copy from `start` on, each source token the model renamed written as it did."""
        tokens, end, copy = self._tokens, len(self._tokens), _Copy([], [], [])
        j = start
        while len(copy.guesses) < n and j < end:
            written = self._renames.get(tokens[j])
            for t in written or (tokens[j],):
                copy.guesses.append(t)
                copy.after.append(j + 1)
                copy.renamed.append(written is not None)
            j += 1
        return copy

    def _learn(self) -> None:
        """Score the last proposal's candidates against the tokens that came after them, and move the copy being
        followed along: in step with the candidate right longest, past a substituted token, or held while the model
        inserts tokens. A substituted token the copy then goes on past is a rename, applied to later copies."""
        if self._last is None:
            return
        then, found, chosen = self._last
        tokens = self._tokens
        grown = len(tokens) - then
        if grown <= 0 or then > len(tokens):
            return
        runs = {}
        for source, copy in found.items():
            run, most = 0, min(grown, len(copy.guesses))
            while run < most and tokens[then + run] == copy.guesses[run]:
                run += 1
            runs[source] = run
            if run < most and copy.renamed[run] and tokens[then + run] == tokens[copy.after[run] - 1]:
                self._renames.pop(tokens[then + run], None)  # the model kept the source's token after all
            for score in [self._scores[source]] + ([self._chosen] if source == chosen else []):
                score[0], score[1] = 0.9 * score[0], 0.9 * score[1]
                score[0 if run else 1] += 1.0
        # The copy followed, right up to the model's last token, is taken as in step past a substituted token; the
        # others are compared with it on the tokens before (a rename's new name matches the previous rewritten line,
        # which goes on with that line's old number, not the source line being copied). A copy just moved past a
        # substitution and wrong again proves nothing.
        followed = runs.get("copy", runs.get("resume", runs.get("held")))
        substituted = followed == grown - 1 and (grown > 1 or not self._edited)
        compared = {source: min(run, grown - 1) if substituted else run for source, run in runs.items()}
        if len(found) > 1:
            best, worst = max(compared.values()), min(compared.values())
            for source in found:
                self._wins[source] = 0.9 * self._wins[source] + (compared[source] == best > worst)
        best = max(found, key=compared.__getitem__)  # the first of equals: the copy followed
        copy, run = found[best], runs[best]
        if best in ("resume", "held", "inserted") and run == 0:
            if self._insertions < self.MAX_INSERTIONS:
                self._insertions += grown  # the model is still writing its replacement: the source waits
            else:
                self._resume, self._edit, self._replaced = None, None, None
            self._last = None
            return
        if best in ("resume", "held") and self._edit is not None:  # back in step past the edit: a rename
            replaced, at = self._edit
            written = tuple(tokens[at:then])
            if 0 < len(written) <= self.MAX_INSERTIONS + 1 and replaced not in written:  # (else words inserted)
                self._renames[replaced] = written
        self._edit = None
        # in step, or past the token the model replaced
        self._resume = copy.after[grown - 1] if grown <= len(copy.after) else \
            (copy.after[-1] if copy.after else then) + grown - len(copy.after)
        self._edited, self._insertions, self._replaced = run < grown, 0, None
        if run < grown and run < len(copy.guesses):
            self._replaced = copy.after[run] - 1
            if not copy.renamed[run]:
                self._edit = (tokens[self._replaced], then + run)
        self._last = None

    def _index(self, context: Sequence[int]) -> None:
        tokens = self._tokens
        if len(context) < len(tokens) or list(context[:len(tokens)]) != tokens:
            tokens.clear()
            for table in self._latest.values():
                table.clear()
            self._resume, self._last, self._insertions, self._edited = None, None, 0, False
            self._renames, self._edit, self._replaced = {}, None, None
            self._words.clear()
            self._latest_words.clear()
        if callable(self._classes):
            self._classes = self._classes()
        # the n-grams ending before the last position: the last one's own would match itself
        classes, words = self._classes, self._words
        for i in range(len(tokens), len(context)):
            for n, table in self._latest.items():
                if i >= n:
                    table[tuple(tokens[i - n:i])] = i
            if classes is not None and i and classes[tokens[i - 1]] and len(words) >= self.WORDS:
                self._latest_words[tuple(words[-self.WORDS:])] = i  # (the last WORDS words end at token i - 1)
            token = int(context[i])
            tokens.append(token)
            if classes is not None and classes[token]:
                words.append(int(classes[token]))


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
class _Copy:
    """A candidate continuation: its tokens, and per token the source index the copy goes on from after it and
    whether it comes from a rename."""

    guesses: list[int]
    after: list[int]
    renamed: list[bool]


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
