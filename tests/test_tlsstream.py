"""TLS that decrypts a socket read's worth at once: same bytes, same checks, same endings.

The servers here are trio's own TLS (SSLStream, server side) on loopback, with certificates
from a throwaway CA; the client side is what every vapifs connection uses over https.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpcore
import httpx
import pytest
import trio

from vapifs.core import http_client
from vapifs.demo.certs import ThrowawayCA
from vapifs.tls import client_context, untrusted
from vapifs.tlsstream import TLSStream

Handler = Callable[[trio.SSLStream[trio.SocketStream]], Awaitable[None]]
RECORD = 16 * 1024  # the most plaintext one TLS record carries


@pytest.fixture(scope="module")
def ca() -> ThrowawayCA:
    return ThrowawayCA("vapifs tlsstream test CA")


@asynccontextmanager
async def tls_server(ca: ThrowawayCA, handler: Handler) -> AsyncIterator[int]:
    """A TLS server on 127.0.0.1 that runs `handler` on each connection; yields its port."""
    context = ca.server_context()

    async def serve(raw: trio.SocketStream) -> None:
        stream = trio.SSLStream(raw, context, server_side=True)
        try:
            await handler(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await raw.aclose()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, serve, 0, host="127.0.0.1"))
        yield listeners[0].socket.getsockname()[1]
        nursery.cancel_scope.cancel()


def http_reply(body: bytes) -> Handler:
    """A handler that answers each request on the connection with `body`."""

    async def handle(stream: trio.SSLStream[trio.SocketStream]) -> None:
        received = b""
        while True:
            while b"\r\n\r\n" not in received:
                more = await stream.receive_some()
                if not more:
                    return
                received += more
            _, _, received = received.partition(b"\r\n\r\n")
            head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            await stream.send_all(head + body)

    return handle


async def test_a_body_arrives_whole_and_a_read_carries_many_records(
    ca: ThrowawayCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = bytes(range(256)) * (24 * 1024)  # 6 MiB
    sizes: list[int] = []
    original = TLSStream.read

    async def read(self: TLSStream, max_bytes: int, timeout: float | None = None) -> bytes:
        data = await original(self, max_bytes, timeout)
        sizes.append(len(data))
        return data

    monkeypatch.setattr(TLSStream, "read", read)
    async with (
        tls_server(ca, http_reply(body)) as port,
        http_client(read_timeout=10, stall_timeout=10, ca_file=Path(ca.ca_file)) as client,
    ):
        for _ in range(2):  # the second on the same connection, kept alive
            response = await client.get(f"https://127.0.0.1:{port}/big")
            assert response.status_code == 200 and response.content == body
    # One read hands on a socket read's worth, not a single record.
    assert sum(sizes) >= 2 * len(body) and max(sizes) > 4 * RECORD, sizes[:20]


async def test_an_untrusted_certificate_is_refused_as_before(ca: ThrowawayCA) -> None:
    url = ""
    async with tls_server(ca, http_reply(b"x")) as port:
        url = f"https://127.0.0.1:{port}/"
        async with http_client(read_timeout=10, stall_timeout=10) as client:  # CA not trusted
            with pytest.raises(httpx.ConnectError) as caught:
                await client.get(url)
    reason = untrusted(caught.value, url, "storage")
    assert reason is not None and "not trusted" in reason


async def test_a_name_the_certificate_does_not_cover_is_refused(ca: ThrowawayCA) -> None:
    async with tls_server(ca, http_reply(b"x")) as port:
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TLSStream(raw, client_context(Path(ca.ca_file)), "storage.example")
        with pytest.raises(httpcore.ConnectError) as caught:
            await stream.handshake(10)
        await raw.aclose()
    cause = caught.value.__cause__
    assert isinstance(cause, ssl.SSLCertVerificationError), cause


async def test_a_close_without_tls_close_reads_as_the_end(ca: ThrowawayCA) -> None:
    async def send_and_drop(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.do_handshake()
        await stream.send_all(b"all of it")
        await stream.transport_stream.aclose()  # the socket, with no close_notify

    async with tls_server(ca, send_and_drop) as port:
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TLSStream(raw, client_context(Path(ca.ca_file)), "localhost")
        await stream.handshake(10)
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.read(1 << 20, timeout=10):
                received += chunk
        assert received == b"all of it"
        assert await stream.read(1 << 20, timeout=10) == b""
        await stream.aclose()


async def test_a_silent_server_times_the_read_out(ca: ThrowawayCA) -> None:
    async def silent(stream: trio.SSLStream[trio.SocketStream]) -> None:
        await stream.do_handshake()
        await trio.sleep_forever()

    async with tls_server(ca, silent) as port:
        raw = await trio.open_tcp_stream("127.0.0.1", port)
        stream = TLSStream(raw, client_context(Path(ca.ca_file)), "localhost")
        await stream.handshake(10)
        started = trio.current_time()
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(1 << 20, timeout=0.3)
        assert trio.current_time() - started < 5
        await stream.aclose()


async def test_tls_inside_tls_reaches_a_host_behind_an_https_proxy(ca: ThrowawayCA) -> None:
    # The proxy ends the outer TLS and relays the bytes to the host, which speaks TLS itself.
    body = b"behind the proxy " * 4096
    async with tls_server(ca, http_reply(body)) as host_port:

        async def relay(outer: trio.SSLStream[trio.SocketStream]) -> None:
            inner = await trio.open_tcp_stream("127.0.0.1", host_port)

            async def pump(a: Any, b: Any) -> None:
                while data := await a.receive_some():
                    await b.send_all(data)

            async with inner, trio.open_nursery() as nursery:
                nursery.start_soon(pump, outer, inner)
                await pump(inner, outer)
                nursery.cancel_scope.cancel()

        async with tls_server(ca, relay) as proxy_port:
            context = client_context(Path(ca.ca_file))
            raw = await trio.open_tcp_stream("127.0.0.1", proxy_port)
            outer = TLSStream(raw, context, "localhost")
            await outer.handshake(10)
            inner = await outer.start_tls(context, "localhost", 10)
            assert isinstance(inner, TLSStream)
            await inner.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", timeout=10)
            received = b""
            with trio.fail_after(10):
                while not received.endswith(body):
                    received += await inner.read(1 << 20, timeout=10)
            assert received.startswith(b"HTTP/1.1 200 OK\r\n")
            await inner.aclose()
