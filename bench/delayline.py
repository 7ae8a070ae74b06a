"""A userspace TCP delay line for loopback benchmarks.

    python bench/delayline.py --rtt 40ms api=127.0.0.1:8080 storage=127.0.0.1:8081

listens on a free 127.0.0.1 port per NAME=HOST:PORT and prints one JSON line
{"api": port, "storage": port} once listening. Every chunk is held for RTT/2 in each
direction; at most --window bytes are in flight per connection and direction (so one
connection moves at most window / (RTT/2) per second, about 25 MiB/s for 512 KiB and 40 ms);
and one token bucket shared by all connections caps the downstream (server to client) rate.
SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import sys
from collections import deque

CHUNK = 256 * 1024


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*(ms|s|us)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r}")
    value = float(m.group(1))
    return {"ms": value / 1000, "us": value / 1e6}.get(m.group(2) or "s", value)


class Bucket:
    """A token bucket as a virtual clock: each take() reserves its slot on the line."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.slack = burst / rate
        self.busy_until = 0.0

    async def take(self, n: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self.busy_until = max(self.busy_until, now - self.slack) + n / self.rate
        wait = self.busy_until - now - self.slack
        if wait > 0:
            await asyncio.sleep(wait)


class Pipe:
    """One direction of one connection: read, hold for delay, deliver; bounded in flight."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: float,
        window: int,
        bucket: Bucket | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.delay = delay
        self.window = window
        self.bucket = bucket
        self.in_flight = 0
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = asyncio.Event()
        self.room = asyncio.Event()
        self.room.set()

    async def intake(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while self.in_flight >= self.window:
                self.room.clear()
                await self.room.wait()
            data = await self.reader.read(min(CHUNK, self.window - self.in_flight))
            self.queue.append((loop.time() + self.delay, data))
            self.queued.set()
            if not data:
                return
            self.in_flight += len(data)

    async def deliver(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.queue:
                self.queued.clear()
                await self.queued.wait()
            due, data = self.queue.popleft()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if self.writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        self.writer.write_eof()
                return
            if self.bucket is not None:
                await self.bucket.take(len(data))
            self.writer.write(data)
            await self.writer.drain()
            self.in_flight -= len(data)
            self.room.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.intake())
            tg.create_task(self.deliver())


class DelayLine:
    def __init__(self, delay: float, window: int, rate: float) -> None:
        self.delay = delay
        self.window = window
        self.bucket = Bucket(rate, 2 * CHUNK) if rate > 0 else None
        self.connections = 0

    async def handle(
        self,
        target: tuple[str, int],
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
    ) -> None:
        self.connections += 1
        server_w: asyncio.StreamWriter | None = None
        try:
            server_r, connected = await asyncio.open_connection(*target, limit=4 * CHUNK)
            server_w = connected
            for w in (client_w, connected):
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            up = Pipe(client_r, connected, self.delay, self.window, None)
            down = Pipe(server_r, client_w, self.delay, self.window, self.bucket)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(up.run())
                tg.create_task(down.run())
        except (OSError, ExceptionGroup):
            pass
        finally:
            for writer in (client_w, server_w):
                if writer is not None:
                    writer.close()
                    with contextlib.suppress(OSError, ConnectionError):
                        await writer.wait_closed()


async def serve(line: DelayLine, targets: dict[str, tuple[str, int]]) -> None:
    servers: list[asyncio.Server] = []
    ports: dict[str, int] = {}
    for name, target in targets.items():

        async def on_client(
            r: asyncio.StreamReader, w: asyncio.StreamWriter, target: tuple[str, int] = target
        ) -> None:
            await line.handle(target, r, w)

        server = await asyncio.start_server(on_client, "127.0.0.1", 0, limit=4 * CHUNK)
        servers.append(server)
        ports[name] = int(server.sockets[0].getsockname()[1])
    print(json.dumps(ports), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TCP delay line: RTT, window, shared rate cap")
    parser.add_argument("--rtt", type=parse_duration, default=0.04, help="e.g. 40ms")
    parser.add_argument("--window", type=int, default=512 * 1024, help="bytes in flight")
    parser.add_argument(
        "--rate", type=float, default=1e9, help="shared downstream bits/s (0: none)"
    )
    parser.add_argument("targets", nargs="+", metavar="NAME=HOST:PORT")
    args = parser.parse_args(argv)
    targets: dict[str, tuple[str, int]] = {}
    for spec in args.targets:
        name, _, hostport = spec.partition("=")
        host, _, port = hostport.rpartition(":")
        if not name or not host or not port.isdigit():
            parser.error(f"bad target {spec!r}")
        targets[name] = (host, int(port))
    line = DelayLine(args.rtt / 2, args.window, args.rate / 8)
    asyncio.run(serve(line, targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
