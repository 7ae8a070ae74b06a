"""Reads of artifacts: the read path, and the one entry to its versions, loads and caches.

The rooms below it, each with one job: `versions` (which version each artifact is at),
`inflight` (one load per block), `memory` (the LRU of blocks), `loads` (blocks from the disk
or the network), `writers` (blocks onto the disk), `ends` (heads and tails), `readahead`
(work ahead of a reader). None of them imports this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypedDict, Unpack

import trio

from .blocks import BlockCache
from .changes import Changes
from .defaults import DEFAULT_REVALIDATE
from .ends import HEAD_BYTES, Ends
from .errors import NetworkError, VapifsError, VersionChanged
from .fetch import Fetcher
from .inflight import GAVE_UP, Inflight
from .loads import MAX_RUN_BLOCKS, Loads
from .memory import BlockMemory
from .meta import MetaStore
from .readahead import ReadAhead, Stream
from .readstats import ReaderStats
from .version import Version
from .versions import Versions
from .writers import DiskWriters

__all__ = ["HEAD_BYTES", "MAX_RUN_BLOCKS", "ArtifactStore", "ReaderStats", "Stream"]


class StoreOptions(TypedDict, total=False):
    """The store's tunables, as the constructor takes them (its defaults apply)."""

    revalidate_after: float
    read_timeout: float
    memory_bytes: int
    max_readahead_blocks: int
    wall_clock: Callable[[], float]
    changes: Changes | None


class ArtifactStore:
    """Everything needed to read any artifact of any call, block by block.

    Blocks come from memory, then the disk cache, then the network; one download per block
    however many readers want it; every block is tied to the artifact version it came from.
    Made by `create`, which also starts the tasks that store fetched blocks on disk.
    """

    def __init__(
        self,
        nursery: trio.Nursery,
        cache: BlockCache,
        meta: MetaStore,
        fetcher: Fetcher,
        *,
        revalidate_after: float = DEFAULT_REVALIDATE,
        read_timeout: float = 30.0,
        memory_bytes: int = 64 << 20,
        max_readahead_blocks: int = 48,
        wall_clock: Callable[[], float] = time.time,
        changes: Changes | None = None,
    ) -> None:
        self.cache = cache
        self.meta = meta
        self.fetcher = fetcher
        self.block_size = cache.block_size
        self.read_timeout = read_timeout
        self.stats = ReaderStats()
        self._memory = BlockMemory(memory_bytes)
        self._inflight = Inflight()
        self._writers = DiskWriters(cache, self.known_version)
        self._loads = Loads(
            nursery, cache, fetcher, self._memory, self._inflight, self._writers, self.stats
        )
        self._ends = Ends(fetcher, self.stats)
        self._versions = Versions(
            meta,
            self._loads,
            self._ends,
            revalidate_after=revalidate_after,
            read_timeout=read_timeout,
            wall_clock=wall_clock,
            changes=changes,
        )
        self._ahead = ReadAhead(nursery, self._loads, max_readahead_blocks)

    @classmethod
    async def create(
        cls,
        nursery: trio.Nursery,
        cache: BlockCache,
        meta: MetaStore,
        fetcher: Fetcher,
        **options: Unpack[StoreOptions],
    ) -> ArtifactStore:
        """A store whose background work (downloads, disk loads, disk writers) runs in
        `nursery`, the writers and the disk reads started before it returns; `options` as
        for the constructor."""
        store = cls(nursery, cache, meta, fetcher, **options)
        await store._writers.start(nursery)
        await store._loads.disk.start(nursery)
        return store

    # -- versions (see versions.py) ------------------------------------------------------

    @property
    def revalidate_after(self) -> float:
        return self._versions.revalidate_after

    def known_version(self, call_id: str, kind: str) -> Version | None:
        """The version in memory, without any I/O (for cheap attributes)."""
        return self._versions.known_version(call_id, kind)

    async def version(
        self, call_id: str, kind: str, *, light: bool = False, head: bool = False
    ) -> Version:
        """The artifact's current version, checked at most once per interval (`light`: at
        the cost of one byte; `head`: with its first HEAD_BYTES; else with block 0)."""
        return await self._versions.version(call_id, kind, light=light, head=head)

    def stored_versions(self, call_id: str, kinds: set[str]) -> dict[str, Any]:
        """The stored version documents of some artifacts (blocking: call it in a thread)."""
        return self._versions.stored_versions(call_id, kinds)

    def seed_versions(self, call_id: str, docs: dict[str, Any]) -> None:
        """Adopt versions loaded by `stored_versions` where nothing newer is known."""
        self._versions.seed_versions(call_id, docs)

    async def forget(self, call_id: str, kind: str, *, keep_version: bool = False) -> None:
        """Drop everything kept of an artifact (its version too, unless `keep_version`)."""
        await self._versions.forget(call_id, kind, keep_version=keep_version)

    async def drop_older_than(self, ts: float) -> list[tuple[str, str]]:
        """Drop every artifact whose bytes were first fetched before `ts` (wall clock)."""
        return await self._versions.drop_older_than(ts)

    # -- reads ---------------------------------------------------------------------------

    async def read(
        self, call_id: str, kind: str, offset: int, size: int, stream: Stream | None = None
    ) -> bytes:
        """Bytes [offset, offset+size) of the artifact, clipped at its end."""
        self.stats.reads += 1
        try:
            # One bound for the whole read, however many steps it takes (a version check,
            # then the blocks): the program waits --read-timeout at most.
            with trio.move_on_after(self.read_timeout):
                return await self._read_version(call_id, kind, offset, size, stream)
            exc = NetworkError(
                f"{call_id}/{kind}: bytes {offset}-{offset + size - 1} not fetched within "
                f"{self.read_timeout:g}s"
            )
            self.gave_up(call_id, kind, exc)
            raise exc
        except VapifsError:
            self.stats.errors += 1
            raise

    async def _read_version(
        self, call_id: str, kind: str, offset: int, size: int, stream: Stream | None
    ) -> bytes:
        for _ in range(3):
            try:
                version = await self.version(call_id, kind)
                data = await self._read(call_id, kind, version, offset, size, stream)
            except VersionChanged as exc:
                await self._versions.changed(call_id, kind, exc.new_version)
                continue
            except GAVE_UP as exc:
                self.gave_up(call_id, kind, exc)
                raise
            if stream is not None and data:
                token = version.token()
                if stream.version is None:
                    stream.version = token
                elif stream.version != token:
                    # Bytes of the old version already went to this reader: more bytes
                    # of the new one would splice two files into one. Reopening reads
                    # the new version whole.
                    raise NetworkError(
                        f"{call_id}/{kind} changed on the server while open; open it again"
                    )
            self.stats.bytes_read += len(data)
            return data
        raise NetworkError(f"{call_id}/{kind} keeps changing on the server")

    async def _read(
        self,
        call_id: str,
        kind: str,
        version: Version,
        offset: int,
        size: int,
        stream: Stream | None,
    ) -> bytes:
        if offset >= version.size or size <= 0:
            return b""
        end = min(offset + size, version.size)
        bs = self.block_size
        first, last = offset // bs, (end - 1) // bs
        head_first = stream is not None and stream.head_first and stream.next_offset < 0
        kept = self._from_ends(call_id, kind, version, offset, end, stream)
        if kept is not None:
            return kept
        sequential, jump = self._ahead.note_access(stream, offset, end)
        found, waits, missing = self._loads.collect(call_id, kind, version, first, last)
        if missing:
            self._inflight.check_gave_up(call_id, kind)
        self._inflight.check_stuck(call_id, kind, waits)
        if head_first and missing == [0] and end <= HEAD_BYTES < version.size:
            # What a walk reads of these files is their header: a head answers sooner
            # than a block, and costs a fraction of the bytes.
            head = await self.head(call_id, kind, version)
            return head[offset:end]
        if jump and not found and all(p.network and p.data is None for p in waits.values()):
            assert stream is not None
            return await self._seek(call_id, kind, version, offset, end, stream)
        waits.update(self._loads.start_fetches(call_id, kind, version, missing))
        if sequential and stream is not None:
            self._ahead.read_ahead(call_id, kind, version, end, stream)
        refetch = self._loads.refetcher(call_id, kind, version)
        blocks = await self._inflight.wait(
            call_id, kind, version, found, waits, first, last, refetch
        )
        if sequential:
            self._ahead.consumed(call_id, kind, version, first, end)
        return _join(blocks, offset - first * bs, end - last * bs)

    def _from_ends(
        self,
        call_id: str,
        kind: str,
        version: Version,
        offset: int,
        end: int,
        stream: Stream | None,
    ) -> bytes | None:
        """Bytes [offset, end), when a head or a tail in memory holds them all."""
        token = version.token()
        head = self._ends.get(call_id, kind, token, "head")
        if head is not None and end <= len(head):
            data = head[offset:end]
        else:
            ending = self._ends.get(call_id, kind, token, "tail")
            if ending is None or offset < version.size - len(ending):
                return None
            at = version.size - len(ending)
            data = ending[offset - at : end - at]
        self._ahead.note_access(stream, offset, end)
        self.stats.bytes_from_memory += end - offset
        return data

    async def _seek(
        self, call_id: str, kind: str, version: Version, offset: int, end: int, stream: Stream
    ) -> bytes:
        """A seek to a spot nothing has fetched yet: one request for exactly these bytes
        answers sooner than whole blocks (one round trip, little data)."""
        started = trio.current_time()
        data = await self.fetcher.fetch_bytes(call_id, kind, offset, end, version)
        self._ahead.seeked(call_id, kind, version, stream, trio.current_time() - started)
        self.stats.bytes_from_network += len(data)
        return data

    async def head(self, call_id: str, kind: str, version: Version) -> bytes:
        """The first HEAD_BYTES of `version`, fetched once however many want them."""
        return await self._ends.head(call_id, kind, version)

    async def tail(self, call_id: str, kind: str, version: Version, n: int) -> bytes:
        """The last `n` bytes of `version` (a probe that reads the end of files)."""
        return await self._ends.tail(call_id, kind, version, n)

    async def prefetch(self, call_id: str, kind: str, nbytes: int, tail: int = 0) -> None:
        """Bring the first `nbytes` (and the last `tail`) of the artifact into the caches, as
        a reader would find them: a head when that is all, else whole blocks."""
        version = await self.version(call_id, kind)
        if tail > 0 and nbytes + tail < version.size:
            await self.tail(call_id, kind, version, tail)
        nbytes = min(nbytes, version.size)
        if nbytes <= 0:
            return
        if nbytes <= HEAD_BYTES < version.size:
            token = version.token()
            if (call_id, kind, token, 0) not in self._memory and not self.cache.has(
                call_id, kind, version, 0
            ):
                await self.head(call_id, kind, version)
            return
        last = (nbytes - 1) // self.block_size
        found, waits, missing = self._loads.collect(call_id, kind, version, 0, last)
        waits.update(self._loads.start_fetches(call_id, kind, version, missing))
        refetch = self._loads.refetcher(call_id, kind, version)
        await self._inflight.wait(call_id, kind, version, found, waits, 0, last, refetch)

    def gave_up(self, call_id: str, kind: str, exc: VapifsError) -> None:
        """Remember that a read of this artifact gave up on the network, and why."""
        self._inflight.gave_up(call_id, kind, exc)

    async def flush(self) -> None:
        """Return once every block queued for the disk is stored (or skipped); see
        DiskWriters.flush."""
        await self._writers.flush()


def _join(blocks: list[bytes], start: int, stop: int) -> bytes:
    """Bytes from `start` in the first block to `stop` in the last, with one copy at most."""
    if len(blocks) == 1:
        block = blocks[0]
        if start == 0 and stop == len(block):
            return block
        return block[start:stop]
    # One copy: views of the blocks' parts, joined.
    parts: list[bytes | memoryview] = [memoryview(blocks[0])[start:], *blocks[1:-1]]
    parts.append(memoryview(blocks[-1])[:stop])
    return b"".join(parts)
