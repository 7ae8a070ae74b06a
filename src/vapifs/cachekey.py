"""The at-rest key policy: which cipher a cache dir is used with, and the refusals users read.

Decided before anything mounts; its messages name the command-line flags, which is why it
lives above the storage modules rather than in them.
"""

from __future__ import annotations

from pathlib import Path

from .atrest import key_matches, stored_format
from .cachefiles import strerror
from .crypto import CacheKeyError, Cipher, load_key
from .defaults import default_key_file


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
    try:
        matches = key_matches(root, cipher)
    except OSError as e:
        raise CacheKeyError(f"cannot use the cache in {root}: {strerror(e)}") from None
    if not matches:
        raise CacheKeyError(
            f"the cache in {root} was encrypted with another key than {path}: give its "
            f"--cache-key-file, or start afresh with vapifs cache clear --cache-dir {root}"
        )
    return cipher
