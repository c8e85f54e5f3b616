"""Structured output: `response_format` json_object / json_schema by grammar-constrained sampling (llguidance).

llguidance compiles a JSON schema into a grammar and, at each step, gives the set of tokens of *our* vocabulary
that keep the output a valid prefix; the logits of every other token become -inf before sampling, so the output
always parses and validates (unless max_tokens cuts it: finish_reason "length"). The vocabulary is handed over
once per model (`GrammarVocabulary`, built on first use: a second or so for 150k tokens); each request gets its own
matcher (`Constraint`).
"""
from __future__ import annotations

import json
import threading

import numpy as np

from edgeinfer.errors import InvalidArgument
from edgeinfer.tokenizer import Tokenizer

# compact separators and no free whitespace: a small model cannot wander into endless blank lines
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_SPECIAL_PREFIX = b"\xff"  # llguidance's mark for a special (control) token's text


def available() -> bool:
    try:
        import llguidance  # noqa: F401
    except ImportError:
        return False
    return True


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads from a tokenizer: token bytes, special ids, encode."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        self._tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer.eos_id is not None else min(tokenizer.eog_ids)
        self.bos_token_id = tokenizer.bos_id
        self.tokens, self.special_token_ids = [], []
        for i in range(n_vocab):
            if i < tokenizer.n_vocab and tokenizer.is_control(i):
                self.tokens.append(_SPECIAL_PREFIX + tokenizer.token_text(i).encode("utf-8"))
                self.special_token_ids.append(i)
            else:
                self.tokens.append(tokenizer.token_to_bytes(i) if i < tokenizer.n_vocab else b"")

    def __call__(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special=False, parse_special=False)


class GrammarVocabulary:
    """A model's vocabulary as llguidance's tokenizer, built on first use (thread-safe)."""

    def __init__(self, tokenizer: Tokenizer, n_vocab: int):
        self._tokenizer, self.n_vocab = tokenizer, n_vocab
        self._lock = threading.Lock()
        self._built = None

    def get(self):
        with self._lock:
            if self._built is None:
                import llguidance

                view = _TokenizerView(self._tokenizer, self.n_vocab)
                self._built = llguidance.LLTokenizer(llguidance.TokenizerWrapper(view), n_vocab=self.n_vocab,
                                                     eos_token=sorted(self._tokenizer.eog_ids))
            return self._built


def grammar_for(response_format: dict) -> str | None:
    """The llguidance grammar of an OpenAI response_format (None for plain text); InvalidArgument naming the problem
    for a schema llguidance cannot compile."""
    import llguidance

    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = {"type": "object"}
    else:  # json_schema: checked by the request parser to hold an object "schema"
        schema = response_format["json_schema"].get("schema") or {"type": "object"}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except (ValueError, TypeError) as e:
        raise InvalidArgument(f"the JSON schema cannot be compiled: {e}") from None


class Constraint:
    """One request's grammar: masks logits before each sample, follows the tokens sampled."""

    def __init__(self, vocabulary: GrammarVocabulary, grammar: str):
        import llguidance

        from kernels_cpu.logits import masked_by_bits  # (compiled code: imported with the first constraint)

        self.n_vocab = vocabulary.n_vocab
        self.matcher = llguidance.LLMatcher(vocabulary.get(), grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidArgument(f"the JSON schema cannot be used: {self.matcher.get_error()}")
        self._masked_by_bits = masked_by_bits
        # the masked logits, in one buffer kept for the request: the server's malloc settings make each fresh
        # vocabulary-sized array fresh pages (Qwen2.5's mask took 323 us a token that way, 99 without them)
        self._masked = np.empty(self.n_vocab, np.float32)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """The logits with every token the grammar forbids now set to -inf: this constraint's own buffer, which the
        next call overwrites."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        self._masked_by_bits(np.asarray(logits, dtype=np.float32), bits, self._masked)
        return self._masked

    def accept(self, token: int) -> None:
        self.matcher.consume_token(token)

    @property
    def complete(self) -> bool:
        """The output is a whole match: only an end-of-generation token could follow."""
        return self.matcher.is_stopped()


class ConstrainedSampler:
    """A Sampler whose tokens follow a Constraint, for loops that sample inside (Model.stream, generate_batch): the
    logits are masked before each sample and the token sampled is given to the constraint. Once the output is
    complete only an end-of-generation token is allowed, which ends the generation."""

    def __init__(self, sampler, constraint: Constraint, eog_ids):
        self.sampler, self.constraint, self.eog = sampler, constraint, frozenset(eog_ids)
        self.params, self.seed = sampler.params, sampler.seed

    def sample(self, logits: np.ndarray, recent_tokens=()) -> int:
        token = self.sampler.sample(self.constraint.mask(logits), recent_tokens)
        if token not in self.eog:
            self.constraint.accept(token)
        return token
