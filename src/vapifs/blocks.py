"""The block store: fixed-size blocks of artifacts on disk, self-checking, bounded by an LRU.

One sparse file per artifact version holds its blocks at their places (see docs/cache.md):
a header naming the call, artifact and version, a table of one record per block (length,
crc32, last access), then the blocks. A sequential fill writes into one file instead of
creating a file per block, and a remount read of a whole artifact opens one file.

This is the store's face; its rooms, each below it: the file format (blockfile), the open
descriptors (openfiles), the index with its LRU and cap (blockindex), reading the files back
at start (blockscan), reads and verify (blockread), writes (blockwrite) and drops (blockdrop).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .blockdrop import BlockDropper
from .blockfile import MAGIC, STORE, Format, artifact_hash
from .blockindex import BlockIndex, CacheStats
from .blockread import BlockReader, VerifyReport
from .blockscan import drop_old_layout, load_all
from .blockwrite import BlockWriter
from .cachefiles import DIR_MODE, ensure_dir, remove_orphans
from .crypto import Cipher
from .heap import keep_freed_blocks
from .openfiles import OpenFiles
from .version import Version

__all__ = ["DEFAULT_BLOCK_SIZE", "MAGIC", "BlockCache", "CacheStats", "VerifyReport"]

log = logging.getLogger("vapifs.cache")

DEFAULT_BLOCK_SIZE = 1 << 20


class BlockCache:
    """Fixed-size blocks of artifacts on disk, each checked on load, bounded by an LRU.

    Crash safety: a file is made whole in root/tmp and linked into place; a block is written
    into its slot first and its record (length, crc32) only after, so a crash at any point
    leaves either no record (the block is simply absent) or, after a power loss without
    fsync, a record whose crc32 the slot's bytes fail: such a block is dropped on get,
    never served.

    With a cipher, the header and every block are sealed, bound to their place (artifact,
    version and block number); one that does not authenticate is dropped like any damaged
    block. Sealing and opening happen in get and put, in the worker threads that do the I/O.
    """

    def __init__(
        self,
        root: Path,
        max_bytes: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        fsync: bool = False,
        cipher: Cipher | None = None,
    ) -> None:
        if block_size <= 0:
            raise ValueError("block_size must be positive")
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.root = Path(root)
        self.block_size = block_size
        self.cipher = cipher
        self._store = self.root / STORE
        self._tmp_dir = self.root / "tmp"
        self._format = Format(block_size, cipher)
        lock = threading.Lock()
        self._index = BlockIndex(lock, OpenFiles(lock), max_bytes)
        self._reader = BlockReader(self._index, self._format)
        self._writer = BlockWriter(self._index, self._format, self.root, fsync)
        self._dropper = BlockDropper(self._index, self._format, self._store)

    @property
    def max_bytes(self) -> int:
        return self._index.max_bytes

    @property
    def fsync(self) -> bool:
        return self._writer.fsync

    @property
    def hits(self) -> int:
        return self._reader.hits

    @property
    def misses(self) -> int:
        return self._reader.misses

    def open(self) -> None:
        """Create the directories, drop crash leftovers, rebuild the index from disk."""
        keep_freed_blocks()
        ensure_dir(self.root)  # a root made here is 0700; an existing one is the user's
        for d in (self._store, self._tmp_dir):
            ensure_dir(d)
            os.chmod(d, DIR_MODE)
        drop_old_layout(self.root)
        remove_orphans(self._tmp_dir)
        found = load_all(self._format, self._store)
        with self._index.lock:
            self._index.rebuild_locked(found)
            dropped = self._index.make_room_locked(0)
        if dropped:
            log.info("cache: evicted %d blocks to fit %d bytes", dropped, self.max_bytes)

    # -- blocks -----------------------------------------------------------------------------

    def block_length(self, version: Version, index: int) -> int:
        return self._format.block_length(version, index)

    @property
    def bytes_used(self) -> int:
        """Bytes of the blocks and files in the index (puts still writing not included)."""
        with self._index.lock:
            return self._index.bytes

    def has(self, call_id: str, kind: str, version: Version, index: int) -> bool:
        return self._index.has((artifact_hash(call_id, kind), version.token(), index))

    def get(self, call_id: str, kind: str, version: Version, index: int) -> bytes | None:
        return self._reader.get_many(call_id, kind, version, [index])[0]

    def get_many(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[bytes | None]:
        """Blocks of one artifact version, read through one open file; None where absent."""
        return self._reader.get_many(call_id, kind, version, indexes)

    def get_cached(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> tuple[dict[int, bytes], list[int]]:
        """Blocks read at once where the kernel holds their bytes in memory, and the blocks
        on disk left for a thread to read; see BlockReader.get_cached."""
        return self._reader.get_cached(call_id, kind, version, indexes)

    def not_in_memory(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[int]:
        """Blocks the kernel may not hold in memory, worth reading ahead from the disk."""
        return self._reader.not_in_memory(call_id, kind, version, indexes)

    def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool:
        """Store one block (False when it does not fit, or the disk refuses it)."""
        return self._writer.put(call_id, kind, version, index, data)

    # -- whole artifacts and the whole cache -------------------------------------------------

    def drop_other_versions(self, call_id: str, kind: str, keep: Version) -> int:
        return self._dropper.drop_other_versions(call_id, kind, keep)

    def drop_artifact(self, call_id: str, kind: str) -> int:
        return self._dropper.drop_artifact(call_id, kind)

    def drop_older_than(self, ts: float) -> int:
        """Delete every block not written or read since `ts` (wall clock): it is older."""
        return self._dropper.drop_older_than(ts)

    def clear(self) -> int:
        """Delete every block. Another process using the same root sees plain misses."""
        return self._dropper.clear()

    def verify(self) -> VerifyReport:
        """Read every block on disk and drop those that are not whole and in their place."""
        return self._reader.verify(self._store)

    def stats(self) -> CacheStats:
        return self._index.stats()
