"""`vapifs stats`: a running mount's live figures agree exactly with the fake's own counters."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from vapifs.calls import artifact_files
from vapifs.defaults import PAGE_CACHE_NOTE, STATS_FILE
from vapifs.demo.server import FakeVapi

from .conftest import VAPIFS, MountFactory

pytestmark = pytest.mark.mount


def stats_json(mountpoint: Path) -> dict[str, Any]:
    out = subprocess.run(
        [*VAPIFS, "stats", str(mountpoint), "--json"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    doc = json.loads(out.stdout)
    assert isinstance(doc, dict)
    return doc


def figures(doc: dict[str, Any]) -> dict[str, int]:
    return {
        "api.list": doc["requests"]["api_list"],
        "api.get": doc["requests"]["api_get"],
        "api.resolve": doc["requests"]["api_resolve"],
        "storage.requests": doc["requests"]["storage_get"],
        "storage.bytes": doc["bytes"]["network"],
    }


def settled(mountpoint: Path, fake: FakeVapi) -> dict[str, Any]:
    """The mount's figures once they agree with the fake's (the fake counts a body just after
    writing it, and read-ahead may still be landing): they must agree within a few seconds."""
    deadline = time.monotonic() + 10
    while True:
        doc = stats_json(mountpoint)
        counters = fake.counters()
        mine = figures(doc)
        theirs = {k: counters.get(k, 0) for k in mine}
        if mine == theirs or time.monotonic() > deadline:
            assert mine == theirs
            return doc
        time.sleep(0.2)


def test_stats_agree_exactly_with_the_fake(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    calls = [c for c in fake.calls.values() if c.artifacts][:3]
    os.listdir(m.calls)
    read = 0
    for fc in calls[:2]:
        for name in artifact_files(fc.call):
            read += len((m.calls / fc.id / name).read_bytes())
    os.stat(m.calls / calls[2].id / "call.json")
    (m.calls / calls[2].id / "call.json").read_bytes()

    doc = settled(m.mountpoint, fake)
    assert doc["mountpoint"] == str(m.mountpoint)
    assert doc["pid"] == m.proc.pid
    assert doc["bytes"]["network"] >= read > 0
    assert doc["bytes"]["read"] >= read
    assert doc["signed_url_resolutions"] == fake.counters()["api.resolve"]
    assert doc["open_files"] == 0
    assert doc["errors"] == {"reads": 0, "api_attempts": 0, "storage_attempts": 0}
    assert 0 < doc["cache"]["bytes_used"] <= doc["cache"]["max_bytes"]
    assert doc["uptime"] > 0
    assert doc["note"] == PAGE_CACHE_NOTE

    with open(m.calls / calls[0].id / "call.json", "rb"):
        assert stats_json(m.mountpoint)["open_files"] == 1

    # The stats file is the root's alone and never listed, so `ls -a`, `cp -a` and backups
    # never see it; each open reads fresh figures.
    assert STATS_FILE not in os.listdir(m.mountpoint)
    first = json.loads((m.mountpoint / STATS_FILE).read_bytes())
    assert first["pid"] == m.proc.pid
    (m.calls / calls[1].id / "call.json").read_bytes()
    assert json.loads((m.mountpoint / STATS_FILE).read_bytes())["uptime"] > first["uptime"]
    with pytest.raises(FileNotFoundError):
        os.stat(m.calls / STATS_FILE)
    with pytest.raises(OSError) as info:
        (m.mountpoint / STATS_FILE).write_bytes(b"{}")
    assert info.value.errno == errno.EROFS
    # No extended attributes: the kernel answers for the mount, so `ls -l` costs the mount
    # no round trip per file for them.
    for path in (m.mountpoint, m.calls, m.calls / calls[0].id / "call.json"):
        with pytest.raises(OSError) as info:
            os.getxattr(path, "user.vapifs.stats")
        assert info.value.errno == errno.EOPNOTSUPP

    table = subprocess.run(
        [*VAPIFS, "stats", str(m.mountpoint)], capture_output=True, text=True, timeout=30
    )
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    labels = [
        "API requests: list",
        "API requests: get",
        "API requests: resolve",
        "storage GETs",
        "signed-URL resolutions",
        "bytes from network",
        "bytes from disk cache",
        "bytes from memory",
        "hit ratio",
        "open files",
        "failed reads",
        "cache",
        "uptime",
    ]
    for label in labels:
        assert any(line.startswith(label + " ") for line in lines), label
    column = {len(line) - len(line[line.index("  ") :].lstrip()) for line in lines}
    assert len(column) == 1, "the values are not aligned"
    assert f"{doc['bytes']['network']:,} bytes" in table.stdout
    assert "kernel page cache" in table.stdout


def test_a_remount_reads_from_disk_and_says_so(fake: FakeVapi, mount_factory: MountFactory) -> None:
    fc = next(c for c in fake.calls.values() if c.artifacts)
    names = list(artifact_files(fc.call))
    m = mount_factory()
    for name in names:
        (m.calls / fc.id / name).read_bytes()
    settled(m.mountpoint, fake)
    m.stop()

    fake.reset_counters()
    m2 = mount_factory(name="again")
    total = sum(len((m2.calls / fc.id / name).read_bytes()) for name in names)
    doc = settled(m2.mountpoint, fake)
    assert doc["bytes"]["network"] == 0 and doc["requests"]["storage_get"] == 0
    assert doc["bytes"]["disk_cache"] >= total
    assert doc["hit_ratio"] == 1.0


def test_stats_of_something_else_is_a_one_line_error(tmp_path: Path) -> None:
    for path in (tmp_path, tmp_path / "missing"):
        out = subprocess.run(
            [*VAPIFS, "stats", str(path)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 1
        assert out.stdout == ""
        assert len(out.stderr.splitlines()) == 1 and str(path) in out.stderr
