"""Blocks read back from the disk cache by threads of their own, in the order they were asked.

A streaming reader's read-ahead queues its next blocks in file order, and a reader waiting
for a block now goes to the front of the queue. The threads stay with the queue while it
holds work: a long read pays one thread wake-up, not one per batch, and each batch comes
back to trio in one callback. (Tasks started one per batch run in trio's chosen order, and a
reader then waits on blocks far ahead of the one it needs.)
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import trio

from .inflight import Pending
from .version import Version

# Threads reading blocks back, and blocks per batch (a batch is one answer to trio).
THREADS = 2
BATCH = 2

GetMany = Callable[[str, str, Version, list[int]], list[bytes | None]]


class Closed(Exception):
    """The reads stopped (the store is closing) before this batch was read."""


@dataclass
class Batch:
    """Blocks of one artifact version, read from the disk in one go."""

    call_id: str
    kind: str
    version: Version
    pendings: dict[int, Pending]  # what each block's readers wait on

    @property
    def indexes(self) -> list[int]:
        return sorted(self.pendings)


# Called in trio with a batch and its blocks (None where absent), or with why it failed.
Done = Callable[[Batch, "list[bytes | None] | BaseException"], None]


class DiskReads:
    """A queue of batches and the threads that read them; `start` runs it in a nursery."""

    def __init__(self, get_many: GetMany, done: Done, *, threads: int = THREADS) -> None:
        self._get_many = get_many
        self._done = done
        self._threads = threads
        self._queue: deque[Batch] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._token: trio.lowlevel.TrioToken | None = None

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the threads; they stop when `nursery` is cancelled."""
        await nursery.start(self._run)

    async def _run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._token = trio.lowlevel.current_trio_token()
        for n in range(self._threads):
            threading.Thread(target=self._work, name=f"vapifs disk reads {n}", daemon=True).start()
        task_status.started()
        try:
            await trio.sleep_forever()
        finally:
            with self._cond:
                self._closed = True
                left = list(self._queue)
                self._queue.clear()
                self._cond.notify_all()
            self._refuse(left)  # nobody may be left waiting

    def put(
        self,
        call_id: str,
        kind: str,
        version: Version,
        pendings: dict[int, Pending],
        *,
        urgent: bool,
    ) -> None:
        """Queue blocks (in order, BATCH per batch): behind the others, or before them all."""
        if self._token is None:
            raise RuntimeError("the disk reads were never started (see DiskReads.start)")
        indexes = sorted(pendings)
        batches = [
            Batch(call_id, kind, version, {i: pendings[i] for i in indexes[at : at + BATCH]})
            for at in range(0, len(indexes), BATCH)
        ]
        with self._cond:
            closed = self._closed
            if not closed:
                if urgent:
                    self._queue.extendleft(reversed(batches))
                else:
                    self._queue.extend(batches)
                self._cond.notify(len(batches))
        if closed:
            self._refuse(batches)

    def _refuse(self, batches: list[Batch]) -> None:
        """Answer batches that will never be read (in trio)."""
        for batch in batches:
            self._done(batch, Closed("the disk cache's reads stopped"))

    def _work(self) -> None:
        token = self._token
        assert token is not None
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                batch = self._queue.popleft()
            result: list[bytes | None] | BaseException
            try:
                result = self._get_many(batch.call_id, batch.kind, batch.version, batch.indexes)
            except Exception as exc:  # answered in trio: a waiting reader gets an error
                result = exc
            try:
                token.run_sync_soon(self._done, batch, result)
            except trio.RunFinishedError:
                return
