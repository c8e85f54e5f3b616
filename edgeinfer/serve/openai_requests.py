"""OpenAI's requests without a transport: a request body becomes prompt tokens, a `ServeRequest` and the `Shape` of
its answer (`OpenAIModel.prepare_chat`, `prepare_completion`).

The HTTP handlers (`edgeinfer.serve.app`) and the Python API (`Model.create_chat_completion`, through
`edgeinfer.serve.in_process`) both come here, so a request is checked, rendered with the chat template (and its
tools), constrained by its response_format and refused the same way: an `InvalidRequest` naming the field, which the
server answers with a 400. Preparing blocks (tokenizing, compiling a grammar): the server runs it off its event loop.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from edgeinfer.errors import EdgeInferError, InvalidArgument
from edgeinfer.sampling import Sampler
from edgeinfer.serve import openai_schema as schema
from edgeinfer.serve import structured, tools
from edgeinfer.serve.openai_schema import Generation, InvalidRequest, ResponseHead
from edgeinfer.serve.responses import ChatShape, CompletionShape, Shape
from edgeinfer.serve.serve_request import ServeRequest
from edgeinfer.serve.structured import Constraint, GrammarVocabulary


def model_names(path: os.PathLike) -> tuple[str, frozenset[str]]:
    """(the id OpenAI's API gives a model file: its catalogue name, else the file's stem; the other names a request's
    `model` may use: the file name, stem and path)."""
    from models.catalogue import catalogue_entry_for

    path = os.fspath(path)
    entry = catalogue_entry_for(path)
    stem = os.path.splitext(os.path.basename(path))[0]
    return (entry.name if entry is not None else stem), frozenset({os.path.basename(path), stem, path})


@dataclass
class Prepared:
    """A checked request: what it asks for, its prompt tokens, the head and shape of its answer, its grammar."""

    gen: Generation
    prompt: list[int]
    head: ResponseHead
    shape: Shape
    constraint: Constraint | None

    def serve_request(self, n_ctx: int, n_vocab: int) -> ServeRequest:
        """The request to run on a sequence of n_ctx positions; InvalidRequest (context_length_exceeded) if the
        prompt and max_tokens do not fit."""
        gen, prompt = self.gen, self.prompt
        max_tokens = n_ctx - len(prompt) if gen.max_tokens is None else gen.max_tokens
        if len(prompt) + max(max_tokens, 1) > n_ctx:
            asked = f"{len(prompt)} in the prompt" + ("" if gen.max_tokens is None else f", {max_tokens} to generate")
            raise InvalidRequest(f"the context is {n_ctx} tokens per request; the request needs "
                                 f"{len(prompt) + max_tokens} ({asked}): shorten the prompt or lower max_tokens",
                                 param="messages" if gen.messages else "prompt", code="context_length_exceeded")
        return ServeRequest(prompt, Sampler(gen.sampling, n_vocab), max_tokens, gen.stop,
                            top_logprobs=gen.top_logprobs, constraint=self.constraint, ignore_eos=gen.ignore_eos,
                            speculative=gen.speculative)


class OpenAIModel:
    """A loaded model (edgeinfer.api.Model) as OpenAI's API sees it: its id and aliases (what a request's `model`
    may name), its vocabulary for grammars (built on first use), whether its template supports tools."""

    def __init__(self, model: Any, model_id: str, aliases: frozenset[str] = frozenset()):
        self.model, self.model_id, self.aliases = model, model_id, aliases
        self.vocabulary = GrammarVocabulary(model.tokenizer, model.n_vocab)
        self._supports_tools: bool | None = None
        self._controls = None

    def knows(self, name: str | None) -> bool:
        return name is None or name == self.model_id or name in self.aliases

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

    # -- requests -----------------------------------------------------------------------------------------------
    def prepare_chat(self, body: Any) -> Prepared:
        """A /v1/chat/completions body, checked and rendered; InvalidRequest naming the field."""
        gen = schema.parse_chat_request(body)
        gen.tools = tools.parse_tools(body)
        self._check_model(gen)
        if gen.tools is not None:
            if gen.response_format is not None:
                raise InvalidRequest("'tools' and a JSON 'response_format' cannot be combined",
                                     param="response_format")
            if not self.supports_tools():
                raise InvalidRequest("this model's chat template has no tool support: send the request without "
                                     "'tools'", param="tools", code="unsupported_parameter")
        try:
            prompt = self.chat_tokens(tools.template_messages(gen.messages), gen.tools and gen.tools.tools)
        except (EdgeInferError, TypeError, ValueError) as e:
            raise InvalidRequest(f"the messages cannot be rendered with this model's chat template: {e}",
                                 param="messages") from None
        head = ResponseHead(schema.new_id("chatcmpl"), "chat.completion", self.model_id)
        return Prepared(gen, prompt, head, ChatShape(self.model.tokenizer, gen.tools), self._constraint(gen))

    def prepare_completion(self, body: Any) -> Prepared:
        """A /v1/completions body, checked and tokenized; InvalidRequest naming the field."""
        gen = schema.parse_completion_request(body)
        self._check_model(gen)
        if isinstance(gen.prompt, str):
            prompt = self.model.tokenize(gen.prompt)
        else:
            n_vocab = self.model.n_vocab
            bad = next((t for t in gen.prompt if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise InvalidRequest(f"'prompt' has token id {bad}: token ids are in [0, {n_vocab})", param="prompt")
            prompt = list(gen.prompt)
        head = ResponseHead(schema.new_id("cmpl"), "text_completion", self.model_id)
        return Prepared(gen, prompt, head, CompletionShape(self.model.tokenizer), self._constraint(gen))

    def _check_model(self, gen: Generation) -> None:
        if not self.knows(gen.model):
            raise InvalidRequest(f"the model {gen.model!r} does not exist: the model here is {self.model_id!r}",
                                 param="model", code="model_not_found")

    def _constraint(self, gen: Generation) -> Constraint | None:
        """The grammar the request's tools or response_format ask for (None for plain text)."""
        if gen.response_format is None and gen.tools is None:
            return None
        if gen.tools is not None:
            return self.grammar(lambda: tools.tool_call_grammar(gen.tools), "tools")
        return self.grammar(lambda: structured.grammar_for(gen.response_format), "response_format")

    def grammar(self, build, param: str) -> Constraint:
        """A Constraint over this model's vocabulary from the grammar build() returns; InvalidRequest naming param
        where llguidance is missing or the grammar cannot be compiled."""
        if not structured.available():
            raise InvalidRequest(f"'{param}' needs llguidance (pip install llguidance)", param=param,
                                 code="unsupported_parameter")
        try:
            return Constraint(self.vocabulary, build())
        except (InvalidArgument, ValueError) as e:
            raise InvalidRequest(str(e), param=param) from None
