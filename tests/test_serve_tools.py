"""Tool calls through `edgeinfer serve` with the real `openai` client, on Qwen2.5 (whose template supports tools):
a call with arguments that follow the schema, plain text when no tool fits, a forced function, a streamed call,
and the tool's answer fed back."""
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cli_helpers import EDGEINFER
from conftest import model_path

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")
pytestmark = pytest.mark.slow

MODEL = "qwen2.5-coder-0.5b-instruct"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two numbers",
    "parameters": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                   "required": ["a", "b"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def client():
    argv = [EDGEINFER] if EDGEINFER else [sys.executable, "-m", "edgeinfer.cli"]
    proc = subprocess.Popen([*argv, "serve", str(model_path(MODEL)), "--port", "0", "--parallel", "1", "--ctx",
                             "1024", "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while not (match := re.search(r"listening on (http://\S+)", seen[-1] if seen else "")):
        seen.append(proc.stdout.readline())
        assert seen[-1], "".join(seen)
    url = match.group(1)
    threading.Thread(target=lambda: seen.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 240
    while httpx.get(url + "/health").status_code != 200:
        assert proc.poll() is None and time.time() < deadline, "".join(seen)
        time.sleep(0.2)
    yield openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=300)
    proc.terminate()
    assert proc.wait(60) == 0, "".join(seen)


def ask(client, content, **kwargs):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                          **{"tools": [WEATHER, ADD], "temperature": 0, "max_tokens": 60, **kwargs})


def test_tool_call_then_the_answer_fed_back(client):
    out = ask(client, "What is the weather in Paris?")
    assert out.choices[0].finish_reason == "tool_calls" and out.choices[0].message.content is None
    call = out.choices[0].message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert arguments["city"] == "Paris" and set(arguments) <= {"city", "unit"}
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature_c": 18})}]
    again = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER, ADD], temperature=0,
                                           max_tokens=40)
    assert again.choices[0].finish_reason in ("stop", "tool_calls", "length")
    assert again.usage.prompt_tokens_details.cached_tokens > 100  # the tools' system prompt and the question


def test_plain_text_when_no_tool_fits(client):
    out = ask(client, "Hello! How are you?", max_tokens=30)
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content
    assert out.choices[0].finish_reason in ("stop", "length")


def test_forced_function_and_streamed_call(client):
    out = ask(client, "What is 2 plus 3?", tool_choice={"type": "function", "function": {"name": "add"}})
    call = out.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and json.loads(call.function.arguments) == {"a": 2, "b": 3}
    chunks = list(ask(client, "Weather in Rome?", tool_choice="required", stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert len(deltas) == 1 and deltas[0][0].function.name == "get_weather"
    assert json.loads(deltas[0][0].function.arguments)["city"] == "Rome"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        ask(client, "hi", tool_choice={"type": "function", "function": {"name": "nope"}})
