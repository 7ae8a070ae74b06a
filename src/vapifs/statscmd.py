"""`vapifs stats`: find the mount that holds a path, read its live figures, print them."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .defaults import PAGE_CACHE_NOTE, STATS_FILE
from .units import human_bytes, human_duration


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
