"""The `serve` command (an OpenAI-compatible HTTP server over one model, edgeinfer.serve) and `bench-serve` (a load
test of any OpenAI-compatible server)."""
from __future__ import annotations

import click

from edgeinfer.cli import (KV_TYPE_CHOICES, KV_TYPE_HELP, THREADS_HELP, CountList, _compute_threads, device_option,
                           speculation_options)


@click.command("serve")
@click.argument("model", required=False)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (loopback only unless told otherwise; 0.0.0.0 for every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="TCP port; 0 picks a free one (the URL printed says which).")
@click.option("--parallel", "-np", type=click.IntRange(1, 64), default=4, show_default=True,
              help="Requests decoded together (slots), each with its own KV cache sequence of --ctx positions.")
@click.option("--ctx", "n_ctx", type=click.IntRange(min=16), default=None,
              help="Context positions per slot: prompt plus completion (default: the largest that fits).")
@click.option("--threads", "n_threads", type=click.IntRange(min=1), default=None, callback=_compute_threads,
              help=THREADS_HELP)
@click.option("--kv-type", type=click.Choice(KV_TYPE_CHOICES), default=None, help=KV_TYPE_HELP)
@device_option()
@speculation_options
@click.option("--api-key", default=None, envvar="EDGEINFER_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
@click.option("--queue", "max_queue", type=click.IntRange(min=0), default=64, show_default=True,
              help="Requests that may wait for a slot; beyond them the server answers 429 with Retry-After.")
@click.option("--drain", "drain_seconds", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds running requests may finish after SIGINT/SIGTERM.")
def serve_cmd(model, host, port, parallel, n_ctx, n_threads, kv_type, device, speculative, draft, api_key, max_queue,
              drain_seconds):
    """Serve MODEL (default: the catalogue's default model, fetched on first use) over OpenAI's HTTP API:
    /v1/chat/completions, /v1/completions, /v1/models, /health, /metrics, /tokenize, /detokenize.
    --spec is each request's speculative decoding (checked per request inside the batch; answers unchanged)."""
    from edgeinfer.serve.openai_requests import model_names
    from edgeinfer.serve.server import ServeOptions, serve
    from edgeinfer.speculative import check_speculation
    from models.fetch import default_model_name, resolve_model, rich_progress

    check_speculation(speculative, draft is not None)  # before fetching anything
    name = model or default_model_name()
    with rich_progress() as progress:
        path = resolve_model(name, progress=progress)
        draft_path = resolve_model(draft, progress=progress) if draft is not None else None
    model_id, _ = model_names(path)  # what /v1/models lists; the file name works too
    options = ServeOptions(host=host, port=port, parallel=parallel, n_ctx=n_ctx, n_threads=n_threads,
                           kv_type=kv_type, device=device, speculative=speculative, draft=draft_path,
                           api_key=api_key or None, max_queue=max_queue,
                           drain_seconds=drain_seconds, model_id=model_id)
    serve(path, options, say=lambda line: click.echo(line))


@click.command("bench-serve")
@click.argument("url")
@click.option("--model", default=None, help="Model name to ask for (default: the first /v1/models lists).")
@click.option("-c", "--concurrency", type=CountList(), default="1,4,8,16", show_default=True,
              help="Comma-separated numbers of concurrent clients, one round each.")
@click.option("-r", "--requests", type=click.IntRange(min=1), default=4, show_default=True,
              help="Requests each client sends in a round, one after another.")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens each request generates.")
@click.option("--agent-requests", type=click.IntRange(min=0), default=20, show_default=True,
              help="1-token requests after a cached ~500-token prefix (agent-style latency); 0 skips.")
@click.option("--api-key", default=None, envvar="EDGEINFER_API_KEY", help="Bearer key the server wants.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench_serve_cmd(url, model, concurrency, requests, max_tokens, agent_requests, api_key, as_json):
    """Load an OpenAI-compatible server at URL (ours, llama-server, ...) with concurrent streaming clients:
    aggregate tokens/s, time to first token and inter-token latency (p50, p99), errors."""
    import json

    from edgeinfer.serve.bench_client import format_bench_serve, run_bench_serve

    result = run_bench_serve(url, model=model, concurrency=concurrency, requests=requests, max_tokens=max_tokens,
                             api_key=api_key, agent_requests=agent_requests)
    click.echo(json.dumps(result, indent=2) if as_json else format_bench_serve(result))


def register_serve_commands(group: click.Group) -> None:
    """Add `serve` and `bench-serve` to the `edgeinfer` command group."""
    for command in (serve_cmd, bench_serve_cmd):
        group.add_command(command)
