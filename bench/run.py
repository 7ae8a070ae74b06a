"""scripts/bench: vapifs side by side with the wire, rclone, page cache and two ceilings.

Run through scripts/bench (which installs nginx, rclone and curl, and the venv). Sets up
nginx (secure_link) over generated files, a fake Vapi API whose 302s point at it, and
optionally a delay line in front of both; then measures and prints a table with ratios,
and writes the same numbers as JSON under bench-results/.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx

import many
import report
import suite
from common import REPO, BenchError, log
from delayline import parse_duration
from harness import Bench


def add_many_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--many",
        action="store_true",
        help="instead: programs that go through every call (zgrep, soxi, ls -l calls/*/) "
        "against a rate-limited API, beside the shell way and rclone",
    )
    parser.add_argument(
        "--api-limit", type=float, default=20.0, help="--many: the fake API's requests/s"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench", description=__doc__)
    parser.add_argument("--rtt", type=parse_duration, default=None, help="e.g. 40ms")
    parser.add_argument("--window", type=int, default=512 * 1024, help="delay line W (bytes)")
    parser.add_argument("--rate", type=float, default=1e9, help="delay line bits/s")
    parser.add_argument(
        "--dir", default=os.environ.get("VAPIFS_BENCH_DIR", "/var/tmp/vapifs-bench")
    )
    parser.add_argument("--big-mib", type=int, default=200)
    parser.add_argument("--huge-mib", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=None, help="(default: 1000; 200 with --many)")
    parser.add_argument("--random-reads", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the cheap measures")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--touch-memory-gib",
        type=int,
        default=6,
        help="GiB of memory to touch before measuring (0: none)",
    )
    parser.add_argument("--ls-timeout", type=float, default=240.0)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="HTTPS everywhere (a throwaway CA, verification on); counts TLS handshakes",
    )
    parser.add_argument(
        "--rclone-opt", action="append", default=[], help="extra rclone mount option"
    )
    add_many_options(parser)
    args = parser.parse_args(argv)
    if args.many and args.calls is None:
        args.calls = 200
    args.calls = 1000 if args.calls is None else args.calls

    def on_signal(signum: int, frame: Any) -> None:
        # Once: a second Ctrl-C must not cut the clean-up (unmounting) short.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    bench = Bench(args)
    try:
        bench.prepare()
        if args.many:
            bench.results["many"] = many.measure(bench)
            table = many.report(bench, bench.results["many"])
        else:
            suite.measure(bench)
            table = report.table(bench)
        path = report.save(bench, table)
        print(table, flush=True)
        log(f"results in {path.relative_to(REPO)}; {time.monotonic() - bench.started:.0f}s")
        return 0
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, subprocess.SubprocessError, httpx.HTTPError, OSError) as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        bench.close()


if __name__ == "__main__":
    sys.exit(main())
