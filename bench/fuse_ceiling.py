"""The FUSE ceiling: a minimal pyfuse3 file system serving one file from memory.

    python bench/fuse_ceiling.py SOURCE MOUNTPOINT [--no-keep-cache]

MOUNTPOINT/<name of SOURCE> holds SOURCE's bytes, loaded into memory first. Reads are
slices of one bytes object: no network, no disk, no locking, so a read through it measures
what pyfuse3 on trio and the kernel's FUSE path cost and nothing else. Like vapifs it raises
the mount's read-ahead to 4 MiB. Prints "ready" once mounted; SIGTERM or SIGINT unmounts.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from typing import Any

import pyfuse3
import trio

FILE_INODE = 2


class MemoryFS(pyfuse3.Operations):
    def __init__(self, name: bytes, data: bytes, keep_cache: bool) -> None:
        super().__init__()
        self.name = name
        self.data = data
        self.keep_cache = keep_cache

    def _attrs(self, inode: int) -> Any:
        attrs = pyfuse3.EntryAttributes()
        attrs.st_ino = inode
        if inode == pyfuse3.ROOT_INODE:
            attrs.st_mode = stat.S_IFDIR | 0o555
            attrs.st_nlink = 2
        elif inode == FILE_INODE:
            attrs.st_mode = stat.S_IFREG | 0o444
            attrs.st_nlink = 1
            attrs.st_size = len(self.data)
        else:
            raise pyfuse3.FUSEError(errno.ENOENT)
        attrs.st_blksize = 1 << 20
        attrs.st_blocks = (attrs.st_size + 511) // 512
        attrs.entry_timeout = attrs.attr_timeout = 3600.0
        return attrs

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE or name != self.name:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(FILE_INODE)

    async def opendir(self, inode: int, ctx: Any) -> int:
        if inode != pyfuse3.ROOT_INODE:
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, self.name, self._attrs(FILE_INODE), 1)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if inode != FILE_INODE:
            raise pyfuse3.FUSEError(errno.EISDIR)
        return pyfuse3.FileInfo(fh=inode, keep_cache=self.keep_cache)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return self.data[off : off + size]


def _raise_read_ahead(mountpoint: str, kib: int = 4096) -> None:
    dev = os.stat(mountpoint).st_dev
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write(str(kib))
    except OSError:
        pass


async def serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:

        async def announce() -> None:
            await trio.to_thread.run_sync(_raise_read_ahead, mountpoint)
            print("ready", flush=True)

        async def on_signals() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(announce)
        nursery.start_soon(on_signals)
        try:
            await pyfuse3.main()
        finally:
            nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a pyfuse3 file system serving one file")
    parser.add_argument("source")
    parser.add_argument("mountpoint")
    parser.add_argument("--no-keep-cache", action="store_true")
    args = parser.parse_args(argv)
    with open(args.source, "rb") as f:
        data = f.read()
    fs = MemoryFS(os.path.basename(args.source).encode(), data, not args.no_keep_cache)
    options = set(pyfuse3.default_options)
    options.update({"fsname=fuse-ceiling", "ro"})
    pyfuse3.init(fs, args.mountpoint, options)
    try:
        trio.run(serve, args.mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
