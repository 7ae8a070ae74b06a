"""The open-file table: block files' descriptors kept open for the next read, 64 at most.

A descriptor is used outside the store's lock (a pread of a block), so a file counts its
users and is closed only by the last one. Before a descriptor is handed out, the file's
path must still name the file it has open: another process may have deleted or replaced it.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable

from .blockfile import BlockFile, FileKey

log = logging.getLogger("vapifs.cache")

# Open block files kept for reuse, least recently used closed first.
OPEN_FILES = 64


class FileGone(Exception):
    """The path no longer names the file that was open: it was deleted or replaced."""


class OpenFiles:
    """Descriptors of block files, shared by the threads using the store (under its lock)."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._open: OrderedDict[FileKey, BlockFile] = OrderedDict()  # files whose fd is open

    def add_locked(self, f: BlockFile, fd: int) -> None:
        """f now holds fd open (a file just made or found by a writer)."""
        f.fd = fd
        self._open[f.key] = f

    def acquire_locked(self, f: BlockFile) -> None:
        f.users += 1
        if self._open.get(f.key) is f:
            self._open.move_to_end(f.key)

    def release_locked(self, f: BlockFile) -> None:
        f.users -= 1
        if f.users == 0 and not f.alive and f.fd >= 0:
            os.close(f.fd)
            f.fd = -1
        self._close_idle_locked()

    def release(self, f: BlockFile) -> None:
        with self._lock:
            self.release_locked(f)

    def drop_locked(self, f: BlockFile) -> None:
        """f is forgotten: out of the table, and closed unless a thread still uses it."""
        if self._open.get(f.key) is f:
            del self._open[f.key]
        if f.users == 0 and f.fd >= 0:
            os.close(f.fd)
            f.fd = -1

    def close_all_locked(self, known: Iterable[BlockFile]) -> None:
        """Before the index is built again: every file known so far is forgotten; one still
        in use is closed by its last user."""
        for f in [*known, *self._open.values()]:
            f.alive = False
            if f.fd >= 0 and f.users == 0:
                os.close(f.fd)
                f.fd = -1
        self._open.clear()

    def _close_idle_locked(self) -> None:
        while len(self._open) > OPEN_FILES:
            idle = next((fk for fk, f in self._open.items() if f.users == 0), None)
            if idle is None:
                return
            f = self._open.pop(idle)
            if f.fd >= 0:
                os.close(f.fd)
                f.fd = -1

    def fd(self, f: BlockFile) -> int | None:
        """f's descriptor (f acquired by the caller); None when it cannot be opened now (out
        of descriptors, a disk error: a miss, f is kept). Raises FileGone when the file on
        disk is no longer f (deleted, or replaced by another process)."""
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
                fd = self._open_path(f)
                if fd >= 0:
                    if os.fstat(fd).st_ino == f.ino:
                        return self._keep(f, fd)
                    os.close(fd)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cache: cannot open %s: %s", f.path, e)
            return None
        raise FileGone(f.path)

    @staticmethod
    def _open_path(f: BlockFile) -> int:
        """f's path opened for writing if it can be, else for reading; -1 when it is gone."""
        try:
            return os.open(f.path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return -1
        except PermissionError:  # a read-only file: reads still work
            return os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            return os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)

    def _keep(self, f: BlockFile, fd: int) -> int | None:
        """fd, just opened on f, becomes f's; or another thread's, opened meanwhile, is used."""
        with self._lock:
            if f.fd < 0 and f.alive:
                self.add_locked(f, fd)
                self._open.move_to_end(f.key)
                self._close_idle_locked()
                return fd
            current = f.fd
        os.close(fd)
        return current if current >= 0 else None
