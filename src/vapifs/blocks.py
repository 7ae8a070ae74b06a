"""The block store: fixed-size blocks of artifacts on disk, self-checking, bounded by an LRU."""

from __future__ import annotations

import contextlib
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
from typing import Any

from .cachefiles import (
    DIR_MODE,
    ENC_MAGIC,
    ensure_dir,
    read_file,
    remove_orphans,
    unlink_if_same,
    write_atomic,
    write_failed,
)
from .crypto import Cipher
from .version import Version

log = logging.getLogger("vapifs.cache")

DEFAULT_BLOCK_SIZE = 1 << 20

# Block file format: MAGIC, a big-endian u32 header length, a JSON header, then the data.
MAGIC = b"VAPIFSB1"
_PREFIX = struct.Struct(">I")
_DATA_OFFSET = len(MAGIC) + _PREFIX.size
# A header is a few hundred bytes; anything far larger is damage, not a header.
_MAX_HEADER = 64 * 1024

# A hit rewrites the block's mtime (the persisted LRU order) at most this often, so that a
# sequential read does not turn into one metadata write per block read.
_TOUCH_INTERVAL = 30.0

_BLOCK_NAME = re.compile(r"^([0-9a-f]{16})-(0|[1-9][0-9]*)\.blk$")
_HASH_NAME = re.compile(r"^[0-9a-f]{32}$")

_Key = tuple[str, str, int]  # (artifact hash, version token, block index)


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
        ensure_dir(self.root)  # a root made here is 0700; an existing one is the user's
        for d in (self._blocks_dir, self._tmp_dir):
            ensure_dir(d)
            os.chmod(d, DIR_MODE)
        remove_orphans(self._tmp_dir)
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
                (head, ino), body = read_file(path), None
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
                    unlink_if_same(path, ino)
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
            write_atomic(self._tmp_dir, self._path(key), parts, self.fsync)
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
            write_failed(self.root, error)
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
                buf, ino = read_file(path)
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
                    unlink_if_same(path, ino)
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
