"""TLS for httpcore's trio connections that decrypts what a socket read brought in one go.

httpcore wraps a connection in trio's SSLStream, whose every read returns one TLS record:
16 KiB at most. Each of those climbs through trio, httpcore, h11 and httpx, and over HTTPS
that climb, not the cipher, caps a download (about half of what plain HTTP gets).

`TLSStream` holds an `ssl.SSLObject` over memory buffers, as SSLStream does, made by the
same context (so the same verification: chain, host name, protocol versions). A read takes
what the socket holds, up to RAW_READ, and decrypts every record in it before handing the
bytes on: one climb carries a socket read's worth, as on plain HTTP. Whatever OpenSSL has
to send meanwhile (the answer to a TLS 1.3 key update) is sent before the read returns.

`install()` makes httpcore's trio backend start TLS this way; TLS inside TLS (to a host
behind an HTTPS proxy) is a TLSStream over a TLSStream.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trio
from httpcore import ConnectError, ConnectTimeout, ReadError, ReadTimeout, WriteError, WriteTimeout
from httpcore._backends import trio as trio_backend
from httpcore._backends.base import AsyncNetworkStream

# The most one socket read takes in, so about the most one read decrypts and returns.
RAW_READ = 1 << 20

# What a broken connection raises below us; httpcore wants its own errors instead.
_BROKEN = (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError)


@contextmanager
def _bounded(
    timeout: float | None, what: str, timed_out: type[Exception], broken: type[Exception]
) -> Iterator[None]:
    """Within `timeout` (None: no bound), with a timeout and a broken connection raised as
    the httpcore errors `timed_out` and `broken` that its callers expect."""
    try:
        with trio.fail_after(float("inf") if timeout is None else timeout):
            yield
    except trio.TooSlowError as exc:
        raise timed_out(f"{what} timed out") from exc
    except _BROKEN as exc:
        raise broken(str(exc)) from exc


class TLSStream(AsyncNetworkStream):
    """A client TLS connection over a trio socket stream (see the module's docstring)."""

    def __init__(
        self,
        transport: trio.SocketStream | TLSStream,
        context: ssl.SSLContext,
        server_hostname: str | None,
    ) -> None:
        self._transport = transport
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(
            self._incoming, self._outgoing, server_side=False, server_hostname=server_hostname
        )

    async def handshake(self, timeout: float | None) -> None:
        with _bounded(timeout, "TLS handshake", ConnectTimeout, ConnectError):
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._exchange()
            await self._flush()

    async def _flush(self) -> None:
        """Send what OpenSSL has written."""
        if self._outgoing.pending:
            await self._transport.send_all(self._outgoing.read())

    async def _exchange(self) -> None:
        """OpenSSL wants the peer's bytes: send what it wrote first, then wait for them."""
        await self._flush()
        await self._fill()

    async def _fill(self) -> None:
        """Wait for bytes from the socket and give them to OpenSSL."""
        if self._incoming.eof:
            # OpenSSL wants more after the end: nothing will come (never wait in a loop).
            raise trio.BrokenResourceError("the connection closed")
        data = await self._transport.receive_some(RAW_READ)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        with _bounded(timeout, "read", ReadTimeout, ReadError):
            return await self._read(max_bytes)

    async def _read(self, max_bytes: int) -> bytes:
        # Records already in may be decrypted without waiting: a cancel is still seen.
        await trio.lowlevel.checkpoint_if_cancelled()
        pieces: list[bytes] = []
        got = 0
        while got < max_bytes:
            try:
                piece = self._ssl.read(max_bytes - got)
            except ssl.SSLWantReadError:
                if got or self._incoming.eof:
                    break  # what had come in is all decrypted: hand it on
                await self._exchange()
                continue
            except ssl.SSLZeroReturnError:
                break  # the server closed TLS cleanly: the end of the stream
            except ssl.SSLEOFError:
                # The socket closed without TLS's close: for HTTP, the framing (length or
                # chunks) says whether the body was whole, as with SSLStream's
                # https_compatible=True; here it reads as the end of the stream.
                break
            if not piece:
                break
            pieces.append(piece)
            got += len(piece)
        await self._flush()
        if len(pieces) == 1:
            return pieces[0]
        return b"".join(pieces)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        with _bounded(timeout, "write", WriteTimeout, WriteError):
            view = memoryview(buffer)
            while view:
                try:
                    sent = self._ssl.write(view)
                except ssl.SSLWantReadError:  # a renegotiation wants the peer first
                    await self._exchange()
                    continue
                view = view[sent:]
            await self._flush()

    async def aclose(self) -> None:
        # As SSLStream with https_compatible=True: no waiting for the server's close_notify.
        await self._transport.aclose()

    # As a transport for TLS inside this TLS.
    async def receive_some(self, max_bytes: int) -> bytes:
        return await self._read(max_bytes)

    async def send_all(self, data: bytes) -> None:
        await self.write(data)

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        return await _started(self, ssl_context, server_hostname, timeout)

    @property
    def socket(self) -> trio.socket.SocketType:
        return self._transport.socket

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._ssl
        if info == "client_addr":
            return self.socket.getsockname()
        if info == "server_addr":
            return self.socket.getpeername()
        if info == "socket":
            return self.socket
        if info == "is_readable":
            return self._incoming.pending > 0 or self.socket.is_readable()
        return None


async def _started(
    transport: trio.SocketStream | TLSStream,
    ssl_context: ssl.SSLContext,
    server_hostname: str | None,
    timeout: float | None,
) -> TLSStream:
    """A TLSStream over `transport`, its handshake done; the transport closed if it fails."""
    stream = TLSStream(transport, ssl_context, server_hostname)
    try:
        await stream.handshake(timeout)
    except BaseException:
        await transport.aclose()
        raise
    return stream


_original_start_tls = trio_backend.TrioStream.start_tls


async def _start_tls(
    self: trio_backend.TrioStream,
    ssl_context: ssl.SSLContext,
    server_hostname: str | None = None,
    timeout: float | None = None,
) -> AsyncNetworkStream:
    transport = getattr(self, "_stream", None)
    if not isinstance(transport, trio.SocketStream):
        return await _original_start_tls(self, ssl_context, server_hostname, timeout)
    return await _started(transport, ssl_context, server_hostname, timeout)


def install() -> bool:
    """Make httpcore's trio connections start TLS as a TLSStream; True if they do."""
    if getattr(trio_backend.TrioStream, "start_tls", None) is _start_tls:
        return True
    if not hasattr(trio_backend.TrioStream, "start_tls"):
        return False
    trio_backend.TrioStream.start_tls = _start_tls  # type: ignore[method-assign]
    return True
