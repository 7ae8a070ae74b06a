"""Candidate block layouts for the disk cache, measured on this disk (bench/layouts.py DIR).

Each candidate stores one artifact of --mib MiB as 1 MiB blocks the way the cache would
(checksummed, crash-safe), then reads it back with the checksum checked, and does it again
--rounds times in the same directory (deleting between rounds, as eviction does), because
file creation on ext4 slows down where many files were recently deleted:
- file-per-block: a temp file per block, written then renamed into place (the old layout);
- extents: one file per 8 blocks, blocks written with pwrite, an index record after each;
- sparse: one sparse file per artifact version, blocks written with pwrite at their place
  and an index record (length, crc32) after each; read back through one open descriptor.
Prints one JSON line per candidate: write and read MB/s (median of the rounds) and opens.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
RECORD = struct.Struct("<IIQ")  # length, crc32, stamp: the shape of an index record


def file_per_block(root: Path, blocks: list[bytes]) -> tuple[float, float, int]:
    tmp = root / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, data in enumerate(blocks):
        header = json.dumps({"index": i, "length": len(data), "crc32": zlib.crc32(data)}).encode()
        t = tmp / f"{os.getpid()}-{i}.tmp"
        fd = os.open(t, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, struct.pack(">I", len(header)) + header)
        os.write(fd, data)
        os.close(fd)
        os.replace(t, root / f"{i}.blk")
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(len(blocks)):
        with open(root / f"{i}.blk", "rb", buffering=0) as f:
            (hlen,) = struct.unpack(">I", f.read(4))
            header = json.loads(f.read(hlen))
            data = f.readall()
        assert zlib.crc32(data) == header["crc32"]
    return write, time.perf_counter() - t0, 2 * len(blocks)


def packed(root: Path, blocks: list[bytes], per_file: int) -> tuple[float, float, int]:
    n = len(blocks)
    files = (n + per_file - 1) // per_file
    index_bytes = 4096
    opens = 0
    t0 = time.perf_counter()
    fds = []
    for k in range(files):
        fd = os.open(root / f"{k}.dat", os.O_RDWR | os.O_CREAT, 0o600)
        opens += 1
        fds.append(fd)
    for i, data in enumerate(blocks):
        fd = fds[i // per_file]
        slot = i % per_file
        os.pwrite(fd, data, index_bytes + slot * MiB)
        os.pwrite(fd, RECORD.pack(len(data), zlib.crc32(data), 1), slot * RECORD.size)
    for fd in fds:
        os.close(fd)
    write = time.perf_counter() - t0
    t0 = time.perf_counter()
    fds = []
    for k in range(files):
        fds.append(os.open(root / f"{k}.dat", os.O_RDONLY))
        opens += 1
    for i in range(n):
        fd = fds[i // per_file]
        slot = i % per_file
        length, crc, _ = RECORD.unpack(os.pread(fd, RECORD.size, slot * RECORD.size))
        data = os.pread(fd, length, index_bytes + slot * MiB)
        assert zlib.crc32(data) == crc
    for fd in fds:
        os.close(fd)
    return write, time.perf_counter() - t0, opens


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dir")
    parser.add_argument("--mib", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(args.dir)
    seed = os.urandom(MiB)
    blocks = [bytes([i & 0xFF]) + seed[1:] for i in range(args.mib)]
    size = args.mib * MiB
    candidates: dict[str, Callable[[Path], tuple[float, float, int]]] = {
        "file-per-block": lambda root: file_per_block(root, blocks),
        "extents-8": lambda root: packed(root, blocks, 8),
        "sparse-per-version": lambda root: packed(root, blocks, len(blocks)),
    }
    for name, run in candidates.items():
        writes, reads, opens = [], [], 0
        for _ in range(args.rounds):
            root = base / name
            shutil.rmtree(root, ignore_errors=True)
            root.mkdir(parents=True)
            w, r, opens = run(root)
            writes.append(w)
            reads.append(r)
        shutil.rmtree(base / name, ignore_errors=True)
        out = {
            "layout": name,
            "write_mb_s": round(size / statistics.median(writes) / 1e6),
            "read_mb_s": round(size / statistics.median(reads) / 1e6),
            "opens": opens,
        }
        print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
