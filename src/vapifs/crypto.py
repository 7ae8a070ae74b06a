"""Encryption at rest for the cache: AES-256-GCM with a key from a 0600 key file."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
# What sealing adds to a plaintext: the nonce in front, the tag behind.
OVERHEAD = NONCE_BYTES + TAG_BYTES


class CacheKeyError(Exception):
    """The cache key is missing, unreadable, unsafe, or not the one the cache was made with."""


def _parse_key(path: Path, text: bytes) -> bytes:
    try:
        key = bytes.fromhex(text.strip().decode())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise CacheKeyError(f"the cache key {path} is not 64 hex digits")
    return key


def _create_key(path: Path) -> bytes:
    """Write a new random key to path, atomically; the key already there if we lost a race."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CacheKeyError(f"cannot create the cache key {path}: {exc.strerror}") from None
    key = os.urandom(KEY_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, key.hex().encode() + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        # link() never replaces: a key another process made meanwhile stays, and is used.
        os.link(tmp, path)
    except FileExistsError:
        return load_key(path, create=False)
    except OSError as exc:
        raise CacheKeyError(f"cannot create the cache key {path}: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return key


def load_key(path: Path, *, create: bool) -> bytes:
    """The 32-byte key in path (mode 0600, 64 hex digits); a new random one if create and absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        if create:
            return _create_key(path)
        raise CacheKeyError(f"the cache key {path} does not exist") from None
    except OSError as exc:
        raise CacheKeyError(f"cannot read the cache key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise CacheKeyError(f"the cache key {path} is not a regular file")
        if info.st_mode & 0o077:
            raise CacheKeyError(f"the cache key {path} is readable by others: chmod 600 {path}")
        if info.st_uid != os.getuid() and os.getuid() != 0:
            raise CacheKeyError(f"the cache key {path} belongs to another user")
        text = f.read(1024)
    return _parse_key(path, text)


class Cipher:
    """Seals and opens blobs; the associated data binds a blob to where it belongs.

    Thread-safe: every call uses its own GCM context, so cache worker threads share one.
    """

    def __init__(self, key: bytes) -> None:
        # Imported here: the import costs tens of milliseconds that an unencrypted cache,
        # and every command that does not touch the cache, should not pay.
        from cryptography.exceptions import InvalidTag
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        if len(key) != KEY_BYTES:
            raise ValueError("a cache key has 32 bytes")
        self._aead = AESGCM(key)
        self._invalid: type[Exception] = InvalidTag

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        """nonce + ciphertext + tag. Random 96-bit nonces: safe for far more blobs than a
        cache will ever write under one key."""
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, plaintext, associated)

    def open(self, blob: bytes | memoryview, associated: bytes) -> bytes | None:
        """The plaintext, or None when the blob does not authenticate (tampered, torn,
        sealed with another key, or sealed for another place)."""
        if len(blob) < OVERHEAD:
            return None
        view = memoryview(blob)
        try:
            return self._aead.decrypt(view[:NONCE_BYTES], view[NONCE_BYTES:], associated)
        except self._invalid:
            return None
