"""The mount's background jobs, each with `run` and `stop`: signals, the unmount watch, the
live figures, and --max-cache-age."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import TracebackType

import trio

from .stats import Sources
from .stats import publish as publish_stats

log = logging.getLogger("vapifs")

# How often the mount checks that it is still mounted (seconds).
UNMOUNT_POLL = 0.5
# --max-cache-age is applied at least this often (seconds).
EXPIRE_EVERY = 600.0


class Job:
    """A task of the mount that runs until it is done or stopped."""

    def __init__(self) -> None:
        self._scope = trio.CancelScope()

    async def run(self) -> None:
        with self._scope:
            await self._work()

    def stop(self) -> None:
        """End `run` at once (or before it starts)."""
        self._scope.cancel()

    async def _work(self) -> None:
        raise NotImplementedError


class Jobs:
    """The jobs started in one nursery, all stopped on exit of the `with`."""

    def __init__(self, nursery: trio.Nursery) -> None:
        self._nursery = nursery
        self._started: list[Job] = []

    def start(self, job: Job) -> None:
        self._started.append(job)
        self._nursery.start_soon(job.run)

    def __enter__(self) -> Jobs:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for job in self._started:
            job.stop()


class SignalWatcher(Job):
    """SIGINT, SIGTERM or SIGHUP: log it and stop the mount, once."""

    def __init__(self, stop_mount: Callable[[], None]) -> None:
        super().__init__()
        self._stop_mount = stop_mount

    async def _work(self) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
            async for signum in signals:
                log.info("%s: unmounting", signal.Signals(signum).name)
                self._stop_mount()
                return


class UnmountWatcher(Job):
    """Once the mount answers, tells `ready` its device; then stops the mount once it is
    unmounted from outside (`vapifs umount`, fusermount3 -u, umount), without waiting for
    requests in flight. After a lazy unmount, files still open keep reading until closed."""

    def __init__(
        self,
        mountpoint: Path,
        open_files: Callable[[], int],
        stop_mount: Callable[[], None],
        ready: Callable[[int], Awaitable[None]],
        *,
        poll: float = UNMOUNT_POLL,
        mounted: Callable[[int], bool] | None = None,
    ) -> None:
        super().__init__()
        self._mountpoint = mountpoint
        self._open_files = open_files
        self._stop_mount = stop_mount
        self._ready = ready
        self._poll = poll
        self._mounted = mounted or is_mounted

    async def _work(self) -> None:
        st = await trio.to_thread.run_sync(os.stat, self._mountpoint)
        await self._ready(st.st_dev)
        while True:
            await trio.sleep(self._poll)
            mounted = await trio.to_thread.run_sync(self._mounted, st.st_dev)
            if not mounted and self._open_files() == 0:
                log.info("%s was unmounted", self._mountpoint)
                self._stop_mount()
                return


class StatsPublisher(Job):
    """Keeps the mount's live figures in its file of the cache's run/ directory."""

    def __init__(self, sources: Sources, path: Path) -> None:
        super().__init__()
        self._sources = sources
        self._path = path

    async def _work(self) -> None:
        await publish_stats(self._sources, self._path)


class Expiry(Job):
    """--max-cache-age: at start, then every so often, drops what is older than `max_age`
    (through the tree's `drop_older_than`)."""

    def __init__(
        self,
        drop_older_than: Callable[[float], Awaitable[int]],
        max_age: float,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self._drop_older_than = drop_older_than
        self._max_age = max_age
        self._wall_clock = wall_clock

    async def _work(self) -> None:
        max_age = self._max_age
        while True:
            try:
                dropped = await self._drop_older_than(self._wall_clock() - max_age)
                if dropped:
                    log.info("cache: dropped %d artifacts older than %gs", dropped, max_age)
            except Exception:  # background work must never take the mount down
                log.exception("cache: cannot drop old data")
            await trio.sleep(max(1.0, min(max_age / 4, EXPIRE_EVERY)))


def is_mounted(dev: int) -> bool:
    """Whether the file system of device `dev` is still mounted in this process's view.

    Read from /proc/self/mountinfo: a stat of the mountpoint would be a request to ourselves.
    """
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(line.split(" ", 3)[2] == wanted for line in f if line.count(" ") >= 3)
    except OSError:
        return True  # cannot tell: keep serving


def remove_file(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()
