"""The disk cache's reads back: in the order asked, a waiting reader first, nobody left waiting;
and the blocks' checksum, which must not let go of the interpreter lock."""

from __future__ import annotations

import random
import sys
import threading
import time
import zlib

import trio

from vapifs.blockfile import block_crc32
from vapifs.diskreads import Batch, DiskReads
from vapifs.inflight import Pending
from vapifs.version import Version

V = Version(size=100 << 20, etag='"e"')


def pendings(indexes: list[int]) -> dict[int, Pending]:
    return {i: Pending(network=False) for i in indexes}


class Recorder:
    """get_many that records the order of its calls and can be held back."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[int] = set()

    def get_many(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[bytes | None]:
        self.gate.wait(10)
        self.calls.append(list(indexes))
        if self.fail & set(indexes):
            raise OSError(5, "Input/output error")
        return [bytes([i % 256]) * 8 if i % 7 else None for i in indexes]


async def test_blocks_come_back_in_the_order_queued_and_a_waiting_reader_goes_first() -> None:
    rec = Recorder()
    answers: list[tuple[list[int], object]] = []

    def done(batch: Batch, result: object) -> None:
        answers.append((batch.indexes, result))

    reads = DiskReads(rec.get_many, done, threads=1)
    async with trio.open_nursery() as nursery:
        await reads.start(nursery)
        rec.gate.clear()  # the thread takes the first batch and waits on it
        reads.put("c", "stereo", V, pendings([0, 1]), urgent=False)
        await trio.sleep(0.05)
        # Read-ahead queues far ahead; then a reader needs block 40 now.
        reads.put("c", "stereo", V, pendings(list(range(2, 30))), urgent=False)
        reads.put("c", "stereo", V, pendings([40]), urgent=True)
        rec.gate.set()
        with trio.fail_after(10):
            while len(answers) < 16:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    expected = [[0, 1], [40]] + [[i, i + 1] for i in range(2, 30, 2)]
    assert rec.calls == expected
    assert [a[0] for a in answers] == expected
    # None where a block is absent, the bytes elsewhere.
    assert answers[1][1] == [bytes([40]) * 8]
    assert answers[4][1] == [bytes([6]) * 8, None]


async def test_a_failed_read_answers_with_its_error() -> None:
    rec = Recorder()
    rec.fail = {3}
    answers: list[tuple[list[int], object]] = []
    reads = DiskReads(rec.get_many, lambda b, r: answers.append((b.indexes, r)), threads=2)
    async with trio.open_nursery() as nursery:
        await reads.start(nursery)
        reads.put("c", "stereo", V, pendings([2, 3, 4, 5]), urgent=False)
        with trio.fail_after(10):
            while len(answers) < 2:
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    by_first = dict((a[0][0], a[1]) for a in answers)
    assert isinstance(by_first[2], OSError)
    assert by_first[4] == [bytes([4]) * 8, bytes([5]) * 8]


async def test_closing_answers_every_queued_batch_and_stops_the_threads() -> None:
    rec = Recorder()
    answers: list[tuple[list[int], object]] = []
    reads = DiskReads(rec.get_many, lambda b, r: answers.append((b.indexes, r)), threads=1)
    before = threading.active_count()
    async with trio.open_nursery() as nursery:
        await reads.start(nursery)
        assert threading.active_count() == before + 1
        rec.gate.clear()
        reads.put("c", "stereo", V, pendings(list(range(10))), urgent=False)
        await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    # Four batches never read are answered at once, with an error.
    assert sorted(a[0][0] for a in answers) == [2, 4, 6, 8]
    assert all(isinstance(a[1], Exception) for a in answers)
    reads.put("c", "stereo", V, pendings([20]), urgent=True)  # after closing: answered too
    assert answers[-1][0] == [20] and isinstance(answers[-1][1], Exception)
    rec.gate.set()
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before


def test_block_checksum_is_zlibs() -> None:
    rng = random.Random(7)
    for n in (0, 1, 4095, 4096, 4097, 65536 + 3, (1 << 20) + 17):
        data = rng.randbytes(n)
        assert block_crc32(data) == zlib.crc32(data)
        assert block_crc32(memoryview(data)) == zlib.crc32(data)


def test_block_checksum_keeps_the_interpreter_lock() -> None:
    """A thread checking a block does not give the lock up to a busy event loop and then
    wait to get it back: that made a 1 MiB block's check take milliseconds."""
    data = bytes(range(256)) * 4096 * 4  # 4 MiB
    stop = threading.Event()
    spins = [0]

    def busy() -> None:
        while not stop.is_set():
            spins[0] += 1

    old = sys.getswitchinterval()
    sys.setswitchinterval(0.2)  # the busy thread never has the lock taken from it by time
    t = threading.Thread(target=busy)
    t.start()
    try:
        time.sleep(0.01)
        started = spins[0]
        block_crc32(data)
        during = spins[0] - started
    finally:
        stop.set()
        t.join()
        sys.setswitchinterval(old)
    assert during == 0
