"""The HTTP face of the server: a starlette app with OpenAI's endpoints over a `Scheduler`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models (and /v1/models/{id}), GET /health (503
while the model loads), GET /metrics (Prometheus), POST /tokenize, POST /detokenize. Every answer that is not a
success is OpenAI's error shape ({"error": {message, type, param, code}}) with its status: 400 bad request, 401
wrong API key, 404 unknown path, 405 wrong method, 413 body over the limit, 429 queue full (with Retry-After),
503 still loading; an unexpected exception is logged and answered 500 without a traceback. A client that goes
away (mid-stream or while waiting) cancels its request, which leaves the batch at the scheduler's next step. How
events become responses and server-sent events: `edgeinfer.serve.responses`.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edgeinfer.errors import EdgeInferError, InvalidArgument
from edgeinfer.sampling import Sampler
from edgeinfer.serve import openai_schema as schema
from edgeinfer.serve import structured, tools
from edgeinfer.serve.metrics import ServeMetrics
from edgeinfer.serve.openai_schema import APIError, Generation, ResponseHead
from edgeinfer.serve.responses import ChatShape, CompletionShape, EventQueue, Shape, collect, sse
from edgeinfer.serve.scheduler import QueueFull, Scheduler, ServeRequest
from edgeinfer.serve.structured import GrammarVocabulary

log = logging.getLogger("edgeinfer.serve")

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024  # JSON bodies beyond this are refused (413) before they are read whole
RETRY_AFTER_SECONDS = 1


@dataclass
class Served:
    """A loaded model and the scheduler that runs its requests; model_id is what /v1/models lists."""

    model: Any  # edgeinfer.api.Model
    scheduler: Scheduler
    model_id: str
    aliases: frozenset[str] = frozenset()
    created: int = field(default_factory=lambda: int(time.time()))
    vocabulary: GrammarVocabulary | None = None  # for response_format: built on first use

    _supports_tools: bool | None = None
    _controls: Any = None

    def __post_init__(self):
        self.vocabulary = GrammarVocabulary(self.model.tokenizer, self.model.n_vocab)

    def supports_tools(self) -> bool:
        if self._supports_tools is None:
            self._supports_tools = tools.template_supports_tools(self.model.chat_template)
        return self._supports_tools

    def chat_tokens(self, messages: list[dict], tool_list: list[dict] | None) -> list[int]:
        """The prompt of a conversation, rendered with the tools when there are any (control-token texts in
        contents stay text either way)."""
        if tool_list is None:
            return self.model.chat_tokens(messages)
        from edgeinfer.api import ControlTexts, check_messages, tokenize_chat

        check_messages(messages)
        if self._controls is None:
            self._controls = ControlTexts(self.model.tokenizer)
        return tokenize_chat(self.model.tokenizer, tools.TemplateWithTools(self.model.chat_template, tool_list),
                             messages, self._controls)

    def knows(self, name: str | None) -> bool:
        return name is None or name == self.model_id or name in self.aliases


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
        if not served.knows(request.path_params["model_id"]):
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
        gen = schema.parse_chat_request(body)
        gen.tools = tools.parse_tools(body)
        self._check_model(served, gen)
        if gen.tools is not None:
            if gen.response_format is not None:
                raise APIError("'tools' and a JSON 'response_format' cannot be combined", param="response_format")
            if not await run_in_threadpool(served.supports_tools):
                raise APIError("this model's chat template has no tool support: send the request without 'tools'",
                               param="tools", code="unsupported_parameter")
        messages = tools.template_messages(gen.messages)
        try:
            prompt = await run_in_threadpool(served.chat_tokens, messages, gen.tools and gen.tools.tools)
        except (EdgeInferError, TypeError, ValueError) as e:
            raise APIError(f"the messages cannot be rendered with this model's chat template: {e}",
                           param="messages") from None
        head = ResponseHead(schema.new_id("chatcmpl"), "chat.completion", served.model_id)
        return await self._respond(request, served, gen, prompt, head, ChatShape(served.model.tokenizer, gen.tools))

    async def completions(self, request: Request) -> Response:
        served = self._served()
        gen = schema.parse_completion_request(await self._json(request))
        self._check_model(served, gen)
        if isinstance(gen.prompt, str):
            prompt = await run_in_threadpool(served.model.tokenize, gen.prompt)
        else:
            n_vocab = served.model.n_vocab
            bad = next((t for t in gen.prompt if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise APIError(f"'prompt' has token id {bad}: token ids are in [0, {n_vocab})", param="prompt")
            prompt = list(gen.prompt)
        head = ResponseHead(schema.new_id("cmpl"), "text_completion", served.model_id)
        return await self._respond(request, served, gen, prompt, head, CompletionShape(served.model.tokenizer))

    @staticmethod
    async def _constraint(served: Served, gen: Generation):
        """The grammar a response_format asks for (None for text), compiled off the event loop."""
        if gen.response_format is None and gen.tools is None:
            return None
        param = "tools" if gen.tools is not None else "response_format"
        if not structured.available():
            raise APIError(f"'{param}' needs llguidance (pip install llguidance)", param=param,
                           code="unsupported_parameter")

        def build():
            grammar = (tools.tool_call_grammar(gen.tools) if gen.tools is not None
                       else structured.grammar_for(gen.response_format))
            return structured.Constraint(served.vocabulary, grammar)

        try:
            return await run_in_threadpool(build)
        except (InvalidArgument, ValueError) as e:
            raise APIError(str(e), param=param) from None

    @staticmethod
    def _check_model(served: Served, gen: Generation) -> None:
        if not served.knows(gen.model):
            raise APIError(f"the model {gen.model!r} does not exist: this server has {served.model_id!r}",
                           param="model", code="model_not_found")

    async def _respond(self, request: Request, served: Served, gen: Generation, prompt: list[int],
                       head: ResponseHead, shape: Shape) -> Response:
        constraint = await self._constraint(served, gen)
        events = self._submit(request, served, gen, prompt, constraint)
        if gen.stream:
            return StreamingResponse(sse(events, head, shape, gen.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            body = await collect(events, head, shape)
        finally:
            events.close()
        return JSONResponse(body)

    def _submit(self, request: Request, served: Served, gen: Generation, prompt: list[int],
                constraint) -> EventQueue:
        """Check that the request fits a slot and queue it; its events come through the returned queue."""
        n_ctx = served.scheduler.n_ctx
        max_tokens = n_ctx - len(prompt) if gen.max_tokens is None else gen.max_tokens
        if len(prompt) + max(max_tokens, 1) > n_ctx:
            asked = f"{len(prompt)} in the prompt" + ("" if gen.max_tokens is None else f", {max_tokens} to generate")
            raise APIError(f"this server's context is {n_ctx} tokens per request; the request needs "
                           f"{len(prompt) + max_tokens} ({asked}): shorten the prompt or lower max_tokens",
                           param="messages" if gen.messages else "prompt", code="context_length_exceeded")
        r = ServeRequest(prompt, Sampler(gen.sampling, served.model.n_vocab), max_tokens, gen.stop,
                         top_logprobs=gen.top_logprobs, constraint=constraint, ignore_eos=gen.ignore_eos)
        events = EventQueue(request, r)
        try:
            served.scheduler.submit(r)
        except QueueFull as e:
            events.close()
            raise APIError(f"the server is busy: {e}; retry shortly", 429, code="server_busy",
                           headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        except EdgeInferError as e:
            events.close()
            raise APIError(str(e), param="prompt") from None
        return events
