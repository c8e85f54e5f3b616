"""Prompt lookup: guesses of the next tokens read off the context itself (the prompt and what was generated),
for speculative decoding (edgeinfer.speculative). The big win where the answer repeats its input: code edits, quotes,
summaries, tool output. `NgramDrafter` follows the copy it finds, by n-grams of tokens or, where none recurs, by
words (`word_classes`: whitespace and case aside).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

_WORD_CLASSES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def word_classes(tokenizer) -> np.ndarray:
    """Per token id, a class shared by the tokens of one word whatever the whitespace before or after it and its
    case (' In', 'In', '\nin'); 0 for whitespace-only and empty (control) tokens. Made once per tokenizer (a pass
    over the vocabulary, 0.12 s for Qwen2.5's 151k tokens)."""
    classes = _WORD_CLASSES.get(tokenizer)
    if classes is None:
        ids: dict[str, int] = {"": 0}
        classes = np.array([ids.setdefault(piece.decode("utf-8", "replace").strip().lower(), len(ids))
                            for piece in tokenizer.all_token_bytes()], np.int32)
        _WORD_CLASSES[tokenizer] = classes
    return classes


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

    Where no n-gram of tokens recurs and word_classes (per token id, `word_classes` below) are given,
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
        self._context: Sequence[int] | None = None  # the list the index was last extended from (see _index)
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
        n = len(tokens)
        # The usual context is the one indexed last, grown since: a generation's history, appended to a token or a
        # few at a time. That is told by the list's identity and its last indexed token, where comparing it whole
        # cost time growing with the context at every step. (A list changed elsewhere than at its end would keep a
        # stale index: worse guesses, never a different output, since every guess is checked by the model.)
        grown = context is self._context and len(context) >= n and (n == 0 or context[n - 1] == tokens[-1])
        self._context = context
        if not grown and (len(context) < n or list(context[:n]) != tokens):
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


@dataclass
class _Copy:
    """A candidate continuation: its tokens, and per token the source index the copy goes on from after it and
    whether it comes from a rename."""

    guesses: list[int]
    after: list[int]
    renamed: list[bool]
