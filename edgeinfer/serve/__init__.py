"""`edgeinfer serve`: an OpenAI-compatible HTTP server with continuous batching, and the same API in-process.

Transport-free (usable without the HTTP stack): `openai_schema` (request parsing, OpenAI error shapes),
`openai_requests` (a parsed body -> prompt tokens, ServeRequest, response shape), `responses` (events -> response
and chunk dicts), `structured` (llguidance grammars: json_object / json_schema), `tools` (tool calls in chat
templates), `scheduler` (one thread owns the engine; one forward pass per step over every running request) with
`batch_speculation` (guesses planned per step), `in_process` (a request on the model's own sequence:
`Model.create_chat_completion`). HTTP: `app` (the starlette routes, SSE), `metrics` (Prometheus), `server`
(socket, uvicorn, model loading, drain on SIGINT/SIGTERM), `bench_client` (`edgeinfer bench-serve`).
Only `edgeinfer.api` imports from below this package, lazily, and only `in_process` (which loads no starlette).
"""
