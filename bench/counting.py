"""What the world's servers saw during a block (storage requests and bytes, API requests,
and the new connections, TLS handshakes with --tls, at each), and a shell command so timed."""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

from stage import Stage
from world import SIGNED_PREFIX


@contextlib.contextmanager
def counting(stage: Stage, into: dict[str, Any], prefix: str = SIGNED_PREFIX) -> Iterator[None]:
    """Storage requests/bytes (nginx's log) and API requests made inside the block."""
    assert stage.nginx is not None and stage.fake is not None
    offset = stage.nginx.log_offset()
    stage.fake.reset_counters()
    try:
        yield
    finally:
        time.sleep(0.05)  # nginx logs after the response
        into["storage_requests"], into["storage_bytes"] = stage.nginx.requests_since(offset, prefix)
        c = stage.fake.counters()
        into["api_requests"] = c.get("api.requests", 0)
        into["api_resolves"] = c.get("api.resolve", 0)
        # New connections, each a full TLS handshake with --tls (no client here resumes
        # sessions): what reusing connections saves, two round trips apiece on a link.
        into["api_connections"] = c.get("api.connections", 0)
        into["storage_connections"] = stage.nginx.connections_since(offset)


def timed_shell(
    stage: Stage,
    cmd: str,
    into: dict[str, Any],
    timeout: float,
    *,
    prefix: str = SIGNED_PREFIX,
    also: Callable[[], None] | None = None,
) -> subprocess.CompletedProcess[str] | None:
    """Run `cmd` in bash: its seconds and the requests it made go into `into`, and `also`
    runs before the counting ends. None when it ran out of `timeout` (`into` says so)."""
    try:
        with counting(stage, into, prefix):
            t0 = time.perf_counter()
            out = subprocess.run(
                ["bash", "-c", cmd], capture_output=True, text=True, timeout=timeout, check=False
            )
            into["seconds"] = time.perf_counter() - t0
            if also is not None:
                also()
    except subprocess.TimeoutExpired:
        into["seconds"] = None
        into["timeout"] = timeout
        return None
    return out
