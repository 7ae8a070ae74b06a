"""`vapifs cache stats|verify|clear`: look after the on-disk cache from the command line."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from .atrest import forget_encryption, stored_format
from .blocks import BlockCache
from .cachekey import cache_cipher
from .meta import MetaStore
from .units import human_bytes


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def running_mounts(cache_dir: Path) -> list[dict[str, Any]]:
    """Figures published by live mounts using this cache dir."""
    found = []
    for path in sorted((cache_dir / "run").glob("*.json")):
        try:
            doc = json.loads(path.read_text())
            pid = int(doc["pid"])
            os.kill(pid, 0)
        except (OSError, ValueError, KeyError, TypeError):
            with contextlib.suppress(OSError):
                if path.stat().st_mtime < time.time() - 60:
                    path.unlink()
            continue
        found.append(doc)
    return found


def run_cache_command(action: str, cache_dir: Path, key_file: Path | None = None) -> int:
    """stats and clear need no key, even for an encrypted cache; verify needs its key."""
    cache_dir = cache_dir.expanduser()
    if not cache_dir.exists():
        print(f"{cache_dir}: no cache here yet")
        return 0
    encrypted = stored_format(cache_dir) == "encrypted"
    cipher = None
    if action == "verify" and encrypted:
        cipher = cache_cipher(cache_dir, True, key_file)
    cache = BlockCache(cache_dir, max_bytes=1 << 62, cipher=cipher)
    cache.open()
    if action == "stats":
        s = cache.stats()
        print(f"cache dir:   {cache_dir}")
        print(f"encrypted:   {'yes' if encrypted else 'no'}")
        print(f"bytes:       {s.bytes} ({human_bytes(s.bytes)})")
        print(f"blocks:      {s.blocks}")
        print(f"artifacts:   {s.artifacts}")
        print(f"oldest access: {_when(s.oldest_access)}")
        print(f"newest access: {_when(s.newest_access)}")
        mounts = running_mounts(cache_dir)
        if not mounts:
            print("running mounts: none")
        for doc in mounts:
            blocks, disk_cache = doc.get("blocks", {}), doc.get("cache", {})
            hits, misses = (
                int(disk_cache.get("disk_hits", 0)),
                int(disk_cache.get("disk_misses", 0)),
            )
            mem = int(blocks.get("memory", 0))
            net = int(blocks.get("network", 0))
            local = int(blocks.get("disk_cache", 0))
            total = mem + local + net
            rate = f"{100 * (mem + local) / total:.1f}%" if total else "-"
            print(
                f"running mount: pid {doc['pid']} on {doc.get('mountpoint')}: hit rate {rate} "
                f"({mem} memory + {local} disk of {total} blocks; disk {hits} hits, "
                f"{misses} misses)"
            )
        return 0
    if action == "verify":
        report = cache.verify()
        print(
            f"checked {report.checked} blocks: {report.bad} bad"
            + (f" (dropped, {human_bytes(report.bad_bytes)})" if report.bad else "")
        )
        return 0
    if action == "clear":
        dropped = cache.clear()
        MetaStore(cache_dir).clear()
        mounts = running_mounts(cache_dir)
        if not mounts:
            # Running mounts keep writing with their key: the cache stays theirs until they stop.
            forget_encryption(cache_dir)
        note = f" ({len(mounts)} running mount(s) will fetch again as needed)" if mounts else ""
        print(f"cleared {dropped} blocks from {cache_dir}{note}")
        return 0
    raise ValueError(action)
