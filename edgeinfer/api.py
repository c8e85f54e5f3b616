"""The Python API: `edgeinfer.load(...)` returns a `Model` to tokenize, score, generate and chat with.

Sections: argument checks, chat tokenization (only the template's markup becomes control tokens), the Model.
"""
from __future__ import annotations

import inspect
import os
import secrets
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from edgeinfer.arch import load_decoder
from edgeinfer.backends.devices import check_device
from edgeinfer.budget import POWER_MODES, ModelFootprint, plan_on_device, read_system_state
from edgeinfer.chat_template import ChatTemplate
from edgeinfer.engine import Engine
from edgeinfer.errors import InvalidArgument, ModelClosed, UnsupportedError
from edgeinfer.generation import CachedEngine, GenerationStats, TextStream, generate_tokens
from edgeinfer.gguf_reader import GGUFFile
from edgeinfer.kv_cache import check_kv_type
from edgeinfer.sampling import CHAT_REPEAT_PENALTY, Sampler, SamplingParams
from edgeinfer.speculative import DEFAULT_SPECULATION, check_same_vocabulary, check_speculation
from edgeinfer.tokenizer import Tokenizer
from edgeinfer.tokenizer.special import partition
from edgeinfer.tokenizer.vocab import Attr


def load(model: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
         seed: int | None = None, power: str = "auto", n_seq: int = 1, kv_type: str | None = None,
         draft: str | os.PathLike | None = None, device: str = "auto",
         frontier: str | os.PathLike | dict | None = None) -> "Model":
    """Open a model by catalogue name (fetched on first use) or path to a GGUF file.

    n_ctx: context positions to allocate (default: the largest that fits in memory, at most min(trained, 8192));
    n_threads: compute threads (default: chosen for this machine's cores and power state);
    seed: default seed for sampling (None or -1: a random one); power: "auto", "saver", "balanced" or "performance";
    n_seq: sequences the KV cache holds, n_ctx positions each (`Model.generate_batch` decodes that many at once);
    kv_type: the KV cache's element type, "f32", "f16" or "q8_0" (llama.cpp's -ctk/-ctv; None: the budget's choice,
    `edgeinfer.kv_cache.DEFAULT_KV_TYPE`);
    draft: a smaller model of the same vocabulary (catalogue name or path) whose guesses `speculative="draft"` (or
    "auto") checks, loaded with the same context and threads; InvalidArgument if its vocabulary differs;
    device: "auto" (a CUDA GPU when there is one and the model fits its free memory, else the CPU), "cpu" or
    "cuda" (UnsupportedError, naming what is missing, without a GPU, its driver or numba-cuda); `Model.device`
    says which was chosen and why.
    frontier: a stored `edgeinfer frontier --json` file (or its dict) measured on `model`: the variant that fits this
    machine's memory and power state is loaded instead (edgeinfer.frontier.choose), with its KV cache type and
    threads unless kv_type / n_threads are given; `Model.frontier_choice` says which and why.
    Raises BudgetError, before allocating anything, if the model or the asked-for context does not fit;
    InvalidArgument / TypeError naming the argument for a bad value."""
    from models.fetch import resolve_model

    _check_options(n_ctx, n_threads, seed, power, n_seq, kv_type, device)
    path, choice = resolve_model(model), None
    if frontier is not None:
        from edgeinfer.frontier.choose import frontier_variant_of

        path, kv_type, n_threads, choice = frontier_variant_of(path, frontier, power, kv_type, n_threads)
    target = Model(path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, power=power, n_seq=n_seq,
                   kv_type=kv_type, device=device)
    target.frontier_choice = choice
    if draft is not None:
        try:
            target.use_draft(draft)
        except BaseException:
            target.close()
            raise
    return target


# ================================================================ argument checks

def _check_int(name: str, value, minimum: int, *, optional: bool = False) -> None:
    """TypeError unless value is an int (not a bool; None if optional), InvalidArgument if below minimum."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise InvalidArgument(f"{name} must be >= {minimum}, got {value}")


def _check_options(n_ctx, n_threads, seed, power, n_seq=1, kv_type=None, device="auto") -> None:
    _check_int("n_ctx", n_ctx, 1, optional=True)
    _check_int("n_seq", n_seq, 1)
    _check_int("n_threads", n_threads, 1, optional=True)
    _check_int("seed", seed, -1, optional=True)  # -1: random, as llama.cpp
    if power != "auto" and power not in POWER_MODES:
        raise InvalidArgument(f"power must be 'auto', {', '.join(repr(m) for m in POWER_MODES)}; got {power!r}")
    if kv_type is not None:
        check_kv_type(kv_type)  # whether q8_0 fits the model's head sizes is checked once the file is read
    check_device(device)


def _check_text(name: str, text) -> None:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, not {type(text).__name__}")


def check_token_ids(tokens, name: str, n_vocab: int) -> list[int]:
    """`tokens` as a list of ints, each in [0, n_vocab); TypeError / InvalidArgument naming `name` and the index."""
    if isinstance(tokens, (str, bytes)) or not isinstance(tokens, (Sequence, np.ndarray)):
        raise TypeError(f"{name} must be a sequence of token ids, not {type(tokens).__name__}")
    out = []
    for i, t in enumerate(tokens):
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"{name} token {i} must be an int, not {type(t).__name__}")
        if not 0 <= t < n_vocab:
            raise InvalidArgument(f"{name} token {i} is {int(t)}: token ids are in [0, {n_vocab})")
        out.append(int(t))
    return out


def check_messages(messages) -> None:
    """TypeError / InvalidArgument, naming the message by index, unless `messages` is a non-empty list of dicts
    with string 'role' and 'content'; checked before any template sees them."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
    if not messages:
        raise InvalidArgument("messages is empty: give at least one {'role': ..., 'content': ...} message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}")
        for key in ("role", "content"):
            if key not in m:
                raise InvalidArgument(f"messages[{i}] has no {key!r}")
            if not isinstance(m[key], str):
                raise TypeError(f"messages[{i}]: {key!r} must be a string, not {type(m[key]).__name__}")


def _per_prompt(key: str, value, n: int) -> list:
    """A generate_batch setting as one value per prompt: a list (for `stop`: a list of lists or None) gives them
    one by one, anything else is every prompt's."""
    if key == "stop":
        given = isinstance(value, list) and any(v is None or isinstance(v, (list, tuple)) for v in value)
    else:
        given = isinstance(value, (list, tuple))
    if not given:
        return [value] * n
    if len(value) != n:
        raise InvalidArgument(f"{key} has {len(value)} values for {n} prompts")
    return list(value)


# ================================================================ chat tokenization

def _placeholder(index: int, nonce: str) -> str:
    """Text no template changes and no special token matches (plane-15 private use characters)."""
    return f"\U000F0000{nonce}{chr(0xF1000 + index)}\U000F0000"


class ControlTexts:
    """The texts of a vocabulary's control and unknown tokens (those only special-token parsing splits out),
    indexed by first character and length: Gemma has 6,000, and every turn looks for them in every message."""

    def __init__(self, tokenizer: Tokenizer):
        vocab = tokenizer.vocab
        self.texts = frozenset(vocab.tokens[i] for i in vocab.special_ids
                               if int(vocab.attrs[i]) & (Attr.CONTROL | Attr.UNKNOWN) and vocab.tokens[i])
        self.first_chars = sorted({t[0] for t in self.texts})
        self.lengths = sorted({len(t) for t in self.texts})

    def found_in(self, text: str) -> set[str]:
        """The control-token texts that occur in `text`."""
        found = set()
        for ch in self.first_chars:
            i = text.find(ch)
            while i >= 0:
                found.update(text[i:i + n] for n in self.lengths if text[i:i + n] in self.texts)
                i = text.find(ch, i + 1)
        return found


def tokenize_chat(tokenizer: Tokenizer, template: ChatTemplate, messages: list[dict], controls: ControlTexts, *,
                  add_generation_prompt: bool = True) -> list[int]:
    """Token ids of the rendered conversation where only the template's own markup becomes control tokens.

    Where a message content holds a control token's text, it is rendered as a placeholder, the rendered text is
    split at the special tokens left, and each piece of text is tokenized with the placeholders put back and
    special-token parsing off. Otherwise (the usual case) this is the rendered text tokenized with special-token
    parsing on: the same ids."""
    add_bos = not template.renders_bos
    found = sorted(set().union(*(controls.found_in(m["content"]) for m in messages)), key=len, reverse=True)
    if not found:
        text = template.render(messages, add_generation_prompt=add_generation_prompt)
        return tokenizer.encode(text, add_special=add_bos, parse_special=True)
    nonce = "".join(chr(0xF0100 + b) for b in secrets.token_bytes(6))
    texts = {_placeholder(i, nonce): c for i, c in enumerate(found)}
    masked = []
    for m in messages:
        content = m["content"]
        for ph, c in texts.items():  # longest first, as the tokenizer would split them
            content = content.replace(c, ph)
        masked.append({**m, "content": content})
    return tokenize_rendered(tokenizer, template.render(masked, add_generation_prompt=add_generation_prompt),
                             texts, add_special=add_bos)


def tokenize_rendered(tokenizer: Tokenizer, text: str, placeholders: Mapping[str, str], *,
                      add_special: bool) -> list[int]:
    """`text` tokenized with special-token parsing on, except that the placeholders' texts are put back into the
    text pieces between special tokens and tokenized as plain text. With no placeholders, the ids of
    tokenizer.encode(text, add_special, parse_special=True)."""
    vocab = tokenizer.vocab
    out = [vocab.ids["bos"]] if add_special and tokenizer.add_bos else []
    for fragment in partition(text, [(vocab.tokens[i], i) for i in vocab.special_ids]):
        if isinstance(fragment, int):
            out.append(fragment)
            continue
        for ph, original in placeholders.items():
            fragment = fragment.replace(ph, original)
        out += tokenizer.encode(fragment, add_special=False, parse_special=False)
    if add_special and tokenizer.add_eos:
        out.append(vocab.ids["eos"])
    return out


# ================================================================ the model

class Completion:
    """The iterator `Model.stream` returns: text pieces as they are generated; `stats` holds its figures (the
    same object as the model's `last_stats` until another generation starts), `params` the sampling parameters
    and `seed` the sampler's seed (a random one drawn for seed None / -1, to replay it)."""

    def __init__(self, pieces: Iterator[str], stats: GenerationStats, sampler: Sampler):
        self._pieces, self.stats = pieces, stats
        self.params, self.seed = sampler.params, sampler.seed

    def __iter__(self) -> "Completion":
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        """Stop generating (the KV cache keeps what was evaluated)."""
        self._pieces.close()


class Model:
    """A loaded model: weights memory-mapped, tokenizer, chat template and an engine with its KV cache.

    Safe to share between threads: evaluations are serialized by a lock, and every generation (`generate`,
    `stream`, `chat`, each `ChatSession` turn) keeps its own token history, re-evaluating it through the prefix
    cache when another one used the cache in between; prefill and decode logits are bit-identical, so each gets
    exactly the answer it would get alone (interleaved streams in one thread too). A `stream` iterator does not
    hold the lock between pieces. After `close()` every method raises ModelClosed, and a stream being consumed
    raises ModelClosed at its next step. `last_stats` is the last generation started; with several threads,
    read each stream's own `stats`. `device` is where it runs (edgeinfer.backends.devices.DeviceChoice: name
    "cpu" or "cuda", the backend, and the reason it was chosen)."""

    frontier_choice: str | None = None  # set by load(..., frontier=): which stored variant and why

    def __init__(self, path: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
                 seed: int | None = None, power: str = "auto", n_seq: int = 1, kv_type: str | None = None,
                 device: str = "auto"):
        _check_options(n_ctx, n_threads, seed, power, n_seq, kv_type, device)
        self.gguf = GGUFFile(path)
        try:
            self.config, views = load_decoder(self.gguf)
            # the device, then the numbers on it (explicit n_ctx / n_threads win); an UnsupportedError (no GPU for
            # device="cuda") or BudgetError comes here, before the tokenizer or KV cache is built
            self.device, self.plan = plan_on_device(ModelFootprint.from_gguf(self.gguf, self.config),
                                                    read_system_state(), views, device=device, n_ctx=n_ctx,
                                                    n_threads=n_threads, power=power, n_seq=n_seq, kv_type=kv_type)
            self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
            self.config = self.config.for_context(self.plan.n_ctx)  # long-rope factors follow the context
            # the backend prepares the weights (the CPU one: repacked, cached on disk; the CUDA one: uploaded) and
            # allocates the cache
            backend = self.device.backend
            self.runner = backend.prepare(self.config, views, self.gguf.path)
            # a backend computing elsewhere uses few host threads: an explicit n_threads for the CPU is capped there
            threads = self.plan.n_threads if backend.name == "cpu" else min(self.plan.n_threads, backend.max_threads)
            self.engine = Engine(self.config, self.runner, n_ctx=self.plan.n_ctx, n_batch=self.plan.n_batch,
                                 n_threads=threads, n_seq=self.plan.n_seq, kv_type=self.plan.kv_type,
                                 backend=backend)
        except BaseException:
            self.gguf.close()
            raise
        self.seed = seed
        self._cached = CachedEngine(self.engine, name=str(self.gguf.path))
        self._lock = threading.RLock()
        self._closed = False
        self._template: ChatTemplate | None = None
        self._controls: ControlTexts | None = None
        self.last_stats = GenerationStats()
        self.draft: Model | None = None  # the draft model of speculative decoding (attach_draft)

    def use_draft(self, draft: "str | os.PathLike | Model") -> None:
        """Check the guesses of `draft` (a smaller model of the same vocabulary: a Model, or a catalogue name or
        path, then loaded with this one's context, threads and cache type) when speculative="draft" or "auto";
        it is closed with this one. InvalidArgument, naming the difference, if its tokens or special ids are not
        this model's."""
        from models.fetch import resolve_model

        if not isinstance(draft, Model):
            draft = Model(resolve_model(draft), n_ctx=self.n_ctx, n_threads=self.n_threads, kv_type=self.kv_type,
                          device=self.device.name)
        try:
            check_same_vocabulary(self.tokenizer, draft.tokenizer)
        except BaseException:
            draft.close()
            raise
        self.draft = draft

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def path(self):
        return self.gguf.path

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    @property
    def n_ctx(self) -> int:
        return self.plan.n_ctx

    @property
    def kv_type(self) -> str:
        """The KV cache's element type ("f32", "f16" or "q8_0"), as planned."""
        return self.plan.kv_type

    @property
    def n_threads(self) -> int:
        return self.plan.n_threads if self._closed else self.engine.n_threads

    @property
    def chat_template(self) -> ChatTemplate:
        self._check_open()
        if self._template is None:
            self._template = ChatTemplate.from_metadata(self.metadata, self.tokenizer.token_text,
                                                        architecture=self.config.arch)
        return self._template

    # -- tokens ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        """Token ids of `text`; add_special adds BOS/EOS as the file asks, parse_special turns the text of control
        tokens (e.g. "<|im_end|>") into those tokens (off: it is text, as a user typed it)."""
        self._check_open()
        _check_text("text", text)
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        """Text of token ids (each in [0, n_vocab)); special writes control tokens' text too."""
        self._check_open()
        return self.tokenizer.decode(check_token_ids(tokens, "tokens", self.n_vocab), special=special)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 logits (len(tokens), n_vocab) of every position, evaluated on a fresh context.

        ModelError (naming the file and position) where they are NaN or inf: those are never a valid answer."""
        tokens = self._prompt_ids(tokens, "tokens")
        try:
            with self._use() as cached:
                return cached.evaluate_all(tokens)
        finally:
            self._call_ended()

    def _prompt_ids(self, prompt, name: str) -> list[int]:
        """Checked prompt token ids: text is tokenized; empty or longer than the context raises InvalidArgument."""
        self._check_open()
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else check_token_ids(prompt, name, self.n_vocab)
        if not tokens:
            raise InvalidArgument(f"the {name} is empty: give text or at least one token")
        if len(tokens) > self.n_ctx:
            raise InvalidArgument(f"the {name} has {len(tokens)} tokens: more than the context of {self.n_ctx}")
        return tokens

    # -- generation -----------------------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.8,
               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None, speculative: str = DEFAULT_SPECULATION,
               json_schema: dict | None = None,
               response_format: dict | None = None) -> Completion:
        """Yield the continuation of `prompt` (text, or token ids in [0, n_vocab)) as text pieces while it is
        generated. Defaults are llama.cpp's (repeat_penalty 1.0: off); seed None takes the model's, -1 is random.
        speculative: "auto" (the default: guesses only where they pay), "ngram" (prompt lookup's every pass),
        "draft" (the draft model's every pass) or "off", see
        edgeinfer.speculative: the output is the same token for token, greedy or sampled with a seed (a guess is
        kept where it is the token the row samples).

        json_schema (a JSON schema dict) or response_format (OpenAI's {"type": "json_object"} / {"type":
        "json_schema", ...}): the output is JSON that follows it, by the grammar `edgeinfer serve` uses (llguidance;
        not with speculation), unless max_tokens cuts it.

        Stops at an end-of-generation token, at max_tokens (>= 0), when the context is full, or before a stop string
        (which is not emitted). The iterator's `stats` (and `last_stats`) hold the figures. Arguments are checked
        here, before the first piece; ModelError if the model computes NaN/inf logits."""
        tokens, sampler, stops = self._request(prompt, "prompt", max_tokens=max_tokens, temperature=temperature,
                                               top_k=top_k, top_p=top_p, min_p=min_p, repeat_penalty=repeat_penalty,
                                               presence_penalty=presence_penalty,
                                               frequency_penalty=frequency_penalty, seed=seed, stop=stop,
                                               json_schema=json_schema, response_format=response_format)
        check_speculation(speculative, self.draft is not None)
        if (json_schema, response_format) != (None, None):  # the grammar cannot follow guesses: auto does not guess
            if speculative in ("ngram", "draft"):
                raise InvalidArgument(f"json_schema and response_format need speculative=\"off\" or \"auto\", "
                                      f"not {speculative!r}")
            speculative = "off"
        self.last_stats = stats = GenerationStats()
        return Completion(self._pieces(tokens, sampler, max_tokens, stops, stats, speculative), stats, sampler)

    def _request(self, prompt, name: str, *, max_tokens, stop, seed, json_schema=None, response_format=None,
                 **sampling) -> tuple:
        """A generation's checked parts: (prompt token ids, sampler (constrained by a JSON schema), stop strings)."""
        tokens = self._prompt_ids(prompt, name)
        _check_int("max_tokens", max_tokens, 0)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        for i, s in enumerate(stops):
            _check_text(f"stop[{i}]", s)
        params = SamplingParams(**sampling, seed=self.seed if seed is None else seed)
        sampler = Sampler(params, self.n_vocab)
        if json_schema is not None or response_format is not None:
            from edgeinfer.serve.in_process import constrained_sampler

            sampler = constrained_sampler(self, sampler, json_schema, response_format)
        return tokens, sampler, stops

    def _pieces(self, tokens: list[int], sampler: Sampler, max_tokens: int, stop: list[str],
                stats: GenerationStats, speculative: str = "off") -> Iterator[str]:
        text = TextStream(self.tokenizer, stop)
        try:
            for token in generate_tokens(self._use, sampler, tokens, max_tokens, self.tokenizer.eog_ids, stats,
                                         speculative, self.draft, self.tokenizer):
                piece = text.push(token)
                if piece:
                    yield piece
                if text.stopped:
                    stats.stop_reason = "stop"
                    return
        finally:
            self._call_ended()
        rest = text.finish()
        if rest:
            yield rest

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        """The whole continuation of `prompt` as one string; keyword arguments as for `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], **settings) -> list[str]:
        """The continuations of several prompts, decoded together: up to n_seq (see `load`) at a time in one forward
        pass per token, the next prompt starting as soon as one ends. settings: the keyword arguments of `stream`
        (max_tokens, temperature, ..., seed, stop); each is one value for every prompt or a list of one per prompt.
        Each answer is exactly what `generate` gives that prompt alone (with a given seed, or greedy).
        `last_batch_stats` holds each prompt's GenerationStats afterwards."""
        from edgeinfer.batch_generation import BatchGenerator, BatchRequest

        self._check_open()
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of prompts, not {type(prompts).__name__}")
        defaults = {name: p.default for name, p in inspect.signature(Model.stream).parameters.items()
                    if p.kind is inspect.Parameter.KEYWORD_ONLY}  # stream's settings, one source of defaults
        if settings.get("speculative", "off") not in ("off", "auto"):  # auto: guesses where they pay, not here
            raise UnsupportedError("generate_batch does not speculate (speculative=\"off\" or \"auto\" only)")
        settings = {key: value for key, value in settings.items() if key != "speculative"}
        defaults.pop("speculative")
        unknown = sorted(set(settings) - set(defaults))
        if unknown:
            raise TypeError(f"generate_batch got unexpected settings: {', '.join(unknown)}")
        per_prompt = {key: _per_prompt(key, value, len(prompts)) for key, value in {**defaults, **settings}.items()}
        requests = []
        for i, prompt in enumerate(prompts):
            mine = {key: values[i] for key, values in per_prompt.items()}
            tokens, sampler, stops = self._request(prompt, f"prompts[{i}]", **mine)
            requests.append(BatchRequest(tokens, sampler, mine["max_tokens"], stops))
        try:
            with self._use() as cached:
                BatchGenerator(cached.engine, self.tokenizer, self.tokenizer.eog_ids,
                               name=str(self.path)).run(requests)
        finally:
            self._call_ended()
        self.last_batch_stats = [r.stats for r in requests]
        return [r.text for r in requests]

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True, *,
                    parse_special: bool = False) -> list[int]:
        """The conversation rendered with the model's chat template and tokenized.

        Only the template's own markup becomes control tokens: a message content's "<|im_end|>" stays text, so a
        user cannot open or close turns. parse_special=True tokenizes the whole rendered text with special-token
        parsing (contents' control-token texts become control tokens: the old behaviour, for trusted text).
        Messages are checked first: TypeError / InvalidArgument naming the message by index."""
        self._check_open()
        check_messages(messages)
        if parse_special:
            text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
            return self.tokenizer.encode(text, add_special=not self.chat_template.renders_bos, parse_special=True)
        if self._controls is None:
            self._controls = ControlTexts(self.tokenizer)
        return tokenize_chat(self.tokenizer, self.chat_template, messages, self._controls,
                             add_generation_prompt=add_generation_prompt)

    def chat(self, messages: list[dict] | str | None = None, *, stream: bool = False, parse_special: bool = False,
             **sampling):
        """Chat with the model.

        chat(messages): the assistant's reply to a whole conversation ([{"role": ..., "content": ...}]), an
        iterator of pieces if stream; the KV cache still skips the prefix it holds from an earlier call.
        chat(): the model's own kept `ChatSession` (created with **sampling on the first call), whose `send`
        answers one message at a time; chat("text") is chat().send("text", stream=stream, **sampling).
        sampling: as for `stream`, but repeat_penalty defaults to 1.1 (Ollama's chat default) instead of 1.0.
        parse_special: see `chat_tokens` (off: control-token texts in contents stay text)."""
        self._check_open()
        if messages is None or isinstance(messages, str):
            session = self.__dict__.get("_chat_session")
            if session is None:
                options = {} if isinstance(messages, str) else sampling
                session = self._chat_session = self.session(parse_special=parse_special, **options)
            return session if messages is None else session.send(messages, stream=stream, **sampling)
        tokens = self.chat_tokens(messages, parse_special=parse_special)
        pieces = self.stream(tokens, **{"repeat_penalty": CHAT_REPEAT_PENALTY, **sampling})
        return pieces if stream else "".join(pieces)

    def create_chat_completion(self, messages: list[dict], **fields):
        """OpenAI's chat completion in-process: fields as the body of `edgeinfer serve`'s POST /v1/chat/completions
        (stream, max_tokens, temperature, top_p, seed, stop, response_format, tools, tool_choice, logprobs, ...;
        unknown ones ignored, as there), answered with the dict the server answers, or with stream=True an iterator
        of the chunk dicts its events carry. InvalidRequest (an InvalidArgument) naming a bad field. See
        edgeinfer.serve.in_process."""
        from edgeinfer.serve.in_process import chat_completion

        self._check_open()
        return chat_completion(self, {**fields, "messages": messages})

    def create_completion(self, prompt: str | Sequence[int], **fields):
        """OpenAI's (legacy) completion in-process, as POST /v1/completions: see `create_chat_completion`."""
        from edgeinfer.serve.in_process import completion

        self._check_open()
        return completion(self, {**fields, "prompt": prompt})

    def session(self, system: str | None = None, **settings):
        """A new conversation that keeps the KV cache across turns (see `edgeinfer.session.ChatSession`);
        settings: max_tokens (per answer), parse_special and sampling options, as for `chat`."""
        from edgeinfer.session import ChatSession

        self._check_open()
        return ChatSession(self, system=system, **settings)

    # -- lifetime -------------------------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ModelClosed(f"model {self.path.name} is closed")

    def _call_ended(self) -> None:
        """A public call (or a stream) is over: the runner may give back what the calling thread holds between calls
        (the CPU runner: the main thread's OpenMP team; see CPURunner.idle)."""
        engine = self.engine
        idle = getattr(engine.runner, "idle", None) if engine is not None else None
        if idle is not None:
            idle()

    @contextmanager
    def _use(self) -> Iterator[CachedEngine]:
        """The cached engine, held for one evaluation under the model's lock; ModelClosed once closed."""
        with self._lock:
            self._check_open()
            yield self._cached

    def close(self) -> None:
        """Release the memory map and the KV cache (waiting for an evaluation under way); closing twice is fine."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.runner = None
            self.engine = None
            self._cached = None
            self.gguf.close()
            if self.draft is not None:
                self.draft.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._closed:
            return f"Model({self.path.name!r}, closed)"
        return (f"Model({self.path.name!r}, arch={self.config.arch}, n_ctx={self.n_ctx}, n_threads={self.n_threads}, "
                f"kv_type={self.kv_type}, device={self.device.name})")
