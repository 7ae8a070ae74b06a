"""Reads of artifacts: block splitting, single flight, the memory and disk caches, read-ahead."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio
from cachetools import LRUCache

from .blocks import BlockCache
from .defaults import DEFAULT_REVALIDATE
from .errors import (
    KeyRejected,
    NetworkError,
    NotFound,
    ProtocolError,
    VapifsError,
    VersionChanged,
)
from .fetch import Fetcher
from .meta import MetaStore
from .version import Version

log = logging.getLogger("vapifs.reader")

BlockKey = tuple[str, str, str, int]  # (call id, kind, version token, block index)

# A run of blocks fetched by one ranged request: long enough to amortise a round trip,
# short enough that a reader waiting on the first block does not wait long.
MAX_RUN_BLOCKS = 8
# A reader that keeps seeking (an editor, a player scrubbing) gets the whole file fetched in
# the background, several runs at once, so that later seeks are local; up to this size.
FILL_AFTER_JUMPS = 4
# ...but only where a seek costs a real round trip: on a fast link, fetching exactly what is
# read is quicker than competing with a background download.
FILL_MIN_SEEK_SECONDS = 0.01
FILL_MAX_BYTES = 512 << 20
FILL_PARALLEL = 4
# Blocks read from the disk per trip to a worker thread, and such trips at once.
DISK_BATCH = 2
DISK_PARALLEL = 2
WRITERS = 2  # tasks storing fetched blocks on disk
# After a read of an artifact gave up on the network, reads that need the network fail at
# once for this long: the kernel retries a failed read (read-ahead, then the page itself)
# at once, which would double the time a program waits and the lines in the log. Past it, a
# read that would only wait on a download started before the give-up (the same attempt,
# still stuck) fails at once too; one that needs a new attempt gets one.
GAVE_UP_MEMO = 2.0
_GAVE_UP = (NetworkError, ProtocolError, KeyRejected)
# A head: the first bytes of an artifact fetched alone, for programs that read only its
# header. Heads live in memory only: the disk cache holds whole blocks.
HEAD_BYTES = 64 << 10
HEADS_MEMORY = 16 << 20


@dataclass
class Stream:
    """Per open file: where the last read ended and how far ahead to fetch."""

    next_offset: int = -1
    window: int = 0  # blocks of read-ahead
    ahead_until: int = 0  # read-ahead has been started for blocks below this index
    version: str | None = None  # token of the version this open file has served bytes of
    jumps: int = 0  # seeks to spots nothing had fetched
    # How long the latest such seeks took to answer: the quickest of them tells the link's
    # round trip (the first one also paid for a connection, or for resolving a URL).
    seek_seconds: list[float] = field(default_factory=list)
    fill: trio.CancelScope | None = None  # the background download of the whole file
    # The first read is likely a header probe (a walk says so): fetch a head, not a block.
    head_first: bool = False

    def close(self) -> None:
        """The file was closed: stop work done for this reader alone."""
        if self.fill is not None:
            self.fill.cancel()


class _Abandoned(NetworkError):
    """A download stopped because its reader went away; whoever still waits fetches again."""


@dataclass
class _Pending:
    event: trio.Event = field(default_factory=trio.Event)
    data: bytes | None = None
    error: BaseException | None = None
    started: float = field(default_factory=trio.current_time)
    network: bool = True  # a download, not a disk read


@dataclass
class _Artifact:
    version: Version | None = None
    checked_at: float = 0.0
    stored_at: float = 0.0  # when this version was first fetched (the age of its bytes)
    lock: trio.Lock = field(default_factory=trio.Lock)


@dataclass
class ReaderStats:
    reads: int = 0
    bytes_read: int = 0
    blocks_from_memory: int = 0
    blocks_from_disk: int = 0
    blocks_from_network: int = 0
    bytes_from_memory: int = 0
    bytes_from_disk: int = 0
    bytes_from_network: int = 0
    errors: int = 0


class ArtifactStore:
    """Everything needed to read any artifact of any call, block by block.

    Blocks come from memory, then the disk cache, then the network; one download per block
    however many readers want it; every block is tied to the artifact version it came from.
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
    ) -> None:
        self._nursery = nursery
        self.cache = cache
        self.meta = meta
        self.fetcher = fetcher
        self.block_size = cache.block_size
        self.revalidate_after = revalidate_after
        self.read_timeout = read_timeout
        self._max_readahead = max_readahead_blocks
        self._now = wall_clock
        self._memory: LRUCache[BlockKey, bytes] = LRUCache(maxsize=memory_bytes, getsizeof=len)
        self._inflight: dict[BlockKey, _Pending] = {}
        # (call id, kind, version token, "head" or "tail") -> the first or last bytes.
        self._ends: LRUCache[tuple[str, str, str, str], bytes] = LRUCache(
            maxsize=HEADS_MEMORY, getsizeof=len
        )
        self._ends_inflight: dict[tuple[str, str, str, str], trio.Event] = {}
        self._disk_limiter = trio.CapacityLimiter(DISK_PARALLEL)
        self._gave_up: dict[tuple[str, str], tuple[float, VapifsError]] = {}
        self._artifacts: dict[tuple[str, str], _Artifact] = {}
        self._writes_send, self._writes_recv = trio.open_memory_channel[
            tuple[str, str, Version, int, bytes]
        ](32)
        self.stats = ReaderStats()
        self.on_version_change: Callable[[str, str], None] | None = None
        # An artifact known before answered 404 (past the org's retention): it was dropped.
        self.on_gone: Callable[[str, str], None] | None = None
        for _ in range(WRITERS):
            nursery.start_soon(self._writer)

    # -- versions ------------------------------------------------------------------------

    def known_version(self, call_id: str, kind: str) -> Version | None:
        """The version in memory, without any I/O (for cheap attributes)."""
        state = self._artifacts.get((call_id, kind))
        return state.version if state else None

    async def version(
        self, call_id: str, kind: str, *, light: bool = False, head: bool = False
    ) -> Version:
        """The artifact's current version (size, ETag), checked at most once per interval.

        Discovery fetches block 0 as well, so a player's first read is already cached, unless
        `light` (a directory listing, which wants sizes of many files and reads few): then
        one byte, or `head` (a walk that reads headers): its first HEAD_BYTES. When the
        network is down, a version seen before is used as it is.
        """
        state = self._artifacts.setdefault((call_id, kind), _Artifact())
        if state.version is not None and self._fresh(state):
            return state.version
        async with state.lock:
            if state.version is None:
                doc = await trio.to_thread.run_sync(self.meta.get, "artifact", f"{call_id}/{kind}")
                if doc is not None:
                    self._take_doc(state, doc)
            if state.version is not None and self._fresh(state):
                return state.version
            if state.version is None:
                self._check_gave_up(call_id, kind)
            try:
                await self._discover(call_id, kind, state, light, head)
            except NotFound:
                if state.version is not None:
                    # It was there and is no more: past retention. Nothing of it stays here.
                    log.warning("%s/%s is gone from the server; dropping it", call_id, kind)
                    await self.forget(call_id, kind)
                    if self.on_gone is not None:
                        self.on_gone(call_id, kind)
                raise
            except NetworkError as exc:
                if state.version is None:
                    raise
                log.warning(
                    "%s/%s: cannot check for a newer version (%s); serving the cached one",
                    call_id,
                    kind,
                    exc,
                )
            assert state.version is not None
            return state.version

    def stored_versions(self, call_id: str, kinds: set[str]) -> dict[str, Any]:
        """The stored version documents of some artifacts (blocking: call it in a thread)."""
        docs = {}
        for kind in kinds:
            doc = self.meta.get("artifact", f"{call_id}/{kind}")
            if doc is not None:
                docs[kind] = doc
        return docs

    def seed_versions(self, call_id: str, docs: dict[str, Any]) -> None:
        """Adopt versions loaded by `stored_versions` where nothing newer is known."""
        for kind, doc in docs.items():
            state = self._artifacts.setdefault((call_id, kind), _Artifact())
            if state.version is None:
                self._take_doc(state, doc)

    @staticmethod
    def _take_doc(state: _Artifact, doc: Any) -> None:
        try:
            state.version = Version.from_json(doc["version"])
            state.checked_at = float(doc["checked_at"])
            state.stored_at = float(doc.get("stored_at", state.checked_at))
        except (KeyError, TypeError, ValueError, AttributeError):
            state.version = None

    async def forget(self, call_id: str, kind: str, *, keep_version: bool = False) -> None:
        """Drop everything kept of an artifact: its blocks (memory and disk) and its stored
        version; the version in memory too, unless `keep_version` (the file is still shown,
        with its size, and fetched again when read)."""
        state = self._artifacts.get((call_id, kind))
        if not keep_version:
            self._artifacts.pop((call_id, kind), None)
        elif state is not None:
            state.stored_at = self._now()  # what is fetched from now on is new
        self._gave_up.pop((call_id, kind), None)
        for key in [k for k in self._memory if k[0] == call_id and k[1] == kind]:
            self._memory.pop(key, None)

        def drop() -> None:
            self.cache.drop_artifact(call_id, kind)
            self.meta.delete("artifact", f"{call_id}/{kind}")

        await trio.to_thread.run_sync(drop)

    async def drop_older_than(self, ts: float) -> list[tuple[str, str]]:
        """Drop every artifact whose bytes were first fetched before `ts` (wall clock), and
        any block file untouched since; returns the artifacts dropped."""

        def old_docs() -> list[tuple[str, str]]:
            found = []
            for key, doc in self.meta.items("artifact"):
                call_id, _, kind = key.partition("/")
                state = _Artifact()
                self._take_doc(state, doc)
                if state.version is None or state.stored_at < ts:
                    found.append((call_id, kind))
            return found

        doomed = set(await trio.to_thread.run_sync(old_docs))
        doomed.update(
            key for key, state in self._artifacts.items() if state.version and state.stored_at < ts
        )
        for call_id, kind in sorted(doomed):
            await self.forget(call_id, kind, keep_version=True)
            if self.on_version_change is not None:
                self.on_version_change(call_id, kind)  # pages the kernel keeps go too
        await trio.to_thread.run_sync(self.cache.drop_older_than, ts)
        return sorted(doomed)

    def _fresh(self, state: _Artifact) -> bool:
        return 0 <= self._now() - state.checked_at < self.revalidate_after

    async def _discover(
        self, call_id: str, kind: str, state: _Artifact, light: bool, head: bool = False
    ) -> None:
        got: list[bytes] = []
        start = b""

        async def keep(index: int, data: bytes) -> None:
            got.append(data)

        with trio.move_on_after(self.read_timeout) as scope:
            if light:
                new = await self.fetcher.probe(call_id, kind)
            elif head:
                new, start = await self.fetcher.fetch_start(call_id, kind, HEAD_BYTES)
            else:
                new = await self.fetcher.fetch(call_id, kind, 0, 1, None, keep)
        if scope.cancelled_caught:
            raise NetworkError(f"{call_id}/{kind}: no answer within {self.read_timeout:g}s")
        await self._adopt(call_id, kind, state, new)
        self.stats.bytes_from_network += len(start)
        if start and len(start) == min(new.size, self.block_size):
            got.append(start)  # the whole first block: the file is that small
        elif start:
            self._ends[(call_id, kind, new.token(), "head")] = start
        if got:
            self._deliver(call_id, kind, new, 0, got[0])
            await self._writes_send.send((call_id, kind, new, 0, got[0]))

    async def _adopt(self, call_id: str, kind: str, state: _Artifact, new: Version) -> None:
        """Make `new` the artifact's version; drop every block of any other version."""
        old = state.version
        state.version = new
        state.checked_at = self._now()
        if old != new or not state.stored_at:
            state.stored_at = state.checked_at
        if old is not None and old != new:
            log.warning("%s/%s changed on the server; dropping its cached blocks", call_id, kind)
            for key in [k for k in self._memory if k[0] == call_id and k[1] == kind]:
                self._memory.pop(key, None)
            if self.on_version_change is not None:
                self.on_version_change(call_id, kind)
        doc = {
            "version": new.to_json(),
            "checked_at": state.checked_at,
            "stored_at": state.stored_at,
        }

        def store() -> None:  # one trip to a worker thread for both
            self.cache.drop_other_versions(call_id, kind, new)
            self.meta.put("artifact", f"{call_id}/{kind}", doc)

        await trio.to_thread.run_sync(store)

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
                state = self._artifacts.setdefault((call_id, kind), _Artifact())
                async with state.lock:
                    await self._adopt(call_id, kind, state, exc.new_version)
                continue
            except _GAVE_UP as exc:
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
        token = version.token()
        head = self._ends.get((call_id, kind, token, "head"))
        if head is not None and end <= len(head):
            self._note_access(stream, offset, end)
            self.stats.bytes_from_memory += end - offset
            return head[offset:end]
        ending = self._ends.get((call_id, kind, token, "tail"))
        if ending is not None and offset >= version.size - len(ending):
            self._note_access(stream, offset, end)
            self.stats.bytes_from_memory += end - offset
            at = version.size - len(ending)
            return ending[offset - at : end - at]
        sequential, jump = self._note_access(stream, offset, end)
        found, waits, missing = await self._collect(call_id, kind, version, first, last)
        if missing:
            self._check_gave_up(call_id, kind)
        self._check_stuck(call_id, kind, waits)
        if head_first and missing == [0] and end <= HEAD_BYTES < version.size:
            # What a walk reads of these files is their header: a head answers sooner
            # than a block, and costs a fraction of the bytes.
            head = await self.head(call_id, kind, version)
            return head[offset:end]
        if jump and not found and not any(p.data for p in waits.values()):
            # A seek to a spot nothing has fetched yet: one request for exactly these
            # bytes answers sooner than whole blocks (one round trip, little data).
            assert stream is not None
            started = trio.current_time()
            data = await self.fetcher.fetch_bytes(call_id, kind, offset, end, version)
            took = trio.current_time() - started
            stream.seek_seconds = [*stream.seek_seconds, took][-FILL_AFTER_JUMPS:]
            self._maybe_fill(call_id, kind, version, stream)
            self.stats.bytes_from_network += len(data)
            return data
        waits.update(self._start_fetches(call_id, kind, version, missing))
        if sequential and stream is not None:
            self._read_ahead(call_id, kind, version, end, stream)
        blocks = await self._wait(call_id, kind, version, found, waits, first, last)
        if sequential:
            self._consumed(call_id, kind, version, first, end)
        start = offset - first * bs
        if first == last:
            block = blocks[0]
            if start == 0 and end - offset == len(block):
                return block
            return block[start : start + (end - offset)]
        # One copy: views of the blocks' parts, joined.
        tail = end - last * bs
        parts: list[bytes | memoryview] = [memoryview(blocks[0])[start:], *blocks[1:-1]]
        parts.append(memoryview(blocks[-1])[:tail])
        return b"".join(parts)

    async def head(self, call_id: str, kind: str, version: Version) -> bytes:
        """The first HEAD_BYTES of `version`, fetched once however many want them."""
        return await self._end(call_id, kind, version, "head", 0, min(HEAD_BYTES, version.size))

    async def tail(self, call_id: str, kind: str, version: Version, n: int) -> bytes:
        """The last `n` bytes of `version` (a probe that reads the end of files)."""
        n = min(n, version.size)
        return await self._end(call_id, kind, version, "tail", version.size - n, version.size)

    async def _end(
        self, call_id: str, kind: str, version: Version, which: str, start: int, stop: int
    ) -> bytes:
        key = (call_id, kind, version.token(), which)
        while True:
            data = self._ends.get(key)
            if data is not None and len(data) >= stop - start:
                return data
            pending = self._ends_inflight.get(key)
            if pending is None:
                break
            await pending.wait()
        pending = self._ends_inflight[key] = trio.Event()
        try:
            data = await self.fetcher.fetch_bytes(call_id, kind, start, stop, version)
            self.stats.bytes_from_network += len(data)
            self._ends[key] = data
            return data
        finally:
            del self._ends_inflight[key]
            pending.set()

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
        found, waits, missing = await self._collect(call_id, kind, version, 0, last)
        waits.update(self._start_fetches(call_id, kind, version, missing))
        await self._wait(call_id, kind, version, found, waits, 0, last)

    def _consumed(self, call_id: str, kind: str, version: Version, first: int, end: int) -> None:
        """A sequential reader is past these blocks: they leave the memory cache.

        The kernel keeps what it was given (keep_cache), so they are not asked again soon,
        while read-ahead blocks not yet read are: an LRU would otherwise evict those first
        (they were stored before the blocks just read were touched), and read them back
        from the disk.
        """
        token = version.token()
        for index in range(first, end // self.block_size + (end == version.size)):
            self._memory.pop((call_id, kind, token, index), None)

    def gave_up(self, call_id: str, kind: str, exc: VapifsError) -> None:
        """Remember that a read of this artifact gave up on the network, and why."""
        if isinstance(exc, _Abandoned):
            return
        now = trio.current_time()
        seen = self._gave_up.get((call_id, kind))
        if seen is None or now - seen[0] >= GAVE_UP_MEMO:  # a replay does not extend it
            self._gave_up[(call_id, kind)] = (now, exc)
        if len(self._gave_up) > 256:
            busy = {key[:2] for key in self._inflight}  # stuck downloads stay remembered
            for k in [k for k, (t, _) in self._gave_up.items() if now - t >= GAVE_UP_MEMO]:
                if k not in busy:
                    del self._gave_up[k]

    def _check_gave_up(self, call_id: str, kind: str) -> None:
        """Fail at once, as the last try did, if the network gave up on this artifact just now."""
        seen = self._gave_up.get((call_id, kind))
        if seen is not None and trio.current_time() - seen[0] < GAVE_UP_MEMO:
            raise type(seen[1])(str(seen[1]))

    def _check_stuck(self, call_id: str, kind: str, waits: dict[int, _Pending]) -> None:
        """Fail at once when this read would wait on a download that a read already gave up
        on: nothing has changed since, and waiting for it again would double the wait."""
        seen = self._gave_up.get((call_id, kind))
        if seen is None:
            return
        if any(p.network and not p.event.is_set() and p.started <= seen[0] for p in waits.values()):
            raise type(seen[1])(str(seen[1]))

    def _note_access(self, stream: Stream | None, offset: int, end: int) -> tuple[bool, bool]:
        """Is this read sequential (grow read-ahead), or a jump within an open file?"""
        if stream is None:
            return False, False
        near = stream.next_offset >= 0 and abs(offset - stream.next_offset) <= 2 * self.block_size
        jump = stream.next_offset >= 0 and not near
        if jump:
            stream.jumps += 1
        if near:
            stream.next_offset = max(stream.next_offset, end)
        else:
            stream.next_offset = end
            stream.window = 0
            stream.ahead_until = 0
        return near, jump

    async def _collect(
        self, call_id: str, kind: str, version: Version, first: int, last: int
    ) -> tuple[dict[int, bytes], dict[int, _Pending], list[int]]:
        """Blocks found in memory or on disk, blocks in flight, and blocks nobody has."""
        token = version.token()
        found: dict[int, bytes] = {}
        waits: dict[int, _Pending] = {}
        unknown: list[int] = []
        for index in range(first, last + 1):
            key = (call_id, kind, token, index)
            data = self._memory.get(key)
            if data is not None:
                self.stats.blocks_from_memory += 1
                self.stats.bytes_from_memory += len(data)
                found[index] = data
            elif key in self._inflight:
                waits[index] = self._inflight[key]
            else:
                unknown.append(index)
        missing = [i for i in unknown if not self.cache.has(call_id, kind, version, i)]
        # In flight from now on, so that concurrent readers wait for this one disk read
        # (and a damaged block is reported and fetched once).
        on_disk = self._register(
            call_id, kind, version, [i for i in unknown if i not in missing], network=False
        )
        if on_disk:
            waits.update(on_disk)
            await self._load_from_disk(call_id, kind, version, on_disk)
        return found, waits, missing

    async def _wait(
        self,
        call_id: str,
        kind: str,
        version: Version,
        found: dict[int, bytes],
        waits: dict[int, _Pending],
        first: int,
        last: int,
    ) -> list[bytes]:
        for index, pending in waits.items():
            await pending.event.wait()
            while isinstance(pending.error, _Abandoned):
                # Its reader closed the file; this one still wants the block.
                key = (call_id, kind, version.token(), index)
                pending = (
                    self._inflight.get(key)
                    or self._start_fetches(call_id, kind, version, [index])[index]
                )
                await pending.event.wait()
            if pending.error is not None:
                raise pending.error
            assert pending.data is not None
            found[index] = pending.data
        return [found[i] for i in range(first, last + 1)]

    def _register(
        self, call_id: str, kind: str, version: Version, indexes: list[int], network: bool = True
    ) -> dict[int, _Pending]:
        """Mark blocks as in flight: from now on, other readers wait for them."""
        token = version.token()
        pendings: dict[int, _Pending] = {}
        for index in indexes:
            pending = _Pending(network=network)
            self._inflight[(call_id, kind, token, index)] = pending
            pendings[index] = pending
        return pendings

    def _spawn_runs(
        self, call_id: str, kind: str, version: Version, pendings: dict[int, _Pending]
    ) -> None:
        """Download registered blocks, adjacent ones coalesced into one request per run."""
        run: list[int] = []
        for index in [*sorted(pendings), -2]:
            if run and (index != run[-1] + 1 or len(run) >= MAX_RUN_BLOCKS):
                run_pendings = {i: pendings[i] for i in run}
                self._nursery.start_soon(
                    self._fetch_run, call_id, kind, version, run[0], len(run), run_pendings
                )
                run = []
            if index >= 0:
                run.append(index)

    def _start_fetches(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> dict[int, _Pending]:
        """Start downloads of `indexes`, coalescing adjacent ones; returns their pendings."""
        pendings = self._register(call_id, kind, version, indexes)
        self._spawn_runs(call_id, kind, version, pendings)
        return pendings

    async def _fetch_run(
        self,
        call_id: str,
        kind: str,
        version: Version,
        first: int,
        count: int,
        pendings: dict[int, _Pending],
    ) -> None:
        token = version.token()

        async def sink(index: int, data: bytes) -> None:
            self.stats.blocks_from_network += 1
            self.stats.bytes_from_network += len(data)
            self._deliver(call_id, kind, version, index, data)
            pending = pendings.pop(index, None)
            if pending is not None:
                self._inflight.pop((call_id, kind, token, index), None)
                pending.data = data
                pending.event.set()
            await self._writes_send.send((call_id, kind, version, index, data))

        error: BaseException | None = None
        try:
            await self.fetcher.fetch(call_id, kind, first, count, version, sink)
        except trio.Cancelled:
            error = _Abandoned(f"{call_id}/{kind}: download abandoned")
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
                self._inflight.pop((call_id, kind, token, index), None)
                pending.error = error
                pending.event.set()

    def _deliver(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> None:
        self._memory[(call_id, kind, version.token(), index)] = data

    async def flush(self) -> None:
        """Return once every block queued for the disk is stored (or skipped).

        For a short-lived user (prefetch) that wants its fetched blocks on disk before it
        cancels the nursery; blocks of fetches still running may be queued after it returns.
        """
        while True:
            s = self._writes_send.statistics()
            idle = s.tasks_waiting_receive == WRITERS  # no writer is storing a block
            if idle and not s.current_buffer_used and not s.tasks_waiting_send:
                return
            await trio.sleep(0.01)

    async def _writer(self) -> None:
        async for call_id, kind, version, index, data in self._writes_recv:
            state = self._artifacts.get((call_id, kind))
            if state is not None and state.version is not None and state.version != version:
                continue  # superseded while queued: never store an old version's block
            try:
                await trio.to_thread.run_sync(self.cache.put, call_id, kind, version, index, data)
            except Exception:  # a bug here must not stop every later block being stored
                log.exception("%s/%s: cannot store block %d", call_id, kind, index)

    # -- read-ahead ----------------------------------------------------------------------

    def _maybe_fill(self, call_id: str, kind: str, version: Version, stream: Stream) -> None:
        if (
            stream.fill is None
            and stream.jumps >= FILL_AFTER_JUMPS
            and min(stream.seek_seconds, default=0.0) >= FILL_MIN_SEEK_SECONDS
            and version.size <= FILL_MAX_BYTES
        ):
            stream.fill = trio.CancelScope()
            self._nursery.start_soon(self._fill, call_id, kind, version, stream.fill)

    async def _fill(
        self, call_id: str, kind: str, version: Version, scope: trio.CancelScope
    ) -> None:
        """Fetch every block nobody has yet, a few runs at a time, until done or cancelled."""
        token = version.token()
        last_block = (version.size - 1) // self.block_size
        limiter = trio.CapacityLimiter(FILL_PARALLEL)

        async def run(first: int, count: int, pendings: dict[int, _Pending], slot: object) -> None:
            try:
                await self._fetch_run(call_id, kind, version, first, count, pendings)
            finally:
                limiter.release_on_behalf_of(slot)

        with scope:
            async with trio.open_nursery() as nursery:
                index = 0
                while index <= last_block:
                    # A free slot first, then the choice of blocks: readers never wait on
                    # blocks the fill has claimed but not started.
                    slot = object()
                    await limiter.acquire_on_behalf_of(slot)
                    wanted: list[int] = []
                    while index <= last_block and len(wanted) < MAX_RUN_BLOCKS:
                        key = (call_id, kind, token, index)
                        present = key in self._memory or key in self._inflight
                        if present or self.cache.has(call_id, kind, version, index):
                            if wanted:
                                break
                        else:
                            wanted.append(index)
                        index += 1
                    if not wanted:
                        limiter.release_on_behalf_of(slot)
                        continue
                    pendings = self._register(call_id, kind, version, wanted)
                    nursery.start_soon(run, wanted[0], len(wanted), pendings, slot)

    def _read_ahead(
        self, call_id: str, kind: str, version: Version, end: int, stream: Stream
    ) -> None:
        """Grow a window of background fetches while a reader stays sequential.

        The window doubles with every sequential read up to its maximum, and is topped up
        only once a run's worth of it (half of it while it is small) has been consumed, so
        that read-ahead goes out as whole runs, several at once on a long link, rather than
        one small request per block.
        """
        bs = self.block_size
        stream.window = min(max(1, stream.window * 2), self._max_readahead)
        current = (end - 1) // bs
        if stream.ahead_until - current > max(stream.window // 2, stream.window - MAX_RUN_BLOCKS):
            return
        token = version.token()
        last_block = (version.size - 1) // bs
        start = max(current + 1, stream.ahead_until)
        stop = min(current + 1 + stream.window, last_block + 1)
        stream.ahead_until = max(stream.ahead_until, stop)
        wanted: list[int] = []
        on_disk: list[int] = []
        for index in range(start, stop):
            key = (call_id, kind, token, index)
            if key in self._memory or key in self._inflight:
                continue
            if self.cache.has(call_id, kind, version, index):
                on_disk.append(index)
            else:
                wanted.append(index)
        if wanted:
            self._start_fetches(call_id, kind, version, wanted)
        for at in range(0, len(on_disk), DISK_BATCH):
            pendings = self._register(
                call_id, kind, version, on_disk[at : at + DISK_BATCH], network=False
            )
            self._nursery.start_soon(self._load_from_disk, call_id, kind, version, pendings)

    async def _load_from_disk(
        self, call_id: str, kind: str, version: Version, pendings: dict[int, _Pending]
    ) -> None:
        """Bring blocks from the disk cache into memory, a few per trip to a worker thread.

        Small batches hand the first blocks to a waiting reader early; two loaders at a
        time keep both cores busy.
        """
        token = version.token()
        indexes = sorted(pendings)
        missing: dict[int, _Pending] = {}
        for at in range(0, len(indexes), DISK_BATCH):
            batch = indexes[at : at + DISK_BATCH]
            try:
                async with self._disk_limiter:
                    datas = await trio.to_thread.run_sync(
                        self.cache.get_many, call_id, kind, version, batch
                    )
            except BaseException:
                for index in indexes[at:]:
                    self._inflight.pop((call_id, kind, token, index), None)
                    pending = pendings[index]
                    pending.error = NetworkError(f"{call_id}/{kind}: disk read interrupted")
                    pending.event.set()
                raise
            for index, data in zip(batch, datas, strict=True):
                pending = pendings[index]
                if data is None:
                    pending.network, pending.started = True, trio.current_time()
                    missing[index] = pending
                    continue
                self.stats.blocks_from_disk += 1
                self.stats.bytes_from_disk += len(data)
                self._deliver(call_id, kind, version, index, data)
                self._inflight.pop((call_id, kind, token, index), None)
                pending.data = data
                pending.event.set()
        # Blocks that vanished from the disk (evicted, damaged) come from the network instead.
        self._spawn_runs(call_id, kind, version, missing)
