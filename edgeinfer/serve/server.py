"""Running the server: bind the socket, serve the app with uvicorn while the model loads in the background (/health
answers 503 until it is ready), drain on SIGINT/SIGTERM, close the model.

The socket is bound here, before uvicorn starts, so a port in use is one clear error and port 0 picks a free port
(whose URL is printed: tests start servers that way).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging
import signal
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgeinfer.budget import read_system_state, threads_for_power
from edgeinfer.errors import EdgeInferError
from edgeinfer.sampling import warm_up as warm_up_sampler
from edgeinfer.serve import structured
from edgeinfer.serve.app import Served, ServerState, create_app
from edgeinfer.serve.openai_requests import model_names
from edgeinfer.serve.scheduler import Scheduler
from edgeinfer.speculative import DEFAULT_SPECULATION, check_speculation
from kernels_cpu.kernel_thread import spin_briefly_if_cpus_are_shared

log = logging.getLogger("edgeinfer.serve")


@dataclass
class ServeOptions:
    """How to serve: where, how many requests at once (slots), their context, and limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    parallel: int = 4
    n_ctx: int | None = None  # per slot; None: the budget's choice for parallel + 1 sequences
    n_threads: int | None = None
    kv_type: str | None = None
    device: str = "auto"  # "auto", "cpu" or "cuda" (edgeinfer.backends.devices)
    speculative: str = DEFAULT_SPECULATION  # each request's mode unless it names one (edgeinfer.speculative)
    draft: Path | None = None  # a draft model of the same vocabulary (for speculative "draft" or "auto")
    api_key: str | None = None
    max_queue: int = 64
    drain_seconds: float = 5.0
    model_id: str | None = None  # the name /v1/models lists (default: openai_requests.model_names)


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; EdgeInferError naming the address if it cannot be had."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not 0: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on accepted sockets
        # whose proto says TCP, and they copy the listener's. With Nagle on, a response's body waited behind its
        # headers for the client's delayed ACK: 40 ms added to every request (an agent's 1-token call took 44 ms)
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise EdgeInferError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


def bound_malloc_growth() -> None:
    """Keep a long-running server's RSS flat under glibc: every request allocates vocabulary-sized arrays (logits,
    sampler candidates: 0.2-1.2 MB) on the scheduler and tokenizer threads. glibc raises its mmap threshold after
    each such free, so they end up in per-thread heaps that fragment: RSS grew ~25 MB per 200 requests without
    these two settings and stays level with them (the same as MALLOC_MMAP_THRESHOLD_=131072 MALLOC_ARENA_MAX=2)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return
    m_mmap_threshold, m_arena_max = -3, -8  # glibc's malloc.h
    mallopt(m_mmap_threshold, 128 * 1024)
    mallopt(m_arena_max, 2)


def freeze_loaded_objects() -> None:
    """Take what loading made (the tokenizer's tables, the model's and the scheduler's Python objects: ~190,000 of
    them) out of the garbage collector's full collections: they live as long as the server, and walking them all
    held the GIL, so every request in flight waited, 75 ms at a time while serving (SmolLM2; 9 ms without them,
    measured with gc.callbacks)."""
    gc.collect()
    gc.freeze()


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(path: Path, options: ServeOptions, say: Callable[[str], None] = print) -> None:
    """Serve the GGUF model at `path` until SIGINT/SIGTERM; then drain for options.drain_seconds and return.

    Raises EdgeInferError if the socket cannot be bound or the model cannot be loaded (the server stops)."""
    import uvicorn

    check_speculation(options.speculative, options.draft is not None)  # before anything is bound or loaded
    sock = bind(options.host, options.port)
    bound_malloc_growth()
    spin_briefly_if_cpus_are_shared(threads_for_power(read_system_state(), n_threads=options.n_threads))
    state = ServerState(api_key=options.api_key)
    config = uvicorn.Config(create_app(state), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=max(0.1, options.drain_seconds))
    server = uvicorn.Server(config)
    url = url_of(sock)
    model_id = options.model_id or model_names(path)[0]
    failure: list[BaseException] = []

    def load() -> None:
        try:
            state.served = _load(path, options, state, model_id, say)
            freeze_loaded_objects()
            draft = state.served.model.draft
            say(f"ready: {url}/v1 (model {model_id!r}, {options.parallel} slots, device: "
                f"{state.served.model.device.summary}, speculation: {options.speculative}"
                f"{f' with draft {draft.path.name}' if draft is not None else ''})")
        except BaseException as e:  # noqa: BLE001 (reported by serve, after uvicorn stops)
            failure.append(e)
            server.should_exit = True

    say(f"edgeinfer serve: listening on {url} (loading {path.name}; /health answers 503 until ready)")
    loader = threading.Thread(target=load, name="edgeinfer-load", daemon=True)
    loader.start()
    # uvicorn re-raises the signal it caught once it has drained; these no-op handlers make that re-raise a
    # plain return, so SIGINT/SIGTERM end the process with status 0 after the drain
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
        served = state.served
        state.served = None
        if served is not None:
            served.scheduler.close()
            served.model.close()
    if failure:
        error = failure[0]
        raise error if isinstance(error, EdgeInferError) else EdgeInferError(f"loading {path.name} failed: "
                                                                              f"{error}")
    say("edgeinfer serve: stopped")


def _load(path: Path, options: ServeOptions, state: ServerState, model_id: str, say) -> Served:
    """The model with parallel + 1 sequences (sequence 0 stays the single-stream API's), warmed up, and its
    scheduler running; the draft model, if any, with as many sequences of as many positions (one per slot)."""
    from edgeinfer.api import Model
    from edgeinfer.budget import format_plan

    model = Model(path, n_ctx=options.n_ctx, n_threads=options.n_threads, n_seq=options.parallel + 1,
                  kv_type=options.kv_type, device=options.device)
    try:
        say(format_plan(model.plan))
        # every page of the KV cache mapped before the server is ready, not during its first burst of requests
        model.engine.cache.map_pages(model.n_threads)
        model.engine.warm_up()  # compiles on a first run (a minute or two), else loads the compiled kernels
        warm_up_sampler()
        if options.draft is not None:
            # closed with the model; InvalidArgument if its vocabulary is not the model's
            model.use_draft(Model(options.draft, n_ctx=model.n_ctx, n_threads=model.n_threads,
                                  n_seq=options.parallel + 1, kv_type=model.kv_type, device=model.device.name))
            model.draft.engine.cache.map_pages(model.n_threads)
            model.draft.engine.warm_up()
        scheduler = Scheduler(model.engine, model.tokenizer, name=str(path), max_queue=options.max_queue,
                              metrics=state.metrics, speculative=options.speculative,
                              draft_engine=model.draft.engine if model.draft is not None else None).start()
    except BaseException:
        model.close()
        raise
    aliases = model_names(path)[1]
    served = Served(model, scheduler, model_id, aliases)
    if structured.available():  # the vocabulary for response_format and tools: seconds, so before it is asked for
        threading.Thread(target=served.vocabulary.get, name="edgeinfer-grammar-vocabulary", daemon=True).start()
    return served
