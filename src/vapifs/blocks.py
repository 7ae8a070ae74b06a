"""The block store: fixed-size blocks of artifacts on disk, self-checking, bounded by an LRU.

One sparse file per artifact version holds its blocks at their places (see docs/cache.md):
a header naming the call, artifact and version, a table of one record per block (length,
crc32, last access), then the blocks. A sequential fill writes into one file instead of
creating a file per block, and a remount read of a whole artifact opens one file.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cachefiles import (
    BLOCK_HEADER_AT,
    DIR_MODE,
    ENC_MAGIC,
    FILE_MODE,
    ensure_dir,
    remove_orphans,
    write_all,
    write_failed,
)
from .crypto import OVERHEAD, Cipher
from .heap import keep_freed_blocks
from .version import Version

try:  # ISA-L's crc32: the very checksum of zlib's, over ten times as fast on a block
    from isal.isal_zlib import crc32
except ImportError:  # a platform without its wheel
    from zlib import crc32

log = logging.getLogger("vapifs.cache")

DEFAULT_BLOCK_SIZE = 1 << 20

# A block file: MAGIC, then _FIXED (header blob length, header region length, block size,
# slot stride, block count), then the header blob (JSON; sealed after ENC_MAGIC when
# encrypted), then the record table at the next multiple of 8; blocks start at the header
# region's length (a multiple of 4096), block i at i * stride.
MAGIC = b"VAPIFSV2"
_FIXED = struct.Struct("<IIIIQ")
_FIXED_END = BLOCK_HEADER_AT
assert len(MAGIC) + _FIXED.size == _FIXED_END
# Block length (stored bytes), crc32 of the stored bytes, last access (unix time), index,
# crc32 of the four fields before it and of the file's identity: a torn or moved record
# fails its own check and reads as "no block here". All zeros is an empty slot.
_RECORD = struct.Struct("<IIdII")
_PAGE = 4096
# A header is a few hundred bytes and a table 24 bytes per block; far larger is damage.
_MAX_HEADER = 64 * 1024
_MAX_REGION = 64 << 20
# What a file costs beyond its blocks in the cap: its header region plus a page for the
# file system's own extent tree once the file is fragmented by eviction.
_FILE_SLACK = _PAGE
# Open block files kept for reuse, least recently used closed first.
_OPEN_FILES = 64

# The layout before this one: a file per block under blocks/. Dropped on first use.
_OLD_LAYOUT = "blocks"
_STORE = "store"
_FILE_NAME = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{16})\.vblk$")

# A hit rewrites the block's access time (the persisted LRU order) at most this often, so
# that a sequential read does not turn into one metadata write per block read.
_TOUCH_INTERVAL = 30.0

_Key = tuple[str, str, int]  # (artifact hash, version token, block index)
_FileKey = tuple[str, str]  # (artifact hash, version token)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def _punch(fd: int, offset: int, length: int) -> bool:
    """Give the disk space of [offset, offset+length) back; False where that is unsupported."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(code, os.strerror(code))


@dataclass
class CacheStats:
    bytes: int
    blocks: int
    artifacts: int
    oldest_access: float | None
    newest_access: float | None


@dataclass
class VerifyReport:
    checked: int
    bad: int
    bad_bytes: int


@dataclass(slots=True)
class _Entry:
    stored: int  # bytes in the slot (sealed length when encrypted)
    crc: int  # crc32 of those bytes
    atime: float  # last access (wall clock), for stats and the persisted LRU order
    touched: float  # when the record's access time was last written, to throttle writes

    @property
    def cost(self) -> int:
        return _round_up(self.stored, _PAGE)


@dataclass(eq=False)
class _File:
    """One artifact version's file, as this process knows it."""

    h: str
    token: str
    path: Path
    ino: int
    call_id: str
    kind: str
    version: Version
    region: int  # header region length: where block 0 starts
    stride: int
    table: int  # where the record table starts
    count: int  # blocks the file has room for
    blocks: int = 0  # blocks indexed in it
    fd: int = -1
    users: int = 0  # threads using fd right now: it is closed only once they are done
    writers: int = 0  # puts in flight: the file is not removed under them
    alive: bool = True  # False once dropped: no block is indexed in it any more
    foreign: bool = False  # written with another block size: dropped at open
    # Sealed, and this instance has no key (`vapifs cache stats`): its blocks are counted,
    # never served; a get drops them like damaged ones.
    opaque: bool = False

    @property
    def cost(self) -> int:
        return self.region + _FILE_SLACK

    def slot(self, index: int) -> int:
        return self.region + index * self.stride

    def record_at(self, index: int) -> int:
        return self.table + index * _RECORD.size


_Loaded = tuple[_File, list[tuple[int, _Entry]]]  # a file and its sound records


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _artifact_hash(call_id: str, kind: str) -> str:
    return hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]


def _block_ad(h: str, token: str, index: int) -> bytes:
    return f"vapifs block {h} {token} {index}".encode()


def _header_ad(h: str, token: str) -> bytes:
    return f"vapifs block file {h} {token}".encode()


def _record_check(h: str, token: str, fields: bytes) -> int:
    return crc32(fields, crc32(f"{h} {token}".encode()))


def _pack_record(h: str, token: str, index: int, stored: int, crc: int, atime: float) -> bytes:
    fields = _RECORD.pack(stored, crc, atime, index, 0)[: _RECORD.size - 4]
    return fields + struct.pack("<I", _record_check(h, token, fields))


def _unpack_record(h: str, token: str, index: int, raw: bytes) -> _Entry | None:
    """The entry a record describes; None for an empty, torn or misplaced one."""
    if len(raw) != _RECORD.size:
        return None
    stored, crc, atime, at, check = _RECORD.unpack(raw)
    if stored == 0 or at != index or check != _record_check(h, token, raw[:-4]):
        return None
    return _Entry(stored, crc, atime, atime)


def _pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]
        offset += n


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


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
        self.max_bytes = max_bytes
        self.block_size = block_size
        self.fsync = fsync
        self.cipher = cipher
        self._store = self.root / _STORE
        self._tmp_dir = self.root / "tmp"
        self._stride = block_size if cipher is None else _round_up(block_size + OVERHEAD, _PAGE)
        self._lock = threading.Lock()
        # Least recently used first.
        self._index: OrderedDict[_Key, _Entry] = OrderedDict()
        self._files: dict[_FileKey, _File] = {}
        self._open: OrderedDict[_FileKey, _File] = OrderedDict()  # files whose fd is open
        self._bytes = 0
        # Bytes promised to puts still writing, so concurrent puts cannot overshoot max_bytes.
        self._reserved = 0
        # Keys with a put in flight: never evicted, or the eviction could clear the record
        # that put is about to write.
        self._writing: dict[_Key, int] = {}
        self.hits = 0
        self.misses = 0

    # -- names ------------------------------------------------------------------------------

    def _file_path(self, h: str, token: str) -> Path:
        return self._store / h[:2] / f"{h}-{token}.vblk"

    def _key(self, call_id: str, kind: str, version: Version, index: int) -> _Key:
        return (_artifact_hash(call_id, kind), version.token(), index)

    def _paths(self) -> Iterator[tuple[str, str, Path]]:
        """Every block file on disk, whoever wrote it."""
        try:
            prefixes = list(os.scandir(self._store))
        except FileNotFoundError:
            return
        for pre in prefixes:
            if not pre.is_dir(follow_symlinks=False):
                continue
            try:
                names = list(os.scandir(pre.path))
            except OSError:
                continue
            for f in names:
                m = _FILE_NAME.match(f.name)
                if m is not None and m.group(1)[:2] == pre.name:
                    yield m.group(1), m.group(2), Path(f.path)

    # -- the file format --------------------------------------------------------------------

    def _new_file_bytes(self, h: str, token: str, call_id: str, kind: str, v: Version) -> bytes:
        count = max(1, -(-v.size // self.block_size))
        header = json.dumps(
            {"call_id": call_id, "kind": kind, "version": v.to_json()}, separators=(",", ":")
        ).encode()
        if self.cipher is not None:
            header = ENC_MAGIC + self.cipher.seal(header, _header_ad(h, token))
        table = _round_up(_FIXED_END + len(header), 8)
        region = _round_up(table + count * _RECORD.size, _PAGE)
        fixed = _FIXED.pack(len(header), region, self.block_size, self._stride, count)
        head = MAGIC + fixed + header
        return head + bytes(region - len(head))

    def _parse(self, h: str, token: str, path: Path, fd: int) -> tuple[_File, bytes] | None:
        """The file's description and record table; None when its header is not sound."""
        head = os.pread(fd, _PAGE, 0)
        if len(head) < _FIXED_END or not head.startswith(MAGIC):
            return None
        hlen, region, block_size, stride, count = _FIXED.unpack_from(head, len(MAGIC))
        table = _round_up(_FIXED_END + hlen, 8)
        if (
            hlen > _MAX_HEADER
            or region > _MAX_REGION
            or region % _PAGE
            or table + count * _RECORD.size > region
            or block_size <= 0
            or stride < block_size
        ):
            return None
        raw = head if region <= len(head) else _pread_all(fd, region, 0)
        if len(raw) < region:
            return None
        blob = raw[_FIXED_END : _FIXED_END + hlen]
        if self.cipher is None and blob.startswith(ENC_MAGIC):
            ino = os.fstat(fd).st_ino
            f = _File(h, token, path, ino, "", "", Version(0), region, stride, table, count)
            f.opaque, f.foreign = True, block_size != self.block_size
            return f, raw[table : table + count * _RECORD.size]
        if self.cipher is not None:
            if not blob.startswith(ENC_MAGIC):
                return None
            opened = self.cipher.open(memoryview(blob)[len(ENC_MAGIC) :], _header_ad(h, token))
            if opened is None:
                return None
            blob = opened
        try:
            header = json.loads(blob)
            call_id, kind = header["call_id"], header["kind"]
            version = Version.from_json(header["version"])
        except (ValueError, KeyError, TypeError):  # ValueError includes UnicodeDecodeError
            return None
        if not (isinstance(call_id, str) and isinstance(kind, str)):
            return None
        if _artifact_hash(call_id, kind) != h or version.token() != token:
            return None
        if count != max(1, -(-version.size // block_size)):
            return None
        f = _File(
            h=h,
            token=token,
            path=path,
            ino=os.fstat(fd).st_ino,
            call_id=call_id,
            kind=kind,
            version=version,
            region=region,
            stride=stride,
            table=table,
            count=count,
            foreign=block_size != self.block_size or stride != self._stride,
        )
        return f, raw[table : table + count * _RECORD.size]

    def _records(self, f: _File, table: bytes) -> Iterator[tuple[int, _Entry]]:
        for index in range(f.count):
            raw = table[index * _RECORD.size : (index + 1) * _RECORD.size]
            if raw.count(0) == len(raw):
                continue
            entry = _unpack_record(f.h, f.token, index, raw)
            if entry is not None and entry.stored <= f.stride:
                yield index, entry

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories, drop crash leftovers, rebuild the index from disk."""
        keep_freed_blocks()
        ensure_dir(self.root)  # a root made here is 0700; an existing one is the user's
        for d in (self._store, self._tmp_dir):
            ensure_dir(d)
            os.chmod(d, DIR_MODE)
        self._drop_old_layout()
        remove_orphans(self._tmp_dir)
        found: list[tuple[_File, list[tuple[int, _Entry]]]] = []
        foreign = 0
        for h, token, path in list(self._paths()):
            loaded = self._load_file(h, token, path)
            if loaded is None:
                continue
            f, records = loaded
            if f.foreign:
                foreign += len(records)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            found.append((f, records))
        if foreign:
            log.info("cache: dropped %d blocks written with another block size", foreign)
        with self._lock:
            self._close_all_locked()
            self._index.clear()
            self._files.clear()
            self._bytes = 0
            entries: list[tuple[_Key, _Entry]] = []
            for f, records in found:
                self._files[(f.h, f.token)] = f
                self._bytes += f.cost
                f.blocks = len(records)
                for index, entry in records:
                    entries.append(((f.h, f.token, index), entry))
                    self._bytes += entry.cost
            entries.sort(key=lambda item: item[1].atime)
            self._index.update(entries)
            dropped = self._make_room_locked(0)
        if dropped:
            log.info("cache: evicted %d blocks to fit %d bytes", dropped, self.max_bytes)

    def _drop_old_layout(self) -> None:
        old = self.root / _OLD_LAYOUT
        if not old.is_dir():
            return
        blocks = sum(1 for _ in old.rglob("*.blk"))
        shutil.rmtree(old, ignore_errors=True)
        log.info(
            "cache: dropped %d blocks of an older cache layout in %s; they are fetched again "
            "as needed",
            blocks,
            self.root,
        )

    def _load_file(self, h: str, token: str, path: Path) -> _Loaded | None:
        """A file's description and its sound records; a file whose header is not sound
        (torn by a power loss, damaged, renamed) is deleted with a warning."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            parsed = self._parse(h, token, path, fd)
            st = os.fstat(fd)
            if parsed is None:
                log.warning("cache: dropped a damaged block file (%d bytes)", st.st_size)
                with contextlib.suppress(OSError):
                    if os.stat(path).st_ino == st.st_ino:
                        os.unlink(path)
                return None
            f, table = parsed
            records = list(self._records(f, table))
            if not f.foreign:
                # A crash between writing a block and its record, or between clearing a
                # record and freeing its slot, leaves bytes no record accounts for.
                expected = f.region + sum(e.cost for _i, e in records) + _FILE_SLACK
                if st.st_blocks * 512 > expected:
                    self._free_unrecorded(path, f, {i for i, _e in records})
            return f, records
        except OSError:
            return None
        finally:
            os.close(fd)

    @staticmethod
    def _free_unrecorded(path: Path, f: _File, present: set[int]) -> None:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                for index in range(f.count):
                    if index not in present and not _punch(fd, f.slot(index), f.stride):
                        return
            finally:
                os.close(fd)

    # -- open files ---------------------------------------------------------------------------

    def _acquire_locked(self, f: _File) -> None:
        f.users += 1
        fk = (f.h, f.token)
        if self._open.get(fk) is f:
            self._open.move_to_end(fk)

    def _release_locked(self, f: _File) -> None:
        f.users -= 1
        if f.users == 0 and not f.alive and f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
        self._close_idle_locked()

    def _release(self, f: _File) -> None:
        with self._lock:
            self._release_locked(f)

    def _close_idle_locked(self) -> None:
        while len(self._open) > _OPEN_FILES:
            idle = next((fk for fk, f in self._open.items() if f.users == 0), None)
            if idle is None:
                return
            f = self._open.pop(idle)
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1

    def _close_all_locked(self) -> None:
        """Before the index is built again: every file known so far is forgotten; one still
        in use is closed by its last user."""
        for f in [*self._files.values(), *self._open.values()]:
            f.alive = False
            if f.fd >= 0 and f.users == 0:
                os.close(f.fd)
                f.fd = -1
        self._open.clear()

    def _fd(self, f: _File) -> int | None:
        """f's descriptor (f acquired by the caller); None when the file on disk is no
        longer f (deleted or replaced by another process: f is then forgotten), or cannot
        be opened now (out of descriptors, a disk error: a miss, f is kept)."""
        try:
            try:
                same = os.stat(f.path).st_ino == f.ino
            except FileNotFoundError:
                same = False
            if same:
                with self._lock:
                    fd = f.fd
                if fd >= 0:
                    return fd
                try:
                    fd = os.open(f.path, os.O_RDWR | os.O_CLOEXEC)
                except FileNotFoundError:
                    fd = -1
                except PermissionError:  # a read-only file: reads still work
                    fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    if e.errno != errno.EROFS:
                        raise
                    fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                if fd >= 0:
                    if os.fstat(fd).st_ino == f.ino:
                        with self._lock:
                            if f.fd < 0 and f.alive:
                                f.fd = fd
                                self._open[(f.h, f.token)] = f
                                self._open.move_to_end((f.h, f.token))
                                self._close_idle_locked()
                                return fd
                            current = f.fd
                        os.close(fd)
                        return current if current >= 0 else None
                    os.close(fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cache: cannot open %s: %s", f.path, e)
            return None
        with self._lock:
            self._forget_file_locked(f)
        return None

    # -- blocks -----------------------------------------------------------------------------

    def block_length(self, version: Version, index: int) -> int:
        start = index * self.block_size
        if index < 0 or start >= version.size:
            raise ValueError(f"block {index} is outside an artifact of {version.size} bytes")
        return min(self.block_size, version.size - start)

    @property
    def bytes_used(self) -> int:
        """Bytes of the blocks and files in the index (puts still writing not included)."""
        with self._lock:
            return self._bytes

    def has(self, call_id: str, kind: str, version: Version, index: int) -> bool:
        key = self._key(call_id, kind, version, index)
        with self._lock:
            return key in self._index

    def get(self, call_id: str, kind: str, version: Version, index: int) -> bytes | None:
        return self.get_many(call_id, kind, version, [index])[0]

    def get_many(
        self, call_id: str, kind: str, version: Version, indexes: list[int]
    ) -> list[bytes | None]:
        """Blocks of one artifact version, read through one open file; None where absent."""
        lengths = [self.block_length(version, i) for i in indexes]
        h, token = _artifact_hash(call_id, kind), version.token()
        out: list[bytes | None] = [None] * len(indexes)
        with self._lock:
            f = self._files.get((h, token))
            entries = [self._index.get((h, token, i)) for i in indexes]
            if f is None or not any(entries):
                self.misses += len(indexes)
                return out
            self._acquire_locked(f)
        try:
            fd = self._fd(f)
            if fd is None:
                with self._lock:
                    self.misses += len(indexes)
                return out
            for n, (index, entry, length) in enumerate(zip(indexes, entries, lengths, strict=True)):
                if entry is None:
                    with self._lock:
                        self.misses += 1
                    continue
                out[n] = self._read_block(f, fd, index, entry, length, call_id, kind)
        finally:
            self._release(f)
        return out

    def _read_block(
        self, f: _File, fd: int, index: int, entry: _Entry, length: int, call_id: str, kind: str
    ) -> bytes | None:
        key = (f.h, f.token, index)
        try:
            buf = os.pread(fd, entry.stored, f.slot(index))
        except OSError as e:
            log.debug("cache: cannot read a block of %s/%s #%d: %s", call_id, kind, index, e)
            with self._lock:
                self.misses += 1
            return None
        data: bytes | None = None
        if len(buf) == entry.stored and not f.opaque:
            if self.cipher is None:
                if crc32(buf) == entry.crc:
                    data = buf
            else:
                data = self.cipher.open(buf, _block_ad(f.h, f.token, index))
            if data is not None and len(data) != length:
                data = None
        now = time.time()
        with self._lock:
            current = self._index.get(key) is entry
            if data is None:
                self.misses += 1
                if current:
                    self._evict_locked(key, entry)
            else:
                self.hits += 1
                touch = False
                if current:
                    self._index.move_to_end(key)
                    entry.atime = now
                    if now - entry.touched >= _TOUCH_INTERVAL:
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
            record = _pack_record(f.h, f.token, index, entry.stored, entry.crc, now)
            with contextlib.suppress(OSError):
                _pwrite_all(fd, record, f.record_at(index))
        return data

    def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool:
        length = self.block_length(version, index)
        if len(data) != length:
            raise ValueError(f"block {index} must hold {length} bytes, not {len(data)}")
        key = self._key(call_id, kind, version, index)
        h, token, _ = key
        stored: bytes = data
        if self.cipher is not None:
            stored = self.cipher.seal(data, _block_ad(h, token, index))
        crc = crc32(stored)
        cost = _round_up(len(stored), _PAGE)
        with self._lock:
            f = self._files.get((h, token))
            need = cost if f is not None else cost + self._new_file_cost(version)
            if need > self.max_bytes:
                return False
            if f is not None:  # pinned: making room must not remove the file under us
                f.writers += 1
                self._acquire_locked(f)
            if self._make_room_locked(need) is None:
                if f is not None:
                    f.writers -= 1
                    self._release_locked(f)
                return False  # the room left is all promised to puts in flight
            self._reserved += need
            self._writing[key] = self._writing.get(key, 0) + 1

        error: OSError | None = None
        written = False
        try:
            for _attempt in range(2):
                if f is None:
                    f = self._file_for_write(call_id, kind, version)
                fd = self._fd(f)
                if fd is not None:
                    break
                # Deleted under us (a clear by another process): make it again.
                with self._lock:
                    f.writers -= 1
                    self._release_locked(f)
                f = None
            if f is None or fd is None:
                raise FileNotFoundError(errno.ENOENT, "the block file went away")
            try:
                _pwrite_all(fd, stored, f.slot(index))
                if self.fsync:
                    os.fsync(fd)  # the block reaches the disk before the record naming it
                now = time.time()
                record = _pack_record(h, token, index, len(stored), crc, now)
                _pwrite_all(fd, record, f.record_at(index))
                written = True
            except OSError:
                with contextlib.suppress(OSError):
                    _punch(fd, f.slot(index), f.stride)
                raise
        except OSError as e:
            error = e
        finally:
            now = time.time()
            with self._lock:
                self._reserved -= need
                left = self._writing[key] - 1
                if left:
                    self._writing[key] = left
                else:
                    del self._writing[key]
                if f is not None:
                    f.writers -= 1
                    if written and f.alive:
                        old = self._index.pop(key, None)
                        if old is not None:
                            self._bytes -= old.cost
                            f.blocks -= 1
                        entry = _Entry(len(stored), crc, now, now)
                        self._index[key] = entry
                        self._bytes += entry.cost
                        f.blocks += 1
                    elif f.alive and f.blocks == 0 and f.writers == 0:
                        self._remove_file_locked(f)
                    self._release_locked(f)
        if error is not None:
            write_failed(self.root, error)
            return False
        return True

    def _new_file_cost(self, version: Version) -> int:
        count = max(1, -(-version.size // self.block_size))
        return _round_up(_FIXED_END + 1024 + count * _RECORD.size, _PAGE) + _FILE_SLACK

    def _file_for_write(self, call_id: str, kind: str, version: Version) -> _File:
        """The file of this version, made if needed; returned with a writer and a user
        counted on it."""
        h, token = _artifact_hash(call_id, kind), version.token()
        path = self._file_path(h, token)
        with self._lock:
            f = self._files.get((h, token))
            if f is not None:
                f.writers += 1
                f.users += 1
                return f
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            fd = self._create(h, token, call_id, kind, version, path)
        try:
            parsed = self._parse(h, token, path, fd)
            if parsed is None or parsed[0].foreign or parsed[0].opaque:
                # Not a file this cache can use (damaged, another block size): start afresh.
                os.close(fd)
                fd = -1
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                fd = self._create(h, token, call_id, kind, version, path)
                parsed = self._parse(h, token, path, fd)
                if parsed is None or parsed[0].opaque:
                    raise OSError(errno.EIO, "a new block file does not read back")
            new, table = parsed
            records = list(self._records(new, table))
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        with self._lock:
            f = self._files.get((h, token))
            if f is not None:  # another thread got there first
                os.close(fd)
            else:
                f = new
                f.fd = fd
                self._files[(h, token)] = f
                self._open[(h, token)] = f
                self._bytes += f.cost
                # Blocks another process stored in it since (or that ours did before a
                # clear made us forget it) count as well.
                for index, entry in records:
                    k = (h, token, index)
                    if k not in self._index:
                        self._index[k] = entry
                        self._index.move_to_end(k, last=False)
                        self._bytes += entry.cost
                        f.blocks += 1
            f.writers += 1
            f.users += 1
            return f

    def _create(self, h: str, token: str, call_id: str, kind: str, v: Version, path: Path) -> int:
        """Make the file whole in tmp/, then link it into place (never over another's)."""
        body = self._new_file_bytes(h, token, call_id, kind, v)
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

    # -- eviction and dropping ---------------------------------------------------------------

    def _make_room_locked(self, need: int) -> int | None:
        """Evict LRU blocks until need more bytes fit; None if that is impossible."""
        dropped = 0
        if self._bytes + self._reserved + need <= self.max_bytes:
            return dropped
        victims: list[_Key] = []
        free = self.max_bytes - self._bytes - self._reserved - need
        emptied: dict[_FileKey, int] = {}
        for key, entry in self._index.items():
            if free >= 0:
                break
            if key in self._writing:
                continue
            victims.append(key)
            free += entry.cost
            fk = (key[0], key[1])
            emptied[fk] = emptied.get(fk, 0) + 1
            f = self._files.get(fk)
            if f is not None and f.blocks == emptied[fk] and f.writers == 0:
                free += f.cost  # its last block: the file goes too
        if free < 0:
            return None
        for key in victims:
            self._evict_locked(key, self._index[key])
            dropped += 1
        return dropped

    def _evict_locked(self, key: _Key, entry: _Entry) -> None:
        """Drop one block: the index first, then its record, then its disk space."""
        del self._index[key]
        self._bytes -= entry.cost
        f = self._files.get((key[0], key[1]))
        if f is None:
            return
        f.blocks -= 1
        if f.blocks <= 0 and f.writers == 0:
            self._remove_file_locked(f)
            return
        index = key[2]
        fd = f.fd
        opened = fd < 0
        try:
            if opened:
                fd = os.open(f.path, os.O_WRONLY | os.O_CLOEXEC)
                if os.fstat(fd).st_ino != f.ino:
                    return
            _pwrite_all(fd, bytes(_RECORD.size), f.record_at(index))
            if not _punch(fd, f.slot(index), f.stride):
                # No holes on this file system: the space comes back with the whole file.
                self._remove_file_locked(f)
        except OSError as e:
            log.debug("cache: cannot evict a block of %s/%s: %s", f.call_id, f.kind, e)
        finally:
            if opened and fd >= 0:
                os.close(fd)

    def _remove_file_locked(self, f: _File) -> None:
        """Forget f and delete it from the disk (if it is still the file there)."""
        self._forget_file_locked(f)
        try:
            if os.stat(f.path).st_ino == f.ino:
                os.unlink(f.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cache: cannot delete %s: %s", f.path, e)

    def _forget_file_locked(self, f: _File) -> None:
        if not f.alive:
            return
        f.alive = False
        fk = (f.h, f.token)
        if self._files.get(fk) is f:
            del self._files[fk]
            self._bytes -= f.cost
        for index in range(f.count):
            entry = self._index.pop((f.h, f.token, index), None)
            if entry is not None:
                self._bytes -= entry.cost
        f.blocks = 0
        if self._open.get(fk) is f:
            del self._open[fk]
        if f.users == 0 and f.fd >= 0:
            os.close(f.fd)
            f.fd = -1

    # -- whole artifacts and the whole cache -------------------------------------------------

    def drop_other_versions(self, call_id: str, kind: str, keep: Version) -> int:
        token = keep.token()
        return self._drop(_artifact_hash(call_id, kind), lambda t: t != token)

    def drop_artifact(self, call_id: str, kind: str) -> int:
        return self._drop(_artifact_hash(call_id, kind), lambda _t: True)

    def drop_older_than(self, ts: float) -> int:
        """Delete every block not written or read since `ts` (wall clock): it is older."""
        with self._lock:
            old = [
                (k, e) for k, e in self._index.items() if e.atime < ts and k not in self._writing
            ]
            for key, entry in old:
                if self._index.get(key) is entry:
                    self._evict_locked(key, entry)
        return len(old)

    def _drop(self, h: str, doomed: Callable[[str], bool]) -> int:
        try:
            names = os.listdir(self._store / h[:2])
        except OSError:
            names = []
        on_disk = set()
        for name in names:
            m = _FILE_NAME.match(name)
            if m is not None and m.group(1) == h and doomed(m.group(2)):
                on_disk.add(m.group(2))
        dropped = 0
        with self._lock:
            tokens = on_disk | {t for (fh, t) in self._files if fh == h and doomed(t)}
            for token in tokens:
                f = self._files.get((h, token))
                if f is not None:
                    dropped += f.blocks
                    self._forget_file_locked(f)
                else:
                    dropped += self._count_on_disk(h, token)
                try:
                    os.unlink(self._file_path(h, token))
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.debug("cache: cannot delete %s: %s", self._file_path(h, token), e)
        return dropped

    def _count_on_disk(self, h: str, token: str) -> int:
        loaded = self._load_file(h, token, self._file_path(h, token))
        return 0 if loaded is None else len(loaded[1])

    def clear(self) -> int:
        """Delete every block. Another process using the same root sees plain misses."""
        dropped = 0
        with self._lock:
            for h, token, path in list(self._paths()):
                f = self._files.get((h, token))
                count = f.blocks if f is not None else self._count_on_disk(h, token)
                try:
                    os.unlink(path)
                    dropped += count
                except OSError:
                    continue
            for f in list(self._files.values()):
                self._forget_file_locked(f)
            # Empty directories go too; one refilled meanwhile stays (ENOTEMPTY), and a put
            # that finds its directory gone makes it again.
            try:
                prefixes = list(os.scandir(self._store))
            except OSError:
                prefixes = []
            for pre in prefixes:
                if pre.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(pre.path)
            self._index.clear()
            self._bytes = 0
        return dropped

    def verify(self) -> VerifyReport:
        """Read every block on disk and drop those that are not whole and in their place."""
        checked = bad = bad_bytes = 0
        for h, token, path in list(self._paths()):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                try:
                    parsed = self._parse(h, token, path, fd)
                except OSError:
                    parsed = None
                if parsed is None or parsed[0].foreign:
                    checked += 1
                    bad += 1
                    bad_bytes += st.st_blocks * 512
                    with self._lock:
                        f = self._files.get((h, token))
                        if f is not None:
                            self._forget_file_locked(f)
                        with contextlib.suppress(OSError):
                            if os.stat(path).st_ino == st.st_ino:
                                os.unlink(path)
                    continue
                disk, table = parsed
                for index, entry in self._records(disk, table):
                    checked += 1
                    if self._sound(disk, fd, index, entry):
                        continue
                    bad += 1
                    bad_bytes += entry.cost
                    key = (h, token, index)
                    with self._lock:
                        mine = self._files.get((h, token))
                        current = self._index.get(key)
                        if mine is not None and mine.ino == disk.ino and current is not None:
                            self._evict_locked(key, current)
                        else:
                            with contextlib.suppress(OSError):
                                _pwrite_all(fd, bytes(_RECORD.size), disk.record_at(index))
                                _punch(fd, disk.slot(index), disk.stride)
            finally:
                os.close(fd)
        return VerifyReport(checked=checked, bad=bad, bad_bytes=bad_bytes)

    def _sound(self, f: _File, fd: int, index: int, entry: _Entry) -> bool:
        try:
            buf = os.pread(fd, entry.stored, f.slot(index))
            expected = self.block_length(f.version, index)
        except (OSError, ValueError):
            return False
        if len(buf) != entry.stored or crc32(buf) != entry.crc:
            return False
        if self.cipher is None:
            return len(buf) == expected
        plain = self.cipher.open(buf, _block_ad(f.h, f.token, index))
        return plain is not None and len(plain) == expected

    def stats(self) -> CacheStats:
        with self._lock:
            entries = list(self._index.items())
            file_bytes = sum(f.cost for f in self._files.values())
        atimes = [e.atime for _k, e in entries]
        return CacheStats(
            bytes=sum(e.cost for _k, e in entries) + file_bytes,
            blocks=len(entries),
            artifacts=len({k[0] for k, _e in entries}),
            oldest_access=min(atimes) if atimes else None,
            newest_access=max(atimes) if atimes else None,
        )
