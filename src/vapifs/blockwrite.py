"""Writing blocks: room made under the cap first, then the slot, then the record naming it.

A file is made whole in root/tmp and linked into place (never over another's); a block is
written into its slot first and its record (length, crc32) only after, so a crash at any
point leaves either no record (the block is simply absent) or, after a power loss without
fsync, a record whose crc32 the slot's bytes fail: such a block is dropped when read, never
served. A full disk is one warning (cachefiles.write_failed) and the put is skipped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .blockfile import (
    PAGE,
    BlockFile,
    Entry,
    Format,
    Key,
    artifact_hash,
    block_ad,
    block_crc32,
    file_path,
    pack_record,
    punch,
    pwrite_all,
    round_up,
)
from .blockindex import BlockIndex
from .cachefiles import FILE_MODE, ensure_dir, write_all, write_failed
from .version import Version


@dataclass
class _Put:
    """One put in flight: its block, the bytes reserved for it, the file it writes."""

    key: Key
    need: int
    f: BlockFile | None  # counted as a writer and a user while it is set
    written: bool = False


class BlockWriter:
    """Puts blocks into their files within the index's cap."""

    def __init__(self, index: BlockIndex, fmt: Format, root: Path, fsync: bool) -> None:
        self._index = index
        self._fmt = fmt
        self._root = root
        self._store = root / "store"
        self._tmp_dir = root / "tmp"
        self.fsync = fsync

    def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool:
        length = self._fmt.block_length(version, index)
        if len(data) != length:
            raise ValueError(f"block {index} must hold {length} bytes, not {len(data)}")
        h, token = artifact_hash(call_id, kind), version.token()
        stored: bytes = data
        if self._fmt.cipher is not None:
            stored = self._fmt.cipher.seal(data, block_ad(h, token, index))
        crc = block_crc32(stored)
        put = self._reserve((h, token, index), version, round_up(len(stored), PAGE))
        if put is None:
            return False
        error: OSError | None = None
        try:
            fd = self._fd_for_write(put, call_id, kind, version)
            self._write(put, fd, stored, crc)
        except OSError as e:
            error = e
        finally:
            self._settle(put, len(stored), crc)
        if error is not None:
            write_failed(self._root, error)
            return False
        return True

    def _reserve(self, key: Key, version: Version, cost: int) -> _Put | None:
        """Room under the cap for this block (and its file, if new); None if there is none."""
        index = self._index
        with index.lock:
            f = index.files.get((key[0], key[1]))
            need = cost if f is not None else cost + self._fmt.new_file_cost(version)
            if need > index.max_bytes:
                return None
            if f is not None:  # pinned: making room must not remove the file under us
                f.writers += 1
                index.open_files.acquire_locked(f)
            if index.make_room_locked(need) is None:
                if f is not None:
                    f.writers -= 1
                    index.open_files.release_locked(f)
                return None  # the room left is all promised to puts in flight
            index.reserved += need
            index.writing[key] = index.writing.get(key, 0) + 1
        return _Put(key, need, f)

    def _fd_for_write(self, put: _Put, call_id: str, kind: str, version: Version) -> int:
        for _attempt in range(2):
            if put.f is None:
                put.f = self._file_for_write(call_id, kind, version)
            fd = self._index.fd(put.f)
            if fd is not None:
                return fd
            # Deleted under us (a clear by another process): make it again.
            with self._index.lock:
                put.f.writers -= 1
                self._index.open_files.release_locked(put.f)
            put.f = None
        raise FileNotFoundError(errno.ENOENT, "the block file went away")

    def _write(self, put: _Put, fd: int, stored: bytes, crc: int) -> None:
        """The slot, then (synced first, with fsync) the record that names it."""
        f = put.f
        assert f is not None
        h, token, index = put.key
        try:
            pwrite_all(fd, stored, f.slot(index))
            if self.fsync:
                os.fsync(fd)  # the block reaches the disk before the record naming it
            now = time.time()
            record = pack_record(h, token, index, len(stored), crc, now)
            pwrite_all(fd, record, f.record_at(index))
            put.written = True
        except OSError:
            with contextlib.suppress(OSError):
                punch(fd, f.slot(index), f.stride)
            raise

    def _settle(self, put: _Put, stored: int, crc: int) -> None:
        """The reservation ends; a block written is indexed, a file left empty goes."""
        now = time.time()
        index = self._index
        with index.lock:
            index.reserved -= put.need
            left = index.writing[put.key] - 1
            if left:
                index.writing[put.key] = left
            else:
                del index.writing[put.key]
            f = put.f
            if f is None:
                return
            f.writers -= 1
            if put.written and f.alive:
                index.stored_locked(f, put.key, Entry(stored, crc, now, now))
            elif f.alive and f.blocks == 0 and f.writers == 0:
                index.remove_file_locked(f)
            index.open_files.release_locked(f)

    def _file_for_write(self, call_id: str, kind: str, version: Version) -> BlockFile:
        """The file of this version, made if needed; returned with a writer and a user
        counted on it."""
        h, token = artifact_hash(call_id, kind), version.token()
        index = self._index
        with index.lock:
            f = index.files.get((h, token))
            if f is not None:
                f.writers += 1
                f.users += 1
                return f
        fd, new, records = self._open_or_make(h, token, call_id, kind, version)
        with index.lock:
            f = index.files.get((h, token))
            if f is not None:  # another thread got there first
                os.close(fd)
            else:
                f = new
                index.adopt_locked(f, fd, records)
            f.writers += 1
            f.users += 1
            return f

    def _open_or_make(
        self, h: str, token: str, call_id: str, kind: str, version: Version
    ) -> tuple[int, BlockFile, list[tuple[int, Entry]]]:
        """The file on disk, opened (made if missing, made again if this cache cannot use
        it), its description and its records."""
        path = file_path(self._store, h, token)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = self._create(h, token, call_id, kind, version, path)
        try:
            parsed = self._fmt.parse(h, token, path, fd)
            if parsed is None or parsed[0].foreign or parsed[0].opaque:
                # Not a file this cache can use (damaged, another block size): start afresh.
                os.close(fd)
                fd = -1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                fd = self._create(h, token, call_id, kind, version, path)
                parsed = self._fmt.parse(h, token, path, fd)
                if parsed is None or parsed[0].opaque:
                    raise OSError(errno.EIO, "a new block file does not read back")
            new, table = parsed
            return fd, new, list(self._fmt.records(new, table))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _create(self, h: str, token: str, call_id: str, kind: str, v: Version, path: Path) -> int:
        """Make the file whole in tmp/, then link it into place (never over another's)."""
        body = self._fmt.new_file_bytes(h, token, call_id, kind, v)
        tmp = self._tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        try:
            fd = os.open(tmp, flags, FILE_MODE)
        except FileNotFoundError:
            ensure_dir(self._tmp_dir)
            fd = os.open(tmp, flags, FILE_MODE)
        try:
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask
            write_all(fd, body)
            if self.fsync:
                os.fsync(fd)
            for attempt in range(3):
                try:
                    os.link(tmp, path)
                    break
                except FileNotFoundError:
                    if attempt == 2:
                        raise
                    ensure_dir(path.parent)
                except FileExistsError:
                    # Another thread or process made it first: use theirs.
                    os.close(fd)
                    fd = -1
                    return os.open(path, os.O_RDWR | os.O_CLOEXEC)
            return fd
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
