"""The cache's files on disk: modes, directories, atomic writes, crash leftovers, write failures."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import threading
import time
from pathlib import Path

log = logging.getLogger("vapifs.cache")

# Every sealed file of an encrypted cache starts with ENC_MAGIC, then a sealed blob whose
# associated data is the file's identity, so that a blob moved to another name never opens.
ENC_MAGIC = b"VAPIFSE1"
# Where a block file's header blob starts, after its magic and fixed fields (see blockfile.py):
# enough for atrest to tell a sealed cache from a plain one without knowing block files.
BLOCK_HEADER_AT = 32

DIR_MODE = 0o700
FILE_MODE = 0o600

# remove_orphans() deletes the temp files of writers that are no longer running (a kill -9),
# and any temp file older than this: a write lasts milliseconds, so anything this old was left
# by a crash, whatever its name says (a younger one may be a live write of another process).
ORPHAN_AGE = 60.0

# A failing cache disk is one warning per root, blocks and metadata together, and again only
# this long after: a nearly full disk that takes small writes but refuses large ones would
# otherwise warn on every few blocks of a read.
WARN_AGAIN_AFTER = 600.0
_write_warned: dict[str, float] = {}
_write_warned_lock = threading.Lock()

_TMP_NAME = re.compile(r"^([1-9][0-9]*)-[0-9a-f]+\.tmp$")


def ensure_dir(path: Path) -> None:
    """Create path and any missing parents with mode 0700 whatever the umask."""
    missing: list[Path] = []
    p = path
    while not p.is_dir():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            continue  # another thread or process made it first
        os.chmod(d, DIR_MODE)


def write_all(fd: int, *parts: bytes) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            view = view[n:]


def write_atomic(tmp_dir: Path, dest: Path, parts: tuple[bytes, ...], fsync: bool) -> None:
    """Write parts to a temp file, then rename it onto dest: dest is never seen half-written.

    Missing directories (the cache cleared by another process, or deleted by hand) are made
    again. On failure the temp file is removed and the OSError propagates.
    """
    # The writer's pid in the name lets open() tell a crash's leftovers from a live put.
    tmp = tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, FILE_MODE)
    except FileNotFoundError:
        ensure_dir(tmp_dir)
        fd = os.open(tmp, flags, FILE_MODE)
    try:
        try:
            os.fchmod(fd, FILE_MODE)  # O_CREAT's mode is filtered by the umask
            write_all(fd, *parts)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        for attempt in range(3):
            try:
                os.replace(tmp, dest)
                break
            except FileNotFoundError:
                # Either dest's directory went away (make it again) or our temp file did.
                if attempt == 2 or not tmp.exists():
                    raise
                ensure_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    return True


def remove_orphans(tmp_dir: Path) -> None:
    """Delete the temp files that crashed writers left in tmp_dir."""
    now = time.time()
    try:
        entries = list(os.scandir(tmp_dir))
    except OSError:
        return
    for e in entries:
        if not e.name.endswith(".tmp"):
            continue
        try:
            writer = _TMP_NAME.match(e.name)
            if (writer is not None and not alive(int(writer.group(1)))) or (
                now - e.stat(follow_symlinks=False).st_mtime >= ORPHAN_AGE
            ):
                os.unlink(e.path)
        except OSError:
            continue


def read_file(path: Path) -> tuple[bytes, int]:
    """The whole file and its inode number, in one open."""
    with open(path, "rb", buffering=0) as f:
        ino = os.fstat(f.fileno()).st_ino
        return f.readall(), ino


def unlink_if_same(path: Path, ino: int) -> bool:
    """Delete path only if it is still the file we read: a put may have replaced it since."""
    try:
        if os.stat(path).st_ino != ino:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def strerror(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def write_failed(root: Path, error: OSError) -> None:
    """Log a failed cache write: a warning the first time, debug lines until the quiet time."""
    now = time.monotonic()
    with _write_warned_lock:
        last = _write_warned.get(str(root))
        warn = last is None or now - last >= WARN_AGAIN_AFTER
        if warn:
            _write_warned[str(root)] = now
    if warn:
        log.warning(
            "cache: cannot write to %s (%s); reading from the network", root, strerror(error)
        )
    else:
        log.debug("cache: write failed again: %s", strerror(error))
