"""The measures of going through every call: `ls -l` of calls/ and calls/*/ (cold, then
after a remount) and a zgrep across every call's log (cold)."""

from __future__ import annotations

import shutil
from typing import Any

from common import log
from counting import timed_shell
from harness import Bench


def _timed_shell(bench: Bench, cmd: str) -> dict[str, Any]:
    """Seconds, entries (the number cmd prints) and the requests made, or the timeout."""
    counts: dict[str, Any] = {}
    out = timed_shell(bench.stage, cmd, counts, bench.args.ls_timeout)
    if out is not None:
        counts["entries"] = int(out.stdout.strip() or 0)
    return counts


def ls_l(bench: Bench, ls: dict[str, Any]) -> None:
    mounts, calls_n = bench.mounts, len(bench.stage.world.calls)
    cache = mounts.fresh_cache("vapifs-ls")
    for phase in ("cold", "remount"):
        log(f"ls -l across {calls_n} calls, {phase}")
        m = mounts.vapifs(f"ls-{phase}", cache)
        assert m.mountpoint is not None
        calls = m.mountpoint / "calls"
        for what, cmd in (
            ("calls", f"ls -l {calls}/ | wc -l"),
            ("files", f"ls -l {calls}/*/ | grep -c '^-'"),
        ):
            ls[f"{what}_{phase}"] = _timed_shell(bench, cmd)
        mounts.stop(m)


def zgrep(bench: Bench, ls: dict[str, Any]) -> None:
    # Every call's log, searched on a new mount with a new cache (a listing with sizes
    # would have fetched the logs already: call-logs.jsonl's size needs them).
    mounts = bench.mounts
    log(f"zgrep across the logs of {len(bench.stage.world.calls)} calls, cold")
    m = mounts.vapifs("zgrep", mounts.fresh_cache("vapifs-zgrep"))
    assert m.mountpoint is not None
    cmd = f"zgrep -c INFO {m.mountpoint}/calls/*/call-logs.jsonl.gz | wc -l"
    ls["zgrep_cold"] = _timed_shell(bench, cmd)
    mounts.stop(m)
    shutil.rmtree(mounts.cache_dir("vapifs-zgrep"), ignore_errors=True)


def measure(bench: Bench) -> None:
    ls: dict[str, Any] = {"calls": len(bench.stage.world.calls)}
    bench.results["ls"] = ls
    ls_l(bench, ls)
    zgrep(bench, ls)
