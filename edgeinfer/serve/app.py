"""The HTTP face of the server: a starlette app with OpenAI's endpoints over a `Scheduler`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/{id}), GET /health (503
while the model loads), GET /metrics (Prometheus), POST /tokenize, POST /detokenize. Every answer that is not a
success is OpenAI's error shape ({"error": {message, type, param, code}}) with its status: 400 bad request, 401
wrong API key, 404 unknown path, 405 wrong method, 413 body over the limit, 429 queue full (with Retry-After),
503 still loading; an unexpected exception is logged and answered 500 without a traceback. A client that goes
away (mid-stream or while waiting) cancels its request, which leaves the batch at the scheduler's next step. How
bodies become requests: `edgeinfer.serve.openai_requests`; how events become responses and chunks:
`edgeinfer.serve.responses` (both shared with the Python API, edgeinfer.serve.in_process).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeinfer.errors import EdgeInferError, InvalidArgument
from edgeinfer.serve import openai_schema as schema
from edgeinfer.serve.metrics import ServeMetrics
from edgeinfer.serve.openai_requests import OpenAIModel, Prepared
from edgeinfer.serve.openai_schema import APIError, InvalidRequest
from edgeinfer.serve.responses import StreamChunks, sse_event, whole_response
from edgeinfer.serve.scheduler import QueueFull, Scheduler
from edgeinfer.serve.serve_request import DoneEvent, ErrorEvent, ServeRequest
from edgeinfer.serve.structured import GrammarVocabulary

log = logging.getLogger("edgeinfer.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # JSON bodies beyond this are refused (413) before they are read whole
RETRY_AFTER_SECONDS = 1


@dataclass
class Served:
    """A loaded model and the scheduler that runs its requests; model_id is what /v1/models lists. How request
    bodies become requests: `api` (edgeinfer.serve.openai_requests, shared with the Python API)."""

    model: Any  # edgeinfer.api.Model
    scheduler: Scheduler
    model_id: str
    aliases: frozenset[str] = frozenset()
    created: int = field(default_factory=lambda: int(time.time()))
    api: OpenAIModel = field(init=False)

    def __post_init__(self):
        self.api = OpenAIModel(self.model, self.model_id, self.aliases)

    @property
    def vocabulary(self) -> GrammarVocabulary:
        """The model's vocabulary for response_format and tools (built on first use)."""
        return self.api.vocabulary


@dataclass
class ServerState:
    """What the app serves: `served` is None while the model loads. api_key None: no authentication."""

    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    metrics: ServeMetrics = field(default_factory=ServeMetrics)
    served: Served | None = None


def create_app(state: ServerState) -> Starlette:
    """The starlette app over `state` (its `served` may be set later, once the model is loaded)."""
    handlers = _Handlers(state)
    routes = [
        Route("/v1/chat/completions", handlers.wrap("chat", handlers.chat), methods=["POST"]),
        Route("/v1/completions", handlers.wrap("completions", handlers.completions), methods=["POST"]),
        Route("/v1/models", handlers.wrap("models", handlers.models), methods=["GET"]),
        Route("/v1/models/{model_id:path}", handlers.wrap("models", handlers.model), methods=["GET"]),
        Route("/health", handlers.wrap("health", handlers.health, public=True), methods=["GET"]),
        Route("/metrics", handlers.wrap("metrics", handlers.metrics_text), methods=["GET"]),
        Route("/tokenize", handlers.wrap("tokenize", handlers.tokenize), methods=["POST"]),
        Route("/detokenize", handlers.wrap("detokenize", handlers.detokenize), methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_exception, Exception: _internal})


async def _http_exception(request: Request, exc: HTTPException) -> Response:
    """Starlette's own refusals (unknown path, wrong method) in OpenAI's shape."""
    message = {404: f"unknown path {request.url.path}", 405: f"{request.method} is not allowed on "
               f"{request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _error_response(APIError(message, exc.status_code, code="not_found" if exc.status_code == 404 else None))


async def _internal(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s", request.url.path)
    return _error_response(APIError("internal server error", 500, type="server_error"))


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


class _Handlers:
    def __init__(self, state: ServerState):
        self.state = state

    def wrap(self, endpoint: str, handler: Callable[[Request], Awaitable[Response]], public: bool = False):
        """handler with authentication, OpenAI-shaped errors and a request counter."""
        async def run(request: Request) -> Response:
            try:
                if not public:
                    self._authenticate(request)
                response = await handler(request)
            except APIError as e:
                response = _error_response(e)
            except InvalidRequest as e:
                response = _error_response(APIError.invalid(e))
            except Exception:  # noqa: BLE001 (nothing a client sends may leak a traceback)
                log.exception("unexpected error on %s", request.url.path)
                response = _error_response(APIError("internal server error", 500, type="server_error"))
            self.state.metrics.requests.labels(endpoint, str(response.status_code)).inc()
            return response
        return run

    def _authenticate(self, request: Request) -> None:
        key = self.state.api_key
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if given != f"Bearer {key}" and request.headers.get("x-api-key") != key:
            raise APIError("incorrect API key provided" if given else "no API key provided (Authorization: Bearer "
                           "KEY)", 401, code="invalid_api_key")

    def _served(self) -> Served:
        served = self.state.served
        if served is None:
            raise APIError("the model is still loading; retry shortly", 503, code="model_loading",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        return served

    async def _json(self, request: Request) -> Any:
        """The body as JSON: 413 beyond the size limit (checked while reading), 400 if it is not JSON."""
        limit = self.state.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise APIError(f"the request body has {int(length)} bytes: the limit is {limit}", 413,
                           code="request_too_large")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise APIError(f"the request body is over the limit of {limit} bytes", 413, code="request_too_large")
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as e:
            raise APIError(f"the request body is not valid JSON: {str(e)[:200]}", code="invalid_json") from None

    # -- plain endpoints ----------------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        served = self.state.served
        if served is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        busy = sum(1 for s in served.scheduler.slots if s.request is not None)
        return JSONResponse({"status": "ok", "slots_idle": served.scheduler.n_slots - busy,
                             "slots_processing": busy})

    async def metrics_text(self, request: Request) -> Response:
        return Response(self.state.metrics.render(), media_type=ServeMetrics.content_type)

    async def models(self, request: Request) -> Response:
        served = self._served()
        return JSONResponse(schema.models_list(served.model_id, served.created))

    async def model(self, request: Request) -> Response:
        served = self._served()
        if not served.api.knows(request.path_params["model_id"]):
            raise APIError(f"the model {request.path_params['model_id']!r} does not exist: this server has "
                           f"{served.model_id!r}", 404, param="model", code="model_not_found")
        return JSONResponse(schema.model_card(served.model_id, served.created))

    async def tokenize(self, request: Request) -> Response:
        served, body = self._served(), await self._json(request)
        text = body.get("content", body.get("prompt")) if isinstance(body, dict) else None
        if not isinstance(text, str):
            raise APIError("'content' must be a string", param="content")
        add_special = body.get("add_special", True)
        if not isinstance(add_special, bool):
            raise APIError("'add_special' must be a boolean", param="add_special")
        tokens = await run_in_threadpool(served.model.tokenize, text, add_special)
        return JSONResponse({"tokens": tokens, "count": len(tokens)})

    async def detokenize(self, request: Request) -> Response:
        served, body = self._served(), await self._json(request)
        tokens = body.get("tokens") if isinstance(body, dict) else None
        try:
            text = served.model.detokenize(tokens)
        except (TypeError, ValueError) as e:
            raise APIError(f"'tokens': {e}", param="tokens") from None
        return JSONResponse({"content": text})

    # -- completions --------------------------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        served = self._served()
        body = await self._json(request)
        return await self._respond(request, served, await run_in_threadpool(served.api.prepare_chat, body))

    async def completions(self, request: Request) -> Response:
        served = self._served()
        body = await self._json(request)
        return await self._respond(request, served, await run_in_threadpool(served.api.prepare_completion, body))

    async def _respond(self, request: Request, served: Served, prepared: Prepared) -> Response:
        r = prepared.serve_request(served.scheduler.n_ctx, served.model.n_vocab)
        events = EventQueue(request, r)
        try:
            served.scheduler.submit(r)
        except QueueFull as e:
            events.close()
            raise APIError(f"the server is busy: {e}; retry shortly", 429, code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except InvalidArgument as e:  # the request's speculation: "draft" with no draft model loaded
            events.close()
            raise APIError(str(e), param="speculative") from None
        except EdgeInferError as e:
            events.close()
            raise APIError(str(e), param="prompt") from None
        if prepared.gen.stream:
            chunks = StreamChunks(prepared.head, prepared.shape, r, prepared.gen.include_usage)
            return StreamingResponse(_sse(events, chunks), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            received = await _collect(events)
        finally:
            events.close()
        return JSONResponse(whole_response(received, prepared.head, prepared.shape, r))


# ================================================================ a request's events on the event loop

_DISCONNECTED = object()  # put into a request's event queue when its client goes away


class LoopHandoff:
    """Events from the scheduler thread to the event loop's queues, with one wake-up of the loop for all the events
    that arrive before it runs (a step's tokens of every stream): a wake-up per event cost the scheduler thread 7%
    of its time at 8 streams (a write to the loop's wake-up pipe, and the GIL handed to the loop and back)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._lock = threading.Lock()
        self._pending: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, event) -> None:
        """Queue `event` for `queue` (from any thread); RuntimeError if the loop is closed."""
        if self.loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a hand-off is scheduled already and has not run yet: it takes this one too
        self.loop.call_soon_threadsafe(self._hand_off)

    def _hand_off(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, []
        for queue, event in pending:
            queue.put_nowait(event)


_HANDOFFS: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopHandoff]" = weakref.WeakKeyDictionary()


class EventQueue:
    """A request's events on the event loop, and the end of its client: `get` returns an event, or None once the
    client disconnected (the request is then cancelled)."""

    def __init__(self, request: Request, r: ServeRequest):
        """Give r a sink that hands its events (from the scheduler thread) to this event loop's queue."""
        loop = asyncio.get_running_loop()
        handoff = _HANDOFFS.get(loop)
        if handoff is None:
            handoff = _HANDOFFS[loop] = LoopHandoff(loop)
        self.r, self.queue = r, asyncio.Queue()

        def sink(event) -> None:
            try:
                handoff.put(self.queue, event)
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
        """The response is over (or abandoned): stop watching; cancel the request if it still runs. Two references
        that made cycles are dropped, each holding the request (and its vocabulary-sized buffers) until one of the
        garbage collector's rare full passes: the watcher task (its CancelledError's traceback holds the frame that
        holds this object) and the request's sink (which refers to the request). Kept, they made the server's RSS
        rise and fall by 100-200 MB every few hundred requests (Qwen2.5, 16 clients)."""
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        self.r.cancel()
        self.r.sink = _no_listener


def _no_listener(event) -> None:
    """The sink of a request whose response is over: its events have nobody to go to."""


async def _collect(events: EventQueue) -> list:
    """Every event of the request, up to its DoneEvent (for a whole response)."""
    received = []
    while not received or not isinstance(received[-1], DoneEvent):
        event = await events.get()
        if event is None:
            raise APIError("the client went away", 499)
        if isinstance(event, ErrorEvent):
            raise APIError(event.message, 500, type="server_error")
        received.append(event)
    return received


async def _sse(events: EventQueue, chunks: StreamChunks) -> AsyncIterator[str]:
    """Server-sent events as OpenAI streams them: `data: {chunk}` lines, `data: [DONE]` last."""
    try:
        for chunk in chunks.opening():
            yield sse_event(chunk)
        while True:
            event = await events.get()
            if event is None:
                return
            if isinstance(event, ErrorEvent):  # headers are sent: the error goes in the stream, as OpenAI's
                yield sse_event(APIError(event.message, 500, type="server_error").body())
                return
            for line in chunks.events(event):
                yield line
            if isinstance(event, DoneEvent):
                yield "data: [DONE]\n\n"
                return
    finally:
        events.close()
