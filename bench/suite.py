"""The default bench's measures, in their order: ceilings, vapifs, rclone, listings."""

from __future__ import annotations

import shutil
from typing import Any

import ceilings
import listings
import rclone_reads
import vapifs_reads
from harness import Bench


def measure(bench: Bench) -> None:
    r = bench.results
    r["page_cache"] = ceilings.page_cache(bench)
    r["curl"] = ceilings.wire(bench)
    r["http_ceiling"] = ceilings.http_ceiling(bench)
    r["fuse_ceiling"] = ceilings.fuse_ceiling(bench)
    v: dict[str, Any] = {}
    r["vapifs"] = v
    vapifs_reads.cold_and_warm(bench, v)
    vapifs_reads.remount(bench, v)
    vapifs_reads.first_byte_and_rss(bench, v)
    offsets = vapifs_reads.random_offsets(bench)
    vapifs_reads.random_64k(bench, v, offsets)
    if shutil.which("rclone"):
        rclone_reads.measure(bench, offsets)
    listings.measure(bench)
