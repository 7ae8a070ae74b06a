"""h11's receive buffer, made to hand a response body on without copying it.

h11 keeps what a connection receives in a bytearray: each socket read is copied into it,
and each piece of body taken out is copied twice more (a slice to test for emptiness, then
the slice it returns), before httpcore copies it once again into bytes. On a fast link
those four copies of every byte cost a tenth of a download's time on the event loop.

`BodyBuffer` holds a socket read as the bytes object it came in, when the buffer was empty,
and hands all of it over as it is when a body wants at least that much; `bytes()` of it
is then no copy either. Whatever else h11 does (headers, a read that ends a message and
begins another) works as before on a bytearray. `install()` puts it in h11's connections
after a check that h11 still reads responses through it as it did; if not, it does nothing.
"""

from __future__ import annotations

import logging
from typing import cast

import h11
from h11 import _connection
from h11._receivebuffer import ReceiveBuffer

log = logging.getLogger("vapifs.fetch")


class BodyBuffer(ReceiveBuffer):
    """A ReceiveBuffer whose `_data` may be, for a while, the bytes object last received."""

    def __iadd__(self, byteslike: bytes | bytearray) -> BodyBuffer:
        if not self._data and type(byteslike) is bytes:
            # Kept as it is: bytes behave as the bytearray would for every read of it.
            self._data = cast(bytearray, byteslike)
            return self
        held: bytes | bytearray = self._data
        if type(held) is bytes:
            self._data = bytearray(held)
        self._data += byteslike
        return self

    def _extract(self, count: int) -> bytearray:
        data: bytes | bytearray = self._data
        self._next_line_search = 0
        self._multiple_lines_search = 0
        if type(data) is bytes:
            # Header lines are edited in place by h11: they must be a bytearray.
            self._data = cast(bytearray, data[count:])
            return bytearray(data[:count])
        assert isinstance(data, bytearray)
        out = data[:count]
        del data[:count]
        return out

    def maybe_extract_at_most(self, count: int) -> bytearray | None:
        data = self._data
        if not data or count <= 0:
            return None  # as h11's own: nothing to take is None, not an empty piece
        if len(data) > count:
            return self._extract(count)
        # All of it: handed over as it is, no copy.
        self._data = bytearray()
        self._next_line_search = 0
        self._multiple_lines_search = 0
        return data


def _reads_responses() -> bool:
    """Does h11, with BodyBuffer, still parse a response fed in odd pieces as it should?"""
    head = b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\nX-A: b\r\n\r\n"
    message = head + b"0123456789"
    for cut in (0, 5, len(head) - 1, len(head), len(head) + 4, len(message)):
        conn = h11.Connection(h11.CLIENT)
        if type(getattr(conn, "_receive_buffer", None)) is not BodyBuffer:
            return False
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
        conn.send(h11.EndOfMessage())
        body = b""
        status = 0
        for piece in (message[:cut], message[cut:]):
            if piece:
                conn.receive_data(piece)
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    break
                if isinstance(event, h11.Response):
                    status = event.status_code
                    if (b"x-a", b"b") not in list(event.headers):
                        return False
                elif isinstance(event, h11.Data):
                    body += bytes(event.data)
        if status != 206 or body != b"0123456789" or conn.their_state is not h11.DONE:
            return False
    return True


_installed: bool | None = None


def install() -> bool:
    """Make every h11 connection made from now on use BodyBuffer; True if it does."""
    global _installed
    if _installed is not None:
        return _installed
    original = getattr(_connection, "ReceiveBuffer", None)
    if original is not ReceiveBuffer:
        _installed = False
        return False
    setattr(_connection, "ReceiveBuffer", BodyBuffer)  # noqa: B010 (not exported)
    try:
        works = _reads_responses()
    except Exception:  # any surprise in h11's internals: leave it as it was
        works = False
    if not works:
        setattr(_connection, "ReceiveBuffer", original)  # noqa: B010
        log.debug("h11 %s: its receive buffer is left as it is", getattr(h11, "__version__", "?"))
    _installed = works
    return works
