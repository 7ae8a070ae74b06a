"""The HTTP ceiling: a plain httpx download on trio, 8 MiB ranges one after another.

    python bench/http_ceiling.py URL [--range-mib 8]

Prints one JSON line: bytes, seconds, MB/s and the time to the first body byte. The body is
counted and dropped, so this is what one httpx connection on trio can pull, with nothing
else in the way.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import httpx
import trio


async def download(url: str, step: int) -> dict[str, float]:
    headers = {"Accept-Encoding": "identity"}
    total = None
    pos = received = 0
    first_byte = 0.0
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=60.0) as client:
        while total is None or pos < total:
            headers["Range"] = f"bytes={pos}-{pos + step - 1}"
            async with client.stream("GET", url, headers=headers) as response:
                if response.status_code != 206:
                    raise SystemExit(f"http_ceiling: HTTP {response.status_code} for a range")
                total = int(response.headers["content-range"].rpartition("/")[2])
                async for chunk in response.aiter_raw(1 << 20):
                    if not received:
                        first_byte = time.perf_counter() - t0
                    received += len(chunk)
            pos += step
    seconds = time.perf_counter() - t0
    return {
        "bytes": received,
        "seconds": seconds,
        "mb_s": received / seconds / 1e6,
        "ttfb": first_byte,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="httpx on trio, ranged downloads")
    parser.add_argument("url")
    parser.add_argument("--range-mib", type=int, default=8)
    args = parser.parse_args(argv)
    result = trio.run(download, args.url, args.range_mib << 20)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
