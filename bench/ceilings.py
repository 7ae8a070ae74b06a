"""The measures of what lies around vapifs: the page cache, the wire (curl), the HTTP
ceiling (httpx on trio) and the FUSE ceiling (pyfuse3 serving from memory)."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
from typing import Any

from common import API_KEY, BENCH, VENV, BenchError, log
from harness import Bench
from probes import mb_s, read_all


def page_cache(bench: Bench) -> dict[str, Any]:
    log("page cache: reading the source file twice")
    big, size = bench.stage.big, bench.stage.big_size
    times = [read_all(big) for _ in range(max(2, bench.args.repeat))]
    return {"mb_s": mb_s(size, min(times[1:])), "first_mb_s": mb_s(size, times[0])}


def _curl_download(bench: Bench, url: str) -> float:
    """MB/s of curl fetching the whole big file from a signed URL."""
    size = bench.stage.big_size
    got, took, _ = subprocess.run(
        [
            "curl",
            *bench.stage.curl_tls(),
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{size_download} %{time_total} %{num_connects}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    ).stdout.split()
    if int(got) != size:
        raise BenchError(f"curl fetched {got} bytes, not {size}")
    return mb_s(size, float(took))


def _curl_first_byte(bench: Bench) -> tuple[float, str]:
    """Time to first byte the way a client sees it (API 302, then storage), and the
    connections curl opened for it."""
    api = f"{bench.stage.api_url}/call/{bench.stage.world.big_id}/stereo-recording"
    ttfb, connects = subprocess.run(
        [
            "curl",
            *bench.stage.curl_tls(),
            "-sS",
            "-L",
            "-o",
            "/dev/null",
            "-r",
            "0-0",
            "-H",
            f"Authorization: Bearer {API_KEY}",
            "-w",
            "%{time_starttransfer} %{num_connects}",
            api,
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    return float(ttfb), connects


def wire(bench: Bench) -> dict[str, Any]:
    log("wire: curl on fresh signed URLs")
    speeds, ttfbs = [], []
    connects = ""
    for _ in range(bench.args.repeat):
        speeds.append(_curl_download(bench, bench.stage.fresh_url(bench.stage.world.big_id)))
        ttfb, connects = _curl_first_byte(bench)
        ttfbs.append(ttfb)
    return {
        "mb_s": statistics.median(speeds),
        "ttfb_s": statistics.median(ttfbs),
        "ttfb_connections": int(connects),  # the API's and storage's
    }


def http_ceiling(bench: Bench) -> dict[str, Any]:
    log("HTTP ceiling: httpx on trio, 8 MiB ranges")
    ca_file = bench.stage.ca_file
    runs = []
    for _ in range(bench.args.repeat):
        out = subprocess.run(
            [
                str(VENV / "python"),
                str(BENCH / "http_ceiling.py"),
                bench.stage.fresh_url(bench.stage.world.big_id),
            ],
            env=dict(os.environ, SSL_CERT_FILE=ca_file) if ca_file else None,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        ).stdout
        runs.append(json.loads(out))
    return {"mb_s": statistics.median(x["mb_s"] for x in runs)}


def fuse_ceiling(bench: Bench) -> dict[str, Any]:
    # Every cold figure (the FUSE ceiling's, vapifs's, rclone's) is the median of `n`
    # first reads, each on a new mount with a new cache: one read alone swings a lot.
    n = bench.args.repeat
    big, size = bench.stage.big, bench.stage.big_size
    log(f"FUSE ceiling: pyfuse3 serving the file from memory, {n} mounts")
    colds, warm = [], math.inf
    for i in range(n):
        fc = bench.mounts.fuse_ceiling(big)
        assert fc.mountpoint is not None
        target = fc.mountpoint / big.name
        colds.append(read_all(target))
        if i == 0:
            warm = min(read_all(target) for _ in range(max(1, n - 1)))
        bench.mounts.stop(fc)
    cold = statistics.median(colds)
    return {"cold_mb_s": mb_s(size, cold), "warm_mb_s": mb_s(size, warm)}
