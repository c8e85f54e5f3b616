"""OpenAI's API in-process: `Model.create_chat_completion` and `create_completion` take the body `edgeinfer serve`
takes and give the dict it answers (or, with stream=True, an iterator of the chunk dicts its server-sent events
carry), so an app moves between in-process use and HTTP without rewriting; `Model.generate(json_schema=...)` is
constrained by the same grammars.

A body is checked and rendered by `edgeinfer.serve.openai_requests` and its events become dicts through
`edgeinfer.serve.responses`, as in the server; a bad field raises `InvalidRequest` (an InvalidArgument) naming it.
The request runs on the model's own stream (sequence 0 of its KV cache, so a later call reuses the prefix it
shares, as `Model.chat` does), taking the model's lock for each evaluation only, as `Model.stream` does: other
generations may run in between, and the model stays usable for anything else. Each token is sampled by
`ServeRequest.step`, the step the server's scheduler takes, so a greedy answer (or one with a seed) is the server's.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from edgeinfer.generation import common_prefix_length
from edgeinfer.serve import structured
from edgeinfer.serve.openai_requests import OpenAIModel, Prepared, model_names
from edgeinfer.serve.openai_schema import InvalidRequest, parse_response_format
from edgeinfer.serve.responses import StreamChunks, whole_response
from edgeinfer.serve.serve_request import DoneEvent, ServeRequest, TokenEvent


def openai_model(model: Any) -> OpenAIModel:
    """The model as OpenAI's API sees it (its id: the catalogue name or the file's stem), kept on the model."""
    api = model.__dict__.get("_openai_model")
    if api is None:
        model_id, aliases = model_names(model.path)
        api = model._openai_model = OpenAIModel(model, model_id, aliases)
    return api


def chat_completion(model: Any, body: dict) -> dict | Iterator[dict]:
    """What POST /v1/chat/completions answers to body, computed here (see the module docstring)."""
    return answer(model, openai_model(model).prepare_chat(body))


def completion(model: Any, body: dict) -> dict | Iterator[dict]:
    """What POST /v1/completions answers to body, computed here."""
    return answer(model, openai_model(model).prepare_completion(body))


def answer(model: Any, prepared: Prepared) -> dict | Iterator[dict]:
    """The response dict, or for a streamed request an iterator of its chunks (generating as it is read)."""
    r = prepared.serve_request(model.n_ctx, model.n_vocab)
    events = run(model, r)
    if prepared.gen.stream:
        return _chunks(events, StreamChunks(prepared.head, prepared.shape, r, prepared.gen.include_usage))
    return whole_response(list(events), prepared.head, prepared.shape, r)


def _chunks(events: Iterator, chunks: StreamChunks) -> Iterator[dict]:
    yield from chunks.opening()
    for event in events:
        yield from chunks.of(event)


def run(model: Any, r: ServeRequest) -> Iterator[TokenEvent | DoneEvent]:
    """r's events, generated on the model's sequence 0; ModelError if the model computes NaN/inf logits."""
    tokenizer = model.tokenizer
    eog = frozenset(tokenizer.eog_ids)
    eog_ids = np.array(sorted(eog), dtype=np.int64)
    try:
        with model._use() as cached:
            if r.max_tokens <= 0:  # nothing to generate: done without evaluating anything, as the scheduler
                keep = min(common_prefix_length(cached.tokens, r.prompt), len(r.prompt) - 1)
                yield DoneEvent("length", "", len(r.prompt), 0, keep)
                return
            logits, evaluated = cached.evaluate_prompt(r.prompt)
        r.begin(tokenizer)
        r.cached_tokens, r.stats.prompt_tokens_evaluated = len(r.prompt) - evaluated, evaluated
        while True:
            yield from r.step(logits, eog, eog_ids, model.n_ctx - len(r.history))[1]
            if r.done:
                return
            with model._use() as cached:
                logits = cached.extend_to(r.history)
    finally:
        model._call_ended()


def constrained_sampler(model: Any, sampler, json_schema: dict | None, response_format: dict | None):
    """sampler, constrained to JSON that follows json_schema (a JSON schema dict) or to an OpenAI response_format
    ({"type": "json_object"} or {"type": "json_schema", "json_schema": {"schema": ...}}); sampler itself for
    neither. InvalidRequest naming the argument for a bad or uncompilable schema."""
    if json_schema is not None and response_format is not None:
        raise InvalidRequest("give json_schema or response_format, not both", param="json_schema")
    if json_schema is not None:
        if not isinstance(json_schema, dict):
            raise InvalidRequest(f"json_schema must be a JSON schema (a dict), not {type(json_schema).__name__}",
                                 param="json_schema")
        response_format = {"type": "json_schema", "json_schema": {"schema": json_schema}}
    fmt = parse_response_format(response_format)
    if fmt is None:
        return sampler
    param = "json_schema" if json_schema is not None else "response_format"
    constraint = openai_model(model).grammar(lambda: structured.grammar_for(fmt), param)
    return structured.ConstrainedSampler(sampler, constraint, model.tokenizer.eog_ids)
