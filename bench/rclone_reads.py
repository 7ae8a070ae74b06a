"""The measures of reading through rclone mount (--vfs-cache-mode full), the peer: first
byte, cold and warm, and the same random reads as vapifs's."""

from __future__ import annotations

import os
import shutil
import statistics
from typing import Any

from common import log
from counting import counting
from harness import Bench
from probes import first_byte, mb_s, random_reads, read_all
from vapifs_reads import READ_SIZE
from world import HUGE_NAME, OPEN_PREFIX


def cold_and_warm(bench: Bench, rc: dict[str, Any]) -> None:
    n, mounts = bench.args.repeat, bench.mounts
    big, size = bench.stage.big, bench.stage.big_size
    log("rclone: first byte, cold, warm")
    m = mounts.rclone("cold", mounts.fresh_cache("rclone-main"))
    assert m.mountpoint is not None
    rc["ttfb_s"] = first_byte(m.mountpoint / HUGE_NAME)
    path = m.mountpoint / big.name
    counts: dict[str, Any] = {}
    with counting(bench.stage, counts, OPEN_PREFIX):
        colds = [read_all(path)]
    warm = min(read_all(path) for _ in range(max(1, n - 1)))
    mounts.stop(m)
    for _ in range(n - 1):
        extra = mounts.fresh_cache("rclone-cold-again")
        m = mounts.rclone("cold-again", extra)
        assert m.mountpoint is not None
        colds.append(read_all(m.mountpoint / big.name))
        mounts.stop(m)
        shutil.rmtree(extra, ignore_errors=True)
    cold = statistics.median(colds)
    rc["cold_mb_s"], rc["warm_mb_s"], rc["cold"] = mb_s(size, cold), mb_s(size, warm), counts
    rc["cold_runs_mb_s"] = [mb_s(size, t) for t in colds]


def random_64k(bench: Bench, rc: dict[str, Any], offsets: list[int]) -> None:
    n, mounts = bench.args.repeat, bench.mounts
    log(f"rclone: {len(offsets)} random 64 KiB reads, cold, {n} new mounts")
    runs: list[float] = []
    rand_counts: dict[str, Any] = {}
    for _ in range(n):
        m = mounts.rclone("random", mounts.fresh_cache("rclone-random"))
        assert m.mountpoint is not None
        path = m.mountpoint / bench.stage.big.name
        os.stat(path)
        counts: dict[str, Any] = {}
        with counting(bench.stage, counts, OPEN_PREFIX):
            runs.append(random_reads(path, offsets, READ_SIZE))
        rand_counts = rand_counts or counts
        mounts.stop(m)
    rc["random_s"], rc["random"], rc["random_runs_s"] = (
        statistics.median(runs),
        rand_counts,
        runs,
    )


def measure(bench: Bench, offsets: list[int]) -> None:
    rc: dict[str, Any] = {}
    bench.results["rclone"] = rc
    cold_and_warm(bench, rc)
    random_64k(bench, rc, offsets)
    for name in ("rclone-main", "rclone-random"):
        shutil.rmtree(bench.mounts.cache_dir(name), ignore_errors=True)
