"""The fake Vapi without sockets: an httpx transport that hands each request to its handlers.

The tree and the reader then run against the fake's real API and storage logic (302s, signed
URLs, Range, ETags, counters) inside one trio run, so that trio's virtual clock can jump over
TTLs and revalidation intervals: nothing waits on a socket. Faults that sleep (stalls) block
the run and are not for this transport. CoreSettings gives core.opened_core its options.
"""

from __future__ import annotations

import http.client
import io
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx

from vapifs.defaults import DEFAULT_API_RATE, DEFAULT_STORAGE_CONNECTIONS
from vapifs.demo.api import ApiHandler
from vapifs.demo.server import FakeVapi
from vapifs.demo.storage import StorageHandler


@dataclass
class CoreSettings:
    """The options core.opened_core reads, as a command's options give them."""

    api_url: str
    cache_dir: Path
    cache_size: int = 1 << 30
    read_timeout: float = 30.0
    stall_timeout: float = 10.0
    api_rate: float = DEFAULT_API_RATE
    storage_connections: int = DEFAULT_STORAGE_CONNECTIONS
    ca_file: Path | None = None


class _Wire:
    """What a request handler takes for a socket: the request in, the answer out."""

    def __init__(self, request: bytes) -> None:
        self._in = io.BytesIO(request)
        self.out = io.BytesIO()
        self.dropped = False

    def makefile(self, mode: str, buffering: int = -1) -> Any:
        if "r" in mode:
            return self._in
        return self.out

    def sendall(self, data: bytes) -> None:
        self.out.write(data)

    def setsockopt(self, *args: Any) -> None:
        pass

    def settimeout(self, value: float | None) -> None:
        pass

    def shutdown(self, how: int) -> None:
        self.dropped = True

    def close(self) -> None:
        pass


class _Answer:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str, buffering: int = -1) -> io.BytesIO:
        return io.BytesIO(self._data)


class InProcessTransport(httpx.AsyncBaseTransport):
    """Route requests for the fake's API and storage URLs to its handlers, in this thread."""

    def __init__(self, fake: FakeVapi) -> None:
        self.fake = fake
        self._server = SimpleNamespace(owner=fake, tls=None)  # plain HTTP: no handshake

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        api = httpx.URL(self.fake.api_url)
        handler = ApiHandler if request.url.port == api.port else StorageHandler
        body = await request.aread()
        head = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1"]
        head += [f"{k.decode()}: {v.decode()}" for k, v in request.headers.raw]
        if body and "content-length" not in request.headers:
            head.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        wire = _Wire(raw)
        handler(wire, ("127.0.0.1", 0), self._server)  # type: ignore[arg-type]
        answer = wire.out.getvalue()
        if wire.dropped or not answer:
            raise httpx.RemoteProtocolError("the fake dropped the connection", request=request)
        response = http.client.HTTPResponse(_Answer(answer))  # type: ignore[arg-type]
        response.begin()
        content = b"" if request.method == "HEAD" else response.read()
        return httpx.Response(
            response.status,
            headers=[(k.encode(), v.encode()) for k, v in response.getheaders()],
            content=content,
            request=request,
        )
