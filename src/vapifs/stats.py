"""Live figures of a running mount, from the core's counters, published for `vapifs stats`."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .api import VapiClient
from .blocks import BlockCache
from .defaults import PAGE_CACHE_NOTE
from .fetch import Fetcher
from .reader import ArtifactStore
from .resolver import Resolver
from .walk import WalkStats


@dataclass
class Sources:
    """The live objects of one mount whose counters make up its figures."""

    api: VapiClient
    resolver: Resolver
    fetcher: Fetcher
    cache: BlockCache
    store: ArtifactStore
    open_files: Callable[[], int]
    started: float  # wall clock
    mountpoint: str
    cache_dir: str
    walks: WalkStats | None = None


def snapshot(src: Sources, now: float | None = None) -> dict[str, Any]:
    """Every figure, as a JSON-ready document (counters since the mount started)."""
    now = time.time() if now is None else now
    r = src.store.stats
    network = src.fetcher.bytes_received
    return {
        "pid": os.getpid(),
        "mountpoint": src.mountpoint,
        "started": src.started,
        "uptime": max(0.0, now - src.started),
        "requests": {
            "api_list": src.api.attempts["list"],
            "api_get": src.api.attempts["get"],
            "api_resolve": src.api.attempts["resolve"],
            "storage_get": src.fetcher.requests,
        },
        "signed_url_resolutions": src.resolver.resolutions,
        # Resolves the presigned URLs of listings made unnecessary (each URL counted once).
        "resolves_spared": src.resolver.presigned_used,
        "api_throttled": src.api.throttled,
        "api_rate": src.api.governor.rate if src.api.governor is not None else None,
        "bytes": {
            "network": network,
            "disk_cache": r.bytes_from_disk,
            "memory": r.bytes_from_memory,
            "read": r.bytes_read,
        },
        "blocks": {
            "memory": r.blocks_from_memory,
            "disk_cache": r.blocks_from_disk,
            "network": r.blocks_from_network,
        },
        # The share of the bytes read that no network fetch paid for (read-ahead and size
        # discovery count against it): 0 for a cold read, 1 when all came from the caches.
        "hit_ratio": max(0.0, 1.0 - network / r.bytes_read) if r.bytes_read else None,
        "reads": r.reads,
        "open_files": src.open_files(),
        "errors": {
            "reads": r.errors,
            "api_attempts": src.api.failures,
            "storage_attempts": src.fetcher.failures,
        },
        "cache": {
            "dir": src.cache_dir,
            "bytes_used": src.cache.bytes_used,
            "max_bytes": src.cache.max_bytes,
            "disk_hits": src.cache.hits,
            "disk_misses": src.cache.misses,
        },
        "walks": vars(src.walks).copy() if src.walks is not None else {},
        "note": PAGE_CACHE_NOTE,
    }


def encode(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _write_runtime(path: Path, doc: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(encode(doc))
    os.replace(tmp, path)


async def publish(src: Sources, path: Path, every: float = 2.0) -> None:
    """Keep `path` holding the mount's snapshot, for `vapifs cache stats` and `prefetch`
    (which find running mounts by the files in the cache's run/ directory)."""
    while True:
        with contextlib.suppress(OSError):
            await trio.to_thread.run_sync(_write_runtime, path, snapshot(src))
        await trio.sleep(every)
