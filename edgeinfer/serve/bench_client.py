"""`edgeinfer bench-serve URL`: load an OpenAI-compatible server (ours, llama-server, any) with concurrent
streaming clients and report what they saw.

For each concurrency c, c clients each send `requests` streaming chat completions one after another; a request's
time to first token (TTFT) is from sending it to its first content chunk, its inter-token latencies the gaps
between content chunks, its tokens the usage the server reports (include_usage; else one per content chunk).
Aggregate tokens/s is all completion tokens over the wall time of the round. The agent round sends 1-token
completions whose prompt is a shared ~500-token prefix plus ~20 new tokens (the prefix cached after the first).
One unmeasured request warms the server up first. Only the HTTP API is used, so the same command measures any
server on the same model. The HTTP client is edgeinfer.serve.http_stream (why: there).
"""
from __future__ import annotations

import asyncio
import json
import statistics
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from edgeinfer.errors import EdgeInferError
from edgeinfer.serve.http_stream import Connection

REQUEST_TIMEOUT_S = 600  # one request, sent to its stream's end

TOPICS = ["rivers", "mountains", "bread", "bicycles", "owls", "glass", "trains", "tea", "maps", "bees", "salt",
          "clocks", "copper", "lighthouses", "paper", "wolves"]
PREFIX = ("You are a careful assistant for a hardware shop. Answer in one short sentence. The catalogue lists "
          "hammers, screwdrivers, drills, saws, nails, screws, bolts, nuts, washers, glue, tape, paint, brushes, "
          "ladders, gloves, goggles, and measuring tapes. ") * 6  # about 500 tokens with most vocabularies


@dataclass
class RoundResult:
    """One concurrency level: counts, wall seconds and the latencies seen (seconds)."""

    concurrency: int
    requests: int = 0
    errors: int = 0
    unfinished: int = 0  # streams that ended without a finish_reason
    tokens: int = 0
    wall: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)  # whole requests, sent to [DONE]
    error_samples: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"concurrency": self.concurrency, "requests": self.requests, "errors": self.errors,
                "unfinished": self.unfinished, "tokens": self.tokens, "wall_s": round(self.wall, 3),
                "tokens_per_s": round(self.tokens / self.wall, 1) if self.wall else 0.0,
                "ttft_p50_ms": _ms(self.ttft, 50), "ttft_p99_ms": _ms(self.ttft, 99),
                "itl_p50_ms": _ms(self.itl, 50), "itl_p99_ms": _ms(self.itl, 99),
                "error_samples": self.error_samples[:3]}


def _ms(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return round(values[0] * 1000, 1)
    return round(statistics.quantiles(values, n=100, method="inclusive")[q - 1] * 1000, 1)


async def _stream_one(conn: Connection, body: dict, result: RoundResult) -> None:
    sent = time.perf_counter()
    last, finished, chunks, usage_tokens = None, False, 0, None

    async def read() -> None:
        nonlocal last, finished, chunks, usage_tokens
        status, events = await conn.post("/v1/chat/completions", body)
        if status != 200:
            text = "".join([t async for t in events])
            raise EdgeInferError(f"HTTP {status}: {text[:200]}")
        async for data in events:
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise EdgeInferError(str(chunk["error"])[:200])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"].get("completion_tokens")
            for choice in chunk.get("choices") or []:
                content = (choice.get("delta") or {}).get("content") or choice.get("text")
                if content:
                    now = time.perf_counter()
                    if last is None:
                        result.ttft.append(now - sent)
                    else:
                        result.itl.append(now - last)
                    last, chunks = now, chunks + 1
                finished |= bool(choice.get("finish_reason"))

    try:
        await asyncio.wait_for(read(), REQUEST_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 (counted and reported, never fatal to the run)
        await conn.close()  # whatever it was in the middle of
        result.errors += 1
        result.error_samples.append(f"{type(e).__name__}: {e}"[:200])
        return
    result.latency.append(time.perf_counter() - sent)
    result.requests += 1
    result.unfinished += not finished
    result.tokens += usage_tokens if usage_tokens is not None else chunks


async def _round(base_url: str, model: str, concurrency: int, requests: int, max_tokens: int, api_key: str | None,
                 agent: bool) -> RoundResult:
    result = RoundResult(concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def worker(w: int) -> None:
        conn = Connection(base_url, headers)  # one keep-alive connection per client
        try:
            for i in range(requests):
                topic = TOPICS[(w * requests + i) % len(TOPICS)]
                if agent:
                    messages = [{"role": "system", "content": PREFIX},
                                {"role": "user", "content": f"Request {w}-{i}: do you sell anything for {topic}?"}]
                    tokens = 1
                else:
                    messages = [{"role": "user", "content": f"Write a long paragraph about {topic}."}]
                    tokens = max_tokens
                body = {"model": model, "messages": messages, "max_tokens": tokens, "temperature": 0,
                        "stream": True, "stream_options": {"include_usage": True}}
                if not agent:
                    body["ignore_eos"] = True  # llama-server's: every request decodes max_tokens
                await _stream_one(conn, body, result)
        finally:
            await conn.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    result.wall = time.perf_counter() - start
    return result


def _run(coroutine):
    """Run on uvloop where it is installed (serve's own dependency): less of the client's CPU per token."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def _first_model(base: str, api_key: str | None) -> str:
    request = urllib.request.Request(base + "/v1/models",
                                     headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            listed = json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raise EdgeInferError(f"{base}/v1/models answered HTTP {e.code}: "
                             f"{e.read().decode('utf-8', 'replace')[:200]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise EdgeInferError(f"{base}: cannot reach the server ({getattr(e, 'reason', e)})") from None
    except ValueError:
        raise EdgeInferError(f"{base}/v1/models did not answer JSON") from None
    try:
        return listed["data"][0]["id"]
    except (KeyError, IndexError, TypeError):
        raise EdgeInferError(f"{base}/v1/models lists no model") from None


def run_bench_serve(url: str, *, model: str | None = None, concurrency: tuple[int, ...] = (1, 4, 8, 16),
                    requests: int = 4, max_tokens: int = 64, api_key: str | None = None,
                    agent_requests: int = 20) -> dict:
    """Every round's summary (see RoundResult.summary), and the agent round's when agent_requests > 0."""
    base = url.rstrip("/").removesuffix("/v1")
    if not base.startswith(("http://", "https://")):
        raise EdgeInferError(f"{url}: not an http:// or https:// URL")
    model = model or _first_model(base, api_key)
    # One request first, not measured: a server's first one may compile kernels or fill caches (ours took ~2 s
    # on Gemma 3), which would otherwise count as the one-client round's time to first token and throughput.
    _run(_round(base, model, 1, 1, 4, api_key, agent=False))
    rounds = [_run(_round(base, model, c, requests, max_tokens, api_key, agent=False)).summary()
              for c in concurrency]
    out = {"url": base, "model": model, "max_tokens": max_tokens, "rounds": rounds}
    if agent_requests:
        _run(_round(base, model, 1, 1, 1, api_key, agent=True))  # caches the shared prefix
        agent = _run(_round(base, model, 1, agent_requests, 1, api_key, agent=True))
        lat = agent.latency
        out["agent"] = {"requests": agent.requests, "errors": agent.errors, "p50_ms": _ms(lat, 50),
                        "p99_ms": _ms(lat, 99)}
    return out


def format_bench_serve(result: dict) -> str:
    lines = [f"bench-serve {result['url']} model {result['model']}, {result['max_tokens']} tokens per request "
             f"('no end': streams that ended without a finish_reason)",
             f"{'clients':>7} {'reqs':>5} {'errors':>6} {'no end':>6} {'tok/s':>8} {'ttft p50':>9} {'ttft p99':>9} "
             f"{'itl p50':>8} {'itl p99':>8}"]
    for r in result["rounds"]:
        lines.append(f"{r['concurrency']:>7} {r['requests']:>5} {r['errors']:>6} {r['unfinished']:>6} "
                     f"{r['tokens_per_s']:>8} "
                     f"{_cell(r['ttft_p50_ms']):>9} {_cell(r['ttft_p99_ms']):>9} {_cell(r['itl_p50_ms']):>8} "
                     f"{_cell(r['itl_p99_ms']):>8}")
        lines += [f"        error: {e}" for e in r["error_samples"]]
    if "agent" in result:
        a = result["agent"]
        lines.append(f"agent: 1-token answers after a cached ~500-token prefix: p50 {_cell(a['p50_ms'])}, "
                     f"p99 {_cell(a['p99_ms'])} ({a['requests']} requests, {a['errors']} errors)")
    return "\n".join(lines)


def _cell(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.0f}ms"
