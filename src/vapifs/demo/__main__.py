"""Run the fake Vapi from the command line: python -m vapifs.demo."""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from types import FrameType

from vapifs.demo.data import generate_calls
from vapifs.demo.server import FakeVapi


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vapifs.demo",
        description="Serve a fake Vapi API and storage with synthetic calls.",
    )
    parser.add_argument("--api-port", type=int, default=0)
    parser.add_argument("--storage-port", type=int, default=0)
    parser.add_argument("--url-ttl", type=float, default=None, help="signed URL lifetime (s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--big-stereo-mb", type=int, default=0)
    parser.add_argument("--api-key", default="demo-private-key")
    parser.add_argument("--knobs", default=None, help="JSON object of fault knobs")
    parser.add_argument(
        "--tls", action="store_true", help="HTTPS with a throwaway CA (its file: ca_file)"
    )
    args = parser.parse_args(argv)

    calls = generate_calls(seed=args.seed, count=args.count, big_stereo_mb=args.big_stereo_mb)
    fake = FakeVapi(
        calls,
        api_key=args.api_key,
        api_port=args.api_port,
        storage_port=args.storage_port,
        seed=args.seed,
        tls=args.tls,
    )
    if args.knobs:
        changes = json.loads(args.knobs)
        if not isinstance(changes, dict):
            parser.error("--knobs must be a JSON object")
        fake.set_knobs(**changes)
    if args.url_ttl is not None:
        fake.set_knobs(url_ttl=args.url_ttl)

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    fake.start()
    info = {
        "api_url": fake.api_url,
        "storage_url": fake.storage_url,
        "api_key": fake.api_key,
        "ca_file": fake.ca_file,
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    # A timed wait keeps the main thread responsive to signals.
    while not stop.wait(0.5):
        pass
    fake.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
