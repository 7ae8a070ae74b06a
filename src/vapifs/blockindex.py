"""The index of stored blocks: the files known, the LRU order, the hard cap and eviction.

Every block counts in the cap by its whole 4 KiB pages, every file by its header region
plus a page; puts still writing have their bytes reserved first, so that concurrent puts
cannot overshoot it. The least recently used block goes first, unless a put is writing it.
All of it is under one lock, shared with the open-file table.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

from .blockfile import RECORD, BlockFile, Entry, FileKey, Key, Loaded, punch, pwrite_all
from .openfiles import FileGone, OpenFiles

log = logging.getLogger("vapifs.cache")


@dataclass
class CacheStats:
    bytes: int
    blocks: int
    artifacts: int
    oldest_access: float | None
    newest_access: float | None


class BlockIndex:
    """What this process knows is on disk, and what it may still add within max_bytes."""

    def __init__(self, lock: threading.Lock, open_files: OpenFiles, max_bytes: int) -> None:
        self.lock = lock
        self.open_files = open_files
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Key, Entry] = OrderedDict()  # least recently used first
        self.files: dict[FileKey, BlockFile] = {}
        self.bytes = 0
        # Bytes promised to puts still writing, so concurrent puts cannot overshoot max_bytes.
        self.reserved = 0
        # Keys with a put in flight: never evicted, or the eviction could clear the record
        # that put is about to write.
        self.writing: dict[Key, int] = {}

    def has(self, key: Key) -> bool:
        with self.lock:
            return key in self.entries

    # -- building it -------------------------------------------------------------------------

    def rebuild_locked(self, found: list[Loaded]) -> None:
        """Forget everything known, then know these files and their records, oldest first."""
        self.open_files.close_all_locked(self.files.values())
        self.entries.clear()
        self.files.clear()
        self.bytes = 0
        entries: list[tuple[Key, Entry]] = []
        for f, records in found:
            self.files[f.key] = f
            self.bytes += f.cost
            f.blocks = len(records)
            for index, entry in records:
                entries.append(((f.h, f.token, index), entry))
                self.bytes += entry.cost
        entries.sort(key=lambda item: item[1].atime)
        self.entries.update(entries)

    def adopt_locked(self, f: BlockFile, fd: int, records: list[tuple[int, Entry]]) -> None:
        """A file a writer opened or made: known from now on, with the records it holds
        (another process's, or ours from before a clear made us forget it), oldest first."""
        self.files[f.key] = f
        self.open_files.add_locked(f, fd)
        self.bytes += f.cost
        for index, entry in records:
            k = (f.h, f.token, index)
            if k not in self.entries:
                self.entries[k] = entry
                self.entries.move_to_end(k, last=False)
                self.bytes += entry.cost
                f.blocks += 1

    def stored_locked(self, f: BlockFile, key: Key, entry: Entry) -> None:
        """A put wrote this block and its record: it is indexed, the most recent."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.bytes -= old.cost
            f.blocks -= 1
        self.entries[key] = entry
        self.bytes += entry.cost
        f.blocks += 1

    # -- the cap -----------------------------------------------------------------------------

    def make_room_locked(self, need: int) -> int | None:
        """Evict LRU blocks until need more bytes fit; None if that is impossible."""
        dropped = 0
        if self.bytes + self.reserved + need <= self.max_bytes:
            return dropped
        victims: list[Key] = []
        free = self.max_bytes - self.bytes - self.reserved - need
        emptied: dict[FileKey, int] = {}
        for key, entry in self.entries.items():
            if free >= 0:
                break
            if key in self.writing:
                continue
            victims.append(key)
            free += entry.cost
            fk = (key[0], key[1])
            emptied[fk] = emptied.get(fk, 0) + 1
            f = self.files.get(fk)
            if f is not None and f.blocks == emptied[fk] and f.writers == 0:
                free += f.cost  # its last block: the file goes too
        if free < 0:
            return None
        for key in victims:
            self.evict_locked(key, self.entries[key])
            dropped += 1
        return dropped

    def evict_locked(self, key: Key, entry: Entry) -> None:
        """Drop one block: the index first, then its record, then its disk space."""
        del self.entries[key]
        self.bytes -= entry.cost
        f = self.files.get((key[0], key[1]))
        if f is None:
            return
        f.blocks -= 1
        if f.blocks <= 0 and f.writers == 0:
            self.remove_file_locked(f)
            return
        index = key[2]
        fd = f.fd
        opened = fd < 0
        try:
            if opened:
                fd = os.open(f.path, os.O_WRONLY | os.O_CLOEXEC)
                if os.fstat(fd).st_ino != f.ino:
                    return
            pwrite_all(fd, bytes(RECORD.size), f.record_at(index))
            if not punch(fd, f.slot(index), f.stride):
                # No holes on this file system: the space comes back with the whole file.
                self.remove_file_locked(f)
        except OSError as e:
            log.debug("cache: cannot evict a block of %s/%s: %s", f.call_id, f.kind, e)
        finally:
            if opened and fd >= 0:
                os.close(fd)

    # -- forgetting files ---------------------------------------------------------------------

    def remove_file_locked(self, f: BlockFile) -> None:
        """Forget f and delete it from the disk (if it is still the file there)."""
        self.forget_file_locked(f)
        try:
            if os.stat(f.path).st_ino == f.ino:
                os.unlink(f.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cache: cannot delete %s: %s", f.path, e)

    def forget_file_locked(self, f: BlockFile) -> None:
        if not f.alive:
            return
        f.alive = False
        if self.files.get(f.key) is f:
            del self.files[f.key]
            self.bytes -= f.cost
        for index in range(f.count):
            entry = self.entries.pop((f.h, f.token, index), None)
            if entry is not None:
                self.bytes -= entry.cost
        f.blocks = 0
        self.open_files.drop_locked(f)

    def forget_all_locked(self) -> None:
        for f in list(self.files.values()):
            self.forget_file_locked(f)
        self.entries.clear()
        self.bytes = 0

    def fd(self, f: BlockFile) -> int | None:
        """f's descriptor (f acquired); None when there is none now, and f is forgotten
        when the file on disk is no longer f."""
        try:
            return self.open_files.fd(f)
        except FileGone:
            with self.lock:
                self.forget_file_locked(f)
            return None

    def stats(self) -> CacheStats:
        with self.lock:
            entries = list(self.entries.items())
            file_bytes = sum(f.cost for f in self.files.values())
        atimes = [e.atime for _k, e in entries]
        return CacheStats(
            bytes=sum(e.cost for _k, e in entries) + file_bytes,
            blocks=len(entries),
            artifacts=len({k[0] for k, _e in entries}),
            oldest_access=min(atimes) if atimes else None,
            newest_access=max(atimes) if atimes else None,
        )
