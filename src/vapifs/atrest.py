"""How a cache dir is encrypted at rest: its key check, and how its files were written."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Literal

from .cachefiles import BLOCK_HEADER_AT, ENC_MAGIC, FILE_MODE, ensure_dir, write_all
from .crypto import Cipher

# Present in an encrypted cache's root: a constant sealed with its key, to refuse another key
# before mounting rather than drop every block one by one.
KEYCHECK_NAME = "keycheck"
_KEYCHECK_PLAINTEXT = b"vapifs cache key check v1"
_KEYCHECK_AD = b"vapifs keycheck"

CacheFormat = Literal["empty", "plain", "encrypted"]


def stored_format(root: Path) -> CacheFormat:
    """How the cache in root was written: told by its key check, else by one data file."""
    if (root / KEYCHECK_NAME).exists():
        return "encrypted"
    # A block file's header blob follows its fixed part; a metadata file starts sealed.
    files = (("store/*/*.vblk", BLOCK_HEADER_AT), ("blocks/*/*/*.blk", 0), ("meta/*/*.json", 0))
    for pattern, at in files:
        for path in root.glob(pattern):
            try:
                with open(path, "rb") as f:
                    f.seek(at)
                    head = f.read(len(ENC_MAGIC))
            except OSError:
                continue
            return "encrypted" if head == ENC_MAGIC else "plain"
    return "empty"


def key_matches(root: Path, cipher: Cipher) -> bool:
    """Whether root's key check opens with cipher; a cache without one gets one made with it.

    Raises OSError when the key check can be neither read nor made.
    """
    path = root / KEYCHECK_NAME
    try:
        blob = path.read_bytes()
    except FileNotFoundError:
        ensure_dir(root)
        blob = ENC_MAGIC + cipher.seal(_KEYCHECK_PLAINTEXT, _KEYCHECK_AD)
        tmp = root / f".{KEYCHECK_NAME}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, FILE_MODE)
        try:
            try:
                write_all(fd, blob)
                os.fsync(fd)
            finally:
                os.close(fd)
            # link() never replaces: when another process marked the cache first, its key
            # check is the one that counts.
            os.link(tmp, path)
        except FileExistsError:
            blob = path.read_bytes()
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    if not blob.startswith(ENC_MAGIC):
        return False
    return cipher.open(memoryview(blob)[len(ENC_MAGIC) :], _KEYCHECK_AD) == _KEYCHECK_PLAINTEXT


def forget_encryption(root: Path) -> None:
    """After a clear: the next user of root may choose anew (no key, or another key)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(root / KEYCHECK_NAME)
