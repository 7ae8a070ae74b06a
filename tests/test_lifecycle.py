"""A mount that lives all day: calls that change under it, and calls it must list offline."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from vapifs.calls import artifact_files, created_at, modified_at, transcript
from vapifs.demo.server import FakeVapi

from .conftest import MountFactory

pytestmark = pytest.mark.mount

DIR_TTL = 2.0


def _within(seconds: float, check: Callable[[], bool]) -> float:
    """How long `check` took to hold; fails after `seconds`."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, f"not within {seconds:g}s"
        time.sleep(0.1)
    return time.monotonic() - started


def _status(path: Path) -> str:
    return str(json.loads((path / "call.json").read_bytes())["status"])


def test_a_call_in_progress_then_ended_then_with_artifacts_shows_them_within_3_dir_ttl(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    fc = next(
        fc
        for fc in sorted(fake.calls.values(), key=lambda fc: fc.created_at, reverse=True)
        if fc.call["status"] == "ended" and "stereo" in fc.artifacts and "logs" in fc.artifacts
    )
    complete = dict(fc.artifacts)
    names = {kind: name for name, kind in artifact_files(fc.call).items()}
    text = transcript(fc.call)
    fake.set_call_stage(fc.id, "in-progress")
    m = mount_factory("--dir-ttl", f"{DIR_TTL:g}s")
    path = m.calls / fc.id
    assert fc.id in os.listdir(m.calls)
    assert os.listdir(path) == ["call.json"]
    assert _status(path) == "in-progress"

    fake.set_call_stage(fc.id, "ended")
    _within(3 * DIR_TTL, lambda: _status(path) == "ended")
    assert os.listdir(path) == ["call.json"]  # ended, nothing attached yet

    # Still nothing after a while: the call keeps being asked for, not forgotten.
    time.sleep(2 * DIR_TTL)
    gets = fake.counters()["api.get"]
    fake.set_call_stage(fc.id, "complete")
    _within(3 * DIR_TTL, lambda: names["stereo"] in os.listdir(path))
    assert fake.counters()["api.get"] > gets
    listed = set(os.listdir(path))
    assert {names[kind] for kind in complete} <= listed
    assert "call-logs.jsonl" in listed and ("transcript.txt" in listed) == (text is not None)
    for kind, data in complete.items():
        assert os.stat(path / names[kind]).st_size == len(data)
        assert (path / names[kind]).read_bytes() == data, kind
    call = json.loads((path / "call.json").read_bytes())
    assert call["status"] == "ended" and set(artifact_files(call)) == set(names.values())
    if text is not None:
        assert (path / "transcript.txt").read_text().rstrip("\n") == text.rstrip("\n")
    assert "Traceback" not in m.log_text()


def test_an_old_ended_call_is_not_asked_for_again(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--dir-ttl", "1s")
    now = time.time()
    old = [
        fc
        for fc in fake.calls.values()
        if fc.call["status"] == "ended" and fc.artifacts and now - modified_at(fc.call) > 7200
    ]
    assert old
    for fc in old[:3]:
        os.listdir(m.calls / fc.id)
    gets = fake.counters()["api.get"]
    time.sleep(2.5)
    for fc in old[:3]:
        os.listdir(m.calls / fc.id)
        (m.calls / fc.id / "call.json").read_bytes()
    assert fake.counters()["api.get"] == gets


def test_offline_ls_lists_the_calls_stored_by_lookups_alone(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    now = time.time()
    by_age = sorted(fake.calls.values(), key=lambda fc: fc.created_at, reverse=True)
    recent = [fc for fc in by_age if now - (created_at(fc.call) or 0) < 13 * 86400]
    old = [fc for fc in by_age if now - (created_at(fc.call) or 0) > 15 * 86400]
    opened, outside = recent[1:5], old[0]
    first = mount_factory(name="online")
    for fc in [*opened, outside]:  # as from links in a ticket: no `ls calls/`
        assert json.loads((first.calls / fc.id / "call.json").read_bytes())["id"] == fc.id
    assert fake.list_queries == [{"limit": "1"}]  # the key check, no listing
    first.stop()
    fake.stop()
    m = mount_factory(cache_dir=first.cache_dir, name="offline")
    for _ in range(3):
        assert os.listdir(m.calls) == [fc.id for fc in opened]  # newest first
    days: dict[str, set[str]] = {}
    assistants: dict[str, set[str]] = {}
    for fc in opened:
        day = datetime.fromtimestamp(created_at(fc.call) or 0, UTC).strftime("%Y-%m-%d")
        days.setdefault(day, set()).add(fc.id)
        assistants.setdefault(str(fc.call["assistantId"]), set()).add(fc.id)
    for view, groups in (("by-date", days), ("by-assistant", assistants)):
        assert set(os.listdir(m.mountpoint / view)) == set(groups)
        for key, ids in groups.items():
            assert set(os.listdir(m.mountpoint / view / key)) == ids
    assert json.loads((m.calls / opened[0].id / "call.json").read_bytes())["id"] == opened[0].id
    warnings = [line for line in m.log_text().splitlines() if "stored on disk" in line]
    assert len(warnings) == 1, m.log_text()
    assert "Traceback" not in m.log_text()
