"""How a request's events become OpenAI's answers: the whole response, or server-sent events as OpenAI streams them
(the same id on every chunk, the role in the first delta, `usage` last when asked for, `data: [DONE]`).

`EventQueue` carries one request's events from the scheduler thread to the event loop and notices the client going
away; a `Shape` says how one endpoint's choices look (chat: message and delta, tool calls parsed out; completions:
text, the legacy logprobs).
"""
from __future__ import annotations

import asyncio
import json
from typing import AsyncIterator

from starlette.requests import Request

from edgeinfer.serve import openai_schema as schema
from edgeinfer.serve import tools
from edgeinfer.serve.openai_schema import APIError, ResponseHead
from edgeinfer.serve.scheduler import DoneEvent, ErrorEvent, ServeRequest, TokenEvent

_DISCONNECTED = object()  # put into a request's event queue when its client goes away


class EventQueue:
    """A request's events on the event loop, and the end of its client: `get` returns an event, or None once the
    client disconnected (the request is then cancelled)."""

    def __init__(self, request: Request, r: ServeRequest):
        """Give r a sink that hands its events (from the scheduler thread) to this event loop's queue."""
        loop = asyncio.get_running_loop()
        self.r, self.queue = r, asyncio.Queue()

        def sink(event) -> None:
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                r.cancel()

        r.sink = sink
        self.watcher = asyncio.ensure_future(self._watch(request.receive))

    async def _watch(self, receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.queue.put_nowait(_DISCONNECTED)

    async def get(self):
        event = await self.queue.get()
        if event is _DISCONNECTED:
            self.r.cancel()
            return None
        return event

    def close(self) -> None:
        """The response is over (or abandoned): stop watching; cancel the request if it still runs."""
        self.watcher.cancel()
        self.r.cancel()


async def collect(events: EventQueue, head: ResponseHead, shape: Shape) -> dict:
    """The whole (non-streaming) response."""
    text, entries = [], []
    while True:
        event = await events.get()
        if event is None:
            raise APIError("the client went away", 499)
        if isinstance(event, ErrorEvent):
            raise APIError(event.message, 500, type="server_error")
        text.append(event.text)
        if isinstance(event, DoneEvent):
            usage = schema.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
            return head.wrap([shape.choice("".join(text), entries, event.finish_reason, events.r)], usage=usage)
        if event.logprob is not None:
            entries.append(event)


async def sse(events: EventQueue, head: ResponseHead, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: chunks with the same id, the role first, [DONE] last."""
    extra = {"usage": None} if include_usage else {}

    def chunk(choices: list[dict], **fields) -> str:
        return f"data: {json.dumps(head.wrap(choices, **{**extra, **fields}), ensure_ascii=False)}\n\n"

    head.object += ".chunk" if head.object == "chat.completion" else ""
    held: list[str] = []  # a buffered shape's text until the end
    try:
        first = shape.first_delta()
        if first is not None:
            yield chunk([first])
        while True:
            event = await events.get()
            if event is None:
                return
            if isinstance(event, ErrorEvent):  # headers are sent: the error goes in the stream, as OpenAI's
                yield f"data: {json.dumps(APIError(event.message, 500, type='server_error').body())}\n\n"
                return
            if isinstance(event, TokenEvent):
                if shape.buffered:
                    held.append(event.text)
                elif event.text or event.logprob is not None:
                    yield chunk([shape.delta(event.text, [event] if event.logprob is not None else [], None,
                                             events.r)])
                continue
            if shape.buffered:
                finals = shape.final_deltas("".join(held) + event.text, event.finish_reason)
            else:
                finals = [shape.delta(event.text, [], event.finish_reason, events.r)]
            for choice in finals:
                yield chunk([choice])
            if include_usage:
                yield chunk([], usage=schema.usage(event.prompt_tokens, event.completion_tokens,
                                                   event.cached_tokens))
            yield "data: [DONE]\n\n"
            return
    finally:
        events.close()


class Shape:
    """How one endpoint's choices look (chat: message / delta; completions: text)."""

    buffered = False  # True: the stream sends the text only at the end (final_deltas)

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def _token(self, token: int) -> tuple[str, bytes]:
        data = self.tokenizer.token_to_bytes(token, special=True)
        return data.decode("utf-8", "replace"), data

    def first_delta(self) -> dict | None:
        return None


class ChatShape(Shape):
    def __init__(self, tokenizer, tool_request=None):
        super().__init__(tokenizer)
        self.tools = tool_request
        self.buffered = tool_request is not None  # tool calls are parsed from the whole text, then streamed

    def _message(self, text: str, finish_reason: str) -> tuple[dict, str]:
        """(the assistant's message, finish_reason): tool calls parsed out where the request has tools."""
        if self.tools is None:
            return {"content": text}, finish_reason
        content, calls = tools.parse_tool_calls(text, self.tools.names)
        if not calls:
            return {"content": text}, finish_reason
        return {"content": content, "tool_calls": calls}, "tool_calls"

    def final_deltas(self, text: str, finish_reason: str) -> list[dict]:
        """A buffered stream's last chunks' choices: the content, the tool calls, the finish."""
        message, finish_reason = self._message(text, finish_reason)
        out = []
        if message.get("content"):
            out.append({"index": 0, "delta": {"content": message["content"]}, "logprobs": None,
                        "finish_reason": None})
        for i, call in enumerate(message.get("tool_calls", [])):
            out.append({"index": 0, "delta": {"tool_calls": [{"index": i, **call}]}, "logprobs": None,
                        "finish_reason": None})
        out.append({"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish_reason})
        return out

    def first_delta(self) -> dict:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _logprobs(self, entries: list[TokenEvent]) -> dict:
        content = []
        for e in entries:
            text, data = self._token(e.token)
            content.append(schema.chat_logprob(text, data, e.logprob,
                                               [(*self._token(t), lp) for t, lp in e.top_logprobs]))
        return {"content": content, "refusal": None}

    def choice(self, text: str, entries: list[TokenEvent], finish_reason: str, r: ServeRequest) -> dict:
        message, finish_reason = self._message(text, finish_reason)
        return {"index": 0, "message": {"role": "assistant", **message, "refusal": None},
                "logprobs": self._logprobs(entries) if r.top_logprobs is not None else None,
                "finish_reason": finish_reason}

    def delta(self, text: str, entries: list[TokenEvent], finish_reason: str | None, r: ServeRequest) -> dict:
        return {"index": 0, "delta": {"content": text} if text or finish_reason is None else {},
                "logprobs": self._logprobs(entries) if entries else None, "finish_reason": finish_reason}


class CompletionShape(Shape):
    def _logprobs(self, entries: list[TokenEvent], offset: int = 0) -> dict:
        tokens, offsets, at = [], [], offset
        for e in entries:
            text, _ = self._token(e.token)
            tokens.append(text)
            offsets.append(at)
            at += len(text)
        return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._token(t)[0]: lp for t, lp in e.top_logprobs} for e in entries],
                "text_offset": offsets}

    def choice(self, text: str, entries: list[TokenEvent], finish_reason: str, r: ServeRequest) -> dict:
        return {"index": 0, "text": text, "logprobs": self._logprobs(entries) if r.top_logprobs is not None
                else None, "finish_reason": finish_reason}

    def delta(self, text: str, entries: list[TokenEvent], finish_reason: str | None, r: ServeRequest) -> dict:
        return {"index": 0, "text": text, "logprobs": self._logprobs(entries) if entries else None,
                "finish_reason": finish_reason}
