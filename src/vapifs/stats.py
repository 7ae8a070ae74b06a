"""Live figures of a running mount: built from the core's counters, read back by `vapifs stats`."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from .api import VapiClient
from .blocks import BlockCache
from .fetch import Fetcher
from .reader import ArtifactStore
from .resolver import Resolver
from .units import human_bytes, human_duration
from .walk import WalkStats

# A file of this name in the mount's root, never listed, reads as `snapshot()` in JSON,
# taken when it is opened. (A file, not an extended attribute: a file system that answers
# getxattr at all is asked for two attributes of every file `ls -l` shows.)
STATS_FILE = ".vapifs-stats"

PAGE_CACHE_NOTE = (
    "re-reads served by the kernel page cache never reach the mount and are not counted"
)


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


class NotAMount(Exception):
    """The path is not inside a running vapifs mount."""


def mount_root(path: Path) -> Path:
    """The mount point holding `path` (the path itself when it is one)."""
    p = Path(os.path.abspath(path))
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def read_stats(path: Path) -> dict[str, Any]:
    """The live figures of the vapifs mount that holds `path`; NotAMount otherwise."""
    if not os.path.exists(path):
        raise NotAMount(f"{path}: no such file or directory")
    try:
        with open(mount_root(path) / STATS_FILE, "rb") as f:
            raw = f.read(1 << 20)
    except OSError:
        raise NotAMount(f"{path} is not a vapifs mount") from None
    try:
        doc = json.loads(raw)
    except ValueError:
        raise NotAMount(f"{path} is not a vapifs mount") from None
    if not isinstance(doc, dict):
        raise NotAMount(f"{path} is not a vapifs mount")
    return doc


def render_table(doc: dict[str, Any]) -> str:
    """The figures as an aligned two-column table."""
    req = doc.get("requests", {})
    b = doc.get("bytes", {})
    err = doc.get("errors", {})
    cache = doc.get("cache", {})

    def amount(n: int) -> str:
        return f"{human_bytes(n)} ({n:,} bytes)" if n >= 1024 else f"{n} bytes"

    ratio = doc.get("hit_ratio")
    used, cap = int(cache.get("bytes_used", 0)), int(cache.get("max_bytes", 0))
    fill = f"{human_bytes(used)} of {human_bytes(cap)}"
    if cap:
        fill += f" ({100 * used / cap:.1f}%)"
    rows = [
        ("mountpoint", str(doc.get("mountpoint", "?"))),
        ("pid", str(doc.get("pid", "?"))),
        ("uptime", human_duration(float(doc.get("uptime", 0.0)))),
        ("API requests: list", str(req.get("api_list", 0))),
        ("API requests: get", str(req.get("api_get", 0))),
        ("API requests: resolve", str(req.get("api_resolve", 0))),
        ("storage GETs", str(req.get("storage_get", 0))),
        ("signed-URL resolutions", str(doc.get("signed_url_resolutions", 0))),
        ("resolves spared by listings", str(doc.get("resolves_spared", 0))),
        (
            "API 429 answers",
            f"{doc.get('api_throttled', 0)} (pace now {float(doc.get('api_rate') or 0):g}/s)",
        ),
        ("bytes from network", amount(int(b.get("network", 0)))),
        ("bytes from disk cache", amount(int(b.get("disk_cache", 0)))),
        ("bytes from memory", amount(int(b.get("memory", 0)))),
        ("bytes read by programs", amount(int(b.get("read", 0)))),
        (
            "hit ratio",
            "-"
            if ratio is None
            else f"{100 * float(ratio):.1f}% of the bytes read came from the caches",
        ),
        ("reads", str(doc.get("reads", 0))),
        ("open files", str(doc.get("open_files", 0))),
        ("failed reads", str(err.get("reads", 0))),
        (
            "failed attempts",
            f"{err.get('api_attempts', 0)} API, {err.get('storage_attempts', 0)} storage (retried)",
        ),
        ("cache", f"{fill} in {cache.get('dir', '?')}"),
        ("not counted", str(doc.get("note", PAGE_CACHE_NOTE))),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def run_stats(mountpoint: Path, as_json: bool) -> int:
    """`vapifs stats`: print a running mount's figures; exit 1 when it is not one."""
    try:
        doc = read_stats(mountpoint)
    except NotAMount as exc:
        print(f"vapifs: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        print(render_table(doc))
    return 0
