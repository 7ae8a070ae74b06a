"""What the world's servers saw during a block: storage requests and bytes, API requests,
and the new connections (TLS handshakes with --tls) at each."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
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
