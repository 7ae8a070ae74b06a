"""Reading blocks back, each checked before use: hits for readers, every block for verify.

A block is read with pread through its file's open descriptor and checked against its
record's length and crc32, or opened with AES-GCM, before anything is served; one that fails
is dropped with a warning (and fetched again by the reader). A hit moves the block to the
recent end of the LRU, and rewrites its record's access time at most every 30 s.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .blockfile import (
    RECORD,
    BlockFile,
    Entry,
    Format,
    artifact_hash,
    block_ad,
    block_crc32,
    pack_record,
    punch,
    pwrite_all,
)
from .blockindex import BlockIndex
from .blockscan import paths
from .version import Version

log = logging.getLogger("vapifs.cache")

# A hit rewrites the block's access time (the persisted LRU order) at most this often, so
# that a sequential read does not turn into one metadata write per block read.
TOUCH_INTERVAL = 30.0


class _Later:
    """A block on disk whose bytes the kernel may not hold: a thread must read it."""


LATER = _Later()


@dataclass
class VerifyReport:
    checked: int
    bad: int
    bad_bytes: int


class BlockReader:
    """Blocks from their files, checked; counts hits and misses."""

    def __init__(self, index: BlockIndex, fmt: Format) -> None:
        self._index = index
        self._fmt = fmt
        self.hits = 0
        self.misses = 0
        # Whether the file system reads what is in memory without waiting (RWF_NOWAIT).
        self.nowait = hasattr(os, "RWF_NOWAIT")

    def get_many(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[bytes | None]:
        """Blocks of one artifact version, read through one open file; None where absent."""
        got = self._get(call_id, kind, version, indexes, nowait=False)
        return [data if isinstance(data, bytes) else None for data in got]

    def get_cached(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> tuple[dict[int, bytes], list[int]]:
        """Blocks whose bytes the kernel holds in memory, read (and checked) at once; and
        those on disk the kernel may not hold, left for a thread to read. A block in neither
        is absent (or was damaged, and is dropped)."""
        if not self.nowait:
            return {}, list(indexes)
        got = self._get(call_id, kind, version, indexes, nowait=True)
        now: dict[int, bytes] = {}
        later: list[int] = []
        for i, data in zip(indexes, got, strict=True):
            if data is LATER:
                later.append(i)
            elif isinstance(data, bytes):
                now[i] = data
        return now, later

    def not_in_memory(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[int]:
        """Those of `indexes` whose bytes the kernel may not hold in memory (or that are no
        longer on disk): what is worth reading ahead from the disk."""
        index = self._index
        h, token = artifact_hash(call_id, kind), version.token()
        with index.lock:
            f = index.files.get((h, token))
            entries = [index.entries.get((h, token, i)) for i in indexes]
            if f is None or not self.nowait:
                return list(indexes)
            index.open_files.acquire_locked(f)
        try:
            fd = index.fd(f)
            if fd is None:
                return list(indexes)
            return [
                i
                for i, entry in zip(indexes, entries, strict=True)
                if entry is None or not self._in_memory(fd, f.slot(i), entry.stored)
            ]
        finally:
            index.open_files.release(f)

    def _get(
        self, call_id: str, kind: str, version: Version, indexes: list[int], *, nowait: bool
    ) -> list[bytes | _Later | None]:
        index = self._index
        lengths = [self._fmt.block_length(version, i) for i in indexes]
        h, token = artifact_hash(call_id, kind), version.token()
        out: list[bytes | _Later | None] = [None] * len(indexes)
        with index.lock:
            f = index.files.get((h, token))
            entries = [index.entries.get((h, token, i)) for i in indexes]
            if f is None or not any(entries):
                self.misses += len(indexes)
                return out
            index.open_files.acquire_locked(f)
        try:
            fd = index.fd(f)
            if fd is None:
                with index.lock:
                    self.misses += len(indexes)
                return out
            for n, (i, entry, length) in enumerate(zip(indexes, entries, lengths, strict=True)):
                if entry is None:
                    with index.lock:
                        self.misses += 1
                    continue
                out[n] = self._read_block(f, fd, i, entry, length, call_id, kind, nowait)
        finally:
            index.open_files.release(f)
        return out

    def _read_block(
        self,
        f: BlockFile,
        fd: int,
        index: int,
        entry: Entry,
        length: int,
        call_id: str,
        kind: str,
        nowait: bool,
    ) -> bytes | _Later | None:
        key = (f.h, f.token, index)
        try:
            if nowait and not self._in_memory(fd, f.slot(index), entry.stored):
                return LATER
            buf = os.pread(fd, entry.stored, f.slot(index))
        except OSError as e:
            log.debug("cache: cannot read a block of %s/%s #%d: %s", call_id, kind, index, e)
            with self._index.lock:
                self.misses += 1
            return None
        data = self._checked(f, index, entry, length, buf)
        now = time.time()
        touch = False
        with self._index.lock:
            current = self._index.entries.get(key) is entry
            if data is None:
                self.misses += 1
                if current:
                    self._index.evict_locked(key, entry)
            else:
                self.hits += 1
                if current:
                    self._index.entries.move_to_end(key)
                    entry.atime = now
                    if now - entry.touched >= TOUCH_INTERVAL:
                        entry.touched = now
                        touch = True
        if data is None:
            if current:  # not merely evicted under this read
                log.warning(
                    "cache: dropped a damaged block of %s/%s #%d; fetching it again",
                    call_id,
                    kind,
                    index,
                )
            return None
        if touch:
            # A failure costs only the LRU order after a remount.
            record = pack_record(f.h, f.token, index, entry.stored, entry.crc, now)
            with contextlib.suppress(OSError):
                pwrite_all(fd, record, f.record_at(index))
        return data

    def _in_memory(self, fd: int, at: int, size: int) -> bool:
        """Whether the kernel holds the bytes [at, at+size) of fd in memory, as far as its
        first, middle and last pages tell. A block is written and read whole, so its pages
        mostly come and go together; should one between them be gone, the read waits on
        the local disk for that page alone."""
        if not self.nowait:
            return False
        probe = bytearray(1)
        try:
            for page in (at, at + size // 2, at + size - 1):
                if os.preadv(fd, [probe], page, os.RWF_NOWAIT) != 1:
                    return False
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.nowait = False  # this file system cannot read without waiting
            return False
        return True

    def _checked(
        self, f: BlockFile, index: int, entry: Entry, length: int, buf: bytes
    ) -> bytes | None:
        """The block's bytes if buf is the whole block its record describes; else None."""
        if len(buf) != entry.stored or f.opaque:
            return None
        cipher = self._fmt.cipher
        data: bytes | None = None
        if cipher is None:
            if block_crc32(buf) == entry.crc:
                data = buf
        else:
            data = cipher.open(buf, block_ad(f.h, f.token, index))
        if data is not None and len(data) != length:
            return None
        return data

    # -- vapifs cache verify -----------------------------------------------------------------

    def verify(self, store: Path) -> VerifyReport:
        """Read every block on disk and drop those that are not whole and in their place."""
        report = VerifyReport(checked=0, bad=0, bad_bytes=0)
        for h, token, path in list(paths(store)):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                self._verify_file(h, token, path, fd, report)
            finally:
                os.close(fd)
        return report

    def _verify_file(self, h: str, token: str, path: Path, fd: int, report: VerifyReport) -> None:
        index = self._index
        st = os.fstat(fd)
        try:
            parsed = self._fmt.parse(h, token, path, fd)
        except OSError:
            parsed = None
        if parsed is None or parsed[0].foreign:
            report.checked += 1
            report.bad += 1
            report.bad_bytes += st.st_blocks * 512
            with index.lock:
                f = index.files.get((h, token))
                if f is not None:
                    index.forget_file_locked(f)
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == st.st_ino:
                        os.unlink(path)
            return
        disk, table = parsed
        for i, entry in self._fmt.records(disk, table):
            report.checked += 1
            if self._sound(disk, fd, i, entry):
                continue
            report.bad += 1
            report.bad_bytes += entry.cost
            key = (h, token, i)
            with index.lock:
                mine = index.files.get((h, token))
                current = index.entries.get(key)
                if mine is not None and mine.ino == disk.ino and current is not None:
                    index.evict_locked(key, current)
                else:
                    with contextlib.suppress(OSError):
                        pwrite_all(fd, bytes(RECORD.size), disk.record_at(i))
                        punch(fd, disk.slot(i), disk.stride)

    def _sound(self, f: BlockFile, fd: int, index: int, entry: Entry) -> bool:
        try:
            buf = os.pread(fd, entry.stored, f.slot(index))
            expected = self._fmt.block_length(f.version, index)
        except (OSError, ValueError):
            return False
        if len(buf) != entry.stored or block_crc32(buf) != entry.crc:
            return False
        cipher = self._fmt.cipher
        if cipher is None:
            return len(buf) == expected
        plain = cipher.open(buf, block_ad(f.h, f.token, index))
        return plain is not None and len(plain) == expected
