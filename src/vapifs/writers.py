"""Storing fetched blocks on disk: a pool of writer tasks off the read path, and its flush."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import trio

from .version import Version

log = logging.getLogger("vapifs.reader")

WRITERS = 2  # tasks storing fetched blocks on disk
QUEUED = 32  # blocks waiting for a writer before those who hand more over wait too
BATCH = 8  # blocks a writer takes from the queue at once, for one trip to its thread

_Write = tuple[str, str, Version, int, bytes]  # (call id, kind, version, index, bytes)


class BlockSink(Protocol):
    """Where blocks are stored: the disk cache (BlockCache.put)."""

    def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool: ...


class DiskWriters:
    """Writer tasks, each on its own clone of one queue, that store blocks in the disk cache.

    Built stopped; `start` runs the pool in a nursery. A block whose artifact has moved to
    another version by the time a writer takes it is skipped: an old version's block is
    never stored. `flush` waits until every block handed over is stored or skipped.
    """

    def __init__(
        self,
        sink: BlockSink,
        current: Callable[[str, str], Version | None],
        *,
        workers: int = WRITERS,
        queued: int = QUEUED,
    ) -> None:
        self._sink = sink
        self._current = current
        self._workers = workers
        self._send, self._recv = trio.open_memory_channel[_Write](queued)
        self._unsettled = 0  # blocks handed to `put`, neither stored nor skipped yet
        self._settled = trio.Condition()
        self._running = False

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the writers in `nursery`; they run until it is cancelled."""
        await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as pool:
            async with self._recv:  # each writer holds a clone: this one closes now
                for _ in range(self._workers):
                    pool.start_soon(self._work, self._recv.clone())
            self._running = True
            task_status.started()

    async def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> None:
        """Queue a block for the disk; waits while the queue is full."""
        if not self._running:
            raise RuntimeError("the disk writers were never started (see DiskWriters.start)")
        self._unsettled += 1
        try:
            await self._send.send((call_id, kind, version, index, data))
        except BaseException:
            await self._settle()  # not queued (cancelled while the queue was full)
            raise

    async def flush(self) -> None:
        """Return once every block handed to `put` is stored (or skipped).

        For a short-lived user (prefetch) that wants its fetched blocks on disk before it
        cancels the nursery, and for an unmount; blocks of fetches still running may be
        queued after it returns.
        """
        async with self._settled:
            while self._unsettled:
                await self._settled.wait()

    async def _work(self, queue: trio.MemoryReceiveChannel[_Write]) -> None:
        async with queue:
            async for first in queue:
                # What else is queued already goes along: one trip to a thread for several
                # blocks, since each trip costs the event loop a wake-up and a handover of
                # the interpreter lock.
                batch = [first]
                while len(batch) < BATCH:
                    try:
                        batch.append(queue.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    todo = [w for w in batch if self._still_current(w)]
                    if todo:
                        await trio.to_thread.run_sync(self._store, todo)
                except Exception:  # a bug here must not stop every later block being stored
                    log.exception("cannot store %d blocks", len(batch))
                finally:
                    for _ in batch:
                        await self._settle()

    def _still_current(self, write: _Write) -> bool:
        """Not superseded while queued: an old version's block is never stored."""
        current = self._current(write[0], write[1])
        return current is None or current == write[2]

    def _store(self, todo: list[_Write]) -> None:
        """Store blocks one after another (in a thread); one that fails leaves the rest."""
        for call_id, kind, version, index, data in todo:
            try:
                self._sink.put(call_id, kind, version, index, data)
            except Exception:  # a bug here must not stop every later block being stored
                log.exception("%s/%s: cannot store block %d", call_id, kind, index)

    async def _settle(self) -> None:
        self._unsettled -= 1
        if self._unsettled:
            return
        # Shielded: a writer or a sender being cancelled still wakes a flush that waits.
        with trio.CancelScope(shield=True):
            async with self._settled:
                self._settled.notify_all()
