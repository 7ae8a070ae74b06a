"""The fake's HTTP plumbing: threaded servers, TLS, replies, and objects served by range."""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast

from vapifs.demo.data import CONTENT_TYPES
from vapifs.demo.faults import Knobs
from vapifs.demo.state import FakeState

CHUNK = 1024 * 1024
XML = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>'


def json_body(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def error_body(status: int, error: str, message: str | list[str]) -> bytes:
    return json_body({"statusCode": status, "error": error, "message": message})


def parse_range(header: str, total: int) -> tuple[int, int] | bool | None:
    """(first, last) for a single satisfiable byte range, False if unsatisfiable, None to ignore."""
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None  # multiple or foreign ranges: answering 200 with everything is allowed
    first_s, dash, last_s = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first_s:
            n = int(last_s)
            if n <= 0 or total == 0:
                return False
            return max(0, total - n), total - 1
        first = int(first_s)
        last = int(last_s) if last_s else total - 1
    except ValueError:
        return None
    if first < 0 or (last_s and last < first):
        return None
    if first >= total:
        return False
    return first, min(last, total - 1)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        handler: type[Handler],
        owner: FakeState,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.owner = owner
        self.tls = tls
        super().__init__(addr, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-response are routine here (cut tests, timeouts): stay quiet.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle plus delayed
    # ACKs would add ~40 ms to every small keep-alive response.
    disable_nagle_algorithm = True
    # Idle keep-alive connections give up after this long so threads do not pile up.
    timeout = 120
    role = "api"  # or "storage": what the counters of its connections are named for

    @property
    def owner(self) -> FakeState:
        return cast(Server, self.server).owner

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def setup(self) -> None:
        tls = cast(Server, self.server).tls
        if tls is not None:
            # The handshake runs in this connection's own thread, bounded, so that a client
            # that never finishes it holds up nobody else.
            self.request.settimeout(10)
            try:
                self.request = tls.wrap_socket(self.request, server_side=True)
            except OSError:
                self.owner.count("tls.failed")
                raise
            # Each one is a new TLS session: what a client that reuses connections saves.
            self.owner.count(f"{self.role}.tls_handshakes")
        super().setup()
        self.owner.track(self.connection, True)
        self.owner.count(f"{self.role}.connections")

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner.track(self.connection, False)
            if isinstance(self.connection, ssl.SSLSocket):
                # The server closes the socket it accepted, which the TLS one replaced.
                with contextlib.suppress(OSError):
                    self.connection.close()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True

    def drop(self) -> None:
        """Close the connection without answering."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def discard_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def reply(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json; charset=utf-8",
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def serve_object(self, call_id: str, kind: str, data: bytes, *, storage: bool) -> None:
        """Answer GET/HEAD for one artifact, honouring Range and (on storage) the fault knobs."""
        owner = self.owner
        knobs = owner.knobs_snapshot() if storage else Knobs()
        if storage and self.command == "GET":
            owner.count(f"storage.get:{call_id}/{kind}")
        total = len(data)
        etag, last_modified = owner.meta(call_id, kind, data)
        content_type = CONTENT_TYPES.get(
            owner.calls[call_id].suffixes[kind], "application/octet-stream"
        )
        header = self.headers.get("Range")
        rng = parse_range(header, total) if header and not knobs.ignore_range else None
        common = (
            ("Accept-Ranges", "bytes"),
            ("ETag", etag),
            ("Last-Modified", last_modified),
        )
        if rng is False:
            body = XML.format("InvalidRange", "The requested range is not satisfiable").encode()
            self.reply(
                416, body, "application/xml", (*common, ("Content-Range", f"bytes */{total}"))
            )
            return
        if isinstance(rng, tuple):
            status, (first, last) = 206, rng
            if knobs.wrong_content_range and total > 1:
                # Serve (and honestly label) a range one byte off the one asked for.
                shift = 1 if last + 1 < total else -1
                first, last = max(0, first + shift), last + shift
        else:
            status, first, last = 200, 0, total - 1
        view = memoryview(data)[first : last + 1]
        extra: list[tuple[str, str]] = list(common)
        if status == 206:
            extra.append(("Content-Range", f"bytes {first}-{last}/{total}"))
        if status == 206 and knobs.gzip_ranged:
            view = memoryview(gzip.compress(bytes(view), mtime=0))
            extra.append(("Content-Encoding", "gzip"))
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(view)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command == "HEAD":
            return
        if storage and not self._body_faults(view, knobs):
            return
        if storage:
            owner.count(f"storage.bytes:{call_id}/{kind}", len(view))
        self._write(view, storage)

    def _body_faults(self, view: memoryview, knobs: Knobs) -> bool:
        """A cut or a stall, at their rates; False when the answer ends here."""
        owner = self.owner
        roll = owner.faults.roll()
        if roll < knobs.cut_rate:
            owner.count("fault.cut")
            self._write(view[: len(view) // 2], True)
            self.drop()
            return False
        if roll < knobs.cut_rate + knobs.stall_rate:
            owner.count("fault.stall")
            self.wfile.flush()
            if owner.faults.stall(knobs.stall_seconds):
                self.drop()
                return False
        return True

    def _write(self, view: memoryview, storage: bool) -> None:
        # Slices of a memoryview: the stored object is never copied per request.
        for off in range(0, len(view), CHUNK):
            piece = view[off : off + CHUNK]
            self.wfile.write(piece)
            if storage:
                self.owner.count("storage.bytes", len(piece))
