"""Chat templates: turn a conversation into prompt text with the model's own Jinja template, run in a sandbox.

A GGUF file carries its template as `tokenizer.chat_template` (Hugging Face's Jinja format). The template is untrusted
code from a downloaded file, so it runs in Jinja's `ImmutableSandboxedEnvironment` (no dunder access, no mutating
methods, bounded `range`) made strict: a render stops after MAX_RENDER_SECONDS (every loop iteration, call, operator
and attribute access checks the clock, so loops that print nothing stop too), and no value it builds or prints
(repetition, concatenation, joins, padding, formatting, the prompt itself) may exceed MAX_PROMPT_CHARS. Every failure
(sandbox violation, limit, syntax error, undefined variable, the template's own `raise_exception`) becomes one
`TemplateError` line naming the template and the limit.

The globals and filters mirror what Hugging Face's `apply_chat_template` provides (`raise_exception`, `strftime_now`,
a `tojson` that does not HTML-escape, `{% break %}`/`{% continue %}`), so templates written for transformers render
the same here.
Files without a template (the Gemma 3 270M GGUF has none) fall back to a built-in one chosen by architecture, in the
format llama.cpp's built-in templates use (`src/llama-chat.cpp`).

The rendered text contains special tokens as text (`<|im_start|>`, and `<bos>` where the template writes
`{{ bos_token }}`): tokenize it with special-token parsing on, and add a BOS only when `renders_bos` is False.
"""
from __future__ import annotations

import functools
import json
import math
import numbers
import operator
import re
import threading
import time
from datetime import datetime
from typing import Any, Callable, Mapping

from jinja2 import Environment, nodes, pass_eval_context
from jinja2.exceptions import SecurityError, TemplateSyntaxError, UndefinedError
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

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

# limits on a render: its wall time, and the size (characters, or items of a list) of any value it builds or prints;
# the size cap is far beyond any context window (about 4 characters a token)
MAX_RENDER_SECONDS = 2.0
MAX_PROMPT_CHARS = 4_000_000
MAX_POWER_BITS = 100_000  # of an integer built by ** or *
MAX_JSON_INDENT = 64
MAX_NESTING = 200  # levels of lists and dicts in one value (tool schemas nest about ten)


class _RaisedByTemplate(Exception):
    """The template called raise_exception(message): its author's own error, passed on verbatim."""


class _PastLimit(SecurityError):
    """A render ran past its time or built a value past its size limit."""


def _raise_exception(message: Any = "") -> None:
    raise _RaisedByTemplate(str(message))


def _strftime_now(fmt: str) -> str:
    """The local time now, formatted (Llama 3 style templates print today's date)."""
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | str | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping of <, >, & and ', as Hugging Face's tojson filter."""
    if isinstance(indent, (int, str)) and (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT:
        raise _PastLimit(f"tojson indent {indent!r} is past {MAX_JSON_INDENT}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _Deadline(threading.local):
    """When the render running in this thread must stop (time.monotonic(); inf outside a render)."""

    at = math.inf

    def check(self) -> None:
        if time.monotonic() > self.at:
            raise _PastLimit(f"the render ran past its {MAX_RENDER_SECONDS:g} s time limit")


_DEADLINE = _Deadline()


def _size(value: Any, limit: int = MAX_PROMPT_CHARS) -> int:
    """Characters of strings plus items of containers in `value`, through nested containers (a shared one counts
    each time it occurs, as printing would, but is walked once); stops counting a container past `limit`."""
    sizes: dict[int, int] = {}  # id of a container walked already -> its size

    def walk(v: Any, depth: int) -> int:
        if id(v) in sizes:
            return sizes[id(v)]
        if depth > MAX_NESTING:
            raise _PastLimit(f"a value nested deeper than {MAX_NESTING} levels")
        total = 1
        for item in (*v.keys(), *v.values()) if isinstance(v, dict) else v:
            if isinstance(item, (str, bytes, range)):
                total += len(item)
            elif isinstance(item, _CONTAINERS):
                total += walk(item, depth + 1)
            else:
                total += 1
            if total > limit:
                break
        sizes[id(v)] = total
        return total

    if isinstance(value, (str, bytes, range)):
        return len(value)
    return walk(value, 0) if isinstance(value, _CONTAINERS) else 1


_CONTAINERS = (list, tuple, set, frozenset, dict)


def _check_size(n: int, what: str) -> None:
    if n > MAX_PROMPT_CHARS:
        raise _PastLimit(f"{what} would be past {MAX_PROMPT_CHARS:,} characters")


def _check_args(args: tuple, kwargs: dict, what: str) -> None:
    _check_size(sum(_size(a) for a in (*args, *kwargs.values())), what)


# a conversion spec of printf-style (`%-10.3f`) and str.format (`{0:>10}`) formatting, for its width and precision
_PERCENT_SPEC = re.compile(r"%[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_FORMAT_SPEC = re.compile(r"\{[^{}]*:([^{}]*)\}|\{[^{}]*:[^{}]*\{")


def _check_format_string(fmt: str) -> None:
    """Refuse widths and precisions past the size limit, and widths taken from arguments (`%*d`, `{:{w}}`)."""
    for width, precision in _PERCENT_SPEC.findall(fmt):
        for n in (width, precision):
            if n == "*" or (n and int(n) > MAX_PROMPT_CHARS):
                raise _PastLimit(f"format width {n!r} in {fmt[:40]!r} is not allowed")
    for match in _FORMAT_SPEC.finditer(fmt):
        spec = match.group(1)
        if spec is None or any(int(n) > MAX_PROMPT_CHARS for n in re.findall(r"\d+", spec)):
            raise _PastLimit(f"format spec in {fmt[:40]!r} is too wide or nested")


def _check_str_method(s: str, name: str, args: tuple) -> None:
    """Size of the result of `s.name(*args)` for the str methods that can grow a string, checked before the call."""
    arg = args[0] if args else None
    if name in ("center", "ljust", "rjust", "zfill") and isinstance(arg, int):
        _check_size(arg, f"str.{name}({arg})")
    elif name == "expandtabs":
        _check_size(len(s) * (arg if isinstance(arg, int) else 8), "str.expandtabs")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        _check_size(len(s) + (len(s) // max(len(args[0]), 1) + 1) * len(args[1]), "str.replace")
    elif name == "join" and hasattr(arg, "__len__"):
        _check_size(_size(arg) + len(s) * len(arg), "str.join")
    elif name in ("format", "format_map"):
        _check_format_string(s)


def _filter_check(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Size of what the growing filters (padding, joining, replacing, batching, wrapping) would make."""

    def arg(index: int, key: str, default: Any = None) -> Any:
        return args[index] if len(args) > index else kwargs.get(key, default)

    text = value if isinstance(value, str) else None
    if name == "center" and isinstance(arg(0, "width"), int):
        _check_size(arg(0, "width"), "center")
    elif name == "indent" and text is not None:
        width = arg(0, "width", 4)
        _check_size(len(text) + (text.count("\n") + 1) * (len(width) if isinstance(width, str) else int(width)),
                    "indent")
    elif name == "wordwrap" and text is not None and isinstance(arg(2, "wrapstring"), str):
        _check_size(len(text) * (len(arg(2, "wrapstring")) + 1), "wordwrap")
    elif name == "join" and hasattr(value, "__len__") and isinstance(arg(0, "d", ""), str):
        _check_size(_size(value) + len(value) * len(arg(0, "d", "")), "join")
    elif name == "replace" and text is not None and len(args) >= 2:
        _check_str_method(text, "replace", (str(args[0]), str(args[1])))
    elif name in ("batch", "slice") and isinstance(arg(0, "linecount" if name == "batch" else "slices"), int):
        _check_size(arg(0, "linecount" if name == "batch" else "slices"), name)
    elif name == "format" and text is not None:
        _check_format_string(text)


def _bounded_filter(name: str, func: Callable) -> Callable:
    """`func` (a Jinja filter) with the clock, its arguments' size and what it would make checked first."""

    @functools.wraps(func)  # keeps jinja_pass_arg, so Jinja still passes the context where the filter wants it
    def bounded(*args, **kwargs):
        _DEADLINE.check()
        _check_args(args, kwargs, f"the arguments of the {name} filter")
        plain = [a for a in args if not isinstance(a, (Context, EvalContext, Environment))]
        if plain:
            _filter_check(name, plain[0], tuple(plain[1:]), kwargs)
        return func(*args, **kwargs)

    return bounded


_GROWING_FILTERS = ("center", "indent", "join", "replace", "batch", "slice", "format", "sum", "string", "pprint",
                    "tojson", "wordwrap")


class _BoundLoops(NodeTransformer):
    """Rewrites a parsed template so that every `for` iterates through `environment.bounded_iter` (which checks the
    clock at each step) and every `~` concatenation goes through `environment.bounded_concat` (which checks size)."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        node = self.generic_visit(node)
        node.iter = _environment_call("bounded_iter", [node.iter], node.iter.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        node = self.generic_visit(node)
        return _environment_call("bounded_concat", node.nodes, node.lineno)


def _environment_call(method: str, args: list, lineno: int) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(method, lineno=lineno), args, [], None, None, lineno=lineno)


class _ChatSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, made strict: unsafe attributes raise at once; loops, calls, attribute access and
    operators check the render's clock; `*`, `**`, `+`, `%`, `~`, string methods, growing filters and printed values
    are size-checked before they are made."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def _parse(self, source, name, filename):
        return _BoundLoops().visit(super()._parse(source, name, filename))

    def unsafe_undefined(self, obj: Any, attribute: str):
        # the stock sandbox returns an Undefined that prints as "" (so `{{ ''.__class__ }}` renders silently)
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def bounded_iter(self, iterable: Any):
        """The items of a `for` loop's iterable, checking the render's clock before each."""
        for item in iterable:
            _DEADLINE.check()
            yield item

    @pass_eval_context
    def bounded_concat(self, eval_ctx, *parts: Any) -> str:
        """`a ~ b ~ ...`, as Jinja's own concatenation, once the result's size is known to be within the limit."""
        _DEADLINE.check()
        _check_size(sum(_size(p) for p in parts), "a ~ concatenation")
        return (markup_join if eval_ctx.autoescape else str_join)(parts)

    def call(__self, __context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's own naming)
        _DEADLINE.check()
        _check_args(args, kwargs, "the arguments of a call")
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            _check_str_method(owner, getattr(target, "__name__", ""), args)
        return super().call(__context, __obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _DEADLINE.check()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _DEADLINE.check()
        return super().getitem(obj, argument)

    def call_binop(self, context, op: str, left: Any, right: Any) -> Any:
        _DEADLINE.check()
        ints = isinstance(left, int) and isinstance(right, int)
        if op == "*" and not ints:
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(times, int) and times > 1:
                    _check_size(_size(seq) * times, "a repeated sequence")
            return operator.mul(left, right)
        if op == "*":
            if left.bit_length() + right.bit_length() > MAX_POWER_BITS:
                raise SecurityError(f"a product of {left.bit_length()}- and {right.bit_length()}-bit integers "
                                    "is too large")
            return operator.mul(left, right)
        if op == "+":
            if not ints:
                _check_size(_size(left) + _size(right), "a + sum")
            return operator.add(left, right)
        if op == "%":
            if isinstance(left, str):
                _check_format_string(left)
                _check_size(len(left) + _size(right), "a % formatting")
            return operator.mod(left, right)
        if ints and right > 0 and max(left.bit_length(), 1) * right > MAX_POWER_BITS:
            raise SecurityError(f"{left} ** {right} is too large")
        return operator.pow(left, right)


def _finalize(value: Any) -> Any:
    """Every `{{ value }}` before it is printed: its size checked (printing a list prints all it holds)."""
    _check_size(_size(value), "a printed value")
    return value


def _make_environment() -> _ChatSandbox:
    env = _ChatSandbox(trim_blocks=True, lstrip_blocks=True, loader=None, autoescape=False, finalize=_finalize,
                       extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    del env.globals["lipsum"]  # lorem ipsum of n paragraphs: a loop in Python that no check could interrupt
    env.filters["tojson"] = _tojson
    for name in _GROWING_FILTERS:
        env.filters[name] = _bounded_filter(name, env.filters[name])
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
        outer_deadline = _DEADLINE.at
        _DEADLINE.at = time.monotonic() + MAX_RENDER_SECONDS
        try:
            pieces, size = [], 0
            for piece in self._template.generate(**context):
                size += len(piece)
                if size > MAX_PROMPT_CHARS:
                    raise _PastLimit(f"the prompt grows past {MAX_PROMPT_CHARS:,} characters")
                _DEADLINE.check()
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
        finally:
            _DEADLINE.at = outer_deadline

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
    tokens = meta.get("tokenizer.ggml.tokens")
    n_tokens = len(tokens) if isinstance(tokens, (list, tuple)) else None
    if not isinstance(token_id, numbers.Integral) or isinstance(token_id, bool) \
            or not 0 <= token_id < (n_tokens or 2 ** 63):
        where = f" ({n_tokens} tokens)" if n_tokens is not None else ""
        raise TemplateError(f"{key} = {token_id!r} is not a token id of the vocabulary{where}")
    token_id = int(token_id)
    if token_text is not None:
        return token_text(token_id)
    return tokens[token_id] if n_tokens is not None else ""
