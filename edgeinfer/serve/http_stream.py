"""A small HTTP/1.1 client on asyncio streams for `bench-serve`'s load: keep-alive connections, JSON POSTs and their
server-sent-event streams, nothing else.

Why not httpx: the load generator runs on the machine it measures, and on a small one every microsecond it spends is
taken from the server's forward. httpx's async stack cost 180-220 us of CPU per streamed token at 8 clients
(measured against `edgeinfer serve` on SmolLM2, 2 cores: 15% of a core at 730 tokens/s); reading the chunked stream
and its `data:` lines directly is a few tens of microseconds. It also keeps `edgeinfer bench-serve` free of a
dependency the runtime does not otherwise need.
"""
from __future__ import annotations

import asyncio
import json
import ssl
from urllib.parse import urlsplit

from edgeinfer.errors import EdgeInferError

_MAX_HEADER_BYTES = 64 * 1024


class HTTPStreamError(EdgeInferError):
    """The server answered in a way this client cannot read (not HTTP/1.x, a broken chunk), or with an error."""


class Connection:
    """One keep-alive connection to base_url (http or https), reopened when the server closes it. Requests go one
    after another (a worker's requests), never two at once."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EdgeInferError(f"{base_url}: not an http:// or https:// URL")
        self.host, self.tls = parts.hostname, parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        host_header = f"[{self.host}]" if ":" in self.host else self.host  # (an IPv6 address in brackets)
        host_header += "" if parts.port is None else f":{parts.port}"
        self.headers = {"Host": host_header, "Accept": "text/event-stream, application/json", **(headers or {})}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            try:
                await self._writer.wait_closed()
            except OSError:
                pass
        self._reader = self._writer = None

    async def post(self, path: str, body: dict):
        """POST body as JSON: (status, events), events an async iterator of the text of each `data:` line of a 200's
        event stream (a non-stream answer: its whole body, once), or of another status's body, once. Read events to
        the end before the next request; close() the connection instead where a caller stops early."""
        payload = json.dumps(body).encode()
        head = [f"POST {self.prefix}{path} HTTP/1.1"] + [f"{k}: {v}" for k, v in self.headers.items()]
        head += ["Content-Type: application/json", f"Content-Length: {len(payload)}", "", ""]
        request = "\r\n".join(head).encode() + payload
        fresh = self._writer is None
        if fresh:
            await self._open()
        try:
            status, headers = await self._send(request)
        except (ConnectionError, asyncio.IncompleteReadError):
            if fresh:
                raise
            await self._open()  # a kept-alive connection the server had closed meanwhile: once more, on a new one
            status, headers = await self._send(request)
        return status, (self._events(headers) if status == 200 else self._text(headers))

    async def _send(self, request: bytes) -> tuple[int, dict[str, str]]:
        self._writer.write(request)
        await self._writer.drain()
        return await self._read_head()

    async def _text(self, headers: dict[str, str]):
        yield b"".join([piece async for piece in self._body(headers)]).decode("utf-8", "replace")

    async def _events(self, headers: dict[str, str]):
        pending = b""
        async for piece in self._body(headers):
            pending += piece
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.startswith(b"data:"):
                    yield line[5:].strip().decode()
        if pending.strip():
            yield pending.strip().decode()  # a non-stream answer: the body itself

    async def _open(self) -> None:
        await self.close()
        context = ssl.create_default_context() if self.tls else None
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, ssl=context,
                                                                   limit=_MAX_HEADER_BYTES)

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        raw = await self._reader.readuntil(b"\r\n\r\n")
        status_line, *lines = raw.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise HTTPStreamError(f"not an HTTP/1.x answer: {status_line[:80]!r}")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            if name:
                headers[name.strip().lower()] = value.strip()
        return int(parts[1]), headers

    async def _body(self, headers: dict[str, str]):
        """The body's bytes as they arrive: chunked, by Content-Length, or up to the connection's end."""
        reader = self._reader
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size_line = await reader.readline()
                try:
                    size = int(size_line.split(b";")[0], 16)
                except ValueError:
                    raise HTTPStreamError(f"a broken chunk header: {size_line[:40]!r}") from None
                if size == 0:
                    while (await reader.readline()) not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    break
                yield await reader.readexactly(size)
                await reader.readexactly(2)
        elif "content-length" in headers:
            left = int(headers["content-length"])
            while left > 0:
                piece = await reader.read(min(left, 65536))
                if not piece:
                    raise HTTPStreamError("the connection ended inside a body")
                left -= len(piece)
                yield piece
        else:
            while piece := await reader.read(65536):
                yield piece
            await self.close()
            return
        if headers.get("connection", "").lower() == "close":
            await self.close()
