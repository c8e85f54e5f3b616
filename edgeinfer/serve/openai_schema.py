"""OpenAI's request and response shapes: parsing and checking request bodies, building responses and chunks.

Parsing is strict about the fields we use (a wrong type or a value out of range is an `InvalidRequest` naming the
parameter: the server answers it with status 400 in OpenAI's error shape, the Python API raises it) and ignores
unknown fields, as OpenAI's clients expect. Nothing here touches the model: `edgeinfer.serve.openai_requests`
tokenizes and builds the request.
"""
from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from edgeinfer.errors import InvalidArgument
from edgeinfer.sampling import SamplingParams
from edgeinfer.speculative import SPECULATION_MODES

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # the completions endpoint's logprobs, as OpenAI


class InvalidRequest(InvalidArgument):
    """A request field is missing, of the wrong type or out of range; `param` names it ("messages[0].role"), `code`
    is OpenAI's error code. The server answers it with a 400; `Model.create_chat_completion` raises it."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class APIError(Exception):
    """A request answered with an OpenAI error body {"error": {message, type, param, code}} and `status`."""

    def __init__(self, message: str, status: int = 400, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code = message, status, param, code
        self.type = type or _ERROR_TYPES.get(status, "server_error")
        self.headers = headers or {}

    @classmethod
    def invalid(cls, e: InvalidRequest) -> "APIError":
        """The server's answer to an invalid request: a 400 naming the parameter."""
        return cls(e.message, 400, param=e.param, code=e.code)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
                503: "server_unavailable"}


# ================================================================ field checks

def _type_error(name: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(f"'{name}' must be {expected}, not {_json_type(value)}", param=name, code="invalid_type")


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _number(body: dict, name: str, default, low: float, high: float):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _type_error(name, "a number", value)
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}, got {value}", param=name,
                             code="invalid_value")
    return float(value)


def _integer(body: dict, name: str, default, low: int, high: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an integer", value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        raise InvalidRequest(f"'{name}' must be {bound}, got {value}", param=name, code="invalid_value")
    return value


def _boolean(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _type_error(name, "a boolean", value)
    return value


def _stops(body: dict) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _type_error("stop", "a string or an array of strings", value)
    if len(stops) > MAX_STOP_STRINGS:
        raise InvalidRequest(f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", param="stop")
    return [s for s in stops if s]


# ================================================================ the parsed request

@dataclass
class Generation:
    """What a completion request asks for, checked: sampling, limits, stops, streaming and logprobs."""

    model: str | None
    sampling: SamplingParams
    max_tokens: int | None  # None: as many as the slot's context leaves
    stop: list[str]
    stream: bool
    include_usage: bool
    top_logprobs: int | None  # None: no logprobs
    response_format: dict | None = None  # json_object / json_schema (parse_response_format); None: text
    ignore_eos: bool = False  # llama-server's extension: decode max_tokens whatever the model says
    speculative: str | None = None  # ours: auto/ngram/draft/off for this request; None: the server's --spec
    tools: Any = None  # chat: edgeinfer.serve.tools.ToolRequest, set by the handler
    prompt: Any = None  # completions: a string or token ids
    messages: list[dict] = field(default_factory=list)  # chat


def _generation(body: Any, *, max_tokens_names: tuple[str, ...]) -> dict:
    """The fields both endpoints share."""
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {_json_type(body)}")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _type_error("model", "a string", model)
    n = _integer(body, "n", 1, 1)
    if n != 1:
        raise InvalidRequest(f"'n' must be 1: this server generates one choice per request (got {n})", param="n",
                             code="unsupported_value")
    max_tokens = None
    for name in max_tokens_names:  # max_completion_tokens wins over the deprecated max_tokens
        max_tokens = _integer(body, name, max_tokens, 0)
    seed = _integer(body, "seed", None, -(2 ** 63), 2 ** 64 - 1)
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 0.8, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.95, 0.0, 1.0),
        top_k=int(_integer(body, "top_k", 40, 0)),  # llama-server's extensions, llama.cpp's defaults
        min_p=_number(body, "min_p", 0.05, 0.0, 1.0),
        repeat_penalty=_number(body, "repeat_penalty", 1.0, 0.0, 10.0) or 1.0,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=None if seed is None or seed < 0 else seed % 2 ** 63)
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _type_error("stream_options", "an object", options)
    include_usage = _boolean(options or {}, "include_usage") if stream else False
    if body.get("functions"):
        raise InvalidRequest("'functions' (deprecated) is not supported: use 'tools'", param="functions",
                             code="unsupported_parameter")
    return dict(model=model, sampling=sampling, max_tokens=max_tokens, stop=_stops(body), stream=stream,
                include_usage=include_usage, response_format=parse_response_format(body.get("response_format")),
                ignore_eos=_boolean(body, "ignore_eos"), speculative=_speculative(body))


def _speculative(body: dict) -> str | None:
    """Our extension `speculative`: this request's speculation mode (edgeinfer.speculative), None for the
    server's. Whether "draft" has a draft model to use is the scheduler's to say."""
    value = body.get("speculative")
    if value is None:
        return None
    if value not in SPECULATION_MODES:
        raise InvalidRequest(f"'speculative' must be one of {', '.join(SPECULATION_MODES)}, got {value!r}"[:300],
                             param="speculative", code="invalid_value")
    return value


def parse_response_format(value: Any) -> dict | None:
    """None for plain text, else {"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema"...}}."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return value
    if kind == "json_schema":
        spec = value.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise InvalidRequest("'response_format.json_schema' must be an object with a 'schema' object",
                                 param="response_format.json_schema")
        return value
    raise InvalidRequest("'response_format.type' must be 'text', 'json_object' or 'json_schema'",
                         param="response_format", code="invalid_value")


def parse_chat_request(body: Any) -> Generation:
    """A /v1/chat/completions body, checked."""
    fields = _generation(body, max_tokens_names=("max_tokens", "max_completion_tokens"))
    top = None
    if _boolean(body, "logprobs"):
        top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return Generation(**fields, top_logprobs=top, messages=_messages(body.get("messages")))


def _messages(messages: Any) -> list[dict]:
    """Messages as the chat template takes them: role and string content (text parts joined)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array of messages", param="messages",
                             code="invalid_type" if not isinstance(messages, list) else "invalid_value")
    out = []
    for i, m in enumerate(messages):
        name = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _type_error(name, "an object", m)
        role = m.get("role")
        if not isinstance(role, str) or role not in ("system", "developer", "user", "assistant", "tool"):
            raise InvalidRequest(f"'{name}.role' must be one of system, developer, user, assistant, tool; got "
                                 f"{role!r}"[:300], param=f"{name}.role")
        content = m.get("content")
        calls = m.get("tool_calls") if role == "assistant" else None
        if content is None and role == "assistant":
            content = ""
        elif isinstance(content, list):
            content = "".join(_text_part(part, f"{name}.content[{j}]") for j, part in enumerate(content))
        elif not isinstance(content, str):
            raise _type_error(f"{name}.content", "a string or an array of text parts", content)
        message = {"role": "system" if role == "developer" else role, "content": content}
        if calls:
            message["tool_calls"] = _tool_calls(calls, f"{name}.tool_calls")
        if role == "tool" and isinstance(m.get("tool_call_id"), str):
            message["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            message["name"] = m["name"]
        out.append(message)
    return out


def _tool_calls(calls: Any, name: str) -> list[dict]:
    """An assistant message's tool_calls: [{"id", "type": "function", "function": {"name", "arguments"}}]."""
    if not isinstance(calls, list):
        raise _type_error(name, "an array", calls)
    for i, c in enumerate(calls):
        function = c.get("function") if isinstance(c, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not isinstance(
                function.get("arguments", ""), (str, dict)):
            raise InvalidRequest(f"'{name}[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ..., "
                                 f"\"arguments\": \"...\"}}}}", param=f"{name}[{i}]")
    return calls


def _text_part(part: Any, name: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        kind = part.get("type") if isinstance(part, dict) else None
        if isinstance(kind, str) and kind != "text":
            raise InvalidRequest(f"'{name}' is a {kind!r} part: this model reads only text", param=name,
                                 code="unsupported_value")
        raise InvalidRequest(f"'{name}' must be {{\"type\": \"text\", \"text\": \"...\"}}", param=name)
    return part["text"]


def parse_completion_request(body: Any) -> Generation:
    """A /v1/completions body, checked; `prompt` is a string or a list of token ids."""
    fields = _generation(body, max_tokens_names=("max_tokens",))
    if body.get("tools"):
        raise InvalidRequest("'tools' belong to /v1/chat/completions", param="tools", code="unsupported_parameter")
    if fields["max_tokens"] is None:
        fields["max_tokens"] = 16  # OpenAI's default for completions
    top = _integer(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)
    if _boolean(body, "echo"):
        raise InvalidRequest("'echo' is not supported by this server", param="echo", code="unsupported_parameter")
    if body.get("suffix"):
        raise InvalidRequest("'suffix' is not supported by this server", param="suffix", code="unsupported_parameter")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # one prompt in a batch of one
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        pass
    elif isinstance(prompt, list):
        raise InvalidRequest("'prompt' must be one string or one array of token ids: this server answers one prompt "
                             "per request", param="prompt")
    elif not isinstance(prompt, str) or not prompt:
        raise InvalidRequest("'prompt' must be a non-empty string or an array of token ids", param="prompt",
                             code="invalid_type" if not isinstance(prompt, str) else "invalid_value")
    return Generation(**fields, top_logprobs=top, prompt=prompt)


# ================================================================ responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


@dataclass
class ResponseHead:
    """What every chunk or response of one request repeats: id, object type, creation time, model."""

    id: str
    object: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def wrap(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": choices, **extra}


def chat_logprob(token_text: str, token_bytes: bytes, logprob: float, top: list[tuple[str, bytes, float]]) -> dict:
    """One entry of a chat choice's logprobs.content."""
    return {"token": token_text, "bytes": list(token_bytes), "logprob": logprob,
            "top_logprobs": [{"token": t, "bytes": list(b), "logprob": lp} for t, b, lp in top]}


def models_list(model_id: str, created: int) -> dict:
    return {"object": "list", "data": [model_card(model_id, created)]}


def model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgeinfer"}
