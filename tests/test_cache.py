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

from vapifs import blocks as blocks_mod
from vapifs import cachefiles
from vapifs.blocks import DEFAULT_BLOCK_SIZE, MAGIC, BlockCache
from vapifs.meta import MetaStore
from vapifs.version import Version

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
    c = BlockCache(tmp_path / "cache", max_bytes=blocks * (BS + 512), block_size=BS, **kw)
    c.open()
    return c


def block_files(root: Path) -> list[Path]:
    return sorted((root / "blocks").rglob("*.blk"))


def file_size_of_one_block(tmp_path: Path) -> int:
    probe = BlockCache(tmp_path / "probe", max_bytes=1 << 30, block_size=BS)
    probe.open()
    assert probe.put(CALL, KIND, V1, 0, payload(V1, 0))
    return probe.bytes_used


def artifact_dir(root: Path, call_id: str = CALL, kind: str = KIND) -> Path:
    h = hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]
    return root / "blocks" / h[:2] / h


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


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
    path = artifact_dir(root) / f"{V1.token()}-3.blk"
    assert block_files(root) == [path]
    for d in (root, root / "blocks", root / "tmp", path.parent, path.parent.parent):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert list((root / "tmp").iterdir()) == []

    raw = path.read_bytes()
    assert raw.startswith(MAGIC)
    (hlen,) = struct.unpack(">I", raw[8:12])
    header = json.loads(raw[12 : 12 + hlen])
    # Exactly what was given, nothing more (no URL, no key).
    assert header == {
        "call_id": CALL,
        "kind": KIND,
        "version": V1.to_json(),
        "index": 3,
        "length": BS,
        "crc32": zlib.crc32(payload(V1, 3)),
    }
    assert raw[12 + hlen :] == payload(V1, 3)


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
    assert c.bytes_used == sum(p.stat().st_size for p in block_files(tmp_path / "cache"))


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


def damaged_variants(good: bytes) -> dict[str, bytes]:
    (hlen,) = struct.unpack(">I", good[8:12])
    flipped = bytearray(good)
    flipped[-1] ^= 0x01
    bad_magic = b"XAPIFSB1" + good[8:]
    header = json.loads(good[12 : 12 + hlen])
    header["crc32"] = (header["crc32"] + 1) & 0xFFFFFFFF
    h2 = json.dumps(header).encode()
    bad_crc = MAGIC + struct.pack(">I", len(h2)) + h2 + good[12 + hlen :]
    return {
        "flipped data byte": bytes(flipped),
        "bad magic": bad_magic,
        "empty": b"",
        "header only": good[: 12 + hlen],
        "truncated data": good[:-1],
        "cut in header": good[:20],
        "huge header length": MAGIC + struct.pack(">I", 1 << 30) + good[12:],
        "garbage header": MAGIC + struct.pack(">I", 5) + b"{{{{{" + good[12 + hlen :],
        "non-object header": MAGIC + struct.pack(">I", 2) + b"[]" + good[12 + hlen :],
        "bad crc field": bad_crc,
        "extra data": good + b"x",
    }


def test_damaged_block_is_dropped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 2, payload(V1, 2))
    (path,) = block_files(tmp_path / "cache")
    good = path.read_bytes()
    for name, raw in damaged_variants(good).items():
        path.write_bytes(good)
        c.open()
        assert c.get(CALL, KIND, V1, 2) == payload(V1, 2), name
        path.write_bytes(raw)
        caplog.clear()
        misses = c.misses
        with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
            assert c.get(CALL, KIND, V1, 2) is None, name
        assert c.misses == misses + 1
        assert not path.exists(), name
        assert not c.has(CALL, KIND, V1, 2), name
        assert c.bytes_used == 0, name
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [
            f"cache: dropped a damaged block of {CALL}/{KIND} #2; fetching it again"
        ], name


def test_block_of_another_key_is_never_served(tmp_path: Path) -> None:
    """A whole, crc-correct file in the wrong place (other index/version/call) is dropped."""
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 10, payload(V1, 10))  # the short last block
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    root = tmp_path / "cache"
    src0 = artifact_dir(root) / f"{V1.token()}-0.blk"
    other_call = "11111111-2222-3333-4444-555555555555"
    targets = [
        artifact_dir(root) / f"{V1.token()}-1.blk",  # other index
        artifact_dir(root) / f"{V2.token()}-0.blk",  # other version
        artifact_dir(root, kind="stereo-recording") / f"{V1.token()}-0.blk",  # other kind
        artifact_dir(root, call_id=other_call) / f"{V1.token()}-0.blk",  # other call
    ]
    asks = [
        (CALL, KIND, V1, 1),
        (CALL, KIND, V2, 0),
        (CALL, "stereo-recording", V1, 0),
        (other_call, KIND, V1, 0),
    ]
    for target in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src0, target)
    # A version whose size differs makes the length wrong even for the right index.
    v_short = Version(size=BS // 2, etag=V1.etag, last_modified=V1.last_modified)
    t = artifact_dir(root) / f"{v_short.token()}-0.blk"
    shutil.copyfile(src0, t)
    targets.append(t)
    asks.append((CALL, KIND, v_short, 0))
    c.open()
    for target, (call_id, kind, version, index) in zip(targets, asks, strict=True):
        assert c.has(call_id, kind, version, index)
        assert c.get(call_id, kind, version, index) is None
        assert not target.exists()
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
    (p0, _p1) = sorted(block_files(tmp_path / "cache"), key=lambda p: p.name)
    p0.unlink()
    p0.mkdir()  # open() of a directory: IsADirectoryError
    assert c.get(CALL, KIND, V1, 0) is None

    def eio(*_a: object, **_k: object) -> Any:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blocks_mod, "open", eio, raising=False)
    assert c.get(CALL, KIND, V1, 1) is None
    monkeypatch.undo()
    assert c.get(CALL, KIND, V1, 1) == payload(V1, 1)


# -- crash safety -----------------------------------------------------------------------------


def test_open_removes_orphan_temp_files(tmp_path: Path) -> None:
    c = make(tmp_path)
    tmp_dir = tmp_path / "cache" / "tmp"
    old = tmp_dir / "0123456789abcdef.tmp"
    old.write_bytes(b"half a block")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    # A fresh one may be another process's put in flight: left alone.
    fresh = tmp_dir / "fedcba9876543210.tmp"
    fresh.write_bytes(b"being written")
    live = tmp_dir / f"{os.getppid()}-0123456789abcdef.tmp"
    live.write_bytes(b"being written by a live process")
    # A temp file of a process that is gone (kill -9) is a leftover however young it is.
    dead = subprocess.Popen(["true"])
    dead.wait()
    killed = tmp_dir / f"{dead.pid}-fedcba9876543210.tmp"
    killed.write_bytes(b"half a block")
    c.open()
    assert not old.exists()
    assert fresh.exists()
    assert live.exists()
    assert not killed.exists()
    assert c.bytes_used == 0


def test_kill_at_any_instant_never_serves_a_wrong_block(tmp_path: Path) -> None:
    """Simulate a crash at every byte of a write: the temp file cut anywhere, and (power loss
    without fsync) the renamed file cut anywhere. Every visible block verifies or is dropped."""
    c = make(tmp_path)
    data = payload(V1, 5)
    assert c.put(CALL, KIND, V1, 5, data)
    (path,) = block_files(tmp_path / "cache")
    whole = path.read_bytes()
    tmp_dir = tmp_path / "cache" / "tmp"
    cuts = sorted({*range(0, 80), *random.Random(1).sample(range(len(whole)), 60)})
    for cut in cuts:
        # Crash before the rename: only a temp file exists.
        path.unlink(missing_ok=True)
        orphan = tmp_dir / "aaaaaaaaaaaaaaaa.tmp"
        orphan.write_bytes(whole[:cut])
        os.utime(orphan, (1, 1))
        d = make(tmp_path)
        assert not orphan.exists()
        assert d.get(CALL, KIND, V1, 5) is None
        # Power loss after the rename: the visible file is torn.
        path.write_bytes(whole[:cut])
        d = make(tmp_path)
        assert d.get(CALL, KIND, V1, 5) is None
        assert not path.exists()
        assert d.verify().bad == 0
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
    one = file_size_of_one_block(tmp_path)
    c = BlockCache(tmp_path / "cache", max_bytes=3 * one + one // 2, block_size=BS)
    c.open()
    v = Version(size=50 * BS)
    for i in range(50):
        assert c.put(CALL, KIND, v, i, payload(v, i))
        files = block_files(tmp_path / "cache")
        assert len(files) <= 3
        assert sum(p.stat().st_size for p in files) <= c.max_bytes
        assert c.bytes_used <= c.max_bytes
    assert [c.has(CALL, KIND, v, i) for i in (46, 47, 48, 49)] == [False, True, True, True]


def test_block_larger_than_max_is_not_stored(tmp_path: Path) -> None:
    c = BlockCache(tmp_path / "cache", max_bytes=BS, block_size=BS)
    c.open()
    assert not c.put(CALL, KIND, V1, 0, payload(V1, 0))
    assert block_files(tmp_path / "cache") == []
    assert c.put(CALL, KIND, V1, 10, payload(V1, 10))  # the 100-byte last block fits


def test_lru_order_follows_gets(tmp_path: Path) -> None:
    one = file_size_of_one_block(tmp_path)
    c = BlockCache(tmp_path / "cache", max_bytes=3 * one + one // 2, block_size=BS)
    c.open()
    for i in (0, 1, 2):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    assert c.get(CALL, KIND, V1, 0) is not None
    assert c.put(CALL, KIND, V1, 3, payload(V1, 3))
    assert [c.has(CALL, KIND, V1, i) for i in range(4)] == [True, False, True, True]


def test_lru_order_survives_restart(tmp_path: Path) -> None:
    one = file_size_of_one_block(tmp_path)
    c = BlockCache(tmp_path / "cache", max_bytes=3 * one + one // 2, block_size=BS)
    c.open()
    for i in (0, 1, 2):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    base = time.time() - 1000
    # Block 1 oldest, then 2; block 0 is read in the next run (a get touches the mtime).
    for i, age in ((0, 0), (1, 10), (2, 20)):
        p = artifact_dir(tmp_path / "cache") / f"{V1.token()}-{i}.blk"
        os.utime(p, (base + age, base + age))
    d = BlockCache(tmp_path / "cache", max_bytes=3 * one + one // 2, block_size=BS)
    d.open()
    assert d.get(CALL, KIND, V1, 0) == payload(V1, 0)
    e = BlockCache(tmp_path / "cache", max_bytes=3 * one + one // 2, block_size=BS)
    e.open()
    assert e.put(CALL, KIND, V1, 3, payload(V1, 3))
    assert [e.has(CALL, KIND, V1, i) for i in range(4)] == [True, False, True, True]


def test_touch_is_throttled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    touched: list[object] = []
    monkeypatch.setattr(os, "utime", lambda p, *a, **k: touched.append(p))
    for _ in range(5):
        assert c.get(CALL, KIND, V1, 0) is not None
    assert touched == []  # just written: its mtime is already fresh
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
    one = c.bytes_used // 10
    base = time.time() - 1000
    for i in range(10):
        p = artifact_dir(tmp_path / "cache") / f"{V1.token()}-{i}.blk"
        os.utime(p, (base + i, base + i))
    d = BlockCache(tmp_path / "cache", max_bytes=4 * one + one // 2, block_size=BS)
    d.open()
    assert d.bytes_used <= d.max_bytes
    assert len(block_files(tmp_path / "cache")) == 4
    assert [d.has(CALL, KIND, V1, i) for i in range(10)] == [False] * 6 + [True] * 4


# -- disk trouble -----------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["replace", "write", "open"])
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

    def enospc(*_a: object, **_k: object) -> Any:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, target, enospc)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        for i in range(1, 6):
            assert not c.put(CALL, KIND, V1, i, payload(V1, i))
    monkeypatch.setattr(os, target, real)
    msgs = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    root = tmp_path / "cache"
    assert msgs == [
        f"cache: cannot write to {root} (No space left on device); reading from the network"
    ]
    assert block_files(root) == before
    assert list((root / "tmp").iterdir()) == []
    assert c.bytes_used == used
    assert [c.has(CALL, KIND, V1, i) for i in range(6)] == [True] + [False] * 5

    # A nearly full disk takes some writes and refuses others: still no new warning, from
    # blocks or metadata alike, until the quiet time has passed.
    assert c.put(CALL, KIND, V1, 1, payload(V1, 1))
    caplog.clear()
    monkeypatch.setattr(os, target, enospc)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert not c.put(CALL, KIND, V1, 2, payload(V1, 2))
        assert not MetaStore(root).put("artifact", "k", {"v": 1})
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    monkeypatch.setattr(cachefiles, "WARN_AGAIN_AFTER", 0.0)
    with caplog.at_level(logging.WARNING, logger="vapifs.cache"):
        assert not c.put(CALL, KIND, V1, 3, payload(V1, 3))
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


def test_other_os_errors_are_caught(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    c = make(tmp_path)
    for code in (errno.EDQUOT, errno.EROFS, errno.EIO, errno.EACCES):

        def fail(*_a: object, _code: int = code, **_k: object) -> Any:
            raise OSError(_code, os.strerror(_code))

        monkeypatch.setattr(os, "replace", fail)
        assert not c.put(CALL, KIND, V1, 0, payload(V1, 0))
        monkeypatch.undo()
    assert block_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_torn_write_leaves_nothing_visible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (disk full mid-block) leaves no block and no temp file."""
    c = make(tmp_path)
    real_write = os.write
    written = [0]

    def half(fd: int, data: Any) -> int:
        if written[0] > 100:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        n = real_write(fd, bytes(data)[:50])
        written[0] += n
        return n

    monkeypatch.setattr(os, "write", half)
    assert not c.put(CALL, KIND, V1, 0, payload(V1, 0))
    monkeypatch.undo()
    assert block_files(tmp_path / "cache") == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    assert c.get(CALL, KIND, V1, 0) is None


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
    assert len(block_files(tmp_path / "cache")) == 1
    assert c.bytes_used == block_files(tmp_path / "cache")[0].stat().st_size
    assert c.drop_artifact(CALL, "nothing") == 0


# -- clear with two processes -----------------------------------------------------------------


def test_clear_while_another_instance_uses_the_cache(tmp_path: Path) -> None:
    a = make(tmp_path)
    for i in range(5):
        assert a.put(CALL, KIND, V1, i, payload(V1, i))
    b = make(tmp_path)
    assert b.clear() == 5
    assert block_files(tmp_path / "cache") == []
    assert not (tmp_path / "cache" / "blocks" / artifact_dir(tmp_path / "cache").name[:2]).exists()
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


# -- threads ----------------------------------------------------------------------------------


def test_concurrent_get_put(tmp_path: Path) -> None:
    one = file_size_of_one_block(tmp_path)
    c = BlockCache(tmp_path / "cache", max_bytes=8 * one + one // 2, block_size=BS)
    c.open()
    v = Version(size=20 * BS, etag='"t"')
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
    files = block_files(tmp_path / "cache")
    on_disk = sum(p.stat().st_size for p in files)
    assert on_disk <= c.max_bytes
    assert c.bytes_used == on_disk
    assert c.stats().blocks == len(files)
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
    files = block_files(tmp_path / "cache")
    base = time.time() - 5000
    for n, p in enumerate(files):
        os.utime(p, (base + n * 100, base + n * 100))
    fresh = BlockCache(tmp_path / "cache", max_bytes=c.max_bytes, block_size=BS)
    fresh.open()
    s = fresh.stats()
    assert s.blocks == 4
    assert s.artifacts == 2
    assert s.bytes == sum(p.stat().st_size for p in files)
    assert s.oldest_access == pytest.approx(base)
    assert s.newest_access == pytest.approx(base + 300)


def test_verify(tmp_path: Path) -> None:
    c = make(tmp_path)
    for i in range(4):
        assert c.put(CALL, KIND, V1, i, payload(V1, i))
    root = tmp_path / "cache"
    adir = artifact_dir(root)
    good = BlockCache(root, max_bytes=c.max_bytes, block_size=BS)
    good.open()
    assert good.verify().bad == 0

    p1 = adir / f"{V1.token()}-1.blk"
    raw = bytearray(p1.read_bytes())
    raw[len(raw) // 2 + 200] ^= 0x40
    p1.write_bytes(bytes(raw))
    size1 = p1.stat().st_size
    report = c.verify()
    assert (report.checked, report.bad, report.bad_bytes) == (4, 1, size1)
    assert not p1.exists()
    assert not c.has(CALL, KIND, V1, 1)

    # A sound file under the wrong name (index or token) is bad too.
    (adir / f"{V1.token()}-2.blk").rename(adir / f"{V1.token()}-7.blk")
    (adir / f"{V1.token()}-3.blk").rename(adir / f"{V2.token()}-3.blk")
    report = c.verify()
    assert (report.checked, report.bad) == (3, 2)
    assert [p.name for p in block_files(root)] == [f"{V1.token()}-0.blk"]
    assert c.get(CALL, KIND, V1, 0) == payload(V1, 0)
    assert c.verify().bad == 0


def test_verify_drops_blocks_of_another_block_size(tmp_path: Path) -> None:
    c = make(tmp_path)
    assert c.put(CALL, KIND, V1, 0, payload(V1, 0))
    other = BlockCache(tmp_path / "cache", max_bytes=c.max_bytes, block_size=BS * 2)
    other.open()
    assert other.verify().bad == 1


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
