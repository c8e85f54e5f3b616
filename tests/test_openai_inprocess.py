"""OpenAI's API in-process (Model.create_chat_completion, create_completion, generate(json_schema=...)): the same
answers and chunks as the HTTP app over the same model (starlette's TestClient), the same errors naming the field,
JSON that parses and validates, and the model still usable for plain generation afterwards."""
import json

import pytest
from starlette.testclient import TestClient

from conftest import model_path
from edgeinfer.errors import InvalidArgument
from edgeinfer.serve.app import Served, ServerState, create_app
from edgeinfer.serve.openai_schema import InvalidRequest
from edgeinfer.serve.scheduler import Scheduler

pytestmark = pytest.mark.slow

MESSAGES = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name three colours."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "pets": {"type": "array", "items": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                                         "name": {"type": "string"}},
                                        "required": ["kind", "name"], "additionalProperties": False},
             "maxItems": 3}},  # bounded, so the grammar (not max_tokens) ends every sample
    "required": ["name", "age", "pets"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model():
    import edgeinfer

    # n_seq=2: sequence 0 is the in-process API's, sequence 1 the HTTP app's scheduler slot
    with edgeinfer.load(model_path("smollm2-135m-instruct"), n_ctx=512, n_threads=1, n_seq=2) as m:
        yield m


@pytest.fixture(scope="module")
def http(model):
    """The HTTP app over the same model; the tests call it and the in-process API one after the other, never at
    once (the scheduler's thread and sequence 0 share the engine)."""
    from edgeinfer.serve.in_process import openai_model

    scheduler = Scheduler(model.engine, model.tokenizer, n_slots=1).start()
    api = openai_model(model)
    try:
        yield TestClient(create_app(ServerState(served=Served(model, scheduler, api.model_id, api.aliases))))
    finally:
        scheduler.close()


def comparable(answer: dict) -> dict:
    """An answer without what differs between two calls: id, creation time, cached prompt tokens."""
    out = {k: v for k, v in answer.items() if k not in ("id", "created")}
    if out.get("usage"):
        out["usage"] = {k: v for k, v in out["usage"].items() if k != "prompt_tokens_details"}
    return out


def sse_chunks(response) -> list[dict]:
    lines = [line for line in response.text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_chat_answers_and_chunks_equal_the_servers(model, http):
    body = {"messages": MESSAGES, "temperature": 0, "max_tokens": 12, "logprobs": True, "top_logprobs": 2,
            "stop": ["\n\n"], "model": "smollm2-135m-instruct", "user": "ignored"}
    served = http.post("/v1/chat/completions", json=body)
    assert served.status_code == 200
    here = model.create_chat_completion(**body)
    assert here["object"] == "chat.completion" and here["id"].startswith("chatcmpl-")
    assert comparable(here) == comparable(served.json())
    assert len(here["choices"][0]["logprobs"]["content"]) == here["usage"]["completion_tokens"]

    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    chunks_http = sse_chunks(http.post("/v1/chat/completions", json=streamed))
    chunks = list(model.create_chat_completion(**streamed))
    assert [comparable(c) for c in chunks] == [comparable(c) for c in chunks_http]
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"] == []
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1])
    assert text == here["choices"][0]["message"]["content"]
    # the same conversation again: the model's cache holds its prompt, as the server's slot does
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1


def test_completion_equals_the_servers_and_the_model_stays_usable(model, http):
    body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "logprobs": 1}
    here = model.create_completion(**body)
    assert comparable(here) == comparable(http.post("/v1/completions", json=body).json())
    assert here["object"] == "text_completion" and here["choices"][0]["logprobs"]["tokens"]
    alone = model.generate(body["prompt"], max_tokens=6, temperature=0)
    assert here["choices"][0]["text"] == alone
    abandoned = model.create_chat_completion(MESSAGES, stream=True, max_tokens=30, temperature=0)
    next(abandoned), next(abandoned)
    abandoned.close()
    assert model.generate(body["prompt"], max_tokens=6, temperature=0) == alone


def valid_person(value) -> bool:
    """PERSON's rules, checked by hand (jsonschema is not a dependency)."""
    return (isinstance(value, dict) and set(value) == {"name", "age", "pets"} and isinstance(value["name"], str)
            and isinstance(value["age"], int) and isinstance(value["pets"], list) and len(value["pets"]) <= 3
            and all(isinstance(p, dict) and set(p) == {"kind", "name"} and p["kind"] in ("cat", "dog")
                    and isinstance(p["name"], str) for p in value["pets"]))


def test_json_schema_output_parses_and_validates(model):
    pytest.importorskip("llguidance")
    for seed in (1, 2):
        text = model.generate("A person and their pets, as JSON:", json_schema=PERSON, max_tokens=80,
                              temperature=0.8, seed=seed)
        assert valid_person(json.loads(text)), text
    assert model.last_stats.stop_reason == "eog"  # the grammar ended it, not max_tokens
    answer = model.create_chat_completion(MESSAGES[1:], max_tokens=80, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert valid_person(json.loads(answer["choices"][0]["message"]["content"]))
    with pytest.raises(InvalidArgument, match="json_schema"):
        model.generate("x", json_schema="not a schema")


def test_bad_fields_raise_invalid_request_naming_them_as_the_server_does(model, http):
    for fields, param in (({"temperature": "hot"}, "temperature"), ({"n": 2}, "n"),
                          ({"model": "gpt-4o"}, "model"), ({"max_tokens": 10_000}, "messages"),
                          ({"tool_choice": "required"}, "tool_choice")):
        with pytest.raises(InvalidRequest) as info:
            model.create_chat_completion(MESSAGES, **fields)
        assert isinstance(info.value, InvalidArgument) and info.value.param == param
        error = http.post("/v1/chat/completions", json={"messages": MESSAGES, **fields})
        assert error.status_code == 400 and error.json()["error"]["param"] == param
        assert error.json()["error"]["message"] == str(info.value)
    with pytest.raises(InvalidRequest, match="'messages'"):
        model.create_chat_completion([], stream=True)  # checked at the call, before the first chunk
    with pytest.raises(InvalidRequest, match="token id 999999"):
        model.create_completion([1, 999999])


def test_tool_call_on_qwen():
    """One request with tools (Qwen2.5's template supports them): the call parsed out, arguments per the schema."""
    pytest.importorskip("llguidance")
    import edgeinfer

    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}
    with edgeinfer.load(model_path("qwen2.5-coder-0.5b-instruct"), n_ctx=512, n_threads=1) as qwen:
        answer = qwen.create_chat_completion([{"role": "user", "content": "What is the weather in Paris?"}],
                                             tools=[weather], temperature=0, max_tokens=40)
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_the_in_process_api_does_not_load_the_http_stack():
    import subprocess
    import sys

    check = ("import sys, edgeinfer.serve.in_process; "
             "sys.exit('starlette' in sys.modules or 'uvicorn' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


def test_a_request_names_its_own_speculation_over_http(http):
    """`speculative` in the body (our extension) is that request's mode: greedy prompt lookup answers as plain
    decoding does; "draft" with no draft model loaded is a 400 naming the field."""
    body = {"messages": [{"role": "user", "content": "Repeat exactly: one two three four five six seven."}],
            "max_tokens": 24, "temperature": 0}
    plain = http.post("/v1/chat/completions", json={**body, "speculative": "off"}).json()
    guessed = http.post("/v1/chat/completions", json={**body, "speculative": "ngram"}).json()
    assert guessed["choices"] == plain["choices"]
    refused = http.post("/v1/chat/completions", json={**body, "speculative": "draft"})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "speculative"
    assert "draft model" in refused.json()["error"]["message"]
