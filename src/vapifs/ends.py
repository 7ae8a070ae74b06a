"""Heads and tails of artifacts: their first or last bytes, fetched alone once, kept in memory."""

from __future__ import annotations

import trio
from cachetools import LRUCache

from .fetch import Fetcher
from .readstats import ReaderStats
from .version import Version

# A head: the first bytes of an artifact fetched alone, for programs that read only its
# header. Heads live in memory only: the disk cache holds whole blocks.
HEAD_BYTES = 64 << 10
HEADS_MEMORY = 16 << 20

EndKey = tuple[str, str, str, str]  # (call id, kind, version token, "head" or "tail")


class Ends:
    """The first or last bytes of artifact versions, one request each however many want them."""

    def __init__(self, fetcher: Fetcher, stats: ReaderStats) -> None:
        self._fetcher = fetcher
        self._stats = stats
        self._kept: LRUCache[EndKey, bytes] = LRUCache(maxsize=HEADS_MEMORY, getsizeof=len)
        self._inflight: dict[EndKey, trio.Event] = {}

    def get(self, call_id: str, kind: str, token: str, which: str) -> bytes | None:
        return self._kept.get((call_id, kind, token, which))

    def keep(self, call_id: str, kind: str, token: str, which: str, data: bytes) -> None:
        self._kept[(call_id, kind, token, which)] = data

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
            data = self._kept.get(key)
            if data is not None and len(data) >= stop - start:
                return data
            pending = self._inflight.get(key)
            if pending is None:
                break
            await pending.wait()
        pending = self._inflight[key] = trio.Event()
        try:
            data = await self._fetcher.fetch_bytes(call_id, kind, start, stop, version)
            self._stats.bytes_from_network += len(data)
            self._kept[key] = data
            return data
        finally:
            del self._inflight[key]
            pending.set()
