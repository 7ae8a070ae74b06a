"""Loads of blocks into memory, one per block: from the disk cache, or downloaded in runs."""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from .blocks import BlockCache
from .diskreads import Batch, DiskReads
from .errors import NetworkError, VapifsError
from .fetch import Fetcher
from .inflight import Abandoned, Inflight, Pending
from .memory import BlockMemory
from .readstats import ReaderStats
from .version import Version
from .writers import DiskWriters

log = logging.getLogger("vapifs.reader")

# A run of blocks fetched by one ranged request: long enough to amortise a round trip,
# short enough that a reader waiting on the first block does not wait long.
MAX_RUN_BLOCKS = 8

# A read finds at most this much of its disk blocks in the kernel's memory and copies it
# on the spot (a FUSE read is 1 MiB at most: two blocks when it straddles a boundary);
# a larger request, a prefetch, leaves its blocks to the disk reads' threads.
INLINE_BYTES = 2 << 20


class Loads:
    """Where a block not in memory comes from, and who else waits for it meanwhile.

    Every block that arrives goes to memory, and a downloaded one to the disk writers too.
    Background work (downloads, disk loads) runs in the store's nursery.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        cache: BlockCache,
        fetcher: Fetcher,
        memory: BlockMemory,
        inflight: Inflight,
        writers: DiskWriters,
        stats: ReaderStats,
    ) -> None:
        self._nursery = nursery
        self.cache = cache
        self.fetcher = fetcher
        self.memory = memory
        self.inflight = inflight
        self.writers = writers
        self.stats = stats
        self.block_size = cache.block_size
        self.disk = DiskReads(self._read_back, self._from_disk)

    def present(self, call_id: str, kind: str, token: str, index: int) -> bool:
        """In memory, or on its way there."""
        key = (call_id, kind, token, index)
        return key in self.memory or key in self.inflight

    async def arrived(
        self, call_id: str, kind: str, version: Version, index: int, data: bytes
    ) -> None:
        """A downloaded block: into memory, then queued for the disk."""
        self.memory.put((call_id, kind, version.token(), index), data)
        await self.writers.put(call_id, kind, version, index, data)

    def collect(
        self, call_id: str, kind: str, version: Version, first: int, last: int
    ) -> tuple[dict[int, bytes], dict[int, Pending], list[int]]:
        """Blocks found in memory (those on disk in the kernel's memory read now among them),
        blocks in flight (the other blocks on disk among them, read back by a thread before
        anything queued), and blocks nobody has."""
        token = version.token()
        found: dict[int, bytes] = {}
        waits: dict[int, Pending] = {}
        unknown: list[int] = []
        for index in range(first, last + 1):
            key = (call_id, kind, token, index)
            data = self.memory.get(key)
            pending = self.inflight.get(key)
            if data is not None:
                self.stats.blocks_from_memory += 1
                self.stats.bytes_from_memory += len(data)
                found[index] = data
            elif pending is not None:
                waits[index] = pending
            else:
                unknown.append(index)
        missing = [i for i in unknown if not self.cache.has(call_id, kind, version, i)]
        stored = [i for i in unknown if i not in missing]
        if stored and len(stored) * self.block_size <= INLINE_BYTES:
            # What the kernel holds in memory is read here and now: a trip to a thread
            # and back costs more than the copy, and a thread holding the interpreter
            # lock slows the event loop's replies.
            now, stored = self.cache.get_cached(call_id, kind, version, stored)
            for index, data in now.items():
                self.stats.blocks_from_disk += 1
                self.stats.bytes_from_disk += len(data)
                self.memory.put((call_id, kind, token, index), data)
                found[index] = data
            gone = [i for i in unknown if i not in missing and i not in now and i not in stored]
            missing = sorted(missing + gone)  # evicted or damaged meanwhile: the network
        # In flight from now on, so that concurrent readers wait for this one disk read
        # (and a damaged block is reported and fetched once).
        on_disk = self.inflight.register(call_id, kind, version, stored, network=False)
        if on_disk:
            waits.update(on_disk)
            self.disk.put(call_id, kind, version, on_disk, urgent=True)
        return found, waits, missing

    def refetcher(self, call_id: str, kind: str, version: Version) -> Callable[[int], Pending]:
        """How a reader whose block's download was abandoned (its first reader closed the
        file) starts that block's download again, for `Inflight.wait`."""

        def refetch(index: int) -> Pending:
            return self.start_fetches(call_id, kind, version, [index])[index]

        return refetch

    def start_fetches(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> dict[int, Pending]:
        """Start downloads of `indexes`, coalescing adjacent ones; returns their pendings."""
        pendings = self.inflight.register(call_id, kind, version, indexes)
        self.spawn_runs(call_id, kind, version, pendings)
        return pendings

    def spawn_runs(
        self, call_id: str, kind: str, version: Version, pendings: dict[int, Pending]
    ) -> None:
        """Download registered blocks, adjacent ones coalesced into one request per run."""
        run: list[int] = []
        for index in [*sorted(pendings), -2]:
            if run and (index != run[-1] + 1 or len(run) >= MAX_RUN_BLOCKS):
                run_pendings = {i: pendings[i] for i in run}
                self._nursery.start_soon(
                    self.fetch_run, call_id, kind, version, run[0], len(run), run_pendings
                )
                run = []
            if index >= 0:
                run.append(index)

    async def fetch_run(
        self,
        call_id: str,
        kind: str,
        version: Version,
        first: int,
        count: int,
        pendings: dict[int, Pending],
    ) -> None:
        """Download `count` registered blocks from `first` in one request; every pending
        is answered, with its block or with why it did not come."""
        token = version.token()

        async def sink(index: int, data: bytes) -> None:
            self.stats.blocks_from_network += 1
            self.stats.bytes_from_network += len(data)
            self.memory.put((call_id, kind, token, index), data)
            pending = pendings.pop(index, None)
            if pending is not None:
                self.inflight.settle((call_id, kind, token, index), pending, data)
            await self.writers.put(call_id, kind, version, index, data)

        error: BaseException | None = None
        try:
            await self.fetcher.fetch(call_id, kind, first, count, version, sink)
        except trio.Cancelled:
            error = Abandoned(f"{call_id}/{kind}: download abandoned")
            raise
        except VapifsError as exc:
            error = exc
        except Exception as exc:  # a bug must not leave readers waiting forever
            log.exception("%s/%s: unexpected error while fetching", call_id, kind)
            error = NetworkError(f"{call_id}/{kind}: internal error {type(exc).__name__}")
        finally:
            if pendings and error is None:
                error = NetworkError(f"{call_id}/{kind}: the download stopped early")
            for index, pending in pendings.items():
                self.inflight.fail((call_id, kind, token, index), pending, error)

    def load_in_background(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> None:
        """Bring blocks known to be on disk into memory, in order, without waiting for them:
        those the kernel holds in memory already are left for the reader to copy itself."""
        indexes = self.cache.not_in_memory(call_id, kind, version, indexes)
        pendings = self.inflight.register(call_id, kind, version, indexes, network=False)
        self.disk.put(call_id, kind, version, pendings, urgent=False)

    def _read_back(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[bytes | None]:
        """Blocks from the disk cache, checked (in a thread of the disk reads)."""
        return self.cache.get_many(call_id, kind, version, indexes)

    def _from_disk(self, batch: Batch, result: list[bytes | None] | BaseException) -> None:
        """A batch read back (in trio): blocks to memory and their readers; blocks gone from
        the disk (evicted, damaged) to the network."""
        call_id, kind, version = batch.call_id, batch.kind, batch.version
        token = version.token()
        pendings = batch.pendings
        if isinstance(result, BaseException):
            error = NetworkError(f"{call_id}/{kind}: disk read failed ({result})")
            for index, pending in pendings.items():
                self.inflight.fail((call_id, kind, token, index), pending, error)
            return
        missing: dict[int, Pending] = {}
        for index, data in zip(batch.indexes, result, strict=True):
            pending = pendings[index]
            if data is None:
                pending.network, pending.started = True, trio.current_time()
                missing[index] = pending
                continue
            self.stats.blocks_from_disk += 1
            self.stats.bytes_from_disk += len(data)
            self.memory.put((call_id, kind, token, index), data)
            self.inflight.settle((call_id, kind, token, index), pending, data)
        self.spawn_runs(call_id, kind, version, missing)
