"""Chat templates: turn a conversation into prompt text with the model's own Jinja template, run in a sandbox.

A GGUF file carries its template as `tokenizer.chat_template` (Hugging Face's Jinja format). The template is untrusted
code from a downloaded file, so it runs in Jinja's `ImmutableSandboxedEnvironment` (no dunder access, no mutating
methods, bounded `range`) with sequence repetition, powers and the prompt's length capped, and every failure (sandbox
violation, syntax error, undefined variable, the template's own `raise_exception`) becomes one `TemplateError` line
naming the template.

The globals and filters mirror what Hugging Face's `apply_chat_template` provides (`raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape, `{% break %}`/`{% continue %}`), so templates written for transformers render
the same here.
Files without a template (the Gemma 3 270M GGUF has none) fall back to a built-in one chosen by architecture, in the
format llama.cpp's built-in templates use (`src/llama-chat.cpp`).

The rendered text contains special tokens as text (`<|im_start|>`, and `<bos>` where the template writes
`{{ bos_token }}`): tokenize it with special-token parsing on, and add a BOS only when `renders_bos` is False.
"""
from __future__ import annotations

import json
import operator
from datetime import datetime
from typing import Any, Callable, Mapping

from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edgeinfer.errors import TemplateError

# ChatML, as llama.cpp's LLM_CHAT_TEMPLATE_CHATML: no BOS, every role verbatim.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

# Gemma's turn format, as llama.cpp's LLM_CHAT_TEMPLATE_GEMMA: there is no system role, so system text (trimmed,
# concatenated) opens the next non-model turn followed by a blank line; "assistant" is "model"; contents are trimmed.
# Unlike llama.cpp's (which adds BOS while tokenizing) it writes the BOS itself, as Gemma's own HF template does.
GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] | trim -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\\n' }}"
    "{%- if ns.system and role != 'model' -%}{{ ns.system + '\\n\\n' }}{%- set ns.system = '' -%}{%- endif -%}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

# general.architecture -> built-in template for files without tokenizer.chat_template; anything else gets ChatML
BUILTIN_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}

# caps on what a template may build (`'x' * 10**10`, `2 ** 10**9`, nested loops printing) before memory runs out;
# the prompt cap is far beyond any context window (about 4 characters a token). Loops that print nothing are not capped.
MAX_REPEAT_ITEMS = 1_000_000
MAX_POWER_BITS = 100_000
MAX_PROMPT_CHARS = 16_000_000


class _RaisedByTemplate(Exception):
    """The template called raise_exception(message): its author's own error, passed on verbatim."""


def _raise_exception(message: Any = "") -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    """The local time now, formatted (Llama 3 style templates print today's date)."""
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping of <, >, & and ', as Hugging Face's tojson filter."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _item_count(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, bytes, list, tuple)) else None


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict: unsafe attributes raise at once, and `*`/`**` are size-checked."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str):
        # the stock sandbox returns an Undefined that prints as "" (so `{{ ''.__class__ }}` renders silently)
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        if op == "*":
            for seq, times in ((left, right), (right, left)):
                n = _item_count(seq)
                if n is not None and isinstance(times, int) and n * times > MAX_REPEAT_ITEMS:
                    raise SecurityError(f"repeating a sequence of length {n} {times} times is too large")
            return operator.mul(left, right)
        if isinstance(left, int) and isinstance(right, int) and right > 0:
            if max(left.bit_length(), 1) * right > MAX_POWER_BITS:
                raise SecurityError(f"{left} ** {right} is too large")
        return operator.pow(left, right)


def _make_environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, loader=None, autoescape=False,
                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


def _template_line(exc: BaseException) -> int | None:
    """The template line a runtime error happened on (Jinja maps its traceback frames back to template lines)."""
    line, tb = None, exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


class ChatTemplate:
    """A compiled, sandboxed chat template and the BOS/EOS strings it may write.

    `source` is the Jinja text (e.g. GGUF `tokenizer.chat_template`); `name` appears in every error message.
    Raises TemplateError if the source does not compile.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "", name: str = "gguf"):
        if not isinstance(source, str):
            raise TemplateError(f"chat template {name}: expected text, found {type(source).__name__}")
        self.source, self.bos_token, self.eos_token, self.name = source, bos_token, eos_token, name
        self._renders_bos: bool | None = None
        try:
            self._template = _make_environment().from_string(source)
        except TemplateSyntaxError as e:
            raise self._error(f"syntax error: {e.message}", e.lineno) from None
        except Exception as e:  # the parser can fail in other ways on hostile input (e.g. recursion depth)
            raise self._error(f"does not compile: {type(e).__name__}: {e}") from None

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], token_text: Callable[[int], str] | None = None,
                      architecture: str | None = None) -> "ChatTemplate":
        """The template a GGUF file's metadata asks for, or the built-in one for its architecture if it has none.

        BOS/EOS strings come from `tokenizer.ggml.bos_token_id` / `eos_token_id`, looked up with `token_text(id)` or,
        without it, in `tokenizer.ggml.tokens`; a missing id gives "". `architecture` defaults to
        `general.architecture` and only matters for the fallback (gemma* -> Gemma turns, otherwise ChatML).
        """
        bos = _special_token_text(meta, "tokenizer.ggml.bos_token_id", token_text)
        eos = _special_token_text(meta, "tokenizer.ggml.eos_token_id", token_text)
        source = meta.get("tokenizer.chat_template")
        if source is not None:
            return cls(source, bos_token=bos, eos_token=eos, name=str(meta.get("general.name") or "gguf"))
        arch = architecture or meta.get("general.architecture") or ""
        if arch in BUILTIN_TEMPLATES:
            return cls(BUILTIN_TEMPLATES[arch], bos_token=bos, eos_token=eos, name=f"built-in {arch}")
        return cls(CHATML_TEMPLATE, bos_token=bos, eos_token=eos, name="built-in chatml")

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True, tools=None, **extra) -> str:
        """Prompt text for `messages` ([{"role": ..., "content": ...}, ...]).

        `add_generation_prompt` appends the opening of the assistant's turn; `tools` (JSON-schema dicts) and `extra`
        (e.g. `enable_thinking`, `date_string`) are passed to the template as variables. Raises TemplateError.
        """
        context = dict(extra, messages=messages, bos_token=self.bos_token, eos_token=self.eos_token,
                       add_generation_prompt=add_generation_prompt, tools=tools)
        try:
            pieces, size = [], 0
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_PROMPT_CHARS:
                    raise SecurityError(f"the prompt grows past {MAX_PROMPT_CHARS} characters")
                pieces.append(piece)
            return "".join(pieces)
        except _RaisedByTemplate as e:
            raise self._error(f"raised: {e}", _template_line(e)) from None
        except SecurityError as e:
            raise self._error(f"forbidden by the sandbox: {e}", _template_line(e)) from None
        except UndefinedError as e:
            raise self._error(f"undefined: {e}", _template_line(e)) from None
        except Exception as e:  # untrusted code: a TypeError or ZeroDivisionError is its fault, reported the same way
            raise self._error(f"failed: {type(e).__name__}: {e}", _template_line(e)) from None

    @property
    def renders_bos(self) -> bool:
        """Whether the rendered text of a one-message conversation starts with the BOS string.

        True means the prompt already holds the BOS token (Gemma's `{{ bos_token }}`, or SmolLM2 whose BOS is
        `<|im_start|>`), so the caller must tokenize it without adding another.
        """
        if self._renders_bos is None:
            text = self.render([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
            self._renders_bos = bool(self.bos_token) and text.startswith(self.bos_token)
        return self._renders_bos

    def _error(self, problem: str, line: int | None = None) -> TemplateError:
        where = f", line {line}" if line is not None else ""
        return TemplateError(f"chat template {self.name}{where}: {_one_line(problem)}")

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r}, {len(self.source)} chars)"


def _special_token_text(meta: Mapping[str, Any], key: str, token_text: Callable[[int], str] | None) -> str:
    token_id = meta.get(key)
    if token_id is None:
        return ""
    if token_text is not None:
        return token_text(int(token_id))
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is None:
        return ""
    if not 0 <= int(token_id) < len(tokens):
        raise TemplateError(f"{key} = {token_id} is outside the vocabulary ({len(tokens)} tokens)")
    return tokens[int(token_id)]
