"""A conversation that keeps the model's KV cache across turns: `ChatSession`.

Each turn renders the whole conversation with the model's chat template and hands the tokens to the model's prefix
cache (`CachedEngine`), which evaluates only what follows the longest common prefix with what it holds. After an
answer the cache holds the prompt and the generated tokens, and the next rendering starts with exactly those (the
answer's text re-tokenizes to the ids that were sampled), so a turn evaluates the template's end of the last turn and
the new message only. Where a template renders an answer differently (strips whitespace, say), evaluation restarts
from the first differing token; nothing needs to know why.

When a turn would not fit (prompt plus room for the answer beyond n_ctx), the oldest turns after the system prompt
leave the context window; they stay in `messages`, so `save` still writes the whole conversation. `save`/`load` also
keep the KV cache beside the JSON (FILE.kv.npz), so a long conversation resumes without its prefill.

Sections: errors, power adaptation, the session (turns, context window, settings, save and load).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from edgeinfer.errors import EdgeInferError, InvalidArgument
from edgeinfer.generation import GenerationStats, common_prefix_length
from edgeinfer.sampling import CHAT_REPEAT_PENALTY, SamplingParams, warm_up as warm_up_sampler
from edgeinfer.speculative import DEFAULT_SPECULATION, check_speculation

if TYPE_CHECKING:
    from edgeinfer.api import Model
    from edgeinfer.engine import Engine

__all__ = ["ChatSession", "MessageTooLong", "PowerWatch", "SessionFileError", "SETTINGS"]

# The answer's share of the context kept free when fitting a prompt: min(max_tokens, n_ctx // 4) tokens.
ANSWER_RESERVE_DIVISOR = 4
# Once turns must be dropped, drop until prompt + answer fit in this fraction of the context, so the next few turns
# fit without dropping again (each drop re-evaluates the whole window after the system prompt).
REFILL_FRACTION = 0.75
FILE_FORMAT = "edgeinfer.chat"
FILE_VERSION = 1
KV_SUFFIX = ".kv.npz"

# Settings `set` accepts (the chat's /set): name -> type. Sampling ones go to Model.stream, max_tokens per answer.
SETTINGS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float, "repeat_penalty": float,
            "presence_penalty": float, "frequency_penalty": float, "seed": int, "speculative": str, "max_tokens": int}


# ================================================================ errors

class MessageTooLong(EdgeInferError):
    """A message does not fit in the context even with every earlier turn dropped; it is not added."""


class SessionFileError(EdgeInferError):
    """A saved conversation cannot be read (not JSON, not a conversation, unreadable)."""


# ================================================================ power adaptation

class PowerWatch:
    """Follows the machine's power state between turns: when it is plugged in or out (or the battery runs low), the
    engine's thread count follows the budget manager's rule. `read_state` returns a `budget.SystemState`; tests pass
    a simulated machine."""

    def __init__(self, read_state: Callable | None = None, *, power: str = "auto", n_threads: int | None = None):
        from edgeinfer import budget

        self._budget = budget
        self.read_state = read_state or budget.read_system_state
        self.power, self.n_threads = power, n_threads  # an explicit n_threads is never changed
        self.state = self.read_state()

    def check(self, engine: "Engine") -> str | None:
        """Re-read the machine; if its power state changed, set engine.n_threads and return one line saying so."""
        import numba

        new = self.read_state()
        old, self.state = self.state, new
        if not self._budget.power_changed(old, new):
            return None
        threads = self._budget.threads_for_power(new, power=self.power, n_threads=self.n_threads)
        threads = max(1, min(threads, numba.config.NUMBA_NUM_THREADS))  # numba cannot run more than it started
        before, engine.n_threads = engine.n_threads, threads
        if new.plugged_in is None:
            what = "no battery reported"
        elif new.plugged_in:
            what = "plugged in"
        else:
            what = "on battery" + (f" at {new.battery_percent:.0f}%" if new.battery_percent is not None else "")
            what += ", low" if new.low_battery else ""
        if threads == before:
            return f"power: {what}; threads stay at {threads}"
        return f"power: {what}; threads {before} -> {threads}"


# ================================================================ the session

class ChatSession:
    """A conversation with a model, its turns evaluated incrementally through the model's KV cache.

    messages: the whole conversation ({"role", "content"} dicts, the system prompt first if any);
    first_in_context: index in `messages` of the oldest message still sent to the model (after the system prompt);
    notices: lines about the last `send` (turns dropped, answer cut by the context, power change), for a UI to show.
    Several sessions may share a model, from several threads too: a session's turn simply re-evaluates from where
    the cache differs (see `Model`). Sampling settings are `Model.stream`'s, except that repeat_penalty defaults to
    1.1 (Ollama's chat default). Message contents are text: a typed "<|im_end|>" does not end a turn, unless
    parse_special=True (see `Model.chat_tokens`)."""

    def __init__(self, model: "Model", *, system: str | None = None, max_tokens: int = 512,
                 power_watch: PowerWatch | None = None, parse_special: bool = False, **sampling):
        self.model = model
        self.power_watch = power_watch
        self.parse_special = parse_special
        self.max_tokens = 0
        self.sampling: dict = {}
        self.set(max_tokens=max_tokens, **{"repeat_penalty": CHAT_REPEAT_PENALTY, **sampling})
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self.first_in_context = len(self.messages)
        self.notices: list[str] = []
        self.last_stats = GenerationStats()
        self.last_interrupted = False
        self.turns = 0
        self.total_evaluated = 0
        self.total_generated = 0

    # -- the conversation -------------------------------------------------------------------------------------
    @property
    def system(self) -> str | None:
        return self.messages[0]["content"] if self.messages and self.messages[0]["role"] == "system" else None

    def set_system(self, text: str | None) -> None:
        """Set (or with None/'' remove) the system prompt; the rest of the conversation stays."""
        if self.system is not None:
            del self.messages[0]
            self.first_in_context -= 1
        if text:
            self.messages.insert(0, {"role": "system", "content": text})
            self.first_in_context += 1

    def reset(self) -> None:
        """Forget the conversation, keeping the system prompt (its prefix stays in the KV cache)."""
        del self.messages[1 if self.system is not None else 0:]
        self.first_in_context = len(self.messages)

    def context_messages(self) -> list[dict]:
        """The messages the model sees: the system prompt and the turns still in the context window."""
        head = self.messages[:1] if self.system is not None else []
        return head + self.messages[self.first_in_context:]

    @property
    def answer_reserve(self) -> int:
        """Positions kept free for the answer when fitting a prompt into the context."""
        return self._reserve(self.max_tokens)

    def _reserve(self, max_tokens: int) -> int:
        return max(1, min(max_tokens, self.model.n_ctx // ANSWER_RESERVE_DIVISOR))

    def send(self, text: str, *, stream: bool = False, **overrides) -> str | Iterator[str]:
        """Add a user message and answer it: the reply text, or an iterator of its pieces if stream.

        The reply is recorded as it streams, so stopping early (closing the iterator, Ctrl-C) keeps what was
        generated as the assistant's turn. overrides: sampling settings or max_tokens for this turn only.
        Raises MessageTooLong (and adds nothing) when the message cannot fit even alone with the system prompt."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        settings = {**self.sampling, "max_tokens": self.max_tokens, **overrides}
        _check_settings(settings)
        self.notices = []
        if self.power_watch is not None:
            line = self.power_watch.check(self.model.engine)
            if line:
                self.notices.append(line)
        user = {"role": "user", "content": text}
        tokens, first, dropped = self._fit(user, self._reserve(settings["max_tokens"]))
        if dropped:
            self.notices.append(f"context full ({self.model.n_ctx} tokens): dropped the oldest {_turns(dropped)} "
                                f"from the model's view (still in the conversation for /save)")
        self.first_in_context = first
        reply = {"role": "assistant", "content": ""}
        self.messages += [user, reply]
        pieces = self._generate(tokens, reply, settings)
        return pieces if stream else "".join(pieces)

    def _generate(self, tokens: list[int], reply: dict, settings: dict) -> Iterator[str]:
        self.last_interrupted = True  # until the stream ends on its own
        pieces = self.model.stream(tokens, **settings)
        try:
            for piece in pieces:
                reply["content"] += piece
                yield piece
            self.last_interrupted = False
        finally:
            stats = self.last_stats = pieces.stats  # this turn's, whatever other threads ran meanwhile
            self.turns += 1
            self.total_evaluated += stats.prompt_tokens_evaluated
            self.total_generated += stats.generated_tokens
            if stats.stop_reason == "context" and not self.last_interrupted:
                self.notices.append(f"the context is full ({self.model.n_ctx} tokens): the answer stopped there; "
                                    "the next turn drops the oldest turns")

    def _fit(self, user: dict, reserve: int) -> tuple[list[int], int, int]:
        """(prompt tokens, first_in_context, turns dropped) for the conversation plus `user`, dropping the oldest
        turns while prompt + `reserve` positions for the answer exceed the context."""
        n_ctx = self.model.n_ctx
        head = self.messages[:1] if self.system is not None else []
        first, dropped = self.first_in_context, 0
        tokens = self._tokens(head + self.messages[first:] + [user])
        if len(tokens) + reserve > n_ctx:
            target = int(n_ctx * REFILL_FRACTION)
            while first < len(self.messages) and len(tokens) + reserve > target:
                first = self._next_turn(first)
                dropped += 1
                tokens = self._tokens(head + self.messages[first:] + [user])
        if len(tokens) + reserve > n_ctx:
            alone = len(self._tokens(head + [user]))
            raise MessageTooLong(
                f"message too long: {alone} tokens with the template{' and system prompt' if head else ''}, plus "
                f"{reserve} kept for the answer, exceed the context of {n_ctx} tokens; it was not added "
                "(shorten it, or start with a larger --ctx)")
        return tokens, first, dropped

    def _tokens(self, messages: list[dict]) -> list[int]:
        return self.model.chat_tokens(messages, parse_special=self.parse_special)

    def _next_turn(self, i: int) -> int:
        """Index of the first message of the turn after the one starting at i (a turn: a user message and the
        replies up to the next user message)."""
        i += 1
        while i < len(self.messages) and self.messages[i]["role"] != "user":
            i += 1
        return i

    def warm_up(self) -> None:
        """Evaluate the template's fixed prefix (it stays cached for the first turn) and one decode step, so the
        prefill and decode kernels (and the sampler's) are compiled or loaded from Numba's cache before the first
        message."""
        warm_up_sampler()
        head = self.messages[:1] if self.system is not None else []
        a = self._tokens(head + [{"role": "user", "content": "a"}])
        b = self._tokens(head + [{"role": "user", "content": "b"}])
        prefix = a[:max(1, common_prefix_length(a, b))]
        try:
            with self.model._use() as cached:
                cached.evaluate_prompt(prefix)
                cached.decode(prefix[-1])  # a throw-away position: only the compiled decode step matters
                cached.truncate(len(prefix))
        finally:
            self.model._call_ended()

    # -- settings ---------------------------------------------------------------------------------------------
    def set(self, **settings) -> None:
        """Change sampling settings (temperature, top_k, top_p, min_p, repeat_penalty, presence_penalty,
        frequency_penalty, seed) or max_tokens for later turns; InvalidArgument (a ValueError) or TypeError names a
        bad one and changes nothing."""
        merged = {**self.sampling, "max_tokens": self.max_tokens, **settings}
        _check_settings(merged)
        self.max_tokens = int(merged.pop("max_tokens"))
        self.sampling = merged

    def settings(self) -> dict:
        """Every setting's value in force, defaults included (seed None: the model's seed, else random)."""
        defaults = SamplingParams()
        values = {name: getattr(defaults, name) for name in SETTINGS if name not in ("max_tokens", "speculative")}
        values["speculative"] = DEFAULT_SPECULATION
        return {**values, "seed": self.model.seed, **self.sampling, "max_tokens": self.max_tokens}

    def stats(self) -> dict:
        """Context use, the last turn's figures and the session's totals."""
        s = self.last_stats
        return {"messages": len(self.messages), "messages_in_context": len(self.context_messages()),
                "cached_tokens": len(self.model._cached.tokens), "n_ctx": self.model.n_ctx,
                "n_threads": self.model.n_threads, "turns": self.turns,
                "last_prompt_tokens": s.prompt_tokens, "last_prompt_tokens_evaluated": s.prompt_tokens_evaluated,
                "last_generated_tokens": s.generated_tokens, "last_time_to_first_token": s.time_to_first_token,
                "last_decode_tokens_per_second": s.decode_tokens_per_second, "last_stop_reason": s.stop_reason,
                "total_prompt_tokens_evaluated": self.total_evaluated, "total_generated_tokens": self.total_generated}

    # -- save and load ----------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> tuple[Path, Path]:
        """Write the conversation as JSON to `path` and the KV cache to `path` + ".kv.npz", each atomically.
        Returns both paths. The KV file records the model file (name, size, mtime) it belongs to."""
        path = Path(path)
        kv_path = path.with_name(path.name + KV_SUFFIX)
        st = os.stat(self.model.path)
        identity = {"model_file": Path(self.model.path).name, "model_size": st.st_size,
                    "model_mtime_ns": st.st_mtime_ns, "n_ctx": self.model.n_ctx}
        with self.model._use() as cached:  # no other turn changes the cache while it is written
            tokens, k, v = cached.engine.cache.export(0)
            _write_atomic(kv_path, lambda f: np.savez(f, tokens=np.asarray(tokens, dtype=np.int64), k=k, v=v,
                                                      identity=np.array(json.dumps(identity))))
        doc = {"format": FILE_FORMAT, "version": FILE_VERSION, "model": identity["model_file"],
               "messages": self.messages, "first_in_context": self.first_in_context,
               "settings": {**self.sampling, "max_tokens": self.max_tokens}}
        data = json.dumps(doc, ensure_ascii=False, indent=1).encode("utf-8")
        _write_atomic(path, lambda f: f.write(data))
        return path, kv_path

    def load(self, path: str | os.PathLike) -> str:
        """Replace the conversation with a saved one; restore its KV cache when it belongs to this model file.
        Returns one line saying what was restored. Settings stay as they are."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SessionFileError(f"{path}: cannot read a conversation: {e}") from None
        if not isinstance(doc, dict) or doc.get("format") != FILE_FORMAT:
            raise SessionFileError(f"{path}: not an edgeinfer conversation (no \"format\": \"{FILE_FORMAT}\")")
        messages = doc.get("messages")
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages):
            raise SessionFileError(f"{path}: \"messages\" must be a list of {{\"role\", \"content\"}} strings")
        self.messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        head = 1 if self.system is not None else 0
        first = doc.get("first_in_context", head)
        self.first_in_context = min(max(first if isinstance(first, int) else head, head), len(self.messages))
        what = f"loaded {len(self.messages)} messages from {path}"
        return what + "; " + self._load_kv(path.with_name(path.name + KV_SUFFIX))

    def _load_kv(self, kv_path: Path) -> str:
        if not kv_path.exists():
            return "no saved KV cache: the next turn evaluates the conversation"
        try:
            with np.load(kv_path) as z:
                identity = json.loads(str(z["identity"]))
                tokens, k, v = z["tokens"], z["k"], z["v"]
        except (OSError, ValueError, KeyError) as e:
            return f"KV cache not used ({kv_path.name} unreadable: {e})"
        st = os.stat(self.model.path)
        mine = (Path(self.model.path).name, st.st_size, st.st_mtime_ns)
        if (identity.get("model_file"), identity.get("model_size"), identity.get("model_mtime_ns")) != mine:
            return f"KV cache not used: saved for another model file ({identity.get('model_file')})"
        # Keys and values depend on absolute positions only, not on n_ctx: a prefix that fits is valid as it is.
        n = min(len(tokens), self.model.n_ctx)
        with self.model._use() as cached:
            if not cached.engine.cache.restore(0, tokens[:n], k[:, :n], v[:, :n]):
                return "KV cache not used: its shapes do not match this model"
        return f"KV cache restored ({n} tokens: no re-evaluation)"


def _check_settings(settings: dict) -> None:
    """InvalidArgument (a ValueError) unless every name is a setting, max_tokens a positive integer and the rest
    valid SamplingParams; TypeError for a value of the wrong kind."""
    unknown = set(settings) - set(SETTINGS)
    if unknown:
        raise InvalidArgument(f"unknown setting {sorted(unknown)[0]!r} (known: {', '.join(SETTINGS)})")
    max_tokens = settings.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise TypeError(f"max_tokens must be an int, not {type(max_tokens).__name__}")
    if max_tokens < 1:
        raise InvalidArgument(f"max_tokens must be a positive integer, got {max_tokens!r}")
    check_speculation(settings.get("speculative", "off"))
    SamplingParams(**{k: v for k, v in settings.items() if k not in ("max_tokens", "speculative")})


def _turns(n: int) -> str:
    return f"{n} turn" + ("" if n == 1 else "s")


def _write_atomic(path: Path, write: Callable) -> None:
    """Write through `write(file)` to a temporary file beside `path`, fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
