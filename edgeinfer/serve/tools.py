"""Tool calls: `tools` rendered through the model's own chat template, the model's tool-call markup parsed into
OpenAI's `tool_calls`, and each call's arguments constrained to its tool's parameter schema.

The markup is the one Qwen2.5's template (and Hermes-style templates) asks for: `<tool_call>\\n{"name": ...,
"arguments": {...}}\\n</tool_call>`. A template supports tools when rendering a probe tool shows both the tool and
that markup; otherwise tools are refused (InvalidRequest: a 400 from the server). The output is constrained with an
llguidance grammar: with tool_choice "auto" either plain text (which never starts a `<tool_call>`) or tool calls;
with "required" or a named function only calls (of that function).
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from edgeinfer.serve.openai_schema import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PROBE = "edgeinfer_probe_function"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's rule for function names


@dataclass
class ToolRequest:
    """The tools of a request, checked: OpenAI's tool dicts, tool_choice "auto" / "required" and the function it
    names (None: any)."""

    tools: list[dict]
    choice: str
    forced: str | None = None

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]


def parse_tools(body: dict) -> ToolRequest | None:
    """The request's tools, or None where there are none or tool_choice is "none"."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise InvalidRequest("'tool_choice' needs 'tools'", param="tool_choice")
        return None
    if not isinstance(tools, list):
        raise InvalidRequest("'tools' must be an array of {\"type\": \"function\", \"function\": {...}}", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function,
                                                                                                     dict):
            raise InvalidRequest(f"'tools[{i}]' must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                                 param=f"tools[{i}]")
        if not isinstance(function.get("name"), str) or not _NAME.match(function["name"]):
            raise InvalidRequest(f"'tools[{i}].function.name' must be 1 to 64 letters, digits, '_', '.' or '-'",
                                 param=f"tools[{i}].function.name")
        if not isinstance(function.get("parameters", {}), dict):
            raise InvalidRequest(f"'tools[{i}].function.parameters' must be a JSON schema object",
                                 param=f"tools[{i}].function.parameters")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise InvalidRequest("'tools' has two functions of the same name", param="tools")
    if choice is None or choice == "auto":
        return ToolRequest(tools, "auto")
    if choice == "none":
        return None
    if choice == "required":
        return ToolRequest(tools, "required")
    forced = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(forced, str) or forced not in names:
        raise InvalidRequest("'tool_choice' must be 'none', 'auto', 'required' or {\"type\": \"function\", "
                             "\"function\": {\"name\": NAME}} naming one of 'tools'", param="tool_choice")
    return ToolRequest(tools, "required", forced)


def template_supports_tools(template) -> bool:
    """Whether the chat template renders tools and asks for the <tool_call> markup."""
    probe = [{"type": "function", "function": {"name": _PROBE, "description": "probe", "parameters": {}}}]
    try:
        text = template.render([{"role": "user", "content": "x"}], tools=probe)
    except Exception:  # noqa: BLE001 (a template that fails with tools does not support them)
        return False
    return _PROBE in text and OPEN in text


class TemplateWithTools:
    """A chat template that renders every conversation with `tools` (what edgeinfer.api.tokenize_chat calls)."""

    def __init__(self, template, tools: list[dict]):
        self.template, self.tools = template, tools

    @property
    def renders_bos(self) -> bool:
        return self.template.renders_bos

    def render(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        return self.template.render(messages, add_generation_prompt=add_generation_prompt, tools=self.tools)


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates expect them: an assistant's tool_calls with `arguments` as an object (OpenAI
    sends a JSON string; Qwen's template writes it with tojson)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": _arguments_object(
                c["function"].get("arguments"))}} for c in calls]}
        out.append(m)
    return out


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def tool_call_grammar(request: ToolRequest) -> str:
    """The llguidance (lark) grammar of the answer: tool calls whose arguments follow their schemas; with
    choice "auto", or else plain text that does not start a tool call."""
    import llguidance

    names = [request.forced] if request.forced else request.names
    by_name = {t["function"]["name"]: t["function"] for t in request.tools}
    call = {"anyOf": [{"type": "object", "properties": {
        "name": {"const": name}, "arguments": by_name[name].get("parameters") or {"type": "object"}},
        "required": ["name", "arguments"], "additionalProperties": False} for name in names]}
    calls = 'calls: (TOOL_OPEN call TOOL_CLOSE)+\nTOOL_OPEN: "<tool_call>\\n"\nTOOL_CLOSE: "\\n</tool_call>"\n'
    rules = f"call: %json {json.dumps(call)}\n"
    if request.choice == "auto":
        # small models often write the call without its tags, bare or in a ```json fence: those are calls too
        # (constrained alike); text is anything that starts otherwise
        start = ('start: TEXT | calls | call | FENCE_OPEN call FENCE_CLOSE\n'
                 'FENCE_OPEN: "```json\\n"\nFENCE_CLOSE: "\\n```"\n'
                 'TEXT: /(?s:.+)/ & ~/(?s:(<tool_call>|[ \\n]*\\{|```json).*)/\n')
    else:
        start = "start: calls\n"
    return llguidance.LLMatcher.grammar_from_lark(start + calls + rules)


def parse_tool_calls(text: str, names: list[str]) -> tuple[str | None, list[dict]]:
    """(the content outside tool calls, None if empty; OpenAI tool_calls) of a generated text: <tool_call> blocks,
    or a whole answer that is one call of a known function, bare or in a ```json fence. A call whose JSON does not
    parse (cut by max_tokens) stays in the content."""
    calls, kept, at = [], [], 0
    for match in _CALL.finditer(text):
        call = _call(match.group(1), names)
        if call is None:
            continue
        kept.append(text[at:match.start()])
        at = match.end()
        calls.append(call)
    kept.append(text[at:])
    content = "".join(kept).strip()
    if not calls:
        bare = _call(_FENCE.sub(r"\1", content), names)
        if bare is not None:
            return None, [bare]
    return (content or None), calls


_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def _call(source: str, names: list[str]) -> dict | None:
    """OpenAI's tool call for '{"name": ..., "arguments": {...}}' naming one of `names`; None otherwise."""
    try:
        call = json.loads(source)
    except ValueError:
        return None
    if not isinstance(call, dict) or call.get("name") not in names or not isinstance(call.get("arguments", {}),
                                                                                        dict):
        return None
    return {"id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": call["name"], "arguments": json.dumps(call.get("arguments", {}),
                                                                       ensure_ascii=False)}}
