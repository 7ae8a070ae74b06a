"""jobs: the mount's background jobs run until done or stopped, and stop with their `Jobs`."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import pytest
import trio
import trio.testing

from vapifs.jobs import Expiry, Job, Jobs, SignalWatcher, UnmountWatcher, is_mounted


class Forever(Job):
    def __init__(self) -> None:
        super().__init__()
        self.started = False
        self.ended = False

    async def _work(self) -> None:
        self.started = True
        try:
            await trio.sleep_forever()
        finally:
            self.ended = True


async def test_stop_ends_a_running_job_and_one_not_started_yet() -> None:
    running, waiting = Forever(), Forever()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(running.run)
        await trio.testing.wait_all_tasks_blocked()
        assert running.started and not running.ended
        running.stop()
        waiting.stop()
        nursery.start_soon(waiting.run)
    assert running.ended
    assert waiting.ended  # stopped before it ran: it ends at its first wait


async def test_jobs_stops_every_job_it_started_on_exit_and_no_other() -> None:
    other = Forever()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(other.run)
        with Jobs(nursery) as jobs:
            started = [Forever(), Forever()]
            for job in started:
                jobs.start(job)
            await trio.testing.wait_all_tasks_blocked()
            assert all(job.started and not job.ended for job in started)
        await trio.testing.wait_all_tasks_blocked()
        assert all(job.ended for job in started)
        assert other.started and not other.ended
        other.stop()


async def test_the_signal_watcher_stops_the_mount_once(autojump_clock: trio.abc.Clock) -> None:
    stops: list[int] = []
    watcher = SignalWatcher(lambda: stops.append(1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        await trio.testing.wait_all_tasks_blocked()
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(5):
            while not stops:
                await trio.sleep(0.01)
    assert stops == [1]  # and the watcher ended by itself


async def test_the_signal_watcher_stopped_stops_nothing() -> None:
    stops: list[int] = []
    watcher = SignalWatcher(lambda: stops.append(1))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        await trio.testing.wait_all_tasks_blocked()
        watcher.stop()
    assert stops == []


async def test_the_unmount_watcher_announces_then_stops_once_unmounted_and_closed(
    tmp_path: Path,
) -> None:
    events: list[str] = []
    mounted = True
    open_files = 1

    async def ready(dev: int) -> None:
        events.append(f"ready {dev == os.stat(tmp_path).st_dev}")

    async def until(what: str) -> None:
        with trio.fail_after(5):
            while what not in events:
                await trio.sleep(0.01)

    watcher = UnmountWatcher(
        tmp_path,
        lambda: open_files,
        lambda: events.append("stop"),
        ready,
        poll=0.01,
        mounted=lambda dev: mounted,
    )
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
        await until("ready True")
        await trio.sleep(0.2)
        assert events == ["ready True"]
        mounted = False  # a lazy unmount: a file is still open, reads go on
        await trio.sleep(0.2)
        assert events == ["ready True"]
        open_files = 0
        await until("stop")
    assert events == ["ready True", "stop"]


async def test_the_unmount_watcher_stopped_stops_nothing(
    autojump_clock: trio.abc.Clock, tmp_path: Path
) -> None:
    events: list[str] = []

    async def ready(dev: int) -> None:
        events.append("ready")

    watcher = UnmountWatcher(
        tmp_path, lambda: 0, lambda: events.append("stop"), ready, mounted=lambda dev: False
    )
    watcher.stop()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watcher.run)
    assert events == []


async def test_expiry_drops_at_start_then_periodically_and_survives_failures(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vapifs")
    asked: list[float] = []

    async def drop_older_than(ts: float) -> int:
        asked.append(trio.current_time())
        if len(asked) == 2:
            raise RuntimeError("a disk error")
        return 3

    expiry = Expiry(drop_older_than, 40.0, wall_clock=lambda: 1000.0)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(expiry.run)
        await trio.sleep(25)
        expiry.stop()
    start = asked[0]
    assert [t - start for t in asked] == [0.0, 10.0, 20.0]  # max_age / 4 between them
    assert "cannot drop old data" in caplog.text
    assert "dropped 3 artifacts older than 40s" in caplog.text


def test_a_device_not_mounted_is_not_mounted(tmp_path: Path) -> None:
    assert is_mounted(os.stat(tmp_path).st_dev)
    assert not is_mounted(os.makedev(4095, 4095))
