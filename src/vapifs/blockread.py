"""Reading blocks back, each checked before use: hits for readers, every block for verify.

A block is read with pread through its file's open descriptor and checked against its
record's length and crc32, or opened with AES-GCM, before anything is served; one that fails
is dropped with a warning (and fetched again by the reader). A hit moves the block to the
recent end of the LRU, and rewrites its record's access time at most every 30 s.
"""

from __future__ import annotations

import contextlib
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

    def get_many(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[bytes | None]:
        """Blocks of one artifact version, read through one open file; None where absent."""
        index = self._index
        lengths = [self._fmt.block_length(version, i) for i in indexes]
        h, token = artifact_hash(call_id, kind), version.token()
        out: list[bytes | None] = [None] * len(indexes)
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
                out[n] = self._read_block(f, fd, i, entry, length, call_id, kind)
        finally:
            index.open_files.release(f)
        return out

    def _read_block(
        self, f: BlockFile, fd: int, index: int, entry: Entry, length: int, call_id: str, kind: str
    ) -> bytes | None:
        key = (f.h, f.token, index)
        try:
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
