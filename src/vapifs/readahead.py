"""Work ahead of a reader: read-ahead while it streams, the whole file while it keeps seeking."""

from __future__ import annotations

from dataclasses import dataclass, field

import trio

from .inflight import Pending
from .loads import MAX_RUN_BLOCKS, Loads
from .version import Version

# A reader that keeps seeking (an editor, a player scrubbing) gets the whole file fetched in
# the background, several runs at once, so that later seeks are local; up to this size.
FILL_AFTER_JUMPS = 4
# ...but only where a seek costs a real round trip: on a fast link, fetching exactly what is
# read is quicker than competing with a background download.
FILL_MIN_SEEK_SECONDS = 0.01
FILL_MAX_BYTES = 512 << 20
FILL_PARALLEL = 4


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


class ReadAhead:
    """What a reader's pattern of reads earns it in the background."""

    def __init__(self, nursery: trio.Nursery, loads: Loads, max_blocks: int) -> None:
        self._nursery = nursery
        self._loads = loads
        self._max_blocks = max_blocks
        self.block_size = loads.block_size

    def note_access(self, stream: Stream | None, offset: int, end: int) -> tuple[bool, bool]:
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

    def read_ahead(
        self, call_id: str, kind: str, version: Version, end: int, stream: Stream
    ) -> None:
        """Grow a window of background fetches while a reader stays sequential.

        The window doubles with every sequential read up to its maximum, and is topped up
        only once a run's worth of it (half of it while it is small) has been consumed, so
        that read-ahead goes out as whole runs, several at once on a long link, rather than
        one small request per block.
        """
        bs = self.block_size
        stream.window = min(max(1, stream.window * 2), self._max_blocks)
        current = (end - 1) // bs
        # Topped up once `ahead_until - current` is down to this: the top-up then asks for
        # exactly a run (or half the window while it is small), never a run and one block
        # more, which goes out as a request of its own.
        low = max(stream.window // 2, stream.window - MAX_RUN_BLOCKS) + 1
        if stream.ahead_until - current > low:
            return
        token = version.token()
        last_block = (version.size - 1) // bs
        start = max(current + 1, stream.ahead_until)
        stop = min(current + 1 + stream.window, last_block + 1)
        if stop - start > MAX_RUN_BLOCKS and stop <= last_block:
            # Whole runs only (the window grew): the odd blocks go with the next top-up.
            stop -= (stop - start) % MAX_RUN_BLOCKS
        stream.ahead_until = max(stream.ahead_until, stop)
        wanted: list[int] = []
        on_disk: list[int] = []
        for index in range(start, stop):
            if self._loads.present(call_id, kind, token, index):
                continue
            if self._loads.cache.has(call_id, kind, version, index):
                on_disk.append(index)
            else:
                wanted.append(index)
        if wanted:
            self._loads.start_fetches(call_id, kind, version, wanted)
        self._loads.load_in_background(call_id, kind, version, on_disk)

    def consumed(self, call_id: str, kind: str, version: Version, first: int, end: int) -> None:
        """A sequential reader is past these blocks: they leave the memory cache.

        The kernel keeps what it was given (keep_cache), so they are not asked again soon,
        while read-ahead blocks not yet read are: an LRU would otherwise evict those first
        (they were stored before the blocks just read were touched), and read them back
        from the disk.
        """
        token = version.token()
        for index in range(first, end // self.block_size + (end == version.size)):
            self._loads.memory.discard((call_id, kind, token, index))

    def seeked(
        self, call_id: str, kind: str, version: Version, stream: Stream, took: float
    ) -> None:
        """A seek to a spot nothing had fetched was answered in `took` seconds: once a
        reader keeps seeking on a slow link, fetch the whole file in the background."""
        stream.seek_seconds = [*stream.seek_seconds, took][-FILL_AFTER_JUMPS:]
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
        loads = self._loads
        token = version.token()
        last_block = (version.size - 1) // self.block_size
        limiter = trio.CapacityLimiter(FILL_PARALLEL)

        async def run(first: int, count: int, pendings: dict[int, Pending], slot: object) -> None:
            try:
                await loads.fetch_run(call_id, kind, version, first, count, pendings)
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
                        present = loads.present(call_id, kind, token, index)
                        if present or loads.cache.has(call_id, kind, version, index):
                            if wanted:
                                break
                        else:
                            wanted.append(index)
                        index += 1
                    if not wanted:
                        limiter.release_on_behalf_of(slot)
                        continue
                    pendings = loads.inflight.register(call_id, kind, version, wanted)
                    nursery.start_soon(run, wanted[0], len(wanted), pendings, slot)
