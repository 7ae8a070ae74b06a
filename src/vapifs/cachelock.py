"""One process per cache dir: a lock on CACHE_DIR/lock, which names the process holding it."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_NAME = "lock"


class CacheInUse(Exception):
    """Another process uses the cache dir; the message is one line saying who and what to do."""


class CacheLock:
    """An exclusive flock on the cache dir's lock file, held until `release` or until the
    process ends (however it ends: the kernel drops a dead process's locks, so a kill -9
    leaves nothing to clean up)."""

    def __init__(self, fd: int, what: str) -> None:
        self._fd: int | None = fd
        self.what = what

    def claim(self) -> None:
        """Write this process's pid into the lock file (again after a fork: the lock is
        shared with the child, which is the process that goes on using the dir)."""
        if self._fd is None:
            return
        text = f"{os.getpid()} {self.what}\n".encode()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, text, 0)

    def forget(self) -> None:
        """Close this process's handle without unlocking (a forked child still holds it)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        self.forget()


def holder(cache_dir: Path) -> tuple[int, str] | None:
    """(pid, what) of the process that holds the lock, as it wrote them; None if unknown."""
    try:
        text = (cache_dir / LOCK_NAME).read_text(errors="replace").strip()
    except OSError:
        return None
    pid, _, what = text.partition(" ")
    return (int(pid), what) if pid.isdigit() else None


def lock_cache(cache_dir: Path, what: str) -> CacheLock:
    """Take the cache dir for this process (`what`: "mount on /x", "prefetch"), or raise
    CacheInUse naming the process that has it.

    Two processes on one dir would each hold their own size cap and index: one at a time
    keeps --cache-size a cap on the disk. A mount's own readers (prefetch through a mount,
    `vapifs cache stats|verify|clear`) do not take it.
    """
    path = cache_dir / LOCK_NAME
    try:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise CacheInUse(f"cannot use the cache dir {cache_dir}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        who = holder(cache_dir)
        name = f"process {who[0]} ({who[1]})" if who else "another process"
        raise CacheInUse(
            f"the cache dir {cache_dir} is in use by {name}: stop it, or give this one "
            "another --cache-dir (vapifs prefetch reads through a running mount by itself)"
        ) from None
    lock = CacheLock(fd, what)
    lock.claim()
    return lock
