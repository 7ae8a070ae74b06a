"""HTTPS_PROXY / NO_PROXY: a mount's requests go through a CONNECT proxy, or around it."""

from __future__ import annotations

import contextlib
import select
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Iterator

import pytest

from vapifs.demo.server import FakeVapi

from .conftest import MountFactory
from .test_mount import expected_files

pytestmark = pytest.mark.mount

_PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY")


class ConnectProxy:
    """A forward proxy on 127.0.0.1 that counts, by target, the CONNECT tunnels it opens (for
    https:// URLs) and the connections it forwards plain requests on (for http:// ones)."""

    def __init__(self) -> None:
        self.tunnels: Counter[str] = Counter()
        self.forwarded: Counter[str] = Counter()
        self.refused = 0
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        owner = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                owner._handle(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ConnectProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            conns = list(self._open)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _handle(self, client: socket.socket) -> None:
        client.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(4096)
            if not chunk:
                return
            head += chunk
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        method, _, rest = line.partition(" ")
        target = rest.partition(" ")[0]
        tunnel = method == "CONNECT"
        if not tunnel:
            # An absolute-form request (GET http://host:port/path): forwarded as it is, since
            # a server must accept that form; the client keeps one connection per origin.
            target = target.removeprefix("http://").partition("/")[0]
        host, _, port = target.rpartition(":")
        if host != "127.0.0.1" or not port.isdigit():
            with self._lock:
                self.refused += 1
            client.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
            return
        try:
            upstream = socket.create_connection((host, int(port)), timeout=5)
        except OSError:
            client.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
            return
        with self._lock:
            (self.tunnels if tunnel else self.forwarded)[target] += 1
            self._open.update((client, upstream))
        try:
            if tunnel:
                client.sendall(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            client.settimeout(None)
            upstream.settimeout(None)
            leftover = head.split(b"\r\n\r\n", 1)[1] if tunnel else head
            if leftover:
                upstream.sendall(leftover)
            self._pump(client, upstream)
        finally:
            with self._lock:
                self._open.difference_update((client, upstream))
            upstream.close()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        peers = {a: b, b: a}
        while True:
            ready, _, _ = select.select(list(peers), [], [], 120)
            if not ready:
                return
            for sock in ready:
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    return
                if not data:
                    return
                try:
                    peers[sock].sendall(data)
                except OSError:
                    return


@pytest.fixture
def connect_proxy(monkeypatch: pytest.MonkeyPatch) -> Iterator[ConnectProxy]:
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    with ConnectProxy() as proxy:
        yield proxy


@pytest.fixture
def tls_fake() -> Iterator[FakeVapi]:
    with FakeVapi(seed=7, tls=True) as server:
        yield server


def _read_one_call(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory(server=fake)
    for call_id, files in list(expected_files(fake).items())[:3]:
        for name, data in files.items():
            assert (m.calls / call_id / name).read_bytes() == data, f"{call_id}/{name}"
    m.stop()


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_every_request_goes_through_the_https_proxy(
    tls_fake: FakeVapi,
    connect_proxy: ConnectProxy,
    mount_factory: MountFactory,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, connect_proxy.url)
    _read_one_call(tls_fake, mount_factory)
    api = tls_fake.api_url.removeprefix("https://")
    storage = tls_fake.storage_url.removeprefix("https://")
    assert connect_proxy.tunnels[api] >= 1 and connect_proxy.tunnels[storage] >= 1
    assert set(connect_proxy.tunnels) == {api, storage}
    counters = tls_fake.counters()
    # Every TLS session the fake saw came through a tunnel: none went around the proxy.
    handshakes = counters["api.tls_handshakes"] + counters["storage.tls_handshakes"]
    assert handshakes == sum(connect_proxy.tunnels.values()), (counters, connect_proxy.tunnels)
    assert connect_proxy.refused == 0 and not connect_proxy.forwarded


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy"])
def test_plain_http_goes_through_the_http_proxy(
    fake: FakeVapi,
    connect_proxy: ConnectProxy,
    mount_factory: MountFactory,
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, connect_proxy.url)
    _read_one_call(fake, mount_factory)
    api, storage = (url.removeprefix("http://") for url in (fake.api_url, fake.storage_url))
    assert connect_proxy.forwarded[api] >= 1 and connect_proxy.forwarded[storage] >= 1
    assert set(connect_proxy.forwarded) == {api, storage} and not connect_proxy.tunnels
    counters = fake.counters()
    connections = counters["api.connections"] + counters["storage.connections"]
    assert connections == sum(connect_proxy.forwarded.values()), counters


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost,127.0.0.1", "*"])
def test_no_proxy_goes_around_it(
    tls_fake: FakeVapi,
    connect_proxy: ConnectProxy,
    mount_factory: MountFactory,
    monkeypatch: pytest.MonkeyPatch,
    no_proxy: str,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    monkeypatch.setenv("NO_PROXY", no_proxy)
    _read_one_call(tls_fake, mount_factory)
    assert sum(connect_proxy.tunnels.values()) == 0
    assert tls_fake.counters()["storage.tls_handshakes"] >= 1
