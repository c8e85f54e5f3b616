"""How a request's events become OpenAI's answers, without a transport: the whole response (`whole_response`), or the
chunks of a stream as OpenAI sends them (`StreamChunks`: the same id on every chunk, the role in the first delta,
`usage` last when asked for). The server writes the chunks as server-sent events (`edgeinfer.serve.app`); the
Python API yields them (`edgeinfer.serve.in_process`).

A `Shape` says how one endpoint's choices look (chat: message and delta, tool calls parsed out; completions: text,
the legacy logprobs).
"""
from __future__ import annotations

import json
from dataclasses import replace
from typing import Sequence

from edgeinfer.serve import openai_schema as schema
from edgeinfer.serve import tools
from edgeinfer.serve.openai_schema import ResponseHead
from edgeinfer.serve.serve_request import DoneEvent, ServeRequest, TokenEvent


def whole_response(events: Sequence[TokenEvent | DoneEvent], head: ResponseHead, shape: "Shape",
                   r: ServeRequest) -> dict:
    """The (non-streaming) response of a request's events, the last one its DoneEvent."""
    done = events[-1]
    text = "".join(e.text for e in events)
    entries = [e for e in events[:-1] if e.logprob is not None]
    usage = schema.usage(done.prompt_tokens, done.completion_tokens, done.cached_tokens)
    return head.wrap([shape.choice(text, entries, done.finish_reason, r)], usage=usage)


class StreamChunks:
    """The chunks (dicts) of a streamed response: `opening()` before the first event, then `of(event)` for each."""

    def __init__(self, head: ResponseHead, shape: "Shape", r: ServeRequest, include_usage: bool):
        chunk_object = head.object + ".chunk" if head.object == "chat.completion" else head.object
        self.head, self.shape, self.r = replace(head, object=chunk_object), shape, r
        self.include_usage = include_usage
        self._held: list[str] = []  # a buffered shape's text until the end
        self._text_frame: tuple[str, str] | None = None  # a plain token's event around its JSON-quoted text

    def _chunk(self, choices: list[dict], **fields) -> dict:
        extra = {"usage": None} if self.include_usage else {}
        return self.head.wrap(choices, **{**extra, **fields})

    def opening(self) -> list[dict]:
        first = self.shape.first_delta()
        return [] if first is None else [self._chunk([first])]

    def events(self, event: TokenEvent | DoneEvent) -> list[str]:
        """The server-sent events (`data: {chunk}` lines) of `of(event)`. A plain token's (text, no logprobs) come
        from a frame rendered once per stream, around the one part that changes, its text: serializing the whole
        chunk at each token was a fifth of the event loop's time per streamed token."""
        if isinstance(event, TokenEvent) and event.text and event.logprob is None and not self.shape.buffered:
            if self._text_frame is None:
                marker = "\x00text\x00"
                before, after = sse_event(self._chunk([self.shape.delta(marker, [], None, self.r)])).split(
                    json.dumps(marker))
                self._text_frame = before, after
            before, after = self._text_frame
            return [before + json.dumps(event.text, ensure_ascii=False) + after]
        return [sse_event(chunk) for chunk in self.of(event)]

    def of(self, event: TokenEvent | DoneEvent) -> list[dict]:
        """The chunks an event gives (none for a token whose text is held back); the last ones for its DoneEvent."""
        shape = self.shape
        if isinstance(event, TokenEvent):
            if shape.buffered:
                self._held.append(event.text)
            elif event.text or event.logprob is not None:
                entries = [event] if event.logprob is not None else []
                return [self._chunk([shape.delta(event.text, entries, None, self.r)])]
            return []
        if shape.buffered:
            finals = shape.final_deltas("".join(self._held) + event.text, event.finish_reason)
        else:
            finals = [shape.delta(event.text, [], event.finish_reason, self.r)]
        chunks = [self._chunk([choice]) for choice in finals]
        if self.include_usage:
            chunks.append(self._chunk([], usage=schema.usage(event.prompt_tokens, event.completion_tokens,
                                                              event.cached_tokens)))
        return chunks


def sse_event(chunk: dict) -> str:
    """A chunk as one server-sent event."""
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"


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
