"""The on-disk block cache of artifact bytes and the small JSON metadata store beside it."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .crypto import CacheKeyError, Cipher, load_key
from .defaults import default_key_file

log = logging.getLogger("vapifs.cache")

DEFAULT_BLOCK_SIZE = 1 << 20

# Block file format: MAGIC, a big-endian u32 header length, a JSON header, then the data.
MAGIC = b"VAPIFSB1"
_PREFIX = struct.Struct(">I")
_DATA_OFFSET = len(MAGIC) + _PREFIX.size
# A header is a few hundred bytes; anything far larger is damage, not a header.
_MAX_HEADER = 64 * 1024

# An encrypted cache's block and metadata files: ENC_MAGIC, then a sealed blob whose
# plaintext is what the unencrypted cache would have written (header included), and whose
# associated data is the file's identity, so that a blob moved to another name never opens.
ENC_MAGIC = b"VAPIFSE1"
# Present in an encrypted cache's root: a constant sealed with its key, to refuse another key
# before mounting rather than drop every block one by one.
KEYCHECK_NAME = "keycheck"
_KEYCHECK_PLAINTEXT = b"vapifs cache key check v1"
_KEYCHECK_AD = b"vapifs keycheck"

_DIR_MODE = 0o700
_FILE_MODE = 0o600

# A hit rewrites the block's mtime (the persisted LRU order) at most this often, so that a
# sequential read does not turn into one metadata write per block read.
_TOUCH_INTERVAL = 30.0

# open() deletes the temp files of writers that are no longer running (a kill -9), and any
# temp file older than this: a put lasts milliseconds, so anything this old was left by a
# crash, whatever its name says (a younger one may be a live put of another process).
_ORPHAN_AGE = 60.0

# A failing cache disk is one warning per root, blocks and metadata together, and again only
# this long after: a nearly full disk that takes small writes but refuses large ones would
# otherwise warn on every few blocks of a read.
_WARN_AGAIN_AFTER = 600.0
_write_warned: dict[str, float] = {}
_write_warned_lock = threading.Lock()

_BLOCK_NAME = re.compile(r"^([0-9a-f]{16})-(0|[1-9][0-9]*)\.blk$")
_TMP_NAME = re.compile(r"^([1-9][0-9]*)-[0-9a-f]+\.tmp$")
_HASH_NAME = re.compile(r"^[0-9a-f]{32}$")
_NS_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")

_Key = tuple[str, str, int]  # (artifact hash, version token, block index)


@dataclass(frozen=True)
class Version:
    """One version of an artifact on the server: its size plus whatever validators it sent."""

    size: int
    etag: str | None = None
    last_modified: str | None = None

    def token(self) -> str:
        # Asked for on every read: computed once per Version (frozen, so it cannot go stale).
        cached: str | None = self.__dict__.get("_token")
        if cached is None:
            raw = json.dumps([self.size, self.etag, self.last_modified], separators=(",", ":"))
            cached = hashlib.sha256(raw.encode()).hexdigest()[:16]
            object.__setattr__(self, "_token", cached)
        return cached

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "etag": self.etag, "last_modified": self.last_modified}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Version:
        size = d.get("size")
        etag = d.get("etag")
        last_modified = d.get("last_modified")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("version size must be a non-negative integer")
        if etag is not None and not isinstance(etag, str):
            raise ValueError("version etag must be a string or null")
        if last_modified is not None and not isinstance(last_modified, str):
            raise ValueError("version last_modified must be a string or null")
        return cls(size=size, etag=etag, last_modified=last_modified)


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
    size: int  # file size, header included: what counts against max_bytes
    atime: float  # last access (wall clock), for stats
    touched: float  # when the file's mtime was last set, to throttle os.utime


def _is_int(v: object) -> bool:
    # bool is an int subclass; a header saying `true` for an index is damage, not 1.
    return isinstance(v, int) and not isinstance(v, bool)


def _artifact_hash(call_id: str, kind: str) -> str:
    return hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:32]


def _ensure_dir(path: Path) -> None:
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
            os.mkdir(d, _DIR_MODE)
        except FileExistsError:
            continue  # another thread or process made it first
        os.chmod(d, _DIR_MODE)


def _write_all(fd: int, *parts: bytes) -> None:
    for part in parts:
        view = memoryview(part)
        while view:
            n = os.write(fd, view)
            if n <= 0:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            view = view[n:]


def _write_atomic(tmp_dir: Path, dest: Path, parts: tuple[bytes, ...], fsync: bool) -> None:
    """Write parts to a temp file, then rename it onto dest: dest is never seen half-written.

    Missing directories (the cache cleared by another process, or deleted by hand) are made
    again. On failure the temp file is removed and the OSError propagates.
    """
    # The writer's pid in the name lets open() tell a crash's leftovers from a live put.
    tmp = tmp_dir / f"{os.getpid()}-{os.urandom(8).hex()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    try:
        fd = os.open(tmp, flags, _FILE_MODE)
    except FileNotFoundError:
        _ensure_dir(tmp_dir)
        fd = os.open(tmp, flags, _FILE_MODE)
    try:
        try:
            os.fchmod(fd, _FILE_MODE)  # O_CREAT's mode is filtered by the umask
            _write_all(fd, *parts)
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
                _ensure_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: alive, another user's
    return True


def _read_file(path: Path) -> tuple[bytes, int]:
    """The whole file and its inode number, in one open."""
    with open(path, "rb", buffering=0) as f:
        ino = os.fstat(f.fileno()).st_ino
        return f.readall(), ino


def _read_plain_block(path: Path) -> tuple[bytes, bytes | None, int]:
    """(head, data, inode) of an unencrypted block file, the data read into its own bytes.

    Reading the header apart spares copying a whole block out of one big buffer. A file
    that does not start like a plain block comes back whole as the head, with data None.
    """
    with open(path, "rb", buffering=0) as f:
        ino = os.fstat(f.fileno()).st_ino
        head = f.read(_DATA_OFFSET)
        if len(head) == _DATA_OFFSET and head.startswith(MAGIC):
            (hlen,) = _PREFIX.unpack_from(head, len(MAGIC))
            if hlen <= _MAX_HEADER:
                head += f.read(hlen)
                return head, f.readall(), ino
        return head + f.readall(), None, ino


def _unlink_if_same(path: Path, ino: int) -> bool:
    """Delete path only if it is still the file we read: a put may have replaced it since."""
    try:
        if os.stat(path).st_ino != ino:
            return False
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def _strerror(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _write_failed(root: Path, error: OSError) -> None:
    """Log a failed cache write: a warning the first time, debug lines until the quiet time."""
    now = time.monotonic()
    with _write_warned_lock:
        last = _write_warned.get(str(root))
        warn = last is None or now - last >= _WARN_AGAIN_AFTER
        if warn:
            _write_warned[str(root)] = now
    if warn:
        log.warning(
            "cache: cannot write to %s (%s); reading from the network", root, _strerror(error)
        )
    else:
        log.debug("cache: write failed again: %s", _strerror(error))


class BlockCache:
    """Fixed-size blocks of artifacts on disk, each file self-checking, bounded by an LRU.

    Crash safety: a block is written to root/tmp and renamed into place, so a visible block
    is always whole as far as this process is concerned. Without fsync (the default, for
    speed) a power loss may still leave a renamed file whose data never reached the disk;
    such a block fails its header or crc32 check and is dropped on get, never served.

    With a cipher, every block file is sealed (see ENC_MAGIC), and one that does not
    authenticate is dropped like any damaged block. Sealing and opening happen in get and
    put, that is in the worker threads that do the file I/O.
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
        self._blocks_dir = self.root / "blocks"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.Lock()
        # Least recently used first.
        self._index: OrderedDict[_Key, _Entry] = OrderedDict()
        self._bytes = 0
        # Bytes promised to puts still writing, so concurrent puts cannot overshoot max_bytes.
        self._reserved = 0
        # Keys with a put in flight: never evicted, or the eviction's unlink could remove the
        # file that put has just renamed into place.
        self._writing: dict[_Key, int] = {}
        self.hits = 0
        self.misses = 0

    # -- paths ------------------------------------------------------------------------------

    def _artifact_dir(self, h: str) -> Path:
        return self._blocks_dir / h[:2] / h

    def _path(self, key: _Key) -> Path:
        h, token, index = key
        return self._artifact_dir(h) / f"{token}-{index}.blk"

    def _key(self, call_id: str, kind: str, version: Version, index: int) -> _Key:
        return (_artifact_hash(call_id, kind), version.token(), index)

    def _unseal(self, key: _Key, buf: bytes) -> bytes | None:
        """The plain block file inside buf (buf itself without a cipher); None if damaged."""
        if self.cipher is None:
            return buf
        if not buf.startswith(ENC_MAGIC):
            return None
        return self.cipher.open(memoryview(buf)[len(ENC_MAGIC) :], _block_ad(key))

    def _scan(self) -> Iterator[tuple[_Key, Path, os.stat_result]]:
        """Every block file on disk, whoever wrote it. Vanishing files are skipped."""
        try:
            prefixes = list(os.scandir(self._blocks_dir))
        except FileNotFoundError:
            return
        for pre in prefixes:
            if not pre.is_dir(follow_symlinks=False):
                continue
            try:
                artifacts = list(os.scandir(pre.path))
            except OSError:
                continue
            for art in artifacts:
                if not (art.is_dir(follow_symlinks=False) and _HASH_NAME.match(art.name)):
                    continue
                if art.name[:2] != pre.name:
                    continue
                yield from self._scan_artifact(art.name)

    def _scan_artifact(self, h: str) -> Iterator[tuple[_Key, Path, os.stat_result]]:
        try:
            files = list(os.scandir(self._artifact_dir(h)))
        except OSError:
            return
        for f in files:
            m = _BLOCK_NAME.match(f.name)
            if m is None:
                continue
            try:
                st = f.stat(follow_symlinks=False)
            except OSError:
                continue
            yield (h, m.group(1), int(m.group(2))), Path(f.path), st

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Create the directories, drop crash leftovers, rebuild the index from disk."""
        _ensure_dir(self.root)  # a root made here is 0700; an existing one is the user's
        for d in (self._blocks_dir, self._tmp_dir):
            _ensure_dir(d)
            os.chmod(d, _DIR_MODE)
        self._remove_orphans()
        found = sorted(self._scan(), key=lambda item: item[2].st_mtime)
        with self._lock:
            self._index.clear()
            self._bytes = 0
            for key, _path, st in found:
                self._index[key] = _Entry(st.st_size, st.st_mtime, st.st_mtime)
                self._bytes += st.st_size
            dropped = self._make_room_locked(0)
        if dropped:
            log.info("cache: evicted %d blocks to fit %d bytes", dropped, self.max_bytes)

    def _remove_orphans(self) -> None:
        now = time.time()
        try:
            entries = list(os.scandir(self._tmp_dir))
        except OSError:
            return
        for e in entries:
            if not e.name.endswith(".tmp"):
                continue
            try:
                writer = _TMP_NAME.match(e.name)
                if (writer is not None and not _alive(int(writer.group(1)))) or (
                    now - e.stat(follow_symlinks=False).st_mtime >= _ORPHAN_AGE
                ):
                    os.unlink(e.path)
            except OSError:
                continue

    # -- blocks -----------------------------------------------------------------------------

    def block_length(self, version: Version, index: int) -> int:
        start = index * self.block_size
        if index < 0 or start >= version.size:
            raise ValueError(f"block {index} is outside an artifact of {version.size} bytes")
        return min(self.block_size, version.size - start)

    @property
    def bytes_used(self) -> int:
        """Bytes of the block files in the index (puts still writing not included)."""
        with self._lock:
            return self._bytes

    def has(self, call_id: str, kind: str, version: Version, index: int) -> bool:
        key = self._key(call_id, kind, version, index)
        with self._lock:
            return key in self._index

    def get(self, call_id: str, kind: str, version: Version, index: int) -> bytes | None:
        length = self.block_length(version, index)
        key = self._key(call_id, kind, version, index)
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                self.misses += 1
                return None
        path = self._path(key)
        try:
            if self.cipher is None:
                head, body, ino = _read_plain_block(path)
            else:
                (head, ino), body = _read_file(path), None
        except FileNotFoundError:
            # Cleared or evicted by someone else: a plain miss.
            with self._lock:
                self._forget_locked(key, entry)
                self.misses += 1
            return None
        except OSError as e:
            log.debug("cache: cannot read a block of %s/%s #%d: %s", call_id, kind, index, e)
            with self._lock:
                self.misses += 1
            return None

        if body is not None:
            data = self._check(head, body, call_id, kind, version, index, length)
        else:
            plain = self._unseal(key, head)
            data = (
                None
                if plain is None
                else self._check(plain, None, call_id, kind, version, index, length)
            )
        if data is None:
            with self._lock:
                try:
                    _unlink_if_same(path, ino)
                except OSError as e:
                    log.debug("cache: cannot delete %s: %s", path, e)
                self._forget_locked(key, entry)
                self.misses += 1
            log.warning(
                "cache: dropped a damaged block of %s/%s #%d; fetching it again",
                call_id,
                kind,
                index,
            )
            return None

        now = time.time()
        with self._lock:
            self.hits += 1
            touch = False
            if self._index.get(key) is entry:
                self._index.move_to_end(key)
                entry.atime = now
                if now - entry.touched >= _TOUCH_INTERVAL:
                    entry.touched = now
                    touch = True
        if touch:
            # A failure costs only the LRU order after a remount.
            with contextlib.suppress(OSError):
                os.utime(path)
        return data

    @staticmethod
    def _check(
        buf: bytes,
        body: bytes | None,
        call_id: str,
        kind: str,
        version: Version,
        index: int,
        length: int,
    ) -> bytes | None:
        """The data of a block file if it is whole and exactly the block asked for.

        `buf` is the whole file, or only its head when `body` holds the data apart.
        """
        parsed = _parse_block(buf, body)
        if parsed is None:
            return None
        header, data = parsed
        if (
            header.get("call_id") != call_id
            or header.get("kind") != kind
            or header.get("version") != version.to_json()
            or header.get("index") != index
            or header.get("length") != length
            or len(data) != length
        ):
            return None
        return data if isinstance(data, bytes) else bytes(data)

    def put(self, call_id: str, kind: str, version: Version, index: int, data: bytes) -> bool:
        length = self.block_length(version, index)
        if len(data) != length:
            raise ValueError(f"block {index} must hold {length} bytes, not {len(data)}")
        key = self._key(call_id, kind, version, index)
        header = json.dumps(
            {
                "call_id": call_id,
                "kind": kind,
                "version": version.to_json(),
                "index": index,
                "length": length,
                "crc32": zlib.crc32(memoryview(data)),
            },
            separators=(",", ":"),
        ).encode()
        prefix = MAGIC + _PREFIX.pack(len(header)) + header
        parts: tuple[bytes, ...] = (prefix, data)
        if self.cipher is not None:
            parts = (ENC_MAGIC, self.cipher.seal(prefix + data, _block_ad(key)))
        total = sum(map(len, parts))
        if total > self.max_bytes:
            return False

        with self._lock:
            if self._make_room_locked(total) is None:
                return False  # the room left is all promised to puts in flight
            self._reserved += total
            self._writing[key] = self._writing.get(key, 0) + 1

        error: OSError | None = None
        written = False
        try:
            _write_atomic(self._tmp_dir, self._path(key), parts, self.fsync)
            written = True
        except OSError as e:
            error = e
        finally:
            now = time.time()
            with self._lock:
                self._reserved -= total
                left = self._writing[key] - 1
                if left:
                    self._writing[key] = left
                else:
                    del self._writing[key]
                if written:
                    old = self._index.pop(key, None)
                    if old is not None:
                        self._bytes -= old.size
                    self._index[key] = _Entry(total, now, now)
                    self._bytes += total
        if error is not None:
            _write_failed(self.root, error)
            return False
        return True

    def _make_room_locked(self, need: int) -> int | None:
        """Evict LRU blocks until need more bytes fit; None if that is impossible."""
        dropped = 0
        if self._bytes + self._reserved + need <= self.max_bytes:
            return dropped
        victims: list[_Key] = []
        free = self.max_bytes - self._bytes - self._reserved - need
        for key, entry in self._index.items():
            if free >= 0:
                break
            if key in self._writing:
                continue
            victims.append(key)
            free += entry.size
        if free < 0:
            return None
        # Unlinked under the lock so that no put of the same key can land in between.
        for key in victims:
            entry = self._index.pop(key)
            self._bytes -= entry.size
            try:
                os.unlink(self._path(key))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.debug("cache: cannot evict %s: %s", self._path(key), e)
            dropped += 1
        return dropped

    def _forget_locked(self, key: _Key, entry: _Entry | None) -> None:
        """Drop key from the index, unless a put has replaced its entry meanwhile."""
        current = self._index.get(key)
        if current is not None and (entry is None or current is entry):
            del self._index[key]
            self._bytes -= current.size

    # -- whole artifacts and the whole cache -------------------------------------------------

    def drop_other_versions(self, call_id: str, kind: str, keep: Version) -> int:
        token = keep.token()
        return self._drop(_artifact_hash(call_id, kind), lambda t: t != token)

    def drop_artifact(self, call_id: str, kind: str) -> int:
        return self._drop(_artifact_hash(call_id, kind), lambda _t: True)

    def _drop(self, h: str, doomed: Callable[[str], bool]) -> int:
        on_disk = [(key, path) for key, path, _st in self._scan_artifact(h) if doomed(key[1])]
        dropped = 0
        with self._lock:
            keys = {key for key, _ in on_disk}
            keys.update(k for k in self._index if k[0] == h and doomed(k[1]))
            for key in keys:
                self._forget_locked(key, None)
                try:
                    os.unlink(self._path(key))
                    dropped += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.debug("cache: cannot delete %s: %s", self._path(key), e)
        return dropped

    def clear(self) -> int:
        """Delete every block. Another process using the same root sees plain misses."""
        dropped = 0
        with self._lock:
            for _key, path, _st in list(self._scan()):
                try:
                    os.unlink(path)
                    dropped += 1
                except OSError:
                    continue
            # Empty directories go too; one refilled meanwhile stays (ENOTEMPTY), and a put
            # that finds its directory gone makes it again.
            try:
                prefixes = list(os.scandir(self._blocks_dir))
            except OSError:
                prefixes = []
            for pre in prefixes:
                if not pre.is_dir(follow_symlinks=False):
                    continue
                try:
                    for art in list(os.scandir(pre.path)):
                        with contextlib.suppress(OSError):
                            os.rmdir(art.path)
                    os.rmdir(pre.path)
                except OSError:
                    continue
            self._index.clear()
            self._bytes = 0
        return dropped

    def verify(self) -> VerifyReport:
        """Read every block file on disk and delete those that are not internally whole."""
        checked = bad = bad_bytes = 0
        for key, path, st in list(self._scan()):
            checked += 1
            try:
                buf, ino = _read_file(path)
            except FileNotFoundError:
                checked -= 1
                continue
            except OSError:
                buf, ino = b"", st.st_ino
            if self._consistent(key, buf):
                continue
            bad += 1
            bad_bytes += st.st_size
            with self._lock:
                try:
                    _unlink_if_same(path, ino)
                except OSError as e:
                    log.debug("cache: cannot delete %s: %s", path, e)
                self._forget_locked(key, None)
        return VerifyReport(checked=checked, bad=bad, bad_bytes=bad_bytes)

    def _consistent(self, key: _Key, buf: bytes) -> bool:
        plain = self._unseal(key, buf)
        parsed = None if plain is None else _parse_block(plain)
        if parsed is None:
            return False
        header, data = parsed
        h, token, index = key
        call_id, kind = header.get("call_id"), header.get("kind")
        raw_version = header.get("version")
        if not (isinstance(call_id, str) and isinstance(kind, str)):
            return False
        if not isinstance(raw_version, dict) or header.get("index") != index:
            return False
        try:
            version = Version.from_json(raw_version)
            expected = self.block_length(version, index)
        except ValueError:
            return False
        return (
            _artifact_hash(call_id, kind) == h
            and version.token() == token
            and header.get("length") == expected == len(data)
        )

    def stats(self) -> CacheStats:
        with self._lock:
            entries = list(self._index.items())
        atimes = [e.atime for _k, e in entries]
        return CacheStats(
            bytes=sum(e.size for _k, e in entries),
            blocks=len(entries),
            artifacts=len({k[0] for k, _e in entries}),
            oldest_access=min(atimes) if atimes else None,
            newest_access=max(atimes) if atimes else None,
        )


def _block_ad(key: _Key) -> bytes:
    # The artifact hash stands for call id + kind: a file's name is all verify knows of it.
    h, token, index = key
    return f"vapifs block {h} {token} {index}".encode()


def _parse_block(
    buf: bytes, body: bytes | None = None
) -> tuple[dict[str, Any], bytes | memoryview] | None:
    """Header and data of a block file whose magic, header and crc32 are sound.

    With `body`, `buf` is only the file's head (magic, length, header) and `body` the rest.
    """
    if len(buf) < _DATA_OFFSET or not buf.startswith(MAGIC):
        return None
    (hlen,) = _PREFIX.unpack_from(buf, len(MAGIC))
    end = _DATA_OFFSET + hlen
    if hlen > _MAX_HEADER or end > len(buf) or (body is not None and end != len(buf)):
        return None
    try:
        header = json.loads(buf[_DATA_OFFSET:end])
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(header, dict):
        return None
    index, length, crc = header.get("index"), header.get("length"), header.get("crc32")
    if not (_is_int(index) and _is_int(length) and _is_int(crc)):
        return None
    data: bytes | memoryview = memoryview(buf)[end:] if body is None else body
    if zlib.crc32(data) != crc:
        return None
    return header, data


def _meta_ad(ns: str, key_hash: str) -> bytes:
    return f"vapifs meta {ns} {key_hash}".encode()


class MetaStore:
    """Small JSON documents (artifact versions, call objects, listings) keyed by namespace.

    With a cipher, every document file is sealed (see ENC_MAGIC); one that does not
    authenticate is deleted, with a warning, and its document is found again at its source.
    """

    def __init__(self, root: Path, cipher: Cipher | None = None) -> None:
        self.root = Path(root)
        self.cipher = cipher
        self._meta_dir = self.root / "meta"
        self._tmp_dir = self.root / "tmp"

    def _ns_dir(self, ns: str) -> Path:
        if not _NS_NAME.match(ns):
            raise ValueError(f"bad metadata namespace {ns!r}")
        return self._meta_dir / ns

    def _path(self, ns: str, key: str) -> Path:
        return self._ns_dir(ns) / f"{_key_hash(key)}.json"

    def _load(self, path: Path) -> tuple[str, dict[str, Any]] | None:
        """(key, doc) of a document file; None when absent; a corrupt file is deleted."""
        try:
            raw, ino = _read_file(path)
        except FileNotFoundError:
            return None
        except OSError as e:
            log.debug("cache: cannot read %s: %s", path, e)
            return None
        if self.cipher is not None:
            ad = _meta_ad(path.parent.name, path.stem)
            plain = None
            if raw.startswith(ENC_MAGIC):
                plain = self.cipher.open(memoryview(raw)[len(ENC_MAGIC) :], ad)
            if plain is None:
                log.warning(
                    "cache: dropped a damaged %s document; fetching it again", path.parent.name
                )
                with contextlib.suppress(OSError):
                    _unlink_if_same(path, ino)
                return None
            raw = plain
        try:
            wrapper = json.loads(raw)
        except ValueError:
            wrapper = None
        if (
            isinstance(wrapper, dict)
            and isinstance(wrapper.get("key"), str)
            and isinstance(wrapper.get("doc"), dict)
            and path.name == f"{_key_hash(wrapper['key'])}.json"
        ):
            return wrapper["key"], wrapper["doc"]
        log.debug("cache: deleting the unreadable metadata file %s", path)
        with contextlib.suppress(OSError):
            _unlink_if_same(path, ino)
        return None

    def get(self, ns: str, key: str) -> dict[str, Any] | None:
        loaded = self._load(self._path(ns, key))
        if loaded is None or loaded[0] != key:
            return None
        return loaded[1]

    def put(self, ns: str, key: str, doc: dict[str, Any]) -> bool:
        path = self._path(ns, key)
        body = json.dumps({"key": key, "doc": doc}, separators=(",", ":")).encode()
        parts: tuple[bytes, ...] = (body,)
        if self.cipher is not None:
            parts = (ENC_MAGIC, self.cipher.seal(body, _meta_ad(ns, path.stem)))
        try:
            _ensure_dir(path.parent)
            _write_atomic(self._tmp_dir, path, parts, fsync=False)
        except OSError as e:
            _write_failed(self.root, e)
            return False
        return True

    def delete(self, ns: str, key: str) -> None:
        try:
            os.unlink(self._path(ns, key))
        except FileNotFoundError:
            pass
        except OSError as e:
            log.debug("cache: cannot delete metadata %s/%s: %s", ns, _key_hash(key), e)

    def items(self, ns: str) -> list[tuple[str, dict[str, Any]]]:
        try:
            names = sorted(os.listdir(self._ns_dir(ns)))
        except OSError:
            return []
        out: list[tuple[str, dict[str, Any]]] = []
        for name in names:
            if not name.endswith(".json"):
                continue
            loaded = self._load(self._ns_dir(ns) / name)
            if loaded is not None:
                out.append(loaded)
        return out

    def clear(self) -> None:
        try:
            namespaces = list(os.scandir(self._meta_dir))
        except OSError:
            return
        for ns in namespaces:
            if not ns.is_dir(follow_symlinks=False):
                continue
            try:
                for f in os.scandir(ns.path):
                    if f.name.endswith(".json"):
                        with contextlib.suppress(OSError):
                            os.unlink(f.path)
                os.rmdir(ns.path)
            except OSError:
                continue


# -- encryption at rest ------------------------------------------------------------------------

CacheFormat = Literal["empty", "plain", "encrypted"]


def stored_format(root: Path) -> CacheFormat:
    """How the cache in root was written: told by its key check, else by one data file."""
    if (root / KEYCHECK_NAME).exists():
        return "encrypted"
    for pattern in ("blocks/*/*/*.blk", "meta/*/*.json"):
        for path in root.glob(pattern):
            try:
                with open(path, "rb") as f:
                    head = f.read(len(ENC_MAGIC))
            except OSError:
                continue
            return "encrypted" if head == ENC_MAGIC else "plain"
    return "empty"


def cache_cipher(root: Path, encrypt: bool, key_file: Path | None = None) -> Cipher | None:
    """The cipher for the cache in root (None: unencrypted), once it is sure that the cache
    was written that way and, when encrypted, with this key: a cache is never a mix.

    The key file is created (with a random key) only for a cache that holds nothing yet.
    Raises CacheKeyError with a one-line reason.
    """
    found = stored_format(root)
    if not encrypt:
        if found == "encrypted":
            raise CacheKeyError(
                f"the cache in {root} is encrypted: use --encrypt-cache (with its "
                "--cache-key-file), or another --cache-dir"
            )
        return None
    if found == "plain":
        raise CacheKeyError(
            f"the cache in {root} is not encrypted: clear it first "
            f"(vapifs cache clear --cache-dir {root}) or use another --cache-dir"
        )
    path = key_file or default_key_file()
    if found == "encrypted" and not path.exists():
        raise CacheKeyError(
            f"the cache in {root} was encrypted with another key ({path} does not exist): "
            f"give its --cache-key-file, or start afresh with vapifs cache clear --cache-dir {root}"
        )
    cipher = Cipher(load_key(path, create=found == "empty"))
    if _keycheck(root, cipher) != _KEYCHECK_PLAINTEXT:
        raise CacheKeyError(
            f"the cache in {root} was encrypted with another key than {path}: give its "
            f"--cache-key-file, or start afresh with vapifs cache clear --cache-dir {root}"
        )
    return cipher


def _keycheck(root: Path, cipher: Cipher) -> bytes | None:
    """What the key check of root opens to with cipher; a new cache gets one made with it."""
    path = root / KEYCHECK_NAME
    try:
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            _ensure_dir(root)
            blob = ENC_MAGIC + cipher.seal(_KEYCHECK_PLAINTEXT, _KEYCHECK_AD)
            tmp = root / f".{KEYCHECK_NAME}.{os.getpid()}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, _FILE_MODE)
            try:
                try:
                    _write_all(fd, blob)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                # link() never replaces: when another process marked the cache first, its
                # key check is the one that counts.
                os.link(tmp, path)
            except FileExistsError:
                blob = path.read_bytes()
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
    except OSError as e:
        raise CacheKeyError(f"cannot use the cache in {root}: {_strerror(e)}") from None
    if not blob.startswith(ENC_MAGIC):
        return None
    return cipher.open(memoryview(blob)[len(ENC_MAGIC) :], _KEYCHECK_AD)


def forget_encryption(root: Path) -> None:
    """After a clear: the next user of root may choose anew (no key, or another key)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(root / KEYCHECK_NAME)
