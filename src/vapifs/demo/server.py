"""A fake Vapi: the /call API and a signed-URL object store, with fault injection."""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType

from vapifs.demo.api import ApiHandler
from vapifs.demo.certs import ThrowawayCA
from vapifs.demo.data import FakeCall
from vapifs.demo.faults import Knobs
from vapifs.demo.state import FakeState
from vapifs.demo.storage import StorageHandler
from vapifs.demo.wire import Server


class FakeVapi(FakeState):
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
        super().__init__(
            calls,
            api_key=api_key,
            knobs=knobs,
            secret=secret,
            seed=seed,
            big_stereo_mb=big_stereo_mb,
        )
        self.host = host
        self._ports = (api_port, storage_port)
        self._servers: list[tuple[Server, threading.Thread]] = []
        self._started = False
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

    def start(self) -> FakeVapi:
        if not self._started:
            if self.faults.halted():
                self.faults.resume()
            self._bind()
            self._started = True
        return self

    def _bind(self) -> None:
        api = Server((self.host, self._ports[0]), ApiHandler, self, self._tls)
        try:
            storage = Server((self.host, self._ports[1]), StorageHandler, self, self._storage_tls)
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
        conns = self.open_connections()
        self.faults.halt()
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
        self.faults.resume()
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
