"""The block cache under real mounts: kill -9, damage, new versions, caps, full disks, offline."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import signal
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from vapifs.calls import artifact_files
from vapifs.demo.data import variant_artifact
from vapifs.demo.server import FakeVapi
from vapifs.meta import MetaStore
from vapifs.version import Version

from .blockfiles import (
    block_count,
    block_files,
    disk_bytes,
    files_of,
    patch,
    records,
    slot_offset,
)
from .conftest import VAPIFS, Mount, MountFactory, force_unmount

pytestmark = pytest.mark.mount

MiB = 1 << 20


@pytest.fixture
def big() -> Iterator[FakeVapi]:
    """A fake whose newest call has a 24 MB stereo, so that reads last long enough to kill."""
    with FakeVapi(seed=7, big_stereo_mb=24) as server:
        yield server


def artifacts(fake: FakeVapi) -> list[tuple[str, str, str, bytes]]:
    """(call id, file name, kind, source bytes) of every artifact the fake holds."""
    out = []
    for call_id, fc in fake.calls.items():
        for name, kind in artifact_files(fc.call).items():
            out.append((call_id, name, kind, fc.artifacts[kind]))
    return out


def biggest(fake: FakeVapi, n: int) -> list[tuple[str, str, str, bytes]]:
    return sorted(artifacts(fake), key=lambda a: -len(a[3]))[:n]


def gets(fake: FakeVapi, call_id: str, kind: str) -> int:
    return fake.counters().get(f"storage.get:{call_id}/{kind}", 0)


def blocks_of(cache_dir: Path, call_id: str, kind: str) -> list[int]:
    return sorted(i for p in files_of(cache_dir, call_id, kind) for i in records(p))


def cache_cmd(action: str, cache_dir: Path) -> str:
    result = subprocess.run(
        [*VAPIFS, "cache", action, "--cache-dir", str(cache_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def warnings(m: Mount) -> list[str]:
    return [line for line in m.log_text().splitlines() if " WARNING " in line]


def test_kill_9_during_concurrent_reads_never_leaves_a_bad_block(
    big: FakeVapi, mount_factory: MountFactory
) -> None:
    started = time.monotonic()
    files = biggest(big, 20)
    rng = random.Random(20)
    # Some storage answers pause a moment: downloads (and cache writes) spread over each round.
    big.set_knobs(stall_rate=0.3, stall_seconds=0.2)
    cache_dir = None
    cut: list[str] = []
    for _round in range(20):
        m = mount_factory(server=big, cache_dir=cache_dir)
        cache_dir = m.cache_dir

        def reader(
            call_id: str,
            name: str,
            data: bytes,
            pos: int,
            m: Mount = m,
        ) -> None:
            # A paced reader from a random offset: still reading when the kill comes, and
            # reaching blocks that earlier rounds did not fetch.
            try:
                with open(m.calls / call_id / name, "rb", buffering=0) as f:
                    f.seek(pos)
                    while True:
                        chunk = f.read(128 * 1024)
                        if not chunk:
                            break
                        assert chunk == data[pos : pos + len(chunk)]
                        pos += len(chunk)
                        time.sleep(0.01)
            except OSError:
                cut.append(name)  # the mount died under us: that is the point

        threads = [
            threading.Thread(
                target=reader, args=(c, name, data, rng.randrange(len(data))), daemon=True
            )
            for c, name, _kind, data in files
        ]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.5))
        m.proc.send_signal(signal.SIGKILL)
        m.proc.wait(10)
        force_unmount(m.mountpoint)
        for t in threads:
            t.join(10)
            assert not t.is_alive()
    assert cache_dir is not None
    assert len(cut) >= 10, "the kills did not interrupt reads"
    big.set_knobs(stall_rate=0.0)
    m = mount_factory(server=big, cache_dir=cache_dir)
    # Temp files of the killed processes are gone as soon as a mount opens the cache.
    assert list((cache_dir / "tmp").glob("*.tmp")) == []
    for call_id, name, _kind, data in files:
        assert (m.calls / call_id / name).read_bytes() == data, f"{call_id}/{name}"
    m.stop()
    assert re.search(r"checked [1-9]\d* blocks: 0 bad", cache_cmd("verify", cache_dir))
    assert time.monotonic() - started < 90


def test_a_damaged_block_is_dropped_and_fetched_again_with_one_warning(
    big: FakeVapi, mount_factory: MountFactory
) -> None:
    call_id, name, kind, data = biggest(big, 1)[0]
    m = mount_factory(server=big)
    assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    blocks = blocks_of(m.cache_dir, call_id, kind)
    assert len(blocks) == -(-len(data) // MiB)
    (path,) = files_of(m.cache_dir, call_id, kind)
    at = slot_offset(path, blocks[len(blocks) // 2]) + MiB - 1000  # in the data, not the header
    patch(path, at, bytes([path.read_bytes()[at] ^ 0x40]))

    big.reset_counters()
    m2 = mount_factory(server=big)
    assert (m2.calls / call_id / name).read_bytes() == data
    assert gets(big, call_id, kind) == 1
    m2.stop()
    lines = warnings(m2)
    assert len(lines) == 1, lines
    assert "damaged" in lines[0]
    assert re.search(r"checked \d+ blocks: 0 bad", cache_cmd("verify", m.cache_dir))


def _swap_target(fake: FakeVapi) -> tuple[str, str, str, bytes]:
    """The largest WAV stereo of at least 3 blocks that is not the biggest file."""
    return next(a for a in sorted(artifacts(fake), key=lambda a: len(a[3])) if len(a[3]) > 2 * MiB)


def test_a_new_version_between_two_mounts_is_served_whole(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    call_id, name, kind, old = _swap_target(fake)
    m = mount_factory()
    assert (m.calls / call_id / name).read_bytes() == old
    m.stop()
    new = variant_artifact(fake.calls[call_id], kind, seed=1)
    fake.swap_artifact(call_id, kind, new)

    m2 = mount_factory("--revalidate", "0")
    path = m2.calls / call_id / name
    assert os.stat(path).st_size == len(new)
    assert path.read_bytes() == new
    m2.stop()
    # Nothing of the old version is left on disk.
    # One file per version: one file left.
    assert len(files_of(m.cache_dir, call_id, kind)) == 1


def test_a_new_version_met_mid_read_is_never_mixed_with_the_old(
    big: FakeVapi, mount_factory: MountFactory
) -> None:
    # The first mount caches the start of the file only; the server then changes it. A mount
    # with the default revalidation trusts the cached start until a download meets the new
    # version: from then on only new bytes are served, and an open file never mixes the two.
    call_id, name, kind, old = biggest(big, 1)[0]
    m = mount_factory(server=big)
    with open(m.calls / call_id / name, "rb", buffering=0) as f:
        assert f.read(64 * 1024) == old[: 64 * 1024]
    m.stop()
    cached = len(blocks_of(m.cache_dir, call_id, kind))
    assert 1 <= cached < len(old) // MiB
    new = variant_artifact(big.calls[call_id], kind, seed=2)
    big.swap_artifact(call_id, kind, new)

    m2 = mount_factory(server=big)
    path = m2.calls / call_id / name
    got = bytearray()
    failed = False
    try:
        with open(path, "rb", buffering=0) as f:
            while chunk := f.read(MiB):
                got += chunk
    except OSError as exc:
        assert exc.errno == errno.EIO
        failed = True
    # The cached start of the old version went out before the change showed: the rest is an
    # honest error, never bytes of the new version spliced onto the old.
    assert failed
    assert old.startswith(got), "old and new bytes mixed"
    assert "changed on the server" in m2.log_text()
    # A file opened after the change reads the new version, whole.
    assert path.read_bytes() == new
    assert os.stat(path).st_size == len(new)
    m2.stop()


def test_cache_size_of_three_blocks_holds(big: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory("--cache-size", "3M", server=big)
    most = 0
    done = threading.Event()

    def on_disk() -> int:
        return disk_bytes(m.cache_dir)

    def watch() -> None:
        nonlocal most
        while not done.is_set():
            most = max(most, on_disk())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    total = 0
    # The big file last: it is made of whole blocks, so at most 3 of them can stay.
    try:
        for call_id, name, _kind, data in reversed(biggest(big, 40)):
            assert (m.calls / call_id / name).read_bytes() == data, f"{call_id}/{name}"
            total += len(data)
    finally:
        done.set()
        watcher.join()
    assert total >= 50 * 1000 * 1000
    assert most <= 3 * MiB
    assert on_disk() <= 3 * MiB
    assert 1 <= block_count(m.cache_dir) <= 3
    m.stop()
    # The cap holds across a restart too, and what is left is sound.
    m2 = mount_factory("--cache-size", "3M", server=big)
    for call_id, name, _kind, data in biggest(big, 3):
        assert (m2.calls / call_id / name).read_bytes() == data
    assert on_disk() <= 3 * MiB
    m2.stop()
    assert re.search(r"checked [1-9] blocks: 0 bad", cache_cmd("verify", m.cache_dir))


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    where = tmp_path / "tiny"
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(where)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)


def test_a_full_cache_disk_costs_one_warning_and_no_wrong_byte(
    big: FakeVapi, mount_factory: MountFactory, tiny_tmpfs: Path
) -> None:
    cache_dir = tiny_tmpfs / "cache"
    m = mount_factory(server=big, cache_dir=cache_dir)
    total = 0
    for call_id, name, _kind, data in biggest(big, 12):
        assert (m.calls / call_id / name).read_bytes() == data, f"{call_id}/{name}"
        total += len(data)
    assert total >= 20 * 1000 * 1000
    m.stop()
    lines = warnings(m)
    assert len(lines) == 1, lines
    assert "No space left" in lines[0]
    assert list((cache_dir / "tmp").glob("*.tmp")) == []
    assert re.search(r"checked [1-9]\d* blocks: 0 bad", cache_cmd("verify", cache_dir))
    # What did land is served from disk after a restart.
    m2 = mount_factory(server=big, cache_dir=cache_dir)
    for call_id, name, _kind, data in biggest(big, 12):
        assert (m2.calls / call_id / name).read_bytes() == data
    m2.stop()


def test_32_readers_of_one_cold_block_cause_one_download(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    call_id, name, kind, data = next(
        a for a in sorted(artifacts(fake), key=lambda a: -len(a[3])) if len(a[3]) < MiB
    )
    m = mount_factory()
    os.listdir(m.calls)
    fake.reset_counters()
    barrier = threading.Barrier(32)
    results: list[bytes] = []

    def reader() -> None:
        barrier.wait()
        results.append((m.calls / call_id / name).read_bytes())

    threads = [threading.Thread(target=reader) for _ in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [data] * 32
    assert gets(fake, call_id, kind) == 1
    # The signed URL came with the call object itself: no resolution was needed.
    assert fake.counters()["api.resolve"] == 0


def test_offline_serves_the_cache_and_fails_fast_then_recovers(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    listed = sorted(os.listdir(m.calls))
    cached = [a for a in artifacts(fake) if a[0] in listed][:6]
    for call_id, name, _kind, data in cached:
        assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    uncached = next(
        a for a in artifacts(fake) if a[0] in listed and a[0] not in {c[0] for c in cached}
    )

    fake.pause()
    try:
        t0 = time.monotonic()
        m2 = mount_factory()
        assert time.monotonic() - t0 < 5
        assert sorted(os.listdir(m2.calls)) == listed
        for call_id, name, _kind, data in cached:
            directory = m2.calls / call_id
            assert name in os.listdir(directory)
            assert os.stat(directory / name).st_size == len(data)
            assert (directory / name).read_bytes() == data
            assert b'"id"' in (directory / "call.json").read_bytes()
        call_id, name, _kind, data = uncached
        for limit in (10, 2):  # once the API is known down, failing takes no retries at all
            t0 = time.monotonic()
            with pytest.raises(OSError) as info:
                (m2.calls / call_id / name).read_bytes()
            assert info.value.errno == errno.EIO
            assert time.monotonic() - t0 < limit
    finally:
        fake.resume()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert (m2.calls / call_id / name).read_bytes() == data
            break
        except OSError:
            assert time.monotonic() < deadline, "the mount did not recover"
            time.sleep(0.5)
    m2.stop()


def test_cache_commands(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    files = biggest(fake, 6)
    for call_id, name, _kind, data in files[:3]:
        assert (m.calls / call_id / name).read_bytes() == data
    time.sleep(2.5)  # the mount publishes its figures every 2 s
    blocks = block_count(m.cache_dir)
    stats = cache_cmd("stats", m.cache_dir)
    size = int(re.findall(r"bytes:       (\d+) ", stats)[0])
    assert disk_bytes(m.cache_dir) <= size <= disk_bytes(m.cache_dir) + 3 * 3 * 4096
    assert f"blocks:      {blocks}\n" in stats
    assert "artifacts:   3\n" in stats
    assert re.search(r"oldest access: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stats)
    assert re.search(r"newest access: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stats)
    assert re.search(rf"running mount: pid {m.proc.pid} on {re.escape(str(m.mountpoint))}", stats)
    # The figures are the mount's own: three files read cold came from the network.
    rate = re.search(r"hit rate \S+ \((\d+) memory \+ (\d+) disk of (\d+) blocks", stats)
    assert rate is not None, stats
    memory, disk, total = (int(rate.group(i)) for i in (1, 2, 3))
    assert total - memory - disk >= 3 and disk == 0, stats

    victim = block_files(m.cache_dir)[0]
    raw = bytearray(victim.read_bytes())
    raw[-1] ^= 1
    victim.write_bytes(bytes(raw))
    assert f"checked {blocks} blocks: 1 bad" in cache_cmd("verify", m.cache_dir)
    assert f"checked {blocks - 1} blocks: 0 bad" in cache_cmd("verify", m.cache_dir)

    out = cache_cmd("clear", m.cache_dir)
    assert f"cleared {blocks - 1} blocks" in out
    assert "running mount" in out
    assert block_files(m.cache_dir) == []
    for call_id, name, _kind, data in files:
        assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    assert block_files(m.cache_dir)  # the mount filled the cache again
    stats = cache_cmd("stats", m.cache_dir)
    assert "running mounts: none" in stats
    assert warnings(m) == []


def test_blocks_read_just_before_an_unmount_are_all_on_disk(
    big: FakeVapi, mount_factory: MountFactory
) -> None:
    call_id, name, kind, data = biggest(big, 1)[0]
    m = mount_factory(server=big)
    assert (m.calls / call_id / name).read_bytes() == data
    m.stop()  # at once: the disk writes may still be queued
    assert len(blocks_of(m.cache_dir, call_id, kind)) == -(-len(data) // MiB)
    big.pause()
    try:
        m2 = mount_factory(server=big)
        assert (m2.calls / call_id / name).read_bytes() == data
        m2.stop()
    finally:
        big.resume()


def write_older_layout(cache_dir: Path, call_id: str, kind: str, data: bytes) -> int:
    """The artifact's blocks as the layout before this one kept them: a file per block under
    blocks/, each a magic, a JSON header and the data. Returns how many were written."""
    doc = MetaStore(cache_dir).get("artifact", f"{call_id}/{kind}")
    assert doc is not None
    version = doc["version"]
    token = Version.from_json(version).token()
    h = hashlib.sha256(f"{call_id}/{kind}".encode()).hexdigest()[:32]
    folder = cache_dir / "blocks" / h[:2] / h
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for index in range(0, -(-len(data) // MiB)):
        chunk = data[index * MiB : (index + 1) * MiB]
        header = json.dumps(
            {
                "call_id": call_id,
                "kind": kind,
                "version": version,
                "index": index,
                "length": len(chunk),
                "crc32": zlib.crc32(chunk),
            },
            separators=(",", ":"),
        ).encode()
        block = b"VAPIFSB1" + struct.pack(">I", len(header)) + header + chunk
        (folder / f"{token}-{index}.blk").write_bytes(block)
        count += 1
    return count


def test_a_cache_of_the_older_layout_is_dropped_once_and_reads_stay_identical(
    big: FakeVapi, mount_factory: MountFactory
) -> None:
    call_id, name, kind, data = biggest(big, 1)[0]
    m = mount_factory(server=big)
    assert (m.calls / call_id / name).read_bytes() == data
    m.stop()
    cache_dir = m.cache_dir
    # The same cache as the older layout would have left it: its metadata (versions, call
    # objects) as they are, its blocks one file each, and none in this layout.
    for p in block_files(cache_dir):
        p.unlink()
    written = write_older_layout(cache_dir, call_id, kind, data)
    assert written == -(-len(data) // MiB)

    big.reset_counters()
    m2 = mount_factory(server=big, cache_dir=cache_dir)
    assert (m2.calls / call_id / name).read_bytes() == data
    m2.stop()
    lines = [line for line in m2.log_text().splitlines() if "older cache layout" in line]
    assert len(lines) == 1, lines
    assert f"dropped {written} blocks of an older cache layout" in lines[0]
    assert " INFO " in lines[0]
    assert warnings(m2) == []
    assert not (cache_dir / "blocks").exists()
    assert gets(big, call_id, kind) >= 1  # fetched again, never read from the old files
    assert blocks_of(cache_dir, call_id, kind) == list(range(written))

    # This layout is never taken for the older one: the next mount drops nothing and reads
    # the file from the disk alone.
    big.reset_counters()
    m3 = mount_factory(server=big, cache_dir=cache_dir)
    assert (m3.calls / call_id / name).read_bytes() == data
    m3.stop()
    assert "older cache layout" not in m3.log_text()
    assert gets(big, call_id, kind) == 0
