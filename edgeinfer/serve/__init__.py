"""`edgeinfer serve`: an OpenAI-compatible HTTP server with continuous batching.

`scheduler` (one thread owns the engine; one forward pass per step over every running request), `openai_schema`
(request parsing, response shapes), `app` (the starlette routes), `metrics` (Prometheus), `server` (socket,
uvicorn, model loading, drain on SIGINT/SIGTERM). Nothing below this package imports it.
"""
