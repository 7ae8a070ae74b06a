"""h11's receive buffer without the copies: the same events as h11's own, bytes handed on."""

from __future__ import annotations

import random
from typing import Any

import h11
from h11 import _connection
from h11._receivebuffer import ReceiveBuffer

from vapifs import h11buffer
from vapifs.h11buffer import BodyBuffer


def responses(rng: random.Random) -> tuple[list[bytes], int]:
    """A keep-alive stream of responses of every framing, and how many requests it answers."""
    out: list[bytes] = []
    for _ in range(rng.randrange(1, 6)):
        body = rng.randbytes(rng.choice([0, 1, 7, 4096, 70_000, rng.randrange(1, 300_000)]))
        framing = rng.choice(["length", "chunked", "none"])
        if framing == "length":
            head = f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
            out.append(head.encode() + b'ETag: "e"\r\n\r\n' + body)
        elif framing == "chunked":
            pieces = [body[i : i + 5000] for i in range(0, len(body), 5000)]
            chunked = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
            start = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            out.append(start + chunked + b"0\r\n\r\n")
        else:
            out.append(b'HTTP/1.1 304 Not Modified\r\nETag: "e"\r\n\r\n')
    return out, len(out)


def parse(stream: bytes, cuts: list[int], count: int, buffer: ReceiveBuffer) -> list[Any]:
    """The events of `count` responses received in pieces cut at `cuts`."""
    conn = h11.Connection(h11.CLIENT)
    conn._receive_buffer = buffer
    events: list[Any] = []
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    for _ in range(count):
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "storage")]))
        conn.send(h11.EndOfMessage())
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(pieces.pop(0) if pieces else b"")
                continue
            if isinstance(event, h11.Data):
                events.append(("data", bytes(event.data)))
            elif isinstance(event, h11.Response):
                events.append(("response", event.status_code, list(event.headers)))
            else:
                events.append(type(event).__name__)
            if isinstance(event, h11.EndOfMessage):
                break
        conn.start_next_cycle()
    return events


def joined(events: list[Any]) -> list[Any]:
    """Events with each message's data joined: how pieces are cut may differ, not the bytes."""
    out: list[Any] = []
    for event in events:
        if isinstance(event, tuple) and event[0] == "data" and out and out[-1][0:1] == ("data",):
            out[-1] = ("data", out[-1][1] + event[1])
        else:
            out.append(event)
    return out


def test_responses_cut_anywhere_read_exactly_as_with_h11s_own_buffer() -> None:
    rng = random.Random(5)
    for _ in range(200):
        parts, count = responses(rng)
        stream = b"".join(parts)
        cuts = sorted(rng.sample(range(1, len(stream)), min(len(stream) - 1, rng.randrange(0, 12))))
        theirs = parse(stream, cuts, count, ReceiveBuffer())
        ours = parse(stream, cuts, count, BodyBuffer())
        assert joined(ours) == joined(theirs)


def test_a_body_read_is_handed_on_as_the_very_bytes_received() -> None:
    conn = h11.Connection(h11.CLIENT)
    conn._receive_buffer = BodyBuffer()
    conn.send(h11.Request(method="GET", target="/", headers=[("Host", "storage")]))
    conn.send(h11.EndOfMessage())
    conn.receive_data(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 2000000\r\n\r\n")
    assert isinstance(conn.next_event(), h11.Response)
    assert conn.next_event() is h11.NEED_DATA
    first, second = b"a" * 1_000_000, b"b" * 1_000_000
    conn.receive_data(first)
    event = conn.next_event()
    assert isinstance(event, h11.Data) and event.data is first  # no copy in h11
    assert bytes(event.data) is first  # nor in httpcore's bytes() of it
    conn.receive_data(second)
    event = conn.next_event()
    assert isinstance(event, h11.Data) and event.data is second
    assert isinstance(conn.next_event(), h11.EndOfMessage)


def test_installed_for_the_locked_h11_and_used_by_new_connections() -> None:
    assert h11buffer.install()
    assert getattr(_connection, "ReceiveBuffer") is BodyBuffer  # noqa: B009
    assert type(h11.Connection(h11.CLIENT)._receive_buffer) is BodyBuffer
