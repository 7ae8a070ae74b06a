"""The report: the table of the default bench (one function per group of rows, with their
ratios), the table layout --many shares, and the JSON kept under bench-results/."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import REPO, MiB
from harness import Bench

Row = tuple[str, str, str]  # measure, value, ratios / notes


def x(a: float, b: float | None) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def speed(value: float) -> str:
    return f"{value:8.0f} MB/s" if value >= 10 else f"{value:8.1f} MB/s"


def secs(value: float | None) -> str:
    return "  timeout" if value is None else f"{value:9.3f} s"


def ceiling_rows(b: Bench) -> list[Row]:
    r = b.results
    pc, curl, hc, fc = r["page_cache"], r["curl"], r["http_ceiling"], r["fuse_ceiling"]
    rows = [
        ("page cache (2nd read of the source file)", speed(pc["mb_s"]), ""),
        ("wire: curl, fresh signed URL", speed(curl["mb_s"]), ""),
        ("HTTP ceiling: httpx+trio, 8 MiB ranges", speed(hc["mb_s"]), ""),
        ("FUSE ceiling: pyfuse3 from memory, cold", speed(fc["cold_mb_s"]), ""),
        ("FUSE ceiling: warm (keep_cache)", speed(fc["warm_mb_s"]), ""),
    ]
    if rc := r.get("rclone"):
        rows.append(("rclone mount (vfs full), cold", speed(rc["cold_mb_s"]), ""))
        rows.append(("rclone mount, warm", speed(rc["warm_mb_s"]), ""))
    return rows


def vapifs_rows(b: Bench) -> list[Row]:
    r = b.results
    pc, curl, hc, fc = r["page_cache"], r["curl"], r["http_ceiling"], r["fuse_ceiling"]
    v, rc = r["vapifs"], r.get("rclone")
    ceiling = min(fc["cold_mb_s"], hc["mb_s"])
    cold_notes = [f"{x(v['cold_mb_s'], ceiling)} min(FUSE, HTTP ceiling)"]
    if rc:
        cold_notes.append(f"{x(v['cold_mb_s'], rc['cold_mb_s'])} rclone")
    cold_notes.append(f"{x(v['cold_mb_s'], curl['mb_s'])} curl")
    cold_notes.append(f"{v['cold']['storage_requests']} storage req")
    warm_notes = [f"{x(v['warm_mb_s'], pc['mb_s'])} page cache"]
    if rc:
        warm_notes.insert(0, f"{x(v['warm_mb_s'], rc['warm_mb_s'])} rclone warm")
    rem = v["remount"]
    remount_note = (
        f"{x(v['remount_mb_s'], fc['cold_mb_s'])} FUSE ceiling cold, "
        f"{x(v['remount_mb_s'], v['remount_ceiling_mb_s'])} the FUSE ceiling read beside "
        f"each remount ({v['remount_ceiling_mb_s']:.0f} MB/s), "
        f"storage req {rem['storage_requests']}, API req {rem['api_requests']}"
    )
    return [
        ("vapifs cold (fresh cache dir)", speed(v["cold_mb_s"]), ", ".join(cold_notes)),
        ("vapifs warm (re-read)", speed(v["warm_mb_s"]), ", ".join(warm_notes)),
        ("vapifs after remount (disk cache)", speed(v["remount_mb_s"]), remount_note),
    ]


def random_rows(b: Bench) -> list[Row]:
    v, rc, n_rand = b.results["vapifs"], b.results.get("rclone"), b.args.random_reads
    vr = v["random"]
    note = f"{vr['storage_requests']} req, {vr['storage_bytes'] / MiB:.0f} MiB"
    if rc:
        note = (
            f"{x(v['random_s'], rc['random_s'])} rclone's time; " + note + " (rclone "
            f"{rc['random']['storage_requests']} req, "
            f"{rc['random']['storage_bytes'] / MiB:.0f} MiB)"
        )
    rows = [(f"vapifs {n_rand} random 64 KiB reads, cold", secs(v["random_s"]), note)]
    if rc:
        rows.append((f"rclone {n_rand} random 64 KiB reads, cold", secs(rc["random_s"]), ""))
    return rows


def first_byte_rows(b: Bench) -> list[Row]:
    v, curl, rc = b.results["vapifs"], b.results["curl"], b.results.get("rclone")
    note = f"curl -L via API {curl['ttfb_s'] * 1000:.1f} ms"
    if rc:
        note += f", rclone {rc['ttfb_s'] * 1000:.1f} ms"
    return [("vapifs time to first byte (cold mount)", secs(v["ttfb_s"]), note)]


def listing_rows(b: Bench) -> list[Row]:
    ls = b.results["ls"]
    rows = []
    for phase, when in (("cold", "cold"), ("remount", "after remount")):
        for what, label in (("calls", "ls -l calls/"), ("files", "ls -l calls/*/")):
            c = ls[f"{what}_{phase}"]
            note = f"{c.get('entries', '?')} entries, API req {c['api_requests']}, "
            note += f"storage req {c['storage_requests']}"
            rows.append((f"{label} ({ls['calls']} calls), {when}", secs(c["seconds"]), note))
    z = ls["zgrep_cold"]
    note = f"{z.get('entries', '?')} files, API req {z['api_requests']}, "
    note += f"storage req {z['storage_requests']}"
    rows.append((f"zgrep every call's log ({ls['calls']} calls), cold", secs(z["seconds"]), note))
    return rows


def rss_rows(b: Bench) -> list[Row]:
    v = b.results["vapifs"]
    return [
        (
            f"vapifs peak RSS streaming {b.stage.huge_size / MiB:.0f} MiB cold",
            f"{v['peak_rss_mib']:8.0f} MiB",
            f"{v['rss_after_mount_mib']:.0f} MiB after mount; "
            f"stream {v['huge_cold_mb_s']:.0f} MB/s",
        )
    ]


def rtt_rows(b: Bench) -> list[Row]:
    if b.stage.rtt is None:
        return []
    v, curl, rc = b.results["vapifs"], b.results["curl"], b.results.get("rclone")
    note = f"{x(v['cold_mb_s'], curl['mb_s'])} curl"
    note += f", {x(v['cold_mb_s'], rc['cold_mb_s'])} rclone" if rc else ""
    return [("with RTT: vapifs cold vs curl / rclone", "", note)]


def connection_rows(b: Bench) -> list[Row]:
    """New connections per workload, API + storage; with --tls each is a full handshake."""
    v, curl, ls = b.results["vapifs"], b.results["curl"], b.results["ls"]
    n_rand, vr = b.args.random_reads, v["random"]
    kind = "TLS handshakes" if b.stage.certs else "new connections"
    rows = [
        (f"{kind} (API + storage) of each workload:", "", ""),
        ("  curl -L, first byte (API 302, then storage)", f"{curl['ttfb_connections']}", ""),
    ]
    workloads = [
        ("vapifs first byte (cold mount)", v["ttfb"], ""),
        ("vapifs cold read of the big file", v["cold"], f"{v['cold']['storage_requests']} req"),
        (f"vapifs {n_rand} random 64 KiB reads", v["random"], f"{vr['storage_requests']} req"),
        (f"ls -l calls/*/ ({ls['calls']} calls), cold", ls["files_cold"], ""),
        (f"zgrep every call's log ({ls['calls']} calls), cold", ls["zgrep_cold"], ""),
    ]
    for label, c, note in workloads:
        api_req, storage_req = c["api_requests"], c["storage_requests"]
        note = note or f"{api_req} API req, {storage_req} storage req"
        rows.append((f"  {label}", f"{c['api_connections']} + {c['storage_connections']}", note))
    return rows


# The table, top to bottom.
ROWS: tuple[Callable[[Bench], list[Row]], ...] = (
    ceiling_rows,
    vapifs_rows,
    random_rows,
    first_byte_rows,
    listing_rows,
    rss_rows,
    rtt_rows,
    connection_rows,
)


def layout(title: str, rows: list[Row], value_width: int) -> str:
    """The title, a header, a rule, then one aligned line per row."""
    width = max(len(a) for a, _, _ in rows)
    lines = [
        title,
        f"{'measure':<{width}}  {'value':>{value_width}}  ratios / notes",
        "-" * (width + 60),
    ]
    lines += [f"{a:<{width}}  {b:>{value_width}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def table(b: Bench) -> str:
    rtt, args = b.stage.rtt, b.args
    where = (
        "loopback"
        if rtt is None
        else f"delay line: RTT {rtt * 1000:.0f} ms, W {args.window // 1024} KiB, "
        f"{args.rate / 1e9:g} Gbit/s shared"
    )
    title = (
        f"vapifs bench: {'HTTPS, ' if b.stage.certs else ''}{where}; "
        f"file {b.stage.big_size / MiB:.0f} MiB; "
        f"MB = 10^6 bytes; {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    return layout(title, [row for part in ROWS for row in part(b)], 13)


def save(b: Bench, table: str) -> Path:
    rtt, args = b.stage.rtt, b.args
    out_dir = REPO / "bench-results"
    out_dir.mkdir(exist_ok=True)
    suffix = "" if rtt is None else f"-rtt{rtt * 1000:.0f}ms"
    suffix += "-tls" if b.stage.certs else ""
    suffix += "-many" if args.many else ""
    path = out_dir / f"bench-{time.strftime('%Y%m%d-%H%M%S')}{suffix}.json"
    payload: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rtt_s": rtt,
        "tls": b.stage.certs is not None,
        "window": args.window if rtt is not None else None,
        "rate_bps": args.rate if rtt is not None else None,
        "file_bytes": b.stage.big_size,
        "huge_bytes": b.stage.huge_size,
        "calls": len(b.stage.world.calls),
        "random_reads": args.random_reads,
        "seconds": time.monotonic() - b.started,
        "results": b.results,
        "table": table.splitlines(),
    }
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
