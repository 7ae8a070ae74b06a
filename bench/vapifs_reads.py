"""The measures of reading through vapifs: cold and warm, after a remount, first byte and
peak RSS streaming the huge file, and random reads."""

from __future__ import annotations

import os
import random
import shutil
import statistics
from typing import Any

from common import MiB, log
from counting import counting
from harness import Bench
from mounts import call_file
from probes import first_byte, mb_s, random_reads, read_all, vm_hwm_kib

READ_SIZE = 64 * 1024
MAIN_CACHE = "vapifs-main"  # the cold read's cache, which the remounts then reuse


def random_offsets(bench: Bench) -> list[int]:
    """Where the random reads go (vapifs's and rclone's alike), from --seed."""
    rng = random.Random(bench.args.seed)
    size = bench.stage.big_size
    return [rng.randrange(0, size - READ_SIZE) for _ in range(bench.args.random_reads)]


def cold_and_warm(bench: Bench, v: dict[str, Any]) -> None:
    n, size, big_id = bench.args.repeat, bench.stage.big_size, bench.stage.world.big_id
    mounts = bench.mounts
    log(f"vapifs: cold ({n} new mounts and caches), warm")
    m = mounts.vapifs("cold", mounts.fresh_cache(MAIN_CACHE))
    path = call_file(m, big_id)
    cold_counts: dict[str, Any] = {}
    with counting(bench.stage, cold_counts):
        colds = [read_all(path)]
    warm = min(read_all(path) for _ in range(max(1, n - 1)))
    mounts.stop(m)
    for _ in range(n - 1):
        extra = mounts.fresh_cache("vapifs-cold-again")
        m = mounts.vapifs("cold-again", extra)
        colds.append(read_all(call_file(m, big_id)))
        mounts.stop(m)
        shutil.rmtree(extra, ignore_errors=True)
    cold = statistics.median(colds)
    v["cold_mb_s"], v["warm_mb_s"], v["cold"] = mb_s(size, cold), mb_s(size, warm), cold_counts
    v["cold_runs_mb_s"] = [mb_s(size, t) for t in colds]


def remount(bench: Bench, v: dict[str, Any]) -> None:
    n, size, big_id = bench.args.repeat, bench.stage.big_size, bench.stage.world.big_id
    mounts = bench.mounts
    log(f"vapifs: after a remount (disk cache), {n} new mounts")
    remount_counts: dict[str, Any] = {}
    agains, ceilings = [], []
    big = bench.stage.big
    for i in range(n):
        # The FUSE ceiling again, read just before each remount: on a machine whose speed
        # drifts (a virtual machine's memory), the pair shares its conditions.
        fc = mounts.fuse_ceiling(big)
        assert fc.mountpoint is not None
        ceilings.append(read_all(fc.mountpoint / big.name))
        mounts.stop(fc)
        m = mounts.vapifs("remount", mounts.cache_dir(MAIN_CACHE))
        path = call_file(m, big_id)
        counts: dict[str, Any] = {}
        with counting(bench.stage, counts):
            agains.append(read_all(path))
        mounts.stop(m)
        if i == 0:
            remount_counts = counts
        else:  # every remount must make zero requests, not only the first
            for name in ("storage_requests", "api_requests"):
                remount_counts[name] = max(remount_counts[name], counts[name])
    again = statistics.median(agains)
    v["remount_mb_s"], v["remount"] = mb_s(size, again), remount_counts
    v["remount_runs_mb_s"] = [mb_s(size, t) for t in agains]
    v["remount_ceiling_mb_s"] = mb_s(size, statistics.median(ceilings))
    v["remount_ceiling_runs_mb_s"] = [mb_s(size, t) for t in ceilings]


def first_byte_and_rss(bench: Bench, v: dict[str, Any]) -> None:
    mounts, huge_size = bench.mounts, bench.stage.huge_size
    log(f"vapifs: first byte and peak RSS streaming {huge_size / MiB:.0f} MiB cold")
    cache = mounts.fresh_cache("vapifs-huge")
    m = mounts.vapifs("huge", cache)
    path = call_file(m, bench.stage.world.huge_id)
    pid = m.popen.pid
    rss_before = vm_hwm_kib(pid)
    ttfb_counts: dict[str, Any] = {}
    with counting(bench.stage, ttfb_counts):
        v["ttfb_s"] = first_byte(path)
    v["ttfb"] = ttfb_counts
    t = read_all(path, timeout=900)
    v["huge_cold_mb_s"] = mb_s(huge_size, t)
    v["rss_after_mount_mib"] = rss_before / 1024
    v["peak_rss_mib"] = vm_hwm_kib(pid) / 1024
    mounts.stop(m)
    shutil.rmtree(cache, ignore_errors=True)


def random_64k(bench: Bench, v: dict[str, Any], offsets: list[int]) -> None:
    n, mounts = bench.args.repeat, bench.mounts
    log(f"vapifs: {len(offsets)} random 64 KiB reads, cold, {n} new mounts and caches")
    rand_runs: list[float] = []
    rand_counts: dict[str, Any] = {}
    for _ in range(n):
        m = mounts.vapifs("random", mounts.fresh_cache("vapifs-random"))
        path = call_file(m, bench.stage.world.big_id)
        os.stat(path)  # the size is known before the clock starts, as for rclone
        counts: dict[str, Any] = {}
        with counting(bench.stage, counts):
            rand_runs.append(random_reads(path, offsets, READ_SIZE))
        rand_counts = rand_counts or counts
        mounts.stop(m)
    v["random_s"] = statistics.median(rand_runs)
    v["random"], v["random_runs_s"] = rand_counts, rand_runs
