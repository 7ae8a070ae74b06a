"""Blocks held in memory: an LRU bounded by bytes, keyed by artifact version and index."""

from __future__ import annotations

from cachetools import LRUCache

from .inflight import BlockKey


class BlockMemory:
    """The blocks a read may find without a trip to the disk or the network."""

    def __init__(self, max_bytes: int) -> None:
        self._lru: LRUCache[BlockKey, bytes] = LRUCache(maxsize=max_bytes, getsizeof=len)

    def __contains__(self, key: BlockKey) -> bool:
        return key in self._lru

    def get(self, key: BlockKey) -> bytes | None:
        return self._lru.get(key)

    def put(self, key: BlockKey, data: bytes) -> None:
        self._lru[key] = data

    def discard(self, key: BlockKey) -> None:
        self._lru.pop(key, None)

    def drop_artifact(self, call_id: str, kind: str) -> None:
        """Every block of the artifact, whatever its version."""
        for key in [k for k in self._lru if k[0] == call_id and k[1] == kind]:
            self._lru.pop(key, None)
