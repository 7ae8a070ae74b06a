"""A fake Vapi: the /call API and a signed-URL object store, with fault injection."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gzip
import hashlib
import hmac
import json
import math
import os
import random
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, cast
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from vapifs.demo.certs import ThrowawayCA
from vapifs.demo.data import (
    CONTENT_TYPES,
    ENDPOINTS,
    KIND_BY_ENDPOINT,
    PRESIGNED_FIELDS,
    FakeCall,
    extra_call,
    generate_calls,
    variant_artifact,
)

CHUNK = 1024 * 1024
BASE_COUNTERS = (
    "api.requests",
    "api.list",
    "api.get",
    "api.resolve",
    "api.unauthorized",
    "storage.requests",
    "storage.connections",
    "storage.bytes",
    "storage.expired",
    "storage.bad_signature",
)
UNAUTHORIZED_MESSAGE = (
    "Invalid Key. Hot tip, you may be using the private key instead of the public key, "
    "or vice versa."
)
_XML = '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{}</Code><Message>{}</Message></Error>'
_FILTERS = ("createdAt", "updatedAt")
_OPS = ("Gt", "Ge", "Lt", "Le")


@dataclass
class Knobs:
    """Fault injection settings; all off by default, changeable at runtime."""

    url_ttl: float = 600.0
    cut_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    api_500_rate: float = 0.0
    api_429_rate: float = 0.0
    retry_after: float | None = None
    ignore_range: bool = False
    wrong_content_range: bool = False
    gzip_ranged: bool = False
    malformed_json_rate: float = 0.0
    odd_calls: bool = False
    artifact_200: bool = False
    storage_down: bool = False
    api_down: bool = False
    api_stall: bool = False  # the API accepts requests and stays silent for stall_seconds
    storage_stall: bool = False  # so does storage, before it answers anything
    # An org's rate limit: requests per second (0: none) beyond a burst of as many; the
    # ones over it answer 429 with a Retry-After of the seconds until one would pass.
    api_rate_limit: float = 0.0


KNOB_NAMES = frozenset(f.name for f in dataclasses.fields(Knobs))


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(status: int, error: str, message: str | list[str]) -> bytes:
    return _json({"statusCode": status, "error": error, "message": message})


def _iso(ts: float) -> str:
    ms = int(ts * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"


def _parse_time(value: str) -> datetime:
    dt = datetime.fromisoformat(value)
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


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


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(
        self,
        addr: tuple[str, int],
        handler: type[_Handler],
        owner: FakeVapi,
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


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle plus delayed
    # ACKs would add ~40 ms to every small keep-alive response.
    disable_nagle_algorithm = True
    # Idle keep-alive connections give up after this long so threads do not pile up.
    timeout = 120

    @property
    def owner(self) -> FakeVapi:
        return cast(_Server, self.server).owner

    def log_message(self, format: str, *args: Any) -> None:
        pass

    @property
    def role(self) -> str:
        return "storage" if isinstance(self, _StorageHandler) else "api"

    def setup(self) -> None:
        tls = cast(_Server, self.server).tls
        if tls is not None:
            # The handshake runs in this connection's own thread, bounded, so that a client
            # that never finishes it holds up nobody else.
            self.request.settimeout(10)
            try:
                self.request = tls.wrap_socket(self.request, server_side=True)
            except OSError:
                self.owner._count("tls.failed")
                raise
            # Each one is a new TLS session: what a client that reuses connections saves.
            self.owner._count(f"{self.role}.tls_handshakes")
        super().setup()
        self.owner._track(self.connection, True)
        self.owner._count(f"{self.role}.connections")

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.owner._track(self.connection, False)
            if isinstance(self.connection, ssl.SSLSocket):
                # The server closes the socket it accepted, which the TLS one replaced.
                with contextlib.suppress(OSError):
                    self.connection.close()

    def handle_one_request(self) -> None:
        try:
            super().handle_one_request()
        except OSError:
            self.close_connection = True

    def _drop(self) -> None:
        """Close the connection without answering."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _discard_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _send(
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

    def _serve_object(self, call_id: str, kind: str, data: bytes, *, storage: bool) -> None:
        """Answer GET/HEAD for one artifact, honouring Range and (on storage) the fault knobs."""
        owner = self.owner
        knobs = owner.knobs_snapshot() if storage else Knobs()
        if storage and self.command == "GET":
            owner._count(f"storage.get:{call_id}/{kind}")
        total = len(data)
        etag, last_modified = owner._meta(call_id, kind, data)
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
            body = _XML.format("InvalidRange", "The requested range is not satisfiable").encode()
            self._send(
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
        if storage:
            roll = owner._roll()
            if roll < knobs.cut_rate:
                owner._count("fault.cut")
                self._write(view[: len(view) // 2], storage)
                self._drop()
                return
            if roll < knobs.cut_rate + knobs.stall_rate:
                owner._count("fault.stall")
                self.wfile.flush()
                if owner._halt.wait(knobs.stall_seconds):
                    self._drop()
                    return
            owner._count(f"storage.bytes:{call_id}/{kind}", len(view))
        self._write(view, storage)

    def _write(self, view: memoryview, storage: bool) -> None:
        # Slices of a memoryview: the stored object is never copied per request.
        for off in range(0, len(view), CHUNK):
            piece = view[off : off + CHUNK]
            self.wfile.write(piece)
            if storage:
                self.owner._count("storage.bytes", len(piece))


class _ApiHandler(_Handler):
    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PATCH(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        owner = self.owner
        url = urlsplit(self.path)
        body = self._discard_body()
        if url.path.startswith("/_fake/"):
            self._admin(url.path, body)
            return
        knobs = owner.knobs_snapshot()
        if knobs.api_down:
            self._drop()
            return
        if knobs.api_stall and owner._halt.wait(knobs.stall_seconds):
            self._drop()  # stopped while stalling; otherwise answer late
            return
        owner._count("api.requests")
        if self.headers.get("Authorization", "") != f"Bearer {owner.api_key}":
            owner._count("api.unauthorized")
            self._send(401, _error(401, "Unauthorized", UNAUTHORIZED_MESSAGE))
            return
        if knobs.api_rate_limit > 0:
            wait = owner._rate_wait(knobs.api_rate_limit)
            if wait > 0:
                owner._count("fault.api_429")
                msg = "ThrottlerException: Too Many Requests"
                after = (("Retry-After", str(max(1, math.ceil(wait)))),)
                self._send(429, _error(429, "Too Many Requests", msg), headers=after)
                return
        roll = owner._roll()
        if roll < knobs.api_500_rate:
            owner._count("fault.api_500")
            self._send(500, _error(500, "Internal Server Error", "Internal server error"))
            return
        if roll < knobs.api_500_rate + knobs.api_429_rate:
            owner._count("fault.api_429")
            headers: tuple[tuple[str, str], ...] = ()
            if knobs.retry_after is not None:
                headers = (("Retry-After", f"{knobs.retry_after:g}"),)
            msg = "ThrottlerException: Too Many Requests"
            self._send(429, _error(429, "Too Many Requests", msg), headers=headers)
            return
        parts = [p for p in url.path.split("/") if p]
        if self.command != "GET" or not parts or parts[0] != "call" or len(parts) > 3:
            self._send(404, _error(404, "Not Found", f"Cannot {self.command} {url.path}"))
            return
        query = parse_qs(url.query, keep_blank_values=True)
        if len(parts) == 1:
            owner._count("api.list")
            owner._log_list(query)
            status, payload = owner._list(query, knobs)
            self._send_api_json(status, payload, knobs)
        elif len(parts) == 2:
            owner._count("api.get")
            fc = owner.calls.get(parts[1])
            if fc is None:
                self._send(404, _error(404, "Not Found", "Call not found"))
            else:
                self._send_api_json(200, owner._presigned(fc), knobs)
        else:
            owner._count("api.resolve")
            self._resolve(parts[1], parts[2], knobs)

    def _send_api_json(self, status: int, payload: Any, knobs: Knobs) -> None:
        body = _json(payload)
        if status == 200 and self.owner._roll() < knobs.malformed_json_rate:
            body = body[: max(1, len(body) // 2)]
        self._send(status, body)

    def _resolve(self, call_id: str, endpoint: str, knobs: Knobs) -> None:
        owner = self.owner
        kind = KIND_BY_ENDPOINT.get(endpoint)
        if kind is None:
            self._send(404, _error(404, "Not Found", f"Cannot GET {self.path}"))
            return
        fc = owner.calls.get(call_id)
        if fc is None:
            self._send(404, _error(404, "Not Found", "Call not found"))
            return
        data = fc.artifacts.get(kind)
        if data is None:
            what = {"logs": "Call logs", "pcap": "PCAP"}.get(kind, "Recording")
            self._send(404, _error(404, "Not Found", f"{what} not found"))
            return
        if knobs.artifact_200:
            self._serve_object(call_id, kind, data, storage=False)
            return
        location, _ = owner.sign(call_id, kind)
        self._send(302, _json({"url": location}), headers=(("Location", location),))

    def _admin(self, path: str, body: bytes) -> None:
        owner = self.owner
        try:
            args: dict[str, Any] = json.loads(body) if body.strip() else {}
            if not isinstance(args, dict):
                raise ValueError("expected a JSON object")
            if path == "/_fake/counters" and self.command == "GET":
                self._send(200, _json(owner.counters()))
            elif path == "/_fake/knobs" and self.command == "GET":
                self._send(200, _json(dataclasses.asdict(owner.knobs_snapshot())))
            elif path == "/_fake/reset-counters" and self.command == "POST":
                owner.reset_counters()
                self._send(200, _json({"ok": True}))
            elif path == "/_fake/knobs" and self.command == "POST":
                owner.set_knobs(**args)
                self._send(200, _json(dataclasses.asdict(owner.knobs_snapshot())))
            elif path == "/_fake/swap" and self.command == "POST":
                call_id, kind = str(args["call_id"]), str(args["kind"])
                fc = owner.calls[call_id]
                data = variant_artifact(fc, kind, int(args.get("seed", 1)))
                owner.swap_artifact(call_id, kind, data)
                etag, _ = owner._meta(call_id, kind, data)
                self._send(
                    200, _json({"call_id": call_id, "kind": kind, "size": len(data), "etag": etag})
                )
            elif path == "/_fake/call-stage" and self.command == "POST":
                owner.set_call_stage(str(args["call_id"]), str(args["stage"]))
                self._send(200, _json({"ok": True}))
            elif path == "/_fake/forget" and self.command == "POST":
                if args.get("kind"):
                    owner.forget_artifact(str(args["call_id"]), str(args["kind"]))
                else:
                    owner.forget_call(str(args["call_id"]))
                self._send(200, _json({"ok": True}))
            elif path == "/_fake/add-call" and self.command == "POST":
                created = args.get("created_at")
                fc = extra_call(
                    int(args.get("seed", 0)),
                    _parse_time(created) if created else None,
                    base_seed=owner.seed,
                    org_id=owner.org_id,
                )
                owner.add_call(fc)
                self._send(200, _json({"id": fc.id}))
            else:
                self._send(404, _error(404, "Not Found", f"Cannot {self.command} {path}"))
        except KeyError as exc:
            self._send(404, _error(404, "Not Found", f"unknown: {exc}"))
        except (ValueError, TypeError) as exc:
            self._send(400, _error(400, "Bad Request", str(exc)))


class _StorageHandler(_Handler):
    def do_GET(self) -> None:
        self._object()

    def do_HEAD(self) -> None:
        self._object()

    def _xml(self, status: int, code: str, message: str) -> None:
        self._send(status, _XML.format(code, message).encode(), "application/xml")

    def _object(self) -> None:
        owner = self.owner
        knobs = owner.knobs_snapshot()
        if knobs.storage_down:
            owner._count("storage.requests")
            self._drop()
            return
        owner._count("storage.requests")
        if knobs.storage_stall:
            owner._count("fault.storage_stall")
            if owner._halt.wait(knobs.stall_seconds):
                self._drop()
                return
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        verdict = owner._verify(url.path, query)
        if verdict == "bad":
            owner._count("storage.bad_signature")
            self._xml(
                403,
                "SignatureDoesNotMatch",
                "The request signature we calculated does not match the signature you provided. "
                "Check your key and signing method.",
            )
            return
        if verdict == "expired":
            owner._count("storage.expired")
            self._xml(403, "AccessDenied", "Request has expired")
            return
        found = owner._lookup(url.path)
        if found is None:
            self._xml(404, "NoSuchKey", "The specified key does not exist.")
            return
        call_id, kind, data = found
        self._serve_object(call_id, kind, data, storage=True)


class FakeVapi:
    """The fake Vapi API and storage servers, on 127.0.0.1 in daemon threads."""

    def __init__(
        self,
        calls: list[FakeCall] | None = None,
        *,
        api_key: str = "demo-private-key",
        host: str = "127.0.0.1",
        api_port: int = 0,
        storage_port: int = 0,
        knobs: Knobs | None = None,
        secret: bytes | None = None,
        seed: int = 0,
        big_stereo_mb: int = 0,
        tls: bool | ThrowawayCA = False,
        storage_certs: ThrowawayCA | None = None,
    ) -> None:
        if calls is None:
            calls = generate_calls(seed=seed, big_stereo_mb=big_stereo_mb)
        self.calls: dict[str, FakeCall] = {fc.id: fc for fc in calls}
        self.api_key = api_key
        self.host = host
        self.knobs = knobs if knobs is not None else Knobs()
        self.seed = seed
        self.org_id = str(calls[0].call["orgId"]) if calls else ""
        self.api_url = ""
        self.storage_url = ""
        self._secret = secret if secret is not None else os.urandom(32)
        self._ports = (api_port, storage_port)
        self._lock = threading.Lock()
        self._counters: dict[str, int] = dict.fromkeys(BASE_COUNTERS, 0)
        # The query of every GET /call, in order (cleared with the counters).
        self.list_queries: list[dict[str, str]] = []
        self._random = random.Random(seed)
        self._etags: dict[tuple[str, str], tuple[bytes, str]] = {}
        self._mtimes: dict[tuple[str, str], float] = {}
        # Calls whose life is driven by set_call_stage: the complete call, and when it ended.
        self._complete: dict[str, tuple[dict[str, Any], dict[str, bytes], float | None]] = {}
        self._servers: list[tuple[_Server, threading.Thread]] = []
        self._connections: set[socket.socket] = set()
        # Set on pause/stop so that stalled responses give up at once.
        self._halt = threading.Event()
        self._started = False
        self._rate_bucket = (float("inf"), time.monotonic())  # (tokens, when)
        # HTTPS on both servers, with a certificate that only `ca_file` makes trusted (a new
        # throwaway CA's, or that of the one given, which other servers may share).
        self.certs = tls if isinstance(tls, ThrowawayCA) else ThrowawayCA() if tls else None
        self._tls = self.certs.server_context() if self.certs is not None else None
        # Storage may show a certificate of another CA: a host the client does not trust.
        self._storage_tls = storage_certs.server_context() if storage_certs else self._tls

    @property
    def tls(self) -> bool:
        return self.certs is not None

    @property
    def ca_file(self) -> str | None:
        """The PEM file of the CA that signed the servers' certificate (HTTPS only)."""
        return str(self.certs.ca_file) if self.certs is not None else None

    # ------------------------------------------------------------ lifecycle

    def start(self) -> FakeVapi:
        if not self._started:
            if self._halt.is_set():
                self._halt = threading.Event()
            self._bind()
            self._started = True
        return self

    def _bind(self) -> None:
        api = _Server((self.host, self._ports[0]), _ApiHandler, self, self._tls)
        try:
            storage = _Server((self.host, self._ports[1]), _StorageHandler, self, self._storage_tls)
        except OSError:
            api.server_close()
            raise
        # Remember the real ports so that resume() binds the very same ones.
        self._ports = (api.server_address[1], storage.server_address[1])
        self.api_url = f"{'https' if self._tls else 'http'}://{self.host}:{self._ports[0]}"
        scheme = "https" if self._storage_tls else "http"
        self.storage_url = f"{scheme}://{self.host}:{self._ports[1]}"
        for srv in (api, storage):
            th = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            th.start()
            self._servers.append((srv, th))

    def pause(self) -> None:
        """Close the listening sockets and every open connection; resume() re-binds."""
        with self._lock:
            servers, self._servers = self._servers, []
            conns = list(self._connections)
        self._halt.set()
        for srv, _ in servers:
            srv.shutdown()
            srv.server_close()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for _, th in servers:
            th.join(timeout=2)

    def resume(self) -> None:
        """Listen again on the same ports as before pause()."""
        self._halt = threading.Event()
        self._bind()

    def stop(self) -> None:
        if self._started:
            self.pause()
            self._started = False

    def __enter__(self) -> FakeVapi:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _track(self, conn: socket.socket, add: bool) -> None:
        with self._lock:
            if add:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

    # ------------------------------------------------------------ state

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def reset_counters(self) -> None:
        with self._lock:
            self._counters = dict.fromkeys(BASE_COUNTERS, 0)
            self.list_queries = []

    def _log_list(self, query: dict[str, list[str]]) -> None:
        with self._lock:
            self.list_queries.append({k: v[-1] for k, v in query.items()})

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] = self._counters.get(name, 0) + n

    def _rate_wait(self, rate: float) -> float:
        """0 when a request may pass the rate limit now (and takes its token), else the wait."""
        with self._lock:
            now = time.monotonic()
            tokens, at = self._rate_bucket
            tokens = min(rate, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._rate_bucket = (tokens - 1.0, now)
                return 0.0
            self._rate_bucket = (tokens, now)
            return (1.0 - tokens) / rate

    def _roll(self) -> float:
        with self._lock:
            return self._random.random()

    def knobs_snapshot(self) -> Knobs:
        with self._lock:
            return dataclasses.replace(self.knobs)

    def set_knobs(self, **changes: Any) -> None:
        unknown = set(changes) - KNOB_NAMES
        if unknown:
            raise TypeError(f"unknown knobs: {sorted(unknown)}")
        with self._lock:
            for name, value in changes.items():
                setattr(self.knobs, name, value)

    def swap_artifact(self, call_id: str, kind: str, data: bytes) -> None:
        """Replace an existing artifact: new bytes, new ETag, later Last-Modified."""
        with self._lock:
            fc = self.calls[call_id]
            if kind not in fc.artifacts:
                raise KeyError(f"{call_id}/{kind}")
            before = self._mtimes.get((call_id, kind), self._default_mtime(fc))
            fc.artifacts[kind] = data
            # HTTP dates have one-second resolution: make sure the new one differs.
            self._mtimes[(call_id, kind)] = max(time.time(), math.floor(before) + 1.0)

    def add_call(self, fc: FakeCall) -> None:
        with self._lock:
            self.calls[fc.id] = fc

    def set_call_stage(self, call_id: str, stage: str) -> None:
        """Drive a call through its life, as Vapi shows it: "in-progress" (no end, no
        artifacts), "ended" (ended just now, no artifacts yet), "complete" (its artifacts
        attached; its bytes are those it was generated with)."""
        if stage not in ("in-progress", "ended", "complete"):
            raise ValueError(f"unknown stage {stage!r}")
        with self._lock:
            fc = self.calls[call_id]
            full, artifacts, ended = self._complete.setdefault(
                call_id, (copy.deepcopy(fc.call), dict(fc.artifacts), None)
            )
            now = time.time()
            call = copy.deepcopy(full)
            call["updatedAt"] = _iso(now)
            if stage == "in-progress":
                call["status"] = "in-progress"
                call.pop("endedAt", None)
                call.pop("endedReason", None)
                ended = None
            else:
                ended = ended if ended is not None else now
                call["status"] = "ended"
                call["endedAt"] = _iso(ended)
                call.setdefault("endedReason", "customer-ended-call")
            if stage != "complete":
                call.pop("artifact", None)
                for key in ("recordingUrl", "stereoRecordingUrl", "transcript"):
                    call.pop(key, None)
            self._complete[call_id] = (full, artifacts, ended)
            fc.call = call
            fc.artifacts = dict(artifacts) if stage == "complete" else {}

    def forget_call(self, call_id: str) -> None:
        """The call passed the org's retention: GET /call/{id} and its artifacts answer 404."""
        with self._lock:
            del self.calls[call_id]

    def forget_artifact(self, call_id: str, kind: str) -> None:
        """One artifact passed retention: resolving it answers 404 (the call object stays)."""
        with self._lock:
            del self.calls[call_id].artifacts[kind]

    # ------------------------------------------------------------ helpers for handlers

    @staticmethod
    def _default_mtime(fc: FakeCall) -> float:
        stamp = fc.call.get("endedAt") or fc.call.get("updatedAt") or fc.call["createdAt"]
        return _parse_time(str(stamp)).timestamp()

    def _meta(self, call_id: str, kind: str, data: bytes) -> tuple[str, str]:
        """(quoted ETag, Last-Modified HTTP date) for the given content of an artifact."""
        key = (call_id, kind)
        with self._lock:
            cached = self._etags.get(key)
            mtime = self._mtimes.get(key)
        if cached is not None and cached[0] is data:
            etag = cached[1]
        else:
            etag = f'"{hashlib.md5(data).hexdigest()}"'
            with self._lock:
                self._etags[key] = (data, etag)
        if mtime is None:
            mtime = self._default_mtime(self.calls[call_id])
        return etag, formatdate(mtime, usegmt=True)

    def _object_path(self, fc: FakeCall, kind: str) -> str:
        return f"/{fc.call['orgId']}/{fc.id}/{kind}{fc.suffixes[kind]}"

    def _signature(self, path: str, date: str, expires: str, expires_at: str) -> str:
        msg = f"{path}\n{date}\n{expires}\n{expires_at}".encode()
        return hmac.new(self._secret, msg, hashlib.sha256).hexdigest()

    def sign(self, call_id: str, kind: str, now: float | None = None) -> tuple[str, float]:
        """A fresh signed storage URL for an artifact, and its expiry (epoch seconds)."""
        fc = self.calls[call_id]
        now = time.time() if now is None else now
        ttl = self.knobs_snapshot().url_ttl
        path = self._object_path(fc, kind)
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        expires = str(max(1, math.ceil(ttl)))
        # X-Amz-Date has one-second resolution; a precise expiry keeps short TTLs exact.
        expires_at = str(int((now + ttl) * 1000))
        query = urlencode(
            [
                ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                ("X-Amz-Credential", f"fake/{date[:8]}/auto/s3/aws4_request"),
                ("X-Amz-Date", date),
                ("X-Amz-Expires", expires),
                ("X-Amz-SignedHeaders", "host"),
                ("X-Fake-Expires-At", expires_at),
                ("X-Amz-Signature", self._signature(path, date, expires, expires_at)),
            ],
            quote_via=quote,
        )
        return f"{self.storage_url}{path}?{query}", now + ttl

    def _verify(self, path: str, query: dict[str, str]) -> str:
        """ "ok", "bad" (missing or wrong signature) or "expired"."""
        try:
            date, expires = query["X-Amz-Date"], query["X-Amz-Expires"]
            expires_at, signature = query["X-Fake-Expires-At"], query["X-Amz-Signature"]
        except KeyError:
            return "bad"
        good = self._signature(path, date, expires, expires_at)
        if not hmac.compare_digest(good, signature):
            return "bad"
        try:
            deadline = int(expires_at) / 1000
        except ValueError:
            return "bad"
        return "expired" if time.time() > deadline else "ok"

    def _lookup(self, path: str) -> tuple[str, str, bytes] | None:
        parts = path.strip("/").split("/")
        if len(parts) != 3:
            return None
        org, call_id, name = parts
        with self._lock:
            fc = self.calls.get(call_id)
            if fc is None or fc.call.get("orgId") != org:
                return None
            for kind, data in fc.artifacts.items():
                if name == kind + fc.suffixes[kind]:
                    return call_id, kind, data
        return None

    def _presigned(self, fc: FakeCall) -> dict[str, Any]:
        """The Call object with fresh presigned URLs; nested data is shared, not copied."""
        call = dict(fc.call)
        artifact = call.get("artifact")
        if isinstance(artifact, dict) and fc.artifacts:
            artifact = dict(artifact)
            now = time.time()
            expiry = now
            for kind in ENDPOINTS:
                if kind in fc.artifacts:
                    artifact[PRESIGNED_FIELDS[kind]], expiry = self.sign(fc.id, kind, now)
            ms = int(expiry * 1000)
            artifact["presignedUrlsExpiresAt"] = (
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms // 1000)) + f".{ms % 1000:03d}Z"
            )
            call["artifact"] = artifact
        return call

    def _list(self, query: dict[str, list[str]], knobs: Knobs) -> tuple[int, Any]:
        def one(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        raw_limit = one("limit")
        limit = 100
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                msg = ["limit must not be greater than 1000", "limit must be a number"]
                return 400, {"statusCode": 400, "error": "Bad Request", "message": msg}
            if limit > 1000:
                msg = ["limit must not be greater than 1000"]
                return 400, {"statusCode": 400, "error": "Bad Request", "message": msg}
            if limit < 0:
                msg = ["limit must not be less than 0"]
                return 400, {"statusCode": 400, "error": "Bad Request", "message": msg}
        bounds: list[tuple[str, str, datetime]] = []
        for field in _FILTERS:
            for op in _OPS:
                value = one(field + op)
                if value is None:
                    continue
                try:
                    bounds.append((field, op, _parse_time(value)))
                except ValueError:
                    msg = [f"{field}{op} must be a valid ISO 8601 date string"]
                    return 400, {"statusCode": 400, "error": "Bad Request", "message": msg}
        equals = {name: one(name) for name in ("id", "assistantId", "phoneNumberId")}
        with self._lock:
            calls = list(self.calls.values())
        selected: list[tuple[datetime, str, FakeCall]] = []
        for fc in calls:
            if any(v is not None and fc.call.get(k) != v for k, v in equals.items()):
                continue
            ok = True
            for field, op, bound in bounds:
                stamp = fc.call.get(field)
                if not isinstance(stamp, str):
                    ok = False
                    break
                t = _parse_time(stamp)
                ok = {
                    "Gt": t > bound,
                    "Ge": t >= bound,
                    "Lt": t < bound,
                    "Le": t <= bound,
                }[op]
                if not ok:
                    break
            if ok:
                selected.append((_parse_time(fc.created_at), fc.id, fc))
        selected.sort(key=lambda item: (item[0], item[1]), reverse=True)
        answer: list[Any] = [self._presigned(fc) for _, _, fc in selected[:limit]]
        if knobs.odd_calls and answer:
            answer[1:1] = self._odd_calls()
            answer = answer[:limit]
        return 200, answer

    def _odd_calls(self) -> list[Any]:
        # Shapes a loose parser must survive without failing the whole listing.
        return [
            {"id": None, "orgId": self.org_id, "createdAt": "2020-01-01T00:00:00.000Z"},
            {
                "id": "0dd0dd00-0000-4000-8000-000000000001",
                "orgId": self.org_id,
                "createdAt": 1700000000000,
                "artifact": "not-an-object",
            },
            {"id": "0dd0dd00-0000-4000-8000-000000000002", "orgId": self.org_id},
            {
                "id": 12345,
                "createdAt": "yesterday",
                "artifact": {"recording": [], "logUrl": 7, "presignedLogUrl": None},
            },
            "not even an object",
        ]
