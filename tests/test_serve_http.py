"""`edgeinfer serve` as a real process on a free port, driven with the real `openai` client (and httpx for what a
client library would never send). One server for the module; the last test stops it with SIGTERM."""
import json
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from cli_helpers import EDGEINFER, assert_one_error_line, run_edgeinfer
from conftest import model_path

openai = pytest.importorskip("openai")

API_KEY = "test-key"
CTX = 768
pytestmark = pytest.mark.slow


class Server:
    def __init__(self, proc: subprocess.Popen, url: str):
        self.proc, self.url, self.output = proc, url, []

    def http(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"},
                            **kwargs)


@pytest.fixture(scope="module")
def server():
    argv = [EDGEINFER] if EDGEINFER else [sys.executable, "-m", "edgeinfer.cli"]
    proc = subprocess.Popen([*argv, "serve", str(model_path("smollm2-135m-instruct")), "--port", "0",
                             "--parallel", "3", "--ctx", str(CTX), "--threads", "1", "--api-key", API_KEY,
                             "--drain", "10"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    while not (match := re.search(r"listening on (http://\S+)", seen[-1] if seen else "")):
        seen.append(proc.stdout.readline())
        assert seen[-1], "".join(seen)  # the process ended before listening
    s = Server(proc, match.group(1))
    threading.Thread(target=lambda: s.output.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + 240
    while True:
        assert proc.poll() is None, "".join(s.output)
        status = httpx.get(s.url + "/health").status_code
        if status == 200:
            break
        assert status == 503 and time.time() < deadline
        time.sleep(0.2)
    yield s
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def chat(client, content, **kwargs):
    return client.chat.completions.create(model="smollm2-135m-instruct", messages=[{"role": "user",
                                          "content": content}], **{"temperature": 0, "max_tokens": 16, **kwargs})


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    assert client.models.retrieve("SmolLM2-135M-Instruct.Q4_1.gguf").id == "smollm2-135m-instruct"  # file name
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["slots_idle"] + health["slots_processing"] == 3


def test_chat_non_streaming_and_streaming_agree(client):
    whole = chat(client, "Name three colours.", max_tokens=24)
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.choices[0].message.content
    assert whole.usage.completion_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    chunks = list(chat(client, "Name three colours.", max_tokens=24, stream=True,
                       stream_options={"include_usage": True}))
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content


def test_sse_wire_format_ends_with_done(server):
    with server.http() as http:
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], "max_tokens": 3,
                "stream": True, "temperature": 0, "some_unknown_field": {"x": 1}}
        lines = [line for line in http.post("/v1/chat/completions", json=body).text.split("\n") if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_stop_strings_and_max_tokens(client):
    free = chat(client, "Count from 1 to 10, separated by commas.", max_tokens=40).choices[0].message.content
    assert "," in free
    cut = free.index(",")
    stopped = chat(client, "Count from 1 to 10, separated by commas.", max_tokens=40, stop=[","])
    assert stopped.choices[0].message.content == free[:cut] and stopped.choices[0].finish_reason == "stop"
    short = chat(client, "Count from 1 to 10.", max_completion_tokens=2)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_seed_reproduces_a_sampled_answer(client):
    a, b = (chat(client, "Write a word.", temperature=1.0, seed=1234, max_tokens=12).choices[0].message.content
            for _ in range(2))
    assert a == b


def test_logprobs(client):
    out = chat(client, "The capital of France is", max_tokens=4, logprobs=True, top_logprobs=3)
    entries = out.choices[0].logprobs.content
    assert len(entries) == out.usage.completion_tokens
    for e in entries:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy takes the most likely
        assert [t.logprob for t in e.top_logprobs] == sorted((t.logprob for t in e.top_logprobs), reverse=True)
    assert "".join(e.token for e in entries) == out.choices[0].message.content
    legacy = client.completions.create(model="smollm2-135m-instruct", prompt="The capital of France is",
                                       max_tokens=3, temperature=0, logprobs=2)
    lp = legacy.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 3
    assert all(len(top) <= 2 for top in lp.top_logprobs) and lp.text_offset[0] == 0


def test_completions_endpoint(client):
    out = client.completions.create(model="smollm2-135m-instruct", prompt="1, 2, 3, 4,", max_tokens=6,
                                    temperature=0)
    assert out.object == "text_completion" and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 6 and out.choices[0].text
    pieces = list(client.completions.create(model="smollm2-135m-instruct", prompt="1, 2, 3, 4,", max_tokens=6,
                                            temperature=0, stream=True))
    assert "".join(p.choices[0].text for p in pieces) == out.choices[0].text


def test_shared_prefix_reports_cached_tokens(client):
    system = "You are a terse assistant who answers in one short sentence about geography and nothing else. " * 3
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Capital of France?"}]
    client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=2)
    messages[1]["content"] = "Capital of Spain?"
    again = client.chat.completions.create(model="smollm2-135m-instruct", messages=messages, max_tokens=2)
    assert again.usage.prompt_tokens_details.cached_tokens >= 60


def test_concurrent_requests_equal_sequential(client):
    prompts = ["Name a fruit.", "What is 2 + 2?", "Say hello.", "Name a city.", "Name an animal."]
    alone = [chat(client, p, max_tokens=20).choices[0].message.content for p in prompts]
    results = [None] * len(prompts)

    def one(i):
        results[i] = chat(client, prompts[i], max_tokens=20).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == alone


PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 20},
    "age": {"type": "integer", "minimum": 0, "maximum": 150},
    "address": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                 "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                "required": ["city", "zip"], "additionalProperties": False},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3}},
    "required": ["name", "age", "address", "tags"], "additionalProperties": False}


def test_json_schema_output_parses_and_validates(client):
    for seed in (1, 2):
        out = chat(client, "Describe a person as JSON.", temperature=0.7, seed=seed, max_tokens=120,
                   response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                           "strict": True}})
        assert out.choices[0].finish_reason == "stop", out.choices[0].message.content
        person = json.loads(out.choices[0].message.content)
        assert set(person) == {"name", "age", "address", "tags"} and isinstance(person["age"], int)
        assert set(person["address"]) == {"city", "zip"} and re.fullmatch(r"[0-9]{5}", person["address"]["zip"])
        assert isinstance(person["tags"], list) and len(person["tags"]) <= 3
    anything = chat(client, "Give me a JSON object.", max_tokens=60, response_format={"type": "json_object"})
    if anything.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(anything.choices[0].message.content), dict)
    else:
        assert anything.choices[0].message.content.startswith("{")
    with pytest.raises(openai.BadRequestError, match="JSON schema cannot be used"):
        chat(client, "hi", response_format={"type": "json_schema", "json_schema": {"name": "x",
                                            "schema": {"type": "object", "properties": {"a": {"type": 12}}}}})


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    return error


def test_errors_have_openai_shapes(server, client):
    with server.http() as http:
        _error(http.post("/v1/chat/completions", content=b"{not json"), 400)
        _error(http.post("/v1/chat/completions", content=b"[1, 2]"), 400)
        assert _error(http.post("/v1/chat/completions", json={"messages": "hi"}), 400)["param"] == "messages"
        assert _error(http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}),
                      400)["param"] == "messages[0].content"
        _error(http.post("/v1/completions", json={"prompt": [1, 2, 10 ** 9]}), 400)
        _error(http.post("/v1/nothing-here", json={}), 404)
        _error(http.get("/v1/chat/completions"), 405)
        _error(http.post("/v1/completions", content=b"x" * (5 * 1024 * 1024)), 413)
        _error(httpx.post(server.url + "/v1/completions", json={"prompt": "a"},
                          headers={"Authorization": "Bearer wrong"}), 401)
        _error(httpx.get(server.url + "/metrics"), 401)
        error = _error(http.post("/v1/completions", json={"prompt": "hello " * 800, "max_tokens": 4}), 400)
        assert error["code"] == "context_length_exceeded" and str(CTX) in error["message"]
        _error(http.post("/tokenize", json={"content": 3}), 400)
        assert http.post("/detokenize", json={"tokens": http.post("/tokenize", json={
            "content": "Hello world", "add_special": False}).json()["tokens"]}).json()["content"] == "Hello world"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        chat(client, "hi", temperature="hot")
    with pytest.raises(openai.BadRequestError, match="'n' must be 1"):
        chat(client, "hi", n=2)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="no tool support"):
        chat(client, "hi", tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()
    assert httpx.get(server.url + "/health").json()["status"] == "ok"


def test_client_disconnect_frees_the_slot(server):
    with server.http() as http:
        body = {"prompt": "Once upon a time", "max_tokens": 300, "stream": True, "temperature": 0}
        with http.stream("POST", "/v1/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    break  # one chunk came; now hang up
        deadline = time.time() + 10
        while httpx.get(server.url + "/health").json()["slots_processing"] and time.time() < deadline:
            time.sleep(0.05)
        assert httpx.get(server.url + "/health").json()["slots_processing"] == 0
        metrics = http.get("/metrics").text
    assert re.search(r'edgeinfer_generations_total\{reason="cancelled"\} [1-9]', metrics), metrics
    for name in ("edgeinfer_requests_total", "edgeinfer_time_to_first_token_seconds_bucket",
                 "edgeinfer_inter_token_latency_seconds_bucket", "edgeinfer_queue_depth",
                 "edgeinfer_kv_cache_usage_ratio", "edgeinfer_generated_tokens_total"):
        assert name in metrics


def test_bench_serve_against_the_server(server):
    result = run_edgeinfer("bench-serve", server.url, "-c", "1,2", "-r", "1", "-n", "4", "--agent-requests", "2",
                           "--api-key", API_KEY, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [(r["requests"], r["errors"], r["unfinished"]) for r in data["rounds"]] == [(1, 0, 0), (2, 0, 0)]
    assert [r["tokens"] for r in data["rounds"]] == [4, 8]  # ignore_eos: each decodes all its tokens
    assert data["agent"]["requests"] == 2 and data["agent"]["p50_ms"] > 0, data


def test_cli_mistakes_are_one_error_line(server):
    port = server.url.rsplit(":", 1)[1]
    assert_one_error_line(run_edgeinfer("serve", str(model_path("smollm2-135m-instruct")), "--port", port,
                                        timeout=120), "cannot listen", port)
    assert_one_error_line(run_edgeinfer("serve", "--parallel", "0"), "--parallel")
    assert_one_error_line(run_edgeinfer("serve", "no-such-model"), "no-such-model")
    too_big = run_edgeinfer("serve", str(model_path("smollm2-135m-instruct")), "--port", "0", "--ctx", "100000000",
                            timeout=120)  # the plan refuses it while the server is up: it stops, one line, exit 1
    assert too_big.returncode == 1 and "listening on" in too_big.stdout
    assert_one_error_line(too_big, "n_ctx=100000000")


def test_sigterm_drains_then_exits_zero(server, client):
    """The last test: a stream under way when SIGTERM comes still ends with its finish_reason; exit status 0."""
    chunks = []

    def stream():
        for chunk in chat(client, "Tell me a story.", max_tokens=200, stream=True, extra_body={"ignore_eos": True}):
            chunks.append(chunk)

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.time() + 30
    while len(chunks) < 3 and time.time() < deadline:
        time.sleep(0.01)
    assert t.is_alive()  # under way when the signal comes
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert server.proc.wait(60) == 0, "".join(server.output)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert "Traceback" not in "".join(server.output)
