"""The block file format: one artifact version's header, record table and block slots.

A block file (see docs/cache.md): MAGIC, then FIXED (header blob length, header region
length, block size, slot stride, block count), then the header blob (JSON; sealed after
ENC_MAGIC when encrypted), then the record table at the next multiple of 8; blocks start at
the header region's length (a multiple of 4096), block i at i * stride. This module packs
and parses those bytes and does the raw I/O on them; what is stored where is the index's.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cachefiles import BLOCK_HEADER_AT, ENC_MAGIC
from .crypto import OVERHEAD, Cipher
from .version import Version

# The checksum of every block and record, for the whole store (hence "as": exported).
try:  # ISA-L's crc32: the very checksum of zlib's, over ten times as fast on a block
    from isal.isal_zlib import crc32 as crc32
except ImportError:  # a platform without its wheel
    from zlib import crc32 as crc32

# Both let go of the interpreter lock for a buffer past about 5 KiB. Threads that check or
# store blocks while the event loop is busy serving reads would then wait to get it back
# after every piece (measured beside a busy thread: 4.4 ms for a 1 MiB block in one call,
# 17 ms in 8 KiB pieces). In pieces of this size the lock stays held, for the 0.07 ms a
# 1 MiB block takes.
_CRC_PIECE = 4096


def block_crc32(data: bytes | memoryview) -> int:
    """crc32 of a block (the same value as crc32), computed without letting go of the lock."""
    view = memoryview(data)
    crc = 0
    for at in range(0, len(view), _CRC_PIECE):
        crc = crc32(view[at : at + _CRC_PIECE], crc)
    return crc


MAGIC = b"VAPIFSV2"
FIXED = struct.Struct("<IIIIQ")
FIXED_END = BLOCK_HEADER_AT
assert len(MAGIC) + FIXED.size == FIXED_END
# Block length (stored bytes), crc32 of the stored bytes, last access (unix time), index,
# crc32 of the four fields before it and of the file's identity: a torn or moved record
# fails its own check and reads as "no block here". All zeros is an empty slot.
RECORD = struct.Struct("<IIdII")
PAGE = 4096
# A header is a few hundred bytes and a table 24 bytes per block; far larger is damage.
_MAX_HEADER = 64 * 1024
_MAX_REGION = 64 << 20
# What a file costs beyond its blocks in the cap: its header region plus a page for the
# file system's own extent tree once the file is fragmented by eviction.
FILE_SLACK = PAGE

STORE = "store"
FILE_NAME = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{16})\.vblk$")

Key = tuple[str, str, int]  # (artifact hash, version token, block index)
FileKey = tuple[str, str]  # (artifact hash, version token)

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc: Any = None


def punch(fd: int, offset: int, length: int) -> bool:
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


def round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def artifact_hash(call_id: str, kind: str) -> str:
    return hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]


def file_path(store: Path, h: str, token: str) -> Path:
    return store / h[:2] / f"{h}-{token}.vblk"


def block_ad(h: str, token: str, index: int) -> bytes:
    return f"vapifs block {h} {token} {index}".encode()


def _header_ad(h: str, token: str) -> bytes:
    return f"vapifs block file {h} {token}".encode()


def _record_check(h: str, token: str, fields: bytes) -> int:
    return crc32(fields, crc32(f"{h} {token}".encode()))


@dataclass(slots=True)
class Entry:
    """One stored block, as its record describes it."""

    stored: int  # bytes in the slot (sealed length when encrypted)
    crc: int  # crc32 of those bytes
    atime: float  # last access (wall clock), for stats and the persisted LRU order
    touched: float  # when the record's access time was last written, to throttle writes

    @property
    def cost(self) -> int:
        return round_up(self.stored, PAGE)


def pack_record(h: str, token: str, index: int, stored: int, crc: int, atime: float) -> bytes:
    fields = RECORD.pack(stored, crc, atime, index, 0)[: RECORD.size - 4]
    return fields + struct.pack("<I", _record_check(h, token, fields))


def unpack_record(h: str, token: str, index: int, raw: bytes) -> Entry | None:
    """The entry a record describes; None for an empty, torn or misplaced one."""
    if len(raw) != RECORD.size:
        return None
    stored, crc, atime, at, check = RECORD.unpack(raw)
    if stored == 0 or at != index or check != _record_check(h, token, raw[:-4]):
        return None
    return Entry(stored, crc, atime, atime)


@dataclass(eq=False)
class BlockFile:
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
    def key(self) -> FileKey:
        return (self.h, self.token)

    @property
    def cost(self) -> int:
        return self.region + FILE_SLACK

    def slot(self, index: int) -> int:
        return self.region + index * self.stride

    def record_at(self, index: int) -> int:
        return self.table + index * RECORD.size


Loaded = tuple[BlockFile, list[tuple[int, Entry]]]  # a file and its sound records


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        view = view[n:]
        offset += n


def pread_all(fd: int, length: int, offset: int) -> bytes:
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


class Format:
    """The layout of one cache's files: its block size, slot stride and cipher."""

    def __init__(self, block_size: int, cipher: Cipher | None) -> None:
        self.block_size = block_size
        self.cipher = cipher
        self.stride = block_size if cipher is None else round_up(block_size + OVERHEAD, PAGE)

    def count(self, size: int) -> int:
        """Blocks of an artifact of `size` bytes (an empty one has room for one)."""
        return max(1, -(-size // self.block_size))

    def block_length(self, version: Version, index: int) -> int:
        start = index * self.block_size
        if index < 0 or start >= version.size:
            raise ValueError(f"block {index} is outside an artifact of {version.size} bytes")
        return min(self.block_size, version.size - start)

    def new_file_cost(self, version: Version) -> int:
        """What a new file of `version` is counted in the cap, at most, before it exists."""
        region = round_up(FIXED_END + 1024 + self.count(version.size) * RECORD.size, PAGE)
        return region + FILE_SLACK

    def new_file_bytes(self, h: str, token: str, call_id: str, kind: str, v: Version) -> bytes:
        count = self.count(v.size)
        header = json.dumps(
            {"call_id": call_id, "kind": kind, "version": v.to_json()}, separators=(",", ":")
        ).encode()
        if self.cipher is not None:
            header = ENC_MAGIC + self.cipher.seal(header, _header_ad(h, token))
        table = round_up(FIXED_END + len(header), 8)
        region = round_up(table + count * RECORD.size, PAGE)
        fixed = FIXED.pack(len(header), region, self.block_size, self.stride, count)
        head = MAGIC + fixed + header
        return head + bytes(region - len(head))

    def parse(self, h: str, token: str, path: Path, fd: int) -> tuple[BlockFile, bytes] | None:
        """The file's description and record table; None when its header is not sound."""
        head = os.pread(fd, PAGE, 0)
        if len(head) < FIXED_END or not head.startswith(MAGIC):
            return None
        hlen, region, block_size, stride, count = FIXED.unpack_from(head, len(MAGIC))
        table = round_up(FIXED_END + hlen, 8)
        if (
            hlen > _MAX_HEADER
            or region > _MAX_REGION
            or region % PAGE
            or table + count * RECORD.size > region
            or block_size <= 0
            or stride < block_size
        ):
            return None
        raw = head if region <= len(head) else pread_all(fd, region, 0)
        if len(raw) < region:
            return None
        records = raw[table : table + count * RECORD.size]
        blob = raw[FIXED_END : FIXED_END + hlen]
        if self.cipher is None and blob.startswith(ENC_MAGIC):
            ino = os.fstat(fd).st_ino
            f = BlockFile(h, token, path, ino, "", "", Version(0), region, stride, table, count)
            f.opaque, f.foreign = True, block_size != self.block_size
            return f, records
        header = self._header(h, token, blob)
        if header is None:
            return None
        call_id, kind, version = header
        if count != max(1, -(-version.size // block_size)):
            return None
        f = BlockFile(
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
            foreign=block_size != self.block_size or stride != self.stride,
        )
        return f, records

    def _header(self, h: str, token: str, blob: bytes) -> tuple[str, str, Version] | None:
        """(call id, kind, version) of a header blob that names this file; None otherwise."""
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
        if artifact_hash(call_id, kind) != h or version.token() != token:
            return None
        return call_id, kind, version

    @staticmethod
    def records(f: BlockFile, table: bytes) -> Iterator[tuple[int, Entry]]:
        """The sound records of a file's table, with their block's index."""
        for index in range(f.count):
            raw = table[index * RECORD.size : (index + 1) * RECORD.size]
            if raw.count(0) == len(raw):
                continue
            entry = unpack_record(f.h, f.token, index, raw)
            if entry is not None and entry.stored <= f.stride:
                yield index, entry
