"""bench-serve's HTTP client (edgeinfer.serve.http_stream) against a scripted asyncio server: chunked event streams,
Content-Length and read-to-close bodies, keep-alive reuse, a connection the server closed, error statuses and
answers that are not HTTP."""
import asyncio
import json

import pytest

from edgeinfer.errors import EdgeInferError
from edgeinfer.serve.http_stream import Connection, HTTPStreamError


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


async def serve(answers, seen):
    """A server that answers each request it reads with the next of answers (bytes; None: close the connection
    without answering); seen gets (request line, headers, body) of each."""
    answers = list(answers)

    async def handle(reader, writer):
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            seen.append((lines[0], headers, body))
            answer = answers.pop(0)
            if answer is None:
                break
            writer.write(answer)
            await writer.drain()
            if b"connection: close" in answer.lower():
                break
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def post_all(conn, body):
    status, events = await conn.post("/v1/chat/completions", body)
    return status, [e async for e in events]


def test_event_stream_split_across_chunks_and_keep_alive():
    events = [b'data: {"n": 1}\n\n', b'data: {"n"', b': 2}\n\ndata: [DONE]\n\n']

    async def main():
        seen = []
        server, url = await serve([SSE_HEAD + chunked(*events), SSE_HEAD + chunked(b"data: again\n\n")], seen)
        async with server:
            conn = Connection(url + "/", {"Authorization": "Bearer k"})
            first = await post_all(conn, {"stream": True})
            second = await post_all(conn, {"x": "\u00e9"})  # the same connection, kept alive
            await conn.close()
        return first, second, seen

    first, second, seen = asyncio.run(main())
    assert first == (200, ['{"n": 1}', '{"n": 2}', "[DONE]"])
    assert second == (200, ["again"])
    assert [s[0] for s in seen] == ["POST /v1/chat/completions HTTP/1.1"] * 2
    assert seen[0][1]["authorization"] == "Bearer k" and seen[0][1]["content-type"] == "application/json"
    assert json.loads(seen[1][2]) == {"x": "\u00e9"}


def test_error_status_gives_its_body_and_content_length_is_honoured():
    body = b'{"error": {"message": "no such model"}}'
    answer = b"HTTP/1.1 404 Not Found\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)

    async def main():
        server, url = await serve([answer, SSE_HEAD + chunked(b"data: ok\n\n")], [])
        async with server:
            conn = Connection(url)
            results = [await post_all(conn, {}), await post_all(conn, {})]
            await conn.close()
        return results

    assert asyncio.run(main()) == [(404, [body.decode()]), (200, ["ok"])]


def test_a_body_read_to_the_close_and_a_reconnect_after_it():
    close_answer = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\ndata: last\n"

    async def main():
        server_a, url = await serve([close_answer, close_answer], [])
        async with server_a:
            conn = Connection(url)
            first = await post_all(conn, {})
            # the server closed that connection: the next request opens a new one
            second = await post_all(conn, {})
            await conn.close()
        return first, second

    assert asyncio.run(main()) == ((200, ["last"]), (200, ["last"]))


def test_a_kept_alive_connection_the_server_dropped_is_reopened_once():
    async def main():
        seen = []
        # first connection: one answer, then the server drops it without a word at the next request
        server, url = await serve([SSE_HEAD + chunked(b"data: 1\n\n"), None, SSE_HEAD + chunked(b"data: 1\n\n")],
                                 seen)
        async with server:
            conn = Connection(url)
            first = await post_all(conn, {})
            second = await post_all(conn, {})
            await conn.close()
        return first, second, len(seen)

    first, second, requests = asyncio.run(main())
    assert first == (200, ["1"]) and second == (200, ["1"]) and requests == 3


@pytest.mark.parametrize("answer, message", [
    (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "not an HTTP/1.x answer"),
    (SSE_HEAD + b"zz\r\n", "a broken chunk header"),
])
def test_answers_that_are_not_http_are_named(answer, message):
    async def main():
        server, url = await serve([answer], [])
        async with server:
            conn = Connection(url)
            try:
                await post_all(conn, {})
            finally:
                await conn.close()

    with pytest.raises(HTTPStreamError, match=message):
        asyncio.run(main())


def test_the_host_header_names_the_port_and_brackets_ipv6():
    assert Connection("http://[::1]:8080").headers["Host"] == "[::1]:8080"
    assert Connection("https://example.com/v1").headers["Host"] == "example.com"
    assert Connection("https://example.com/v1").port == 443 and Connection("http://h").port == 80


@pytest.mark.parametrize("url", ["ftp://host/", "localhost:8080", "http://"])
def test_urls_it_cannot_use_are_refused(url):
    with pytest.raises(EdgeInferError, match="not an http"):
        Connection(url)
