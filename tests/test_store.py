"""The store's seams driven directly: its disk writers, and one load per block.

The writers run against a sink that stands for the disk; single flight runs the whole core
against the fake Vapi in process. Virtual time throughout: a wait that slept would move it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from vapifs import writers as writers_module
from vapifs.core import Core, opened_core
from vapifs.demo.server import FakeVapi
from vapifs.version import Version
from vapifs.writers import DiskWriters

from .inprocess import CoreSettings, InProcessTransport

V1 = Version(size=10 << 20, etag='"one"')
V2 = Version(size=10 << 20, etag='"two"')
FOREVER = 10 * 86400.0


class Sink:
    """A disk that stores blocks in a list, each `put` held until `gate` opens; with a
    `barrier`, the first puts (as many as it has parties) wait until all of them are under
    way at once."""

    def __init__(self, barrier: threading.Barrier | None = None) -> None:
        self.gate = threading.Event()
        self.barrier = barrier
        self._waiting_left = barrier.parties if barrier is not None else 0
        self.stored: list[tuple[str | None, int]] = []
        self.threads: set[int] = set()
        self._lock = threading.Lock()

    def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool:
        with self._lock:
            wait = self._waiting_left > 0
            self._waiting_left -= wait
        if wait:
            assert self.barrier is not None
            self.barrier.wait()
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        with self._lock:
            self.stored.append((version.etag, index))
            self.threads.add(threading.get_ident())
        return True


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the run has been idle a moment of real time (puts run in
    threads: a jump while one is under way would fire the guard's timeout early)."""
    return trio.testing.MockClock(autojump_threshold=0.1)


async def test_flush_waits_on_the_writers_and_never_polls(clock: trio.testing.MockClock) -> None:
    sink = Sink()
    writers = DiskWriters(sink, lambda call_id, kind: None, workers=2)
    started = trio.current_time()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await writers.start(nursery)
            for index in range(5):
                await writers.put("c", "stereo", V1, index, b"x")
            flushed = trio.Event()

            async def flush() -> None:
                await writers.flush()
                flushed.set()

            nursery.start_soon(flush)
            await trio.testing.wait_all_tasks_blocked()
            # Parked on the condition while the writers are busy, not sleeping in a loop.
            assert not flushed.is_set()
            assert writers._settled.statistics().tasks_waiting == 1
            sink.gate.set()
            await flushed.wait()
            assert sorted(sink.stored) == [('"one"', i) for i in range(5)]
            nursery.cancel_scope.cancel()
    # Woken by the last block stored: the virtual clock never had a reason to move.
    assert trio.current_time() == started


async def test_flush_returns_at_once_when_nothing_is_queued(
    clock: trio.testing.MockClock,
) -> None:
    writers = DiskWriters(Sink(), lambda call_id, kind: None)
    async with trio.open_nursery() as nursery:
        await writers.start(nursery)
        started = trio.current_time()
        await writers.flush()
        assert trio.current_time() == started
        nursery.cancel_scope.cancel()


async def test_each_writer_drains_the_queue_on_its_own_clone(
    clock: trio.testing.MockClock,
) -> None:
    # Three puts must be under way at once before any completes: only three writers, each
    # taking blocks from the queue by itself, get there (however the six blocks are shared
    # between their batches).
    sink = Sink(barrier=threading.Barrier(3, timeout=30))
    sink.gate.set()
    writers = DiskWriters(sink, lambda call_id, kind: None, workers=3)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await writers.start(nursery)
            for index in range(6):
                await writers.put("c", "stereo", V1, index, b"x")
            await writers.flush()
            nursery.cancel_scope.cancel()
    assert sorted(i for _, i in sink.stored) == list(range(6))
    assert len(sink.threads) >= 3  # the first three puts were under way at once


async def test_a_block_superseded_while_queued_is_not_stored(
    clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    sink.gate.set()
    current = {"stereo": V1}
    writers = DiskWriters(sink, lambda call_id, kind: current.get(kind))
    async with trio.open_nursery() as nursery:
        await writers.start(nursery)
        current["stereo"] = V2  # the artifact changed before a writer took its old block
        await writers.put("c", "stereo", V1, 0, b"old")
        await writers.put("c", "stereo", V2, 0, b"new")
        await writers.put("c", "mono", V1, 0, b"no version known")
        await writers.flush()
        nursery.cancel_scope.cancel()
    assert sorted(sink.stored) == [('"one"', 0), ('"two"', 0)]  # mono's, and stereo's new


async def test_a_put_cancelled_on_a_full_queue_does_not_hold_up_flush(
    clock: trio.testing.MockClock,
) -> None:
    sink = Sink()
    writers = DiskWriters(sink, lambda call_id, kind: None, workers=1, queued=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await writers.start(nursery)
            await writers.put("c", "stereo", V1, 0, b"x")  # taken by the writer, held
            await trio.testing.wait_all_tasks_blocked()
            await writers.put("c", "stereo", V1, 1, b"x")  # fills the queue
            with trio.CancelScope() as scope:
                scope.deadline = trio.current_time() + 1.0
                await writers.put("c", "stereo", V1, 2, b"x")  # waits for room, gives up
            assert scope.cancelled_caught
            sink.gate.set()
            await writers.flush()
            nursery.cancel_scope.cancel()
    assert sorted(i for _, i in sink.stored) == [0, 1]


async def test_blocks_queued_together_go_to_the_disk_in_one_trip_to_a_thread(
    clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A trip to a thread costs the event loop a wake-up and a handover of the interpreter
    # lock: blocks waiting in the queue go together, BATCH at most, in the order queued.
    trips: list[int] = []
    original = trio.to_thread.run_sync

    async def run_sync(fn: Any, *args: Any, **kwargs: Any) -> Any:
        trips.append(len(args[0]))
        return await original(fn, *args, **kwargs)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    sink = Sink()
    writers = DiskWriters(sink, lambda call_id, kind: None, workers=1)
    count = 1 + writers_module.BATCH + 3
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await writers.start(nursery)
            await writers.put("c", "stereo", V1, 0, b"x")  # taken by the writer, held
            await trio.testing.wait_all_tasks_blocked()
            for index in range(1, count):
                await writers.put("c", "stereo", V1, index, b"x")
            sink.gate.set()
            await writers.flush()
            nursery.cancel_scope.cancel()
    assert trips == [1, writers_module.BATCH, 3]
    assert sink.stored == [('"one"', i) for i in range(count)]


async def test_a_block_that_fails_to_store_leaves_the_others_of_its_trip(
    clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Failing(Sink):
        def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool:
            if index == 2:
                raise RuntimeError("no luck with this one")
            return super().put(call_id, kind, version, index, data)

    sink = Failing()
    writers = DiskWriters(sink, lambda call_id, kind: None, workers=1)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            await writers.start(nursery)
            await writers.put("c", "stereo", V1, 0, b"x")
            await trio.testing.wait_all_tasks_blocked()
            for index in range(1, 5):
                await writers.put("c", "stereo", V1, index, b"x")
            sink.gate.set()
            await writers.flush()
            nursery.cancel_scope.cancel()
    assert sorted(i for _, i in sink.stored) == [0, 1, 3, 4]
    assert "c/stereo: cannot store block 2" in caplog.text


async def test_a_put_before_the_writers_start_is_refused() -> None:
    writers = DiskWriters(Sink(), lambda call_id, kind: None)
    with pytest.raises(RuntimeError, match="never started"):
        await writers.put("c", "stereo", V1, 0, b"x")


# -- single flight, through the whole core --------------------------------------------------


@pytest.fixture
def fake() -> Iterator[FakeVapi]:
    with FakeVapi(seed=21, big_stereo_mb=8) as server:
        yield server


@asynccontextmanager
async def core_of(fake: FakeVapi, cache_dir: Path) -> AsyncIterator[Core]:
    started = time.time()
    settings = CoreSettings(fake.api_url, cache_dir, read_timeout=FOREVER, stall_timeout=FOREVER)
    async with opened_core(
        settings,
        fake.api_key,
        None,
        revalidate_after=86400.0,
        wall_clock=lambda: started + trio.current_time(),
        transport=InProcessTransport(fake),
    ) as core:
        yield core
        await core.store.flush()


def big_stereo(fake: FakeVapi) -> tuple[str, bytes]:
    return max(
        ((c, fc.artifacts["stereo"]) for c, fc in fake.calls.items() if "stereo" in fc.artifacts),
        key=lambda item: len(item[1]),
    )


async def read_at_once(core: Core, call_id: str, offsets: list[int], size: int) -> list[bytes]:
    results: list[bytes] = [b""] * len(offsets)

    async def read(i: int) -> None:
        results[i] = await core.store.read(call_id, "stereo", offsets[i], size)

    async with trio.open_nursery() as nursery:
        for i in range(len(offsets)):
            nursery.start_soon(read, i)
    return results


async def test_32_readers_of_one_block_cause_one_download(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id, data = big_stereo(fake)
    async with core_of(fake, tmp_path / "cache") as core:
        bs = core.cache.block_size
        assert len(data) > 4 * bs
        await core.store.version(call_id, "stereo")  # the discovery brings block 0 as well
        fake.reset_counters()
        offsets = [3 * bs + i * 1000 for i in range(32)]
        got = await read_at_once(core, call_id, offsets, 4096)
        assert got == [data[o : o + 4096] for o in offsets]
        assert fake.counters()[f"storage.get:{call_id}/stereo"] == 1
        assert fake.counters()["storage.bytes"] == bs


def count_disk_reads(core: Core, monkeypatch: Any) -> tuple[list[list[int]], list[list[int]]]:
    """The blocks read back from the disk cache from now on: by the event loop at once (those
    the kernel holds in memory), and by the disk reads' threads."""
    at_once: list[list[int]] = []
    by_thread: list[list[int]] = []
    get_many, get_cached = core.cache.get_many, core.cache.get_cached

    def counted_many(call_id: str, kind: str, version: Version, indexes: list[int]) -> Any:
        by_thread.append(list(indexes))
        return get_many(call_id, kind, version, indexes)

    def counted_cached(call_id: str, kind: str, version: Version, indexes: list[int]) -> Any:
        now, later = get_cached(call_id, kind, version, indexes)
        if now:
            at_once.append(sorted(now))
        return now, later

    monkeypatch.setattr(core.cache, "get_many", counted_many)
    monkeypatch.setattr(core.cache, "get_cached", counted_cached)
    return at_once, by_thread


async def test_32_readers_of_one_block_on_disk_cause_one_disk_read(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock, monkeypatch: Any
) -> None:
    call_id, data = big_stereo(fake)
    async with core_of(fake, tmp_path / "cache") as core:
        bs = core.cache.block_size
        assert await core.store.read(call_id, "stereo", 0, 4 * bs) == data[: 4 * bs]
    fake.reset_counters()
    async with core_of(fake, tmp_path / "cache") as core:  # a new process: memory is empty
        at_once, by_thread = count_disk_reads(core, monkeypatch)
        offsets = [3 * bs + i * 1000 for i in range(32)]
        got = await read_at_once(core, call_id, offsets, 4096)
        assert got == [data[o : o + 4096] for o in offsets]
        assert at_once + by_thread == [[3]]
        assert fake.counters()["storage.requests"] == 0


def drop_from_page_cache(path: Path) -> bool:
    """Make the kernel forget the file's pages; False where it keeps them (tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            os.preadv(fd, [bytearray(1)], 0, os.RWF_NOWAIT)
        except BlockingIOError:
            return True
        return False
    finally:
        os.close(fd)


async def test_a_block_the_kernel_holds_is_read_at_once_and_another_by_a_thread(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock, monkeypatch: Any
) -> None:
    call_id, data = big_stereo(fake)
    async with core_of(fake, tmp_path / "cache") as core:
        bs = core.cache.block_size
        assert await core.store.read(call_id, "stereo", 0, 7 * bs) == data[: 7 * bs]
    fake.reset_counters()
    async with core_of(fake, tmp_path / "cache") as core:
        at_once, by_thread = count_disk_reads(core, monkeypatch)
        assert (
            await core.store.read(call_id, "stereo", 3 * bs + 5, 4096)
            == data[3 * bs + 5 : 3 * bs + 5 + 4096]
        )
        assert (at_once, by_thread) == ([[3]], [])  # just written: in the page cache
        (path,) = (tmp_path / "cache").rglob("*.vblk")
        dropped = drop_from_page_cache(path)
        got = await core.store.read(call_id, "stereo", 5 * bs - 100, 200)  # blocks 4 and 5
        assert got == data[5 * bs - 100 : 5 * bs + 100]
        if dropped:  # the event loop never waits on the disk: a thread reads them
            assert (at_once, by_thread) == ([[3]], [[4, 5]])
        else:
            assert (at_once, by_thread) == ([[3], [4, 5]], [])
        assert fake.counters()["storage.requests"] == 0


async def test_blocks_read_just_before_a_flush_are_on_disk_after_it(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id, data = big_stereo(fake)
    async with core_of(fake, tmp_path / "cache") as core:
        assert await core.store.read(call_id, "stereo", 0, len(data)) == data
        await core.store.flush()
        version = core.store.known_version(call_id, "stereo")
        assert version is not None
        blocks = -(-len(data) // core.cache.block_size)
        assert all(core.cache.has(call_id, "stereo", version, i) for i in range(blocks))
