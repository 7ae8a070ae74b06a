"""Tests of the on-disk block cache and the metadata store."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import shutil
import stat
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from vapifs import cachefiles
from vapifs.atrest import stored_format
from vapifs.blocks import DEFAULT_BLOCK_SIZE, MAGIC, BlockCache
from vapifs.meta import MetaStore
from vapifs.version import Version

from .blockfiles import (
    block_count,
    block_file,
    block_files,
    disk_bytes,
    patch,
    record_offset,
    records,
    set_access,
    slot_offset,
)

BS = 4096
CALL = "3f2b8c1e-0d4a-4c55-9a51-2f7f1a9a0e11"
KIND = "mono-recording"
V1 = Version(size=10 * BS + 100, etag='"abc"', last_modified="Tue, 01 Oct 2024 10:00:00 GMT")
V2 = Version(size=10 * BS + 100, etag='"def"', last_modified="Tue, 01 Oct 2024 10:00:00 GMT")


def payload(version: Version, index: int, salt: str = "") -> bytes:
    """Deterministic bytes of one block, distinct per version, index and salt."""
    length = min(BS, version.size - index * BS)
    seed = hashlib.sha256(f"{version.token()}/{index}/{salt}".encode()).digest()
    return (seed * (length // len(seed) + 1))[:length]


def make(tmp_path: Path, blocks: int = 100, **kw: Any) -> BlockCache:
    room = blocks * (BS + 512) + (64 << 10)
    c = BlockCache(tmp_path / "cache", max_bytes=room, block_size=BS, **kw)
    c.open()
    return c


def room_for(tmp_path: Path, blocks: float, version: Version = V1) -> int:
    """A max_bytes that holds `blocks` blocks of one artifact version (and a half: no more)."""
    probe = BlockCache(tmp_path / "probe", max_bytes=1 << 30, block_size=BS)
    probe.open()
    assert probe.put(CALL, KIND, version, 0, payload(version, 0))
    one = probe.bytes_used
    assert probe.put(CALL, KIND, version, 1, payload(version, 1))
    per_block = probe.bytes_used - one
    shutil.rmtree(tmp_path / "probe")
    return int(one - per_block + blocks * per_block)


def fresh(c: BlockCache) -> BlockCache:
    """Another instance on the same root, with the same settings: what a restart finds."""
    d = BlockCache(c.root, max_bytes=c.max_bytes, block_size=c.block_size, cipher=c.cipher)
    d.open()
    return d


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- Version ----------------------------------------------------------------------------------


def test_version_token_is_stable_short_hex_and_distinct() -> None:
    a = Version(100, '"x"', "Mon")
    assert a.token() == Version(100, '"x"', "Mon").token()
    assert len(a.token()) == 16
    int(a.token(), 16)
    tokens = {
        a.token(),
        Version(101, '"x"', "Mon").token(),
        Version(100, '"y"', "Mon").token(),
        Version(100, '"x"', "Tue").token(),
        Version(100).token(),
    }
    assert len(tokens) == 5


def test_version_json_round_trip() -> None:
    for v in (V1, Version(5), Version(0, None, "x")):
        assert Version.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(ValueError):
        Version.from_json({"size": "12"})
    with pytest.raises(ValueError):
        Version.from_json({"size": 12, "etag": 5})


def test_block_length(tmp_path: Path) -> None:
    c = BlockCache(tmp_path, max_bytes=1 << 20, block_size=BS)
    assert c.block_length(V1, 0) == BS
    assert c.block_length(V1, 9) == BS
    assert c.block_length(V1, 10) == 100
    for bad in (-1, 11, 1000):
        with pytest.raises(ValueError):
            c.block_length(V1, bad)
    with pytest.raises(ValueError):
        c.block_length(Version(0), 0)
    assert BlockCache(tmp_path, 1).block_size == DEFAULT_BLOCK_SIZE == 1 << 20


def test_constructor_does_no_io(tmp_path: Path) -> None:
    BlockCache(tmp_path / "c", max_bytes=1 << 20)
    MetaStore(tmp_path / "c")
    assert not (tmp_path / "c").exists()


# -- layout -----------------------------------------------------------------------------------


def test_layout_and_permissions(tmp_path: Path, umask_zero: None) -> None:
    c = make(tmp_path)
    root = tmp_path / "cache"
    assert c.put(CALL, KIND, V1, 3, payload(V1, 3))
    path = block_file(root, CALL, KIND, V1)
    assert block_files(root) == [path]
    for d in (root, root / "store", root / "tmp", path.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list((root / "tmp").iterdir()) == []

    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    hlen = struct.unpack_from("<I", raw, 8)[0]
    header = json.loads(raw[32 : 32 + hlen])
    # Exactly what was given, nothing more (no URL, no key).
    assert header == {"call_id": CALL, "kind": KIND, "version": V1.to_json()}
    assert records(path) == {3: (BS, zlib.crc32(payload(V1, 3)))}
    assert raw[slot_offset(path, 3) : slot_offset(path, 3) + BS] == payload(V1, 3)
    # Slots of blocks never stored are holes: the file takes the space of what it holds.
    assert disk_bytes(root) <= c.bytes_used


def test_a_sequential_fill_is_one_file_and_a_read_back_one_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make(tmp_path)
    for i in range(11):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    assert block_files(tmp_path / "cache") == [block_file(tmp_path / "cache", CALL, KIND, V1)]
    d = fresh(c)
    opens: list[object] = []
    real = os.open

    def counting(path: Any, *a: Any, **k: Any) -> int:
        opens.append(path)
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", counting)
    assert d.get_many(CALL, KIND, V1, list(range(11))) == [payload(V1, i) for i in range(11)]
    for i in range(11):
        assert d.get(CALL, KIND, V1, i) == payload(V1, i)
    assert len(opens) == 1


def test_permissions_under_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o277)
    try:
        c = make(tmp_path)
        assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    finally:
        os.umask(old)
    (path,) = block_files(tmp_path / "cache")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert c.get(CALL, KIND, V1, 0) == payload(V1, 0)


# -- get / put --------------------------------------------------------------------------------


def test_put_get_has_and_counters(tmp_path: Path) -> None:
    c = make(tmp_path)
    assert c.get(CALL, KIND, V1, 0) is None
    assert not c.has(CALL, KIND, V1, 0)
    for i in range(11):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    for i in range(11):
        assert c.has(CALL, KIND, V1, i)
        assert c.get(CALL, KIND, V1, i) == payload(V1, i)
    assert not c.has(CALL, KIND, V2, 0)
    assert c.get(CALL, KIND, V2, 0) is None
    assert c.get(CALL, "stereo-recording", V1, 0) is None
    assert (c.hits, c.misses) == (11, 3)
    assert disk_bytes(tmp_path / "cache") <= c.bytes_used == fresh(c).bytes_used


def test_put_rejects_wrong_length_and_index(tmp_path: Path) -> None:
    c = make(tmp_path)
    with pytest.raises(ValueError):
        c.put(CALL, KIND, V1, 0, b"short")
    with pytest.raises(ValueError):
        c.put(CALL, KIND, V1, 11, b"")
    with pytest.raises(ValueError):
        c.get(CALL, KIND, V1, -1)
    assert block_files(tmp_path / "cache") == []


def test_persisted_across_instances(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(4):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    d = make(tmp_path)
    assert d.bytes_used == c.bytes_used
    for i in range(4):
        assert d.has(CALL, KIND, V1, i)
        assert d.get(CALL, KIND, V1, i) == payload(V1, i)


# -- self-checking blocks ---------------------------------------------------------------------


def slot_damages(path: Path, index: int) -> dict[str, tuple[int, bytes] | int]:
    """Ways a block's slot can be wrong on disk: (offset, bytes) to write, or a length to cut
    the file to."""
    at = slot_offset(path, index)
    good = path.read_bytes()[at : at + BS]
    return {
        "flipped first byte": (at, bytes([good[0] ^ 1])),
        "flipped last byte": (at + BS - 1, bytes([good[-1] ^ 0x80])),
        "zeroed": (at, bytes(BS)),
        "another block's bytes": (at, payload(V1, index + 1)),
        "truncated data": at + BS - 1,
        "cut at the slot": at,
    }


def read_back(c: BlockCache, how: str, index: int) -> bytes | None:
    """A block read back as the store does it: by a thread, or at once where the kernel holds
    its bytes in memory (and by a thread where it may not)."""
    if how == "thread":
        return c.get(CALL, KIND, V1, index)
    now, later = c.get_cached(CALL, KIND, V1, [index])
    if later:
        return c.get(CALL, KIND, V1, index)
    return now.get(index)


@pytest.mark.parametrize("how", ["thread", "at once"])
def test_damaged_block_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 2, payload(V1, 2))
    (path,) = block_files(tmp_path / "cache")
    good = path.read_bytes()
    for name, damage in slot_damages(path, 2).items():
        path.write_bytes(good)
        c.open()
        assert c.get(CALL, KIND, V1, 2) == payload(V1, 2), name
        if isinstance(damage, int):
            os.truncate(path, damage)
        else:
            patch(path, *damage)
        caplog.clear()
        misses = c.misses
        with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
            assert read_back(c, how, 2) is None, name
        assert c.misses == misses + 1
        assert not path.exists(), name  # its only block: the file went with it
        assert not c.has(CALL, KIND, V1, 2), name
        assert c.bytes_used == 0, name
        assert warnings_of(caplog) == [
            f"cache: dropped a damaged block of {CALL}/{KIND} #2; fetching it again"
        ], name


def test_blocks_in_the_page_cache_are_read_at_once_and_the_others_left_for_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make(tmp_path)
    for i in range(4):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    everything = {i: payload(V1, i) for i in range(4)}
    assert c.get_cached(CALL, KIND, V1, [0, 1, 2, 3]) == (everything, [])
    assert c.not_in_memory(CALL, KIND, V1, [0, 1, 2, 3]) == []
    assert c.get_cached(CALL, KIND, V1, [9]) == ({}, [])  # absent: in neither
    assert c.not_in_memory(CALL, KIND, V1, [3, 9]) == [9]  # worth a thread's try
    real = os.preadv
    cold = slot_offset(block_files(tmp_path / "cache")[0], 2)

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        if flags & os.RWF_NOWAIT and cold <= offset < cold + BS:
            raise BlockingIOError(errno.EAGAIN, "would wait")
        return real(fd, buffers, offset, flags)

    monkeypatch.setattr(os, "preadv", preadv)
    assert c.get_cached(CALL, KIND, V1, [1, 2, 3]) == ({1: payload(V1, 1), 3: payload(V1, 3)}, [2])
    assert c.not_in_memory(CALL, KIND, V1, [1, 2, 3]) == [2]
    assert c.get(CALL, KIND, V1, 2) == payload(V1, 2)  # a thread's read does not ask


def test_a_file_system_that_cannot_read_without_waiting_leaves_every_block_to_a_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make(tmp_path)
    for i in range(2):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    asked: list[int] = []

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        asked.append(offset)
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(os, "preadv", preadv)
    assert c.get_cached(CALL, KIND, V1, [0, 1]) == ({}, [0, 1])
    assert len(asked) == 1  # asked once, then never again
    assert c.not_in_memory(CALL, KIND, V1, [0, 1]) == [0, 1]
    assert c.get_cached(CALL, KIND, V1, [1]) == ({}, [1])
    assert len(asked) == 1
    assert c.get_many(CALL, KIND, V1, [0, 1]) == [payload(V1, 0), payload(V1, 1)]


def test_damage_beside_a_damaged_block_is_not_touched(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(3):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    (path,) = block_files(tmp_path / "cache")
    patch(path, slot_offset(path, 1) + 7, b"\xff")
    assert c.get(CALL, KIND, V1, 1) is None
    assert sorted(records(path)) == [0, 2]  # its record cleared on disk too
    assert c.get_many(CALL, KIND, V1, [0, 1, 2]) == [payload(V1, 0), None, payload(V1, 2)]
    assert [fresh(c).has(CALL, KIND, V1, i) for i in range(3)] == [True, False, True]


def header_damages(path: Path) -> dict[str, tuple[int, bytes]]:
    """Ways a file's header or a record can be wrong: caught when the cache opens."""
    hlen = struct.unpack_from("<I", path.read_bytes(), 8)[0]
    rec = record_offset(path, 2)
    return {
        "bad magic": (0, b"X"),
        "huge header length": (8, struct.pack("<I", 1 << 30)),
        "huge region": (12, struct.pack("<I", 1 << 31)),
        "other block size": (16, struct.pack("<I", BS * 2)),
        "garbage header": (32, b"{{{{{"),
        "non-object header": (32, b"[]" + b" " * (hlen - 2)),
        "other version in the header": (32 + hlen - 40, b"Wed"),
        "flipped record length": (rec, b"\x01"),
        "flipped record crc": (rec + 4, b"\x00\x00"),
        "record moved to another index": (rec + 16, struct.pack("<I", 3)),
    }


def test_a_damaged_header_or_record_is_never_served(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 2, payload(V1, 2))
    (path,) = block_files(tmp_path / "cache")
    good = path.read_bytes()
    for name, (offset, data) in header_damages(path).items():
        path.write_bytes(good)
        patch(path, offset, data)
        caplog.clear()
        d = make(tmp_path)
        assert not d.has(CALL, KIND, V1, 2), name
        assert d.get(CALL, KIND, V1, 2) is None, name
        assert d.verify().bad == 0, name
        if "record" not in name:
            assert not path.exists(), name
    # The intact file still serves, and a put after a damaged record stores the block again.
    path.write_bytes(good)
    assert make(tmp_path).get(CALL, KIND, V1, 2) == payload(V1, 2)


def test_block_of_another_key_is_never_served(tmp_path: Path) -> None:
    """A whole, crc-correct file or block in the wrong place (other index, version, call,
    artifact) is never served."""
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 10, payload(V1, 10))  # the short last block
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    root = tmp_path / "cache"
    src = block_file(root, CALL, KIND, V1)
    other_call = "11111111-2222-3333-4444-555555555555"
    v_short = Version(size=BS // 2, etag=V1.etag, last_modified=V1.last_modified)
    asks = [
        (CALL, KIND, V2),  # other version
        (CALL, "stereo-recording", V1),  # other kind
        (other_call, KIND, V1),  # other call
        (CALL, KIND, v_short),  # a version whose size differs
    ]
    targets = [block_file(root, *ask) for ask in asks]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, target)
    # And within the file: block 0's slot and record copied to block 1's place.
    raw = src.read_bytes()
    r0, r1 = record_offset(src, 0), record_offset(src, 1)
    s0, s1 = slot_offset(src, 0), slot_offset(src, 1)
    patch(src, r1, raw[r0 : r0 + 24])
    patch(src, s1, raw[s0 : s0 + BS])
    c.open()
    for target, (call_id, kind, version) in zip(targets, asks, strict=True):
        assert not c.has(call_id, kind, version, 0)
        assert c.get(call_id, kind, version, 0) is None
        assert not target.exists()
    assert not c.has(CALL, KIND, V1, 1)
    assert c.get(CALL, KIND, V1, 1) is None
    assert c.get(CALL, KIND, V1, 0) == payload(V1, 0)
    assert c.get(CALL, KIND, V1, 10) == payload(V1, 10)


def test_missing_file_is_a_plain_miss(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    for p in block_files(tmp_path / "cache"):
        p.unlink()
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert c.get(CALL, KIND, V1, 0) is None
    assert caplog.records == []
    assert not c.has(CALL, KIND, V1, 0)
    assert c.bytes_used == 0
    assert c.misses == 1


def test_read_error_is_a_miss_not_an_exception(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert c.put(CALL, KIND, V1, 1, payload(V1, 1))

    def eio(*_a: object, **_k: object) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "pread", eio)
    assert c.get(CALL, KIND, V1, 1) is None
    monkeypatch.undo()
    assert c.get(CALL, KIND, V1, 1) == payload(V1, 1)
    (path,) = block_files(tmp_path / "cache")
    path.unlink()
    path.mkdir()  # open() of a directory: IsADirectoryError
    assert c.get(CALL, KIND, V1, 0) is None
    d = BlockCache(tmp_path / "cache", max_bytes=c.max_bytes, block_size=BS)
    d.open()
    assert d.get(CALL, KIND, V1, 0) is None


# -- crash safety -----------------------------------------------------------------------------


def test_open_removes_orphan_temp_files(tmp_path: Path) -> None:
    c = make(tmp_path)
    tmp_dir = tmp_path / "cache" / "tmp"
    old = tmp_dir / "0123456789abcdef.tmp"
    old.write_bytes(b"half a block")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    # A fresh one may be another process's put in flight: left alone.
    fresh_tmp = tmp_dir / "fedcba9876543210.tmp"
    fresh_tmp.write_bytes(b"being written")
    live = tmp_dir / f"{os.getppid()}-0123456789abcdef.tmp"
    live.write_bytes(b"being written by a live process")
    # A temp file of a process that is gone (kill -9) is a leftover however young it is.
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_dir / f"{dead.pid}-fedcba9876543210.tmp"
    killed.write_bytes(b"half a block")
    c.open()
    assert not old.exists()
    assert fresh_tmp.exists()
    assert live.exists()
    assert not killed.exists()
    assert c.bytes_used == 0


def test_kill_at_any_instant_never_serves_a_wrong_block(tmp_path: Path) -> None:
    """Simulate a crash at every step of a write: the new file's temp copy cut anywhere,
    the linked file cut anywhere (power loss without fsync), a slot written without its
    record, a record cut anywhere. Every visible block verifies or is dropped."""
    c = make(tmp_path)
    data = payload(V1, 5)
    assert c.put(CALL, KIND, V1, 5, data)
    (path,) = block_files(tmp_path / "cache")
    whole = path.read_bytes()
    tmp_dir = tmp_path / "cache" / "tmp"
    rec = record_offset(path, 5)
    record = whole[rec : rec + 24]
    without_record = whole[:rec] + bytes(24) + whole[rec + 24 :]
    cuts = sorted({*range(0, 80), *random.Random(1).sample(range(len(whole)), 60), len(whole) - 1})
    for cut in cuts:
        # Crash before the link: only a temp file exists.
        path.unlink(missing_ok=True)
        orphan = tmp_dir / "aaaaaaaaaaaaaaaa.tmp"
        orphan.write_bytes(whole[:cut])
        os.utime(orphan, (1, 1))
        d = make(tmp_path)
        assert not orphan.exists()
        assert d.get(CALL, KIND, V1, 5) is None
        # Power loss after the link: the visible file is torn.
        path.write_bytes(whole[:cut])
        d = make(tmp_path)
        assert d.get(CALL, KIND, V1, 5) is None
        assert not d.has(CALL, KIND, V1, 5)
        assert d.verify().bad == 0
    for k in range(24):
        # The slot written, its record cut after k bytes: no block.
        path.write_bytes(without_record[:rec] + record[:k] + without_record[rec + k :])
        d = make(tmp_path)
        assert not d.has(CALL, KIND, V1, 5), k
        assert d.get(CALL, KIND, V1, 5) is None
    # The slot written and no record: no block, and its disk space is given back.
    path.write_bytes(without_record)
    d = make(tmp_path)
    assert not d.has(CALL, KIND, V1, 5)
    assert disk_bytes(tmp_path / "cache") <= d.bytes_used
    # And the intact file still serves.
    path.write_bytes(whole)
    assert make(tmp_path).get(CALL, KIND, V1, 5) == data


def test_fsync_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert calls == []
    c = make(tmp_path, fsync=True)
    assert c.put(CALL, KIND, V1, 1, payload(V1, 1))
    assert len(calls) == 1
    assert c.get(CALL, KIND, V1, 1) == payload(V1, 1)


# -- bounds and LRU ---------------------------------------------------------------------------


def test_bounded_by_max_bytes(tmp_path: Path) -> None:
    v = Version(size=50 * BS)
    c = BlockCache(tmp_path / "cache", max_bytes=room_for(tmp_path, 3.5, v), block_size=BS)
    c.open()
    for i in range(50):
        assert c.put(CALL, KIND, v, i, payload(v, i))
        assert block_count(tmp_path / "cache") <= 3
        assert disk_bytes(tmp_path / "cache") <= c.max_bytes
        assert c.bytes_used <= c.max_bytes
    assert [c.has(CALL, KIND, v, i) for i in (46, 47, 48, 49)] == [False, True, True, True]
    assert block_count(tmp_path / "cache") == 3


def test_block_larger_than_max_is_not_stored(tmp_path: Path) -> None:
    room = room_for(tmp_path, 1)  # one block of BS bytes, and its file
    c = BlockCache(tmp_path / "cache", max_bytes=room, block_size=2 * BS)
    c.open()
    big = payload(V1, 0) + payload(V1, 1)
    assert not c.put(CALL, KIND, V1, 0, big)
    assert block_files(tmp_path / "cache") == []
    assert c.put(CALL, KIND, V1, 5, payload(V1, 10))  # the 100-byte last block fits
    assert c.get(CALL, KIND, V1, 5) == payload(V1, 10)


def test_lru_order_follows_gets(tmp_path: Path) -> None:
    c = BlockCache(tmp_path / "cache", max_bytes=room_for(tmp_path, 3.5), block_size=BS)
    c.open()
    for i in (0, 1, 2):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    assert c.get(CALL, KIND, V1, 0) is not None
    assert c.put(CALL, KIND, V1, 3, payload(V1, 3))
    assert [c.has(CALL, KIND, V1, i) for i in range(4)] == [True, False, True, True]


def test_lru_order_survives_restart(tmp_path: Path) -> None:
    room = room_for(tmp_path, 3.5)
    c = BlockCache(tmp_path / "cache", max_bytes=room, block_size=BS)
    c.open()
    for i in (0, 1, 2):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    base = time.time() - 1000
    # Block 1 oldest, then 2; block 0 is read in the next run (a get touches its record).
    (path,) = block_files(tmp_path / "cache")
    for i, age in ((0, 0), (1, 10), (2, 20)):
        set_access(path, i, base + age)
    d = BlockCache(tmp_path / "cache", max_bytes=room, block_size=BS)
    d.open()
    assert d.get(CALL, KIND, V1, 0) == payload(V1, 0)
    e = BlockCache(tmp_path / "cache", max_bytes=room, block_size=BS)
    e.open()
    assert e.put(CALL, KIND, V1, 3, payload(V1, 3))
    assert [e.has(CALL, KIND, V1, i) for i in range(4)] == [True, False, True, True]


def test_touch_is_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    (path,) = block_files(tmp_path / "cache")
    touched: list[object] = []
    real = os.pwrite

    def counting(fd: int, data: Any, offset: int) -> int:
        if offset == record_offset(path, 0):
            touched.append(offset)
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", counting)
    for _ in range(5):
        assert c.get(CALL, KIND, V1, 0) is not None
    assert touched == []  # just written: its access time is already fresh
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 31)
    for _ in range(5):
        assert c.get(CALL, KIND, V1, 0) is not None
    assert len(touched) == 1
    monkeypatch.setattr(time, "time", lambda: now + 62)
    assert c.get(CALL, KIND, V1, 0) is not None
    assert len(touched) == 2


def test_open_evicts_down_to_a_smaller_max(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(10):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    base = time.time() - 1000
    (path,) = block_files(tmp_path / "cache")
    for i in range(10):
        set_access(path, i, base + i)
    d = BlockCache(tmp_path / "cache", max_bytes=room_for(tmp_path, 4.5), block_size=BS)
    d.open()
    assert d.bytes_used <= d.max_bytes
    assert disk_bytes(tmp_path / "cache") <= d.max_bytes
    assert block_count(tmp_path / "cache") == 4
    assert [d.has(CALL, KIND, V1, i) for i in range(10)] == [False] * 6 + [True] * 4
    assert [fresh(d).has(CALL, KIND, V1, i) for i in range(10)] == [False] * 6 + [True] * 4


def test_the_last_block_evicted_takes_its_file(tmp_path: Path) -> None:
    c = BlockCache(tmp_path / "cache", max_bytes=room_for(tmp_path, 2.5), block_size=BS)
    c.open()
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert c.put(CALL, KIND, V2, 0, payload(V2, 0))
    assert c.put(CALL, KIND, V2, 1, payload(V2, 1))
    assert block_files(tmp_path / "cache") == [block_file(tmp_path / "cache", CALL, KIND, V2)]
    assert disk_bytes(tmp_path / "cache") <= c.bytes_used <= c.max_bytes


# -- disk trouble -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["pwrite", "link", "open"])
def test_disk_full_is_one_warning_and_nothing_visible(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    target: str,
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    before = block_files(tmp_path / "cache")
    used = c.bytes_used
    real = getattr(os, target)
    # Writing into a block file fails on a full disk; so does making one (a new version).
    v = V1 if target == "pwrite" else V2

    def enospc(*_a: object, **_k: object) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, target, enospc)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        for i in range(1, 6):
            assert not c.put(CALL, KIND, v, i, payload(v, i))
    monkeypatch.setattr(os, target, real)
    msgs = warnings_of(caplog)
    root = tmp_path / "cache"
    assert msgs == [
        f"cache: cannot write to {root} (No space left on device); reading from the network"
    ]
    assert block_files(root) == before
    assert list((root / "tmp").iterdir()) == []
    assert c.bytes_used == used
    assert [c.has(CALL, KIND, V1, i) for i in range(6)] == [True] + [False] * 5
    assert [c.has(CALL, KIND, v, i) for i in range(1, 6)] == [False] * 5
    assert disk_bytes(root) <= c.bytes_used

    # A nearly full disk takes some writes and refuses others: still no new warning, from
    # blocks or metadata alike, until the quiet time has passed.
    assert c.put(CALL, KIND, V1, 1, payload(V1, 1))
    caplog.clear()
    monkeypatch.setattr(os, target, enospc)
    monkeypatch.setattr(os, "replace", enospc)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert not c.put(CALL, KIND, v, 2, payload(v, 2))
        assert not MetaStore(root).put("artifact", "k", {"v": 1})
    assert warnings_of(caplog) == []
    monkeypatch.setattr(cachefiles, "WARN_AGAIN_AFTER", 0.0)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert not c.put(CALL, KIND, v, 3, payload(v, 3))
    assert len(warnings_of(caplog)) == 1


def test_other_os_errors_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = make(tmp_path)
    for code in (errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES):

        def fail(*_a: object, _code: int = code, **_k: object) -> Any:
            raise OSError(_code, os.strerror(_code))

        monkeypatch.setattr(os, "pwrite", fail)
        assert not c.put(CALL, KIND, V1, 0, payload(V1, 0))
        monkeypatch.undo()
    assert block_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert c.bytes_used == 0


def test_torn_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (disk full mid-block) leaves no block and no temp file."""
    c = make(tmp_path)
    real_pwrite = os.pwrite
    written = [0]

    def half(fd: int, data: Any, offset: int) -> int:
        if written[0] > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_pwrite(fd, bytes(data)[:50], offset)
        written[0] += n
        return n

    monkeypatch.setattr(os, "pwrite", half)
    assert not c.put(CALL, KIND, V1, 0, payload(V1, 0))
    monkeypatch.undo()
    assert block_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert c.get(CALL, KIND, V1, 0) is None
    # Into a file that holds other blocks: the others stay, this one is absent, its slot freed.
    assert c.put(CALL, KIND, V1, 1, payload(V1, 1))
    written[0] = 0
    monkeypatch.setattr(os, "pwrite", half)
    assert not c.put(CALL, KIND, V1, 0, payload(V1, 0))
    monkeypatch.undo()
    assert c.get(CALL, KIND, V1, 0) is None
    assert c.get(CALL, KIND, V1, 1) == payload(V1, 1)
    assert sorted(records(block_files(tmp_path / "cache")[0])) == [1]
    assert disk_bytes(tmp_path / "cache") <= c.bytes_used


# -- versions ---------------------------------------------------------------------------------


def test_drop_other_versions_and_artifact(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(3):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    for i in range(2):
        assert c.put(CALL, KIND, V2, i, payload(V2, i))
    assert c.put(CALL, "stereo-recording", V1, 0, payload(V1, 0))
    assert c.drop_other_versions(CALL, KIND, keep=V2) == 3
    assert [c.has(CALL, KIND, V1, i) for i in range(3)] == [False] * 3
    assert [c.get(CALL, KIND, V2, i) for i in range(2)] == [payload(V2, i) for i in range(2)]
    assert c.drop_other_versions(CALL, KIND, keep=V2) == 0
    assert c.drop_artifact(CALL, KIND) == 2
    assert not c.has(CALL, KIND, V2, 0)
    assert c.has(CALL, "stereo-recording", V1, 0)
    assert block_files(tmp_path / "cache") == [
        block_file(tmp_path / "cache", CALL, "stereo-recording", V1)
    ]
    assert block_count(tmp_path / "cache") == 1
    assert disk_bytes(tmp_path / "cache") <= c.bytes_used == fresh(c).bytes_used
    assert c.drop_artifact(CALL, "nothing") == 0
    # Blocks another instance stored are dropped too.
    d = fresh(c)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert d.drop_artifact(CALL, KIND) == 1
    assert c.get(CALL, KIND, V1, 0) is None


# -- clear with two processes -----------------------------------------------------------------


def test_clear_while_another_instance_uses_the_cache(tmp_path: Path) -> None:
    a = make(tmp_path)
    for i in range(5):
        assert a.put(CALL, KIND, V1, i, payload(V1, i))
    b = make(tmp_path)
    assert b.clear() == 5
    assert block_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / "store").iterdir()) == []
    assert b.stats().blocks == 0
    for i in range(5):
        assert a.get(CALL, KIND, V1, i) is None
    assert a.bytes_used == 0
    assert a.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert a.get(CALL, KIND, V1, 0) == payload(V1, 0)
    # Even the whole directory tree gone: put makes what it needs.
    shutil.rmtree(tmp_path / "cache")
    assert a.put(CALL, KIND, V1, 1, payload(V1, 1))
    assert a.get(CALL, KIND, V1, 1) == payload(V1, 1)


def test_a_file_replaced_under_an_open_one_is_read_from_the_path(tmp_path: Path) -> None:
    """A process never serves blocks from a file another one deleted or replaced."""
    a = make(tmp_path)
    assert a.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert a.get(CALL, KIND, V1, 0) == payload(V1, 0)  # its file is open now
    b = make(tmp_path)
    assert b.clear() == 1
    assert b.put(CALL, KIND, V1, 1, payload(V1, 1))
    assert a.get(CALL, KIND, V1, 0) is None
    assert a.get(CALL, KIND, V1, 1) is None  # not known to a until it finds the new file
    assert a.put(CALL, KIND, V1, 2, payload(V1, 2))  # adopts b's file and its blocks
    assert a.get(CALL, KIND, V1, 1) == payload(V1, 1)
    assert a.get(CALL, KIND, V1, 2) == payload(V1, 2)
    assert b.verify().bad == 0


# -- the layout before this one -------------------------------------------------------------


def old_layout_block(root: Path, index: int) -> Path:
    """A block as the previous layout wrote it: a file of its own under blocks/."""
    h = hashlib.sha256(f"{CALL}/{KIND}".encode()).hexdigest()[:32]
    data = payload(V1, index)
    header = json.dumps(
        {
            "call_id": CALL,
            "kind": KIND,
            "version": V1.to_json(),
            "index": index,
            "length": len(data),
            "crc32": zlib.crc32(data),
        }
    ).encode()
    path = root / "blocks" / h[:2] / h / f"{V1.token()}-{index}.blk"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"VAPIFSB1" + struct.pack(">I", len(header)) + header + data)
    return path


def test_an_older_layout_is_dropped_once_with_one_info_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "cache"
    for i in range(3):
        old_layout_block(root, i)
    assert MetaStore(root).put("artifact", f"{CALL}/{KIND}", {"v": 1})
    assert stored_format(root) == "plain"
    with caplog.at_level(logging.INFO, logger="vapifs.cache"):
        c = make(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"cache: dropped 3 blocks of an older cache layout in {root}; they are fetched again "
        "as needed"
    ]
    assert not (root / "blocks").exists()
    assert MetaStore(root).get("artifact", f"{CALL}/{KIND}") == {"v": 1}
    assert [c.get(CALL, KIND, V1, i) for i in range(3)] == [None] * 3
    assert c.bytes_used == 0
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="vapifs.cache"):
        d = make(tmp_path)
    assert caplog.records == []
    assert d.get(CALL, KIND, V1, 0) == payload(V1, 0)


def test_this_layout_is_never_taken_for_the_older_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(tmp_path)
    for i in range(11):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    root = tmp_path / "cache"
    # Nothing of it looks like the older layout: no blocks/ dir, no *.blk file, other magic.
    assert not (root / "blocks").exists()
    assert not list(root.rglob("*.blk"))
    assert all(not p.read_bytes().startswith(b"VAPIFSB1") for p in block_files(root))
    assert stored_format(root) == "plain"
    with caplog.at_level(logging.INFO, logger="vapifs.cache"):
        d = make(tmp_path)
    assert caplog.records == []
    assert [d.get(CALL, KIND, V1, i) for i in range(11)] == [payload(V1, i) for i in range(11)]


# -- threads ----------------------------------------------------------------------------------


def test_concurrent_get_put(tmp_path: Path) -> None:
    v = Version(size=20 * BS, etag='"t"')
    c = BlockCache(tmp_path / "cache", max_bytes=room_for(tmp_path, 8.5, v), block_size=BS)
    c.open()
    calls = [CALL, "aaaaaaaa-0000-0000-0000-000000000000"]
    wrong: list[str] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            call_id = rng.choice(calls)
            i = rng.randrange(20)
            if rng.random() < 0.5:
                c.put(call_id, KIND, v, i, payload(v, i, call_id))
            else:
                got = c.get(call_id, KIND, v, i)
                if got is not None and got != payload(v, i, call_id):
                    wrong.append(f"{call_id} {i}")
            if rng.random() < 0.01:
                c.drop_artifact(call_id, KIND)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(work, range(32)))
    assert wrong == []
    root = tmp_path / "cache"
    assert disk_bytes(root) <= c.max_bytes
    assert c.bytes_used <= c.max_bytes
    assert c.stats().blocks == block_count(root)
    again = fresh(c)
    assert again.bytes_used == c.bytes_used
    assert again.stats().blocks == c.stats().blocks
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert c.verify().bad == 0


# -- stats and verify -------------------------------------------------------------------------


def test_stats_from_disk(tmp_path: Path) -> None:
    c = make(tmp_path)
    assert c.stats().blocks == 0
    assert c.stats().oldest_access is None
    for i in range(3):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    assert c.put(CALL, "stereo-recording", V1, 0, payload(V1, 0))
    base = time.time() - 5000
    n = 0
    for p in block_files(tmp_path / "cache"):
        for index in sorted(records(p)):
            set_access(p, index, base + n * 100)
            n += 1
    again = fresh(c)
    s = again.stats()
    assert s.blocks == 4
    assert s.artifacts == 2
    assert s.bytes == c.bytes_used == again.bytes_used
    assert disk_bytes(tmp_path / "cache") <= s.bytes
    assert s.oldest_access == pytest.approx(base)
    assert s.newest_access == pytest.approx(base + 300)


def test_verify(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(4):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    root = tmp_path / "cache"
    (path,) = block_files(root)
    good = BlockCache(root, max_bytes=c.max_bytes, block_size=BS)
    good.open()
    assert good.verify().bad == 0

    patch(path, slot_offset(path, 1) + BS // 2, b"\x40")
    report = c.verify()
    assert (report.checked, report.bad, report.bad_bytes) == (4, 1, BS)
    assert sorted(records(path)) == [0, 2, 3]
    assert not c.has(CALL, KIND, V1, 1)

    # A sound block under another index is no block; a sound file under another name is bad.
    raw = path.read_bytes()
    r2, r3 = record_offset(path, 2), record_offset(path, 3)
    patch(path, record_offset(path, 7), raw[r2 : r2 + 24])
    patch(path, slot_offset(path, 7), raw[slot_offset(path, 2) : slot_offset(path, 2) + BS])
    assert raw[r3 : r3 + 24]
    moved = block_file(root, CALL, KIND, V2)
    shutil.copyfile(path, moved)
    report = c.verify()
    assert (report.checked, report.bad) == (4, 1)
    assert not moved.exists()
    assert block_files(root) == [path]
    assert sorted(records(path)) == [0, 2, 3]
    assert c.get(CALL, KIND, V1, 0) == payload(V1, 0)
    assert c.get(CALL, KIND, V1, 7) is None
    assert c.verify().bad == 0


def test_blocks_of_another_block_size_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    other = BlockCache(tmp_path / "cache", max_bytes=c.max_bytes, block_size=BS * 2)
    with caplog.at_level(logging.INFO, logger="vapifs.cache"):
        other.open()
    assert [r.getMessage() for r in caplog.records] == [
        "cache: dropped 1 blocks written with another block size"
    ]
    assert block_files(tmp_path / "cache") == []
    assert other.get(CALL, KIND, V1, 0) is None
    assert other.verify().bad == 0


def test_get_and_put_of_a_large_block_are_cheap(tmp_path: Path) -> None:
    v = Version(size=8 << 20)
    c = BlockCache(tmp_path / "cache", max_bytes=64 << 20)
    c.open()
    data = os.urandom(1 << 20)
    t0 = time.perf_counter()
    for i in range(8):
        assert c.put(CALL, KIND, v, i, data)
    for _ in range(3):
        for i in range(8):
            assert c.get(CALL, KIND, v, i) == data
    # Generous: a few ms each on any disk; catches accidental quadratic copies.
    assert time.perf_counter() - t0 < 5


# -- MetaStore --------------------------------------------------------------------------------


def test_meta_round_trip_and_layout(tmp_path: Path, umask_zero: None) -> None:
    m = MetaStore(tmp_path / "c")
    assert m.get("versions", "k") is None
    doc = {"size": 5, "etag": None, "nested": {"a": [1, 2]}, "checked_at": 1.5}
    assert m.put("versions", f"{CALL}/{KIND}", doc)
    assert m.get("versions", f"{CALL}/{KIND}") == doc
    h = hashlib.sha256(f"{CALL}/{KIND}".encode()).hexdigest()[:32]
    path = tmp_path / "c" / "meta" / "versions" / f"{h}.json"
    assert json.loads(path.read_text())["key"] == f"{CALL}/{KIND}"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for d in (path.parent, path.parent.parent, tmp_path / "c"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert m.put("versions", f"{CALL}/{KIND}", {"size": 6})
    assert m.get("versions", f"{CALL}/{KIND}") == {"size": 6}
    assert list((tmp_path / "c" / "tmp").iterdir()) == []


def test_meta_items_delete_clear(tmp_path: Path) -> None:
    m = MetaStore(tmp_path)
    for k in ("a/b", "ü key", "x" * 500):
        assert m.put("calls", k, {"k": k})
    assert m.put("listings", "window", {"ids": []})
    assert sorted(m.items("calls")) == sorted((k, {"k": k}) for k in ("a/b", "ü key", "x" * 500))
    assert m.items("nothing") == []
    m.delete("calls", "a/b")
    m.delete("calls", "never there")
    assert m.get("calls", "a/b") is None
    assert len(m.items("calls")) == 2
    m.clear()
    assert m.items("calls") == []
    assert m.get("listings", "window") is None
    assert m.put("calls", "again", {})
    assert m.get("calls", "again") == {}


def test_meta_corrupt_file_is_none_and_deleted(tmp_path: Path) -> None:
    m = MetaStore(tmp_path)
    assert m.put("calls", "k1", {"a": 1})
    assert m.put("calls", "k2", {"a": 2})
    h1 = hashlib.sha256(b"k1").hexdigest()[:32]
    path = tmp_path / "meta" / "calls" / f"{h1}.json"
    for bad in (b"", b'{"key": "k1", "doc": {"a": 1', b"[]", b'{"key": "k1", "doc": 3}', b"\xff"):
        path.write_bytes(bad)
        assert m.get("calls", "k1") is None
        assert not path.exists()
    path.write_bytes(b"{{")
    assert m.items("calls") == [("k2", {"a": 2})]
    assert not path.exists()


def test_meta_put_failure_is_false_and_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    m = MetaStore(tmp_path)
    assert m.put("calls", "k", {"v": 1})

    def enospc(*_a: object, **_k: object) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", enospc)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert not m.put("calls", "k", {"v": 2})
        assert not m.put("calls", "k2", {"v": 3})
    monkeypatch.undo()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    assert m.get("calls", "k") == {"v": 1}
    assert m.get("calls", "k2") is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_meta_rejects_bad_namespaces(tmp_path: Path) -> None:
    m = MetaStore(tmp_path)
    for ns in ("", "..", "a/b", ".hidden", "../x"):
        with pytest.raises(ValueError):
            m.put(ns, "k", {})


def test_meta_and_blocks_share_a_root(tmp_path: Path) -> None:
    c = make(tmp_path)
    m = MetaStore(tmp_path / "cache")
    assert m.put("versions", "k", {"size": 1})
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert c.clear() == 1
    assert m.get("versions", "k") == {"size": 1}
    m.clear()
    assert c.stats().blocks == 0


def test_reopening_under_a_read_leaves_no_descriptor_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = make(tmp_path)
    for i in range(2):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    c.open()
    before = len(os.listdir("/proc/self/fd"))
    real = os.pread
    reopened: list[int] = []

    def pread_then_reopen(fd: int, n: int, offset: int) -> bytes:
        data = real(fd, n, offset)
        if not reopened:
            reopened.append(fd)
            c.open()  # another thread rebuilds the index while this read holds the file
        return data

    monkeypatch.setattr(os, "pread", pread_then_reopen)
    assert c.get_many(CALL, KIND, V1, [0, 1]) == [payload(V1, 0), payload(V1, 1)]
    monkeypatch.undo()
    assert reopened
    assert len(os.listdir("/proc/self/fd")) == before
    assert c.get(CALL, KIND, V1, 1) == payload(V1, 1)
    assert len(os.listdir("/proc/self/fd")) == before + 1  # the file, open again for reuse


def test_a_file_that_cannot_be_opened_now_is_a_miss_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    d = fresh(c)  # its file is not open yet
    real = os.open

    def emfile(path: Any, *a: Any, **k: Any) -> int:
        if str(path).endswith(".vblk"):
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real(path, *a, **k)

    monkeypatch.setattr(os, "open", emfile)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert d.get(CALL, KIND, V1, 0) is None
    monkeypatch.undo()
    assert warnings_of(caplog) == []
    assert d.has(CALL, KIND, V1, 0)  # kept: the file is still there
    assert d.get(CALL, KIND, V1, 0) == payload(V1, 0)
