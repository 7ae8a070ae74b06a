"""Reading the store's files back from disk: which exist, what each holds, crash leftovers.

At start every file's header and record table are read (a block whose record was written is
known, one still being written is not); a file whose header is not sound is deleted with a
warning, and slot space no record accounts for (a crash between a block and its record) is
given back. The older layout, a file per block under blocks/, is deleted on first use.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from .blockfile import FILE_NAME, FILE_SLACK, BlockFile, Format, Loaded, file_path, punch

log = logging.getLogger("vapifs.cache")

# The layout before this one: a file per block under blocks/. Dropped on first use.
_OLD_LAYOUT = "blocks"


def paths(store: Path) -> Iterator[tuple[str, str, Path]]:
    """Every block file on disk, whoever wrote it: (artifact hash, version token, path)."""
    try:
        prefixes = list(os.scandir(store))
    except FileNotFoundError:
        return
    for pre in prefixes:
        if not pre.is_dir(follow_symlinks=False):
            continue
        try:
            names = list(os.scandir(pre.path))
        except OSError:
            continue
        for f in names:
            m = FILE_NAME.match(f.name)
            if m is not None and m.group(1)[:2] == pre.name:
                yield m.group(1), m.group(2), Path(f.path)


def load_all(fmt: Format, store: Path) -> list[Loaded]:
    """Every usable file and its records; files of another block size are deleted."""
    found: list[Loaded] = []
    foreign = 0
    for h, token, path in list(paths(store)):
        loaded = load_file(fmt, h, token, path)
        if loaded is None:
            continue
        f, records = loaded
        if f.foreign:
            foreign += len(records)
            with contextlib.suppress(OSError):
                os.unlink(path)
            continue
        found.append((f, records))
    if foreign:
        log.info("cache: dropped %d blocks written with another block size", foreign)
    return found


def load_file(fmt: Format, h: str, token: str, path: Path) -> Loaded | None:
    """A file's description and its sound records; a file whose header is not sound
    (torn by a power loss, damaged, renamed) is deleted with a warning."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        parsed = fmt.parse(h, token, path, fd)
        st = os.fstat(fd)
        if parsed is None:
            log.warning("cache: dropped a damaged block file (%d bytes)", st.st_size)
            with contextlib.suppress(OSError):
                if os.stat(path).st_ino == st.st_ino:
                    os.unlink(path)
            return None
        f, table = parsed
        records = list(fmt.records(f, table))
        if not f.foreign:
            # A crash between writing a block and its record, or between clearing a
            # record and freeing its slot, leaves bytes no record accounts for.
            expected = f.region + sum(e.cost for _i, e in records) + FILE_SLACK
            if st.st_blocks * 512 > expected:
                _free_unrecorded(path, f, {i for i, _e in records})
        return f, records
    except OSError:
        return None
    finally:
        os.close(fd)


def count_on_disk(fmt: Format, store: Path, h: str, token: str) -> int:
    """Blocks recorded in a file this process does not know."""
    loaded = load_file(fmt, h, token, file_path(store, h, token))
    return 0 if loaded is None else len(loaded[1])


def _free_unrecorded(path: Path, f: BlockFile, present: set[int]) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            for index in range(f.count):
                if index not in present and not punch(fd, f.slot(index), f.stride):
                    return
        finally:
            os.close(fd)


def drop_old_layout(root: Path) -> None:
    old = root / _OLD_LAYOUT
    if not old.is_dir():
        return
    blocks = sum(1 for _ in old.rglob("*.blk"))
    shutil.rmtree(old, ignore_errors=True)
    log.info(
        "cache: dropped %d blocks of an older cache layout in %s; they are fetched again as needed",
        blocks,
        root,
    )
