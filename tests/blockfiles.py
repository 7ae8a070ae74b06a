"""What the block store holds on disk, read from its files without the store's help."""

from __future__ import annotations

import hashlib
import os
import struct
import zlib
from pathlib import Path

from vapifs import blockfile as B
from vapifs.version import Version


def artifact_hash(call_id: str, kind: str) -> str:
    return hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]


def block_file(root: Path, call_id: str, kind: str, version: Version) -> Path:
    h = artifact_hash(call_id, kind)
    return root / "store" / h[:2] / f"{h}-{version.token()}.vblk"


def block_files(root: Path) -> list[Path]:
    return sorted((root / "store").glob("*/*.vblk"))


def files_of(root: Path, call_id: str, kind: str) -> list[Path]:
    h = artifact_hash(call_id, kind)
    return sorted((root / "store" / h[:2]).glob(f"{h}-*.vblk"))


def layout(path: Path) -> tuple[int, int, int, int]:
    """(record table offset, slot 0 offset, slot stride, block count) of a block file."""
    raw = path.read_bytes()[: len(B.MAGIC) + B.FIXED.size]
    hlen, region, _block_size, stride, count = B.FIXED.unpack_from(raw, len(B.MAGIC))
    table = -(-(len(B.MAGIC) + B.FIXED.size + hlen) // 8) * 8
    return table, region, stride, count


def records(path: Path) -> dict[int, tuple[int, int]]:
    """index -> (stored length, crc32) of every sound record of a block file."""
    name = path.name.removesuffix(".vblk")
    h, token = name.split("-")
    table, _region, _stride, count = layout(path)
    raw = path.read_bytes()
    out = {}
    seed = zlib.crc32(f"{h} {token}".encode())
    for index in range(count):
        rec = raw[table + index * B.RECORD.size : table + (index + 1) * B.RECORD.size]
        if len(rec) < B.RECORD.size:
            continue
        stored, crc, _atime, at, check = B.RECORD.unpack(rec)
        if stored and at == index and check == zlib.crc32(rec[:-4], seed):
            out[index] = (stored, crc)
    return out


def record_offset(path: Path, index: int) -> int:
    return layout(path)[0] + index * B.RECORD.size


def slot_offset(path: Path, index: int) -> int:
    _table, region, stride, _count = layout(path)
    return region + index * stride


def slot(path: Path, index: int) -> bytes:
    stored, _crc = records(path)[index]
    with open(path, "rb") as f:
        f.seek(slot_offset(path, index))
        return f.read(stored)


def block_count(root: Path) -> int:
    return sum(len(records(p)) for p in block_files(root))


def disk_bytes(root: Path) -> int:
    """The disk space the block files take (holes take none)."""
    total = 0
    for p in block_files(root):
        try:
            total += os.stat(p).st_blocks * 512
        except FileNotFoundError:
            continue
    return total


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def set_access(path: Path, index: int, when: float) -> None:
    """Rewrite a block's last access in its record, the way the store does on a hit."""
    stored, crc = records(path)[index]
    write_record(path, index, stored, crc, when)


def write_record(path: Path, index: int, stored: int, crc: int, when: float = 0.0) -> None:
    """A sound record for a slot, whatever the slot holds (as a bug or an attacker might)."""
    h, token = path.name.removesuffix(".vblk").split("-")
    fields = B.RECORD.pack(stored, crc, when, index, 0)[:-4]
    check = zlib.crc32(fields, zlib.crc32(f"{h} {token}".encode()))
    patch(path, record_offset(path, index), fields + struct.pack("<I", check))


def clear_record(path: Path, index: int) -> None:
    patch(path, record_offset(path, index), bytes(B.RECORD.size))
