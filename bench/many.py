"""scripts/bench --many: programs that go through every call, inside the org's rate limit.

On the same world as the rest of the bench (nginx secure_link storage, the fake API, the
delay line with --rtt), with the fake API limited to --api-limit requests a second (429 with
Retry-After beyond): zgrep across every call's log, soxi across every recording and
`ls -l calls/*/`, each on a new vapifs mount with a new cache; beside them, in the same run,
the shell way (list the calls, curl every log 8 at a time retrying 429s, zgrep the copies)
and rclone mounted over the same files (a tree of call directories under nginx's /open/).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from common import log
from counting import timed_shell
from harness import Bench
from report import Row, layout
from world import OPEN_PREFIX

# File names in a call directory, as vapifs shows them, by artifact kind.
NAMES = {"stereo": "stereo.wav", "mono": "mono.wav", "logs": "call-logs.jsonl.gz"}
WORKLOADS = {
    "zgrep": "zgrep -c ERROR {root}/*/call-logs.jsonl.gz | wc -l",
    "soxi": "soxi -D {root}/*/*.wav | wc -l",
    "ls": "ls -l {root}/*/ | grep -c '^-'",
}
SHELL_JOBS = 8


def call_tree(bench: Bench) -> Path:
    """data/calls/<id>/<name>: the same files vapifs shows, as plain files for rclone
    (hard links to the world's files: no copy)."""
    data_dir = bench.stage.data_dir
    root = data_dir / "calls"
    shutil.rmtree(root, ignore_errors=True)
    for (call_id, kind), rel in bench.stage.world.paths.items():
        if kind not in NAMES:
            continue
        d = root / call_id
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        os.link(data_dir / rel, d / NAMES[kind])
    root.chmod(0o755)
    return root


def timed(bench: Bench, cmd: str, into: dict[str, Any], *, prefix: str | None = None) -> None:
    """Run a shell command, with its seconds and the requests it made (API, storage)."""
    fake = bench.stage.fake
    assert fake is not None

    def refused() -> None:
        into["api_429"] = fake.counters().get("fault.api_429", 0)

    kwargs = {} if prefix is None else {"prefix": prefix}
    out = timed_shell(bench.stage, cmd, into, bench.args.ls_timeout, also=refused, **kwargs)
    if out is None:
        return
    into["output"] = out.stdout.strip()[-200:]
    if out.returncode not in (0, 1):  # zgrep and grep -c say 1 when nothing matched
        into["error"] = out.stderr.strip()[-300:]


def shell_way(bench: Bench, into: dict[str, Any]) -> None:
    """List the calls, curl every log 8 at a time (retrying 429s), zgrep the copies."""
    stage = bench.stage
    assert stage.fake is not None
    copies = stage.run_dir / "shell-logs"
    shutil.rmtree(copies, ignore_errors=True)
    copies.mkdir()
    auth = "Authorization: Bearer " + stage.fake.api_key
    curl = " ".join(["curl", "-sS", *stage.curl_tls()])
    script = (
        f"set -e; cd {copies}; "
        f"{curl} -H '{auth}' '{stage.api_url}/call?limit=1000' > calls.json; "
        "python3 -c 'import json,sys; "
        '[print(c["id"]) for c in json.load(open("calls.json")) '
        'if c.get("artifact",{}).get("logUrl")]\' > ids; '
        f"xargs -P {SHELL_JOBS} -I{{}} {curl} -L --retry 20 -H '{auth}' "
        f"-o {{}}.jsonl.gz '{stage.api_url}/call/{{}}/call-logs' < ids; "
        "zgrep -c ERROR *.jsonl.gz | wc -l"
    )
    timed(bench, script, into, prefix=None)
    shutil.rmtree(copies, ignore_errors=True)


def on_vapifs(bench: Bench, into: dict[str, Any]) -> None:
    """Each workload on a new vapifs mount with a new cache, with what its stats file says."""
    mounts, calls_n = bench.mounts, len(bench.stage.world.calls)
    for name, cmd in WORKLOADS.items():
        log(f"--many: {name} across {calls_n} calls, vapifs, new cache")
        m = mounts.vapifs(f"many-{name}", mounts.fresh_cache(f"many-{name}"))
        assert m.mountpoint is not None
        counts: dict[str, Any] = {}
        timed(bench, cmd.format(root=m.mountpoint / "calls"), counts)
        with open(m.mountpoint / ".vapifs-stats", "rb") as f:
            stats = json.loads(f.read())
        counts["resolves_spared"] = stats.get("resolves_spared")
        counts["walks"] = stats.get("walks")
        into[name] = counts
        mounts.stop(m)
        shutil.rmtree(mounts.cache_dir(f"many-{name}"), ignore_errors=True)


def on_rclone(bench: Bench, into: dict[str, Any]) -> None:
    """Each workload on a new rclone mount (of the call tree) with a new cache."""
    mounts = bench.mounts
    for name, cmd in WORKLOADS.items():
        log(f"--many: {name} across {len(bench.stage.world.calls)} calls, rclone, new cache")
        m = mounts.rclone(f"many-rclone-{name}", mounts.fresh_cache(f"rclone-{name}"))
        assert m.mountpoint is not None
        counts: dict[str, Any] = {}
        timed(bench, cmd.format(root=m.mountpoint / "calls"), counts, prefix=OPEN_PREFIX)
        into[name] = counts
        mounts.stop(m)
        shutil.rmtree(mounts.cache_dir(f"rclone-{name}"), ignore_errors=True)


def measure(bench: Bench) -> dict[str, Any]:
    fake, world = bench.stage.fake, bench.stage.world
    assert fake is not None
    results: dict[str, Any] = {"calls": len(world.calls), "api_limit": bench.args.api_limit}
    fake.set_knobs(api_rate_limit=float(bench.args.api_limit))
    tree = call_tree(bench)
    logs = sum(1 for (_, kind) in world.paths if kind == "logs")
    results["logs"] = logs
    vapifs: dict[str, Any] = {}
    rclone: dict[str, Any] = {}
    results["vapifs"], results["rclone"] = vapifs, rclone
    on_vapifs(bench, vapifs)
    log("--many: the shell way: list, curl every log 8 at a time, zgrep the copies")
    shell: dict[str, Any] = {}
    shell_way(bench, shell)
    results["shell"] = shell
    if shutil.which("rclone"):
        on_rclone(bench, rclone)
    fake.set_knobs(api_rate_limit=0.0)
    shutil.rmtree(tree, ignore_errors=True)
    return results


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def report(bench: Bench, results: dict[str, Any]) -> str:
    v, rc, sh = results["vapifs"], results.get("rclone", {}), results["shell"]
    rows: list[Row] = []

    def secs(c: dict[str, Any] | None) -> str:
        if not c:
            return "n/a"
        return "  timeout" if c.get("seconds") is None else f"{c['seconds']:9.2f} s"

    def refused(c: dict[str, Any]) -> str:
        sent = c.get("api_requests", 0)
        share = f"{100 * c.get('api_429', 0) / sent:.1f}%" if sent else "-"
        return f"429: {c.get('api_429', 0)} of {sent} API req ({share})"

    labels = {
        "zgrep": "zgrep -c ERROR calls/*/call-logs.jsonl.gz",
        "soxi": "soxi -D calls/*/*.wav",
        "ls": "ls -l calls/*/",
    }
    for name, label in labels.items():
        c = v[name]
        notes = [f"out {c.get('output', '?')}", refused(c)]
        if name in rc:
            notes.insert(0, f"{_ratio(c.get('seconds'), rc[name].get('seconds'))} rclone")
        if name == "zgrep":
            notes.insert(0, f"{_ratio(c.get('seconds'), sh.get('seconds'))} shell way")
        notes.append(f"storage req {c.get('storage_requests')}")
        notes.append(f"resolves spared {c.get('resolves_spared')}")
        if "error" in c:
            notes.append(f"ERROR {c['error']}")
        rows.append((f"vapifs {label}", secs(c), ", ".join(notes)))
    rows.append(
        (
            f"shell: list, curl logs x{SHELL_JOBS} (retry 429), zgrep",
            secs(sh),
            f"out {sh.get('output', '?')}, {refused(sh)}",
        )
    )
    for name, label in labels.items():
        if name in rc:
            c = rc[name]
            rows.append((f"rclone {label}", secs(c), f"out {c.get('output', '?')}"))
    sent = sum(v[n].get("api_requests", 0) for n in v)
    refused_total = sum(v[n].get("api_429", 0) for n in v)
    share = f"{100 * refused_total / sent:.2f}%" if sent else "-"
    rows.append(
        ("vapifs: API requests refused (429), all workloads", share, f"{refused_total}/{sent}")
    )
    rtt = bench.stage.rtt
    where = (
        "loopback"
        if rtt is None
        else f"delay line RTT {rtt * 1000:.0f} ms, W {bench.args.window // 1024} KiB"
    )
    title = (
        f"vapifs bench --many: {results['calls']} calls, API limited to {results['api_limit']}"
        f" req/s (429 + Retry-After beyond); {where}; {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    return layout(title, rows, 11)
