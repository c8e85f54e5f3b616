"""The starlette app without a model: 503 while loading, 429 with Retry-After when the scheduler's queue is full, and
the error shape of what the router refuses (starlette's TestClient drives the ASGI app in-process)."""
import gc
import time
import weakref
from types import SimpleNamespace

from starlette.testclient import TestClient

from edgeinfer.serve.app import Served, ServerState, create_app
from edgeinfer.serve.scheduler import QueueFull


class FullScheduler:
    n_ctx, n_slots, slots = 64, 1, [SimpleNamespace(request=object())]

    def submit(self, request):
        raise QueueFull("all 1 slots are busy and 4 requests are waiting")


def fake_model():
    tokenizer = SimpleNamespace(eog_ids=frozenset({0}))
    return SimpleNamespace(tokenizer=tokenizer, n_vocab=100, tokenize=lambda text, add_special=True: [1, 2, 3],
                           chat_tokens=lambda messages: [1, 2, 3])


def test_loading_then_busy():
    state = ServerState()
    client = TestClient(create_app(state))
    health = client.get("/health")
    assert health.status_code == 503 and health.json() == {"status": "loading"}
    loading = client.post("/v1/completions", json={"prompt": "hi"})
    assert loading.status_code == 503 and loading.headers["retry-after"] == "1"
    assert loading.json()["error"]["code"] == "model_loading"

    state.served = Served(fake_model(), FullScheduler(), "fake")
    assert client.get("/health").json() == {"status": "ok", "slots_idle": 0, "slots_processing": 1}
    busy = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["type"] == "rate_limit_error" and "4 requests are waiting" in busy.json()["error"][
        "message"]
    assert client.get("/v1/models").json()["data"][0]["id"] == "fake"
    metrics = client.get("/metrics").text
    assert 'edgeinfer_requests_total{endpoint="chat",status="429"} 1.0' in metrics


def test_router_refusals_are_openai_errors():
    client = TestClient(create_app(ServerState(api_key="k")))
    for response, status in ((client.get("/nope"), 404), (client.delete("/v1/models"), 405)):
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param",
                                                                                    "code"}
    assert client.get("/health").status_code == 503  # /health needs no key
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 503


def test_connections_have_nagle_off():
    """Every accepted connection sends small writes at once (TCP_NODELAY): with Nagle's algorithm on, a response's
    body waited behind its headers for the client's delayed ACK, 40 ms on every request."""
    import asyncio
    import socket

    from edgeinfer.serve.server import bind

    async def accepted_nodelay() -> int:
        listener = bind("127.0.0.1", 0)
        seen = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                sock = transport.get_extra_info("socket")
                seen.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()

    assert asyncio.run(accepted_nodelay()) != 0


def test_events_from_the_scheduler_thread_reach_their_queues_in_order_with_few_wake_ups():
    """LoopHandoff: a step's events (one per stream) wake the event loop once, not once per event; each queue gets
    its events in order, and a closed loop is refused (so the sink cancels the request)."""
    import asyncio
    import threading

    import pytest

    from edgeinfer.serve.app import LoopHandoff

    async def main():
        loop = asyncio.get_running_loop()
        handoff = LoopHandoff(loop)
        wake_ups = []
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args):
            wake_ups.append(1)
            return call_soon_threadsafe(*args)

        loop.call_soon_threadsafe = counted
        queues = [asyncio.Queue() for _ in range(8)]

        def emit_step(step):  # one event for each of 8 streams, as the scheduler thread emits a step's tokens
            for i, q in enumerate(queues):
                handoff.put(q, (i, step))

        # Each step is emitted while the loop is blocked (as it is while the scheduler thread holds the GIL through a
        # step), then the loop runs once: a step costs at most one wake-up, whatever the thread timing.
        for step in range(50):
            thread = threading.Thread(target=emit_step, args=(step,))
            thread.start()
            thread.join()
            await asyncio.sleep(0)
        received = [[await q.get() for _ in range(50)] for q in queues]
        assert received == [[(i, step) for step in range(50)] for i in range(8)]
        assert 1 <= len(wake_ups) <= 50  # one per event would be 400

        # Events emitted while the loop runs freely still arrive, each queue in order.
        def scheduler():
            for step in range(50, 100):
                emit_step(step)

        thread = threading.Thread(target=scheduler)
        thread.start()
        received = [[await q.get() for _ in range(50)] for q in queues]
        thread.join()
        assert received == [[(i, step) for step in range(50, 100)] for i in range(8)]
        return handoff

    loop = asyncio.new_event_loop()
    handoff = loop.run_until_complete(main())
    loop.close()
    with pytest.raises(RuntimeError):
        handoff.put(asyncio.Queue(), "late")


def test_what_loading_made_is_left_out_of_full_collections():
    """The server freezes the objects loading made (freeze_loaded_objects, called once the model is ready): a full
    collection no longer walks them, so it pauses requests in flight for milliseconds, not ~75 ms."""
    import gc

    from edgeinfer.serve.server import freeze_loaded_objects

    made_by_loading = [{"token": i} for i in range(10_000)]
    try:
        freeze_loaded_objects()
        assert gc.get_freeze_count() >= len(made_by_loading)
        assert not any(gc.is_tracked(o) and o in gc.get_objects(generation=2) for o in made_by_loading[:3])
    finally:
        gc.unfreeze()  # this test process goes on


class EchoScheduler:
    """Answers each request at once with one token and its end, and keeps only a weak reference to it."""
    n_ctx, n_slots, slots = 64, 1, [SimpleNamespace(request=None)]

    def __init__(self):
        self.requests = []

    def submit(self, request):
        from edgeinfer.serve.serve_request import DoneEvent, TokenEvent

        self.requests.append(weakref.ref(request))
        request.sink(TokenEvent(5, "hi"))
        request.sink(DoneEvent("length", "", 3, 1, 0))


def test_a_finished_request_is_freed_without_the_garbage_collector():
    """A request (and its vocabulary-sized buffers) goes when its response does: no reference cycle keeps it until
    one of the collector's rare full passes (the watcher task's CancelledError held the frame holding the request's
    event queue; its sink referred to it), which made a server's RSS rise and fall by 100-200 MB."""
    scheduler = EchoScheduler()
    state = ServerState()
    state.served = Served(fake_model(), scheduler, "fake")
    client = TestClient(create_app(state))
    gc.disable()
    try:
        whole = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        streamed = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "stream": True})
        assert whole.json()["choices"][0]["text"] == "hi" and streamed.text.endswith("data: [DONE]\n\n")
        for _ in range(100):  # (the cancelled watcher task ends at the event loop's next turn)
            if all(ref() is None for ref in scheduler.requests):
                break
            time.sleep(0.01)
        assert len(scheduler.requests) == 2 and all(ref() is None for ref in scheduler.requests)
    finally:
        gc.enable()


def test_a_plain_tokens_event_from_its_frame_is_the_chunk_serialized():
    """StreamChunks.events renders a plain token's event from a frame made once per stream: byte for byte what
    serializing the whole chunk gives, for chat and completions, with and without usage, whatever the text holds."""
    from edgeinfer.sampling import Sampler, SamplingParams
    from edgeinfer.serve.openai_schema import ResponseHead
    from edgeinfer.serve.responses import ChatShape, CompletionShape, StreamChunks, sse_event
    from edgeinfer.serve.serve_request import DoneEvent, ServeRequest, TokenEvent

    texts = ["Hello", ' "quoted" \\ back', "line\nbreak\ttab", "é ü 漢字 🙂", "\x00\x1f", "</script>"]
    for shape, kind in ((ChatShape(None), "chat.completion"), (CompletionShape(None), "text_completion")):
        for include_usage in (False, True):
            r = ServeRequest([1, 2], Sampler(SamplingParams(temperature=0), 10), 4)
            chunks = StreamChunks(ResponseHead("id-1", kind, "m", created=7), shape, r, include_usage)
            for text in texts:
                event = TokenEvent(5, text)
                assert chunks.events(event) == [sse_event(c) for c in chunks.of(event)], (kind, text)
            done = DoneEvent("length", "", 2, 4, 0)
            assert chunks.events(done) == [sse_event(c) for c in chunks.of(done)]
