"""The Python API: `edgeinfer.load(...)` returns a `Model` to tokenize, score, generate and chat with."""
from __future__ import annotations

import os
from typing import Iterator, Sequence

import numpy as np

from edgeinfer.arch import load_decoder
from edgeinfer.budget import ModelFootprint, Plan, make_plan, read_system_state
from edgeinfer.chat_template import ChatTemplate
from edgeinfer.engine import Engine
from edgeinfer.generation import CachedEngine, GenerationStats, TextStream, generate_tokens
from edgeinfer.gguf_reader import GGUFFile
from edgeinfer.sampling import Sampler, SamplingParams
from edgeinfer.tokenizer import Tokenizer

def load(model: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
         seed: int | None = None, power: str = "auto") -> "Model":
    """Open a model by catalogue name (fetched on first use) or path to a GGUF file.

    n_ctx: context positions to allocate (default: the largest that fits in memory, at most min(trained, 8192));
    n_threads: compute threads (default: chosen for this machine's cores and power state);
    seed: default seed for sampling; power: "auto", "saver", "balanced" or "performance".
    Raises BudgetError, before allocating anything, if the model or the asked-for context does not fit."""
    from models.fetch import resolve_model

    return Model(resolve_model(model), n_ctx=n_ctx, n_threads=n_threads, seed=seed, power=power)


class Model:
    """A loaded model: weights memory-mapped, tokenizer, chat template and an engine with its KV cache."""

    def __init__(self, path: str | os.PathLike, *, n_ctx: int | None = None, n_threads: int | None = None,
                 seed: int | None = None, power: str = "auto"):
        self.gguf = GGUFFile(path)
        try:
            self.config, self.weights = load_decoder(self.gguf)
            # explicit n_ctx / n_threads win; a BudgetError comes here, before the tokenizer or KV cache is built
            self.plan: Plan = make_plan(ModelFootprint.from_gguf(self.gguf, self.config), read_system_state(),
                                        n_ctx=n_ctx, n_threads=n_threads, power=power)
            self.tokenizer = Tokenizer.from_metadata(self.gguf.metadata)
            self.engine = Engine(self.config, self.weights, n_ctx=self.plan.n_ctx, n_batch=self.plan.n_batch,
                                 n_threads=self.plan.n_threads)
        except BaseException:
            self.gguf.close()
            raise
        self.seed = seed
        self._cached = CachedEngine(self.engine)
        self._template: ChatTemplate | None = None
        self.last_stats = GenerationStats()

    # -- properties -----------------------------------------------------------------------------------------------
    @property
    def path(self):
        return self.gguf.path

    @property
    def metadata(self) -> dict:
        return self.gguf.metadata

    @property
    def n_vocab(self) -> int:
        return self.config.n_vocab

    @property
    def n_ctx(self) -> int:
        return self.engine.n_ctx

    @property
    def n_threads(self) -> int:
        return self.engine.n_threads

    @property
    def chat_template(self) -> ChatTemplate:
        if self._template is None:
            self._template = ChatTemplate.from_metadata(self.metadata, self.tokenizer.token_text,
                                                        architecture=self.config.arch)
        return self._template

    # -- tokens ---------------------------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self.tokenizer.encode(text, add_special=add_special, parse_special=parse_special)

    def detokenize(self, tokens: Sequence[int], special: bool = False) -> str:
        return self.tokenizer.decode(tokens, special=special)

    def logits(self, tokens: Sequence[int]) -> np.ndarray:
        """float32 logits (len(tokens), n_vocab) of every position, evaluated on a fresh context."""
        self._cached.reset()
        out = self.engine.prefill(np.asarray(tokens, dtype=np.int64), all_logits=True)
        self._cached.tokens = list(tokens)
        return out

    # -- generation -----------------------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], *, max_tokens: int = 256, temperature: float = 0.8,
               top_k: int = 40, top_p: float = 0.95, min_p: float = 0.05, repeat_penalty: float = 1.0,
               presence_penalty: float = 0.0, frequency_penalty: float = 0.0, seed: int | None = None,
               stop: str | Sequence[str] | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` (text, or token ids) as text pieces while it is generated.

        Stops at an end-of-generation token, at max_tokens, when the context is full, or before a stop string
        (which is not emitted). `last_stats` holds the figures afterwards."""
        tokens = self.tokenize(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not tokens:
            raise ValueError("the prompt is empty: give text or at least one token")
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, presence_penalty=presence_penalty,
                                frequency_penalty=frequency_penalty, seed=self.seed if seed is None else seed)
        return self._stream_tokens(tokens, params, max_tokens, [stop] if isinstance(stop, str) else list(stop or ()))

    def _stream_tokens(self, tokens: list[int], params: SamplingParams, max_tokens: int,
                       stop: list[str]) -> Iterator[str]:
        sampler = Sampler(params, self.n_vocab)
        text = TextStream(self.tokenizer, stop)
        self.last_stats = stats = GenerationStats()
        for token in generate_tokens(self._cached, sampler, tokens, max_tokens, self.tokenizer.eog_ids, stats):
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                stats.stop_reason = "stop"
                return
        rest = text.finish()
        if rest:
            yield rest

    def generate(self, prompt: str | Sequence[int], **kwargs) -> str:
        """The whole continuation of `prompt` as one string; keyword arguments as for `stream`."""
        return "".join(self.stream(prompt, **kwargs))

    def chat_tokens(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The conversation rendered with the model's chat template and tokenized (special tokens parsed)."""
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        add_bos = not self.chat_template.renders_bos
        return self.tokenizer.encode(text, add_special=add_bos, parse_special=True)

    def chat(self, messages: list[dict] | str | None = None, *, stream: bool = False, **sampling):
        """Chat with the model.

        chat(messages): the assistant's reply to a whole conversation ([{"role": ..., "content": ...}]), an
        iterator of pieces if stream; the KV cache still skips the prefix it holds from an earlier call.
        chat(): the model's own kept `ChatSession` (created with **sampling on the first call), whose `send`
        answers one message at a time; chat("text") is chat().send("text", stream=stream, **sampling)."""
        if messages is None or isinstance(messages, str):
            session = self.__dict__.get("_chat_session")
            if session is None:
                session = self._chat_session = self.session(**({} if isinstance(messages, str) else sampling))
            return session if messages is None else session.send(messages, stream=stream, **sampling)
        pieces = self.stream(self.chat_tokens(messages), **sampling)
        return pieces if stream else "".join(pieces)

    def session(self, system: str | None = None, **settings):
        """A new conversation that keeps the KV cache across turns (see `edgeinfer.session.ChatSession`);
        settings: max_tokens (per answer) and sampling options, as for `stream`."""
        from edgeinfer.session import ChatSession

        return ChatSession(self, system=system, **settings)

    # -- lifetime -------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the memory map and the KV cache."""
        self.weights = None
        self.engine = None
        self._cached = None
        self.gguf.close()

    def __enter__(self) -> "Model":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Model({self.path.name!r}, arch={self.config.arch}, n_ctx={self.n_ctx}, n_threads={self.n_threads})"
