"""OpenAI request parsing (no model): what is accepted, what is refused with which parameter named (InvalidRequest,
an InvalidArgument; the server's 400 body names the same parameter)."""
import pytest

from edgeinfer.errors import InvalidArgument
from edgeinfer.serve.openai_schema import APIError, InvalidRequest, parse_chat_request, parse_completion_request
from edgeinfer.serve.tools import parse_tool_calls, parse_tools


def chat_body(**fields):
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}


def test_chat_fields_and_defaults():
    gen = parse_chat_request(chat_body(max_completion_tokens=7, temperature=0, top_p=0.5, seed=3, stop="\n",
                                       presence_penalty=0.5, user="u1", logprobs=True, top_logprobs=2,
                                       stream=True, stream_options={"include_usage": True},
                                       unknown_field=[1, 2], response_format={"type": "text"}))
    assert gen.max_tokens == 7 and gen.stop == ["\n"] and gen.stream and gen.include_usage
    assert gen.sampling.temperature == 0 and gen.sampling.top_p == 0.5 and gen.sampling.seed == 3
    assert gen.sampling.presence_penalty == 0.5 and gen.top_logprobs == 2
    plain = parse_chat_request(chat_body())
    assert plain.max_tokens is None and plain.top_logprobs is None and not plain.include_usage
    assert plain.sampling.top_k == 40 and plain.sampling.temperature == 0.8  # llama.cpp's defaults


def test_message_contents_text_parts_and_roles():
    gen = parse_chat_request({"messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
        {"role": "assistant", "content": None}]})
    assert gen.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
                            {"role": "assistant", "content": ""}]


@pytest.mark.parametrize("fields, param, fragment", [
    ({"temperature": "hot"}, "temperature", "a number"),
    ({"temperature": 3}, "temperature", "between 0 and 2"),
    ({"max_tokens": -1}, "max_tokens", ">= 0"),
    ({"max_tokens": True}, "max_tokens", "an integer"),
    ({"n": 2}, "n", "must be 1"),
    ({"stop": ["a", 1]}, "stop", "array of strings"),
    ({"stop": list("abcde")}, "stop", "at most 4"),
    ({"stream_options": "yes", "stream": True}, "stream_options", "an object"),
    ({"top_logprobs": 2}, "top_logprobs", "needs 'logprobs'"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"functions": [{"name": "f"}]}, "functions", "use 'tools'"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}]},
     "messages[0].tool_calls[0]", "function"),
    ({"response_format": {"type": "xml"}}, "response_format", "'json_schema'"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 3}}}, "response_format.json_schema",
     "'schema' object"),
    ({"messages": []}, "messages", "non-empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role", "one of"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]", "only text"),
    ({"model": 3}, "model", "a string"),
    ({"speculative": "fast"}, "speculative", "one of auto, ngram, draft, off"),
])
def test_bad_chat_fields_name_the_parameter(fields, param, fragment):
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(chat_body(**fields))
    assert isinstance(info.value, InvalidArgument) and info.value.param == param and fragment in str(info.value)
    answer = APIError.invalid(info.value)
    assert answer.status == 400 and answer.body()["error"]["param"] == param
    assert answer.body()["error"]["type"] == "invalid_request_error" and fragment in answer.body()["error"]["message"]


def test_completion_prompts():
    assert parse_completion_request({"prompt": "abc"}).max_tokens == 16  # OpenAI's default for completions
    assert parse_completion_request({"prompt": ["abc"]}).prompt == "abc"
    assert parse_completion_request({"prompt": [1, 2, 3], "logprobs": 2}).top_logprobs == 2
    for bad in ({"prompt": ["a", "b"]}, {"prompt": ""}, {"prompt": None}, {"prompt": "a", "logprobs": 6},
                {"prompt": "a", "echo": True}, "just a string"):
        with pytest.raises(InvalidRequest):
            parse_completion_request(bad)


def test_tools_and_tool_choice():
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assert parse_tools({"tools": [weather]}).choice == "auto"
    assert parse_tools({"tools": [weather], "tool_choice": "none"}) is None
    forced = parse_tools({"tools": [weather], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert forced.choice == "required" and forced.forced == "get_weather"
    for bad, param in (({"tools": [weather], "tool_choice": {"function": {"name": "x"}}}, "tool_choice"),
                       ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
                       ({"tools": [weather, weather]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
                       ({"tools": "x"}, "tools")):
        with pytest.raises(InvalidRequest) as info:
            parse_tools(bad)
        assert info.value.param == param


def test_tool_calls_are_parsed_from_the_markup_or_a_whole_json_answer():
    content, calls = parse_tool_calls('Let me check.\n<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>',
                                      ["f"])
    assert content == "Let me check." and calls[0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    assert parse_tool_calls('```json\n{"name": "f", "arguments": {}}\n```', ["f"])[0] is None
    assert parse_tool_calls('{"name": "g", "arguments": {}}', ["f"]) == ('{"name": "g", "arguments": {}}', [])
    assert parse_tool_calls("<tool_call>\n{\"name\": \"f\", \"argu", ["f"])[1] == []  # cut by max_tokens
