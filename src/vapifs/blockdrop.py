"""Dropping blocks on purpose: an artifact's other versions, all of it, the old, everything.

Files are deleted from the disk and forgotten by the index together; files of an artifact
that another process wrote (not in this index) are found by listing their directory. Each
drop returns how many blocks went.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

from .blockfile import FILE_NAME, Format, artifact_hash, file_path
from .blockindex import BlockIndex
from .blockscan import count_on_disk, paths
from .version import Version

log = logging.getLogger("vapifs.cache")


class BlockDropper:
    """Deletions of whole files, or of blocks by age, from the disk and the index."""

    def __init__(self, index: BlockIndex, fmt: Format, store: Path) -> None:
        self._index = index
        self._fmt = fmt
        self._store = store

    def drop_other_versions(self, call_id: str, kind: str, keep: Version) -> int:
        token = keep.token()
        return self._drop(artifact_hash(call_id, kind), lambda t: t != token)

    def drop_artifact(self, call_id: str, kind: str) -> int:
        return self._drop(artifact_hash(call_id, kind), lambda _t: True)

    def drop_older_than(self, ts: float) -> int:
        """Delete every block not written or read since `ts` (wall clock): it is older."""
        index = self._index
        with index.lock:
            old = [
                (k, e) for k, e in index.entries.items() if e.atime < ts and k not in index.writing
            ]
            for key, entry in old:
                if index.entries.get(key) is entry:
                    index.evict_locked(key, entry)
        return len(old)

    def _drop(self, h: str, doomed: Callable[[str], bool]) -> int:
        try:
            names = os.listdir(self._store / h[:2])
        except OSError:
            names = []
        on_disk = set()
        for name in names:
            m = FILE_NAME.match(name)
            if m is not None and m.group(1) == h and doomed(m.group(2)):
                on_disk.add(m.group(2))
        dropped = 0
        index = self._index
        with index.lock:
            tokens = on_disk | {t for (fh, t) in index.files if fh == h and doomed(t)}
            for token in tokens:
                f = index.files.get((h, token))
                if f is not None:
                    dropped += f.blocks
                    index.forget_file_locked(f)
                else:
                    dropped += count_on_disk(self._fmt, self._store, h, token)
                path = file_path(self._store, h, token)
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError as e:
                    log.debug("cache: cannot delete %s: %s", path, e)
        return dropped

    def clear(self) -> int:
        """Delete every block. Another process using the same root sees plain misses."""
        dropped = 0
        index = self._index
        with index.lock:
            for h, token, path in list(paths(self._store)):
                f = index.files.get((h, token))
                count = (
                    f.blocks if f is not None else count_on_disk(self._fmt, self._store, h, token)
                )
                try:
                    os.unlink(path)
                    dropped += count
                except OSError:
                    continue
            index.forget_all_locked()
            # Empty directories go too; one refilled meanwhile stays (ENOTEMPTY), and a put
            # that finds its directory gone makes it again.
            try:
                prefixes = list(os.scandir(self._store))
            except OSError:
                prefixes = []
            for pre in prefixes:
                if pre.is_dir(follow_symlinks=False):
                    with contextlib.suppress(OSError):
                        os.rmdir(pre.path)
        return dropped
