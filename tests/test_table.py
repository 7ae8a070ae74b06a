"""Real mounts: calls.csv and calls.jsonl, the table of the window."""

from __future__ import annotations

import csv
import io
import json
import os
import time

import pytest

from vapifs.calls import artifact_files, parse_time
from vapifs.demo.server import FakeVapi
from vapifs.table import COLUMNS

from .conftest import MountFactory

pytestmark = pytest.mark.mount


def window(fake: FakeVapi, days: float = 14.0) -> list[str]:
    horizon = time.time() - days * 86400
    created = {i: parse_time(fc.created_at) or 0.0 for i, fc in fake.calls.items()}
    return sorted((i for i in fake.calls if created[i] >= horizon), key=lambda i: (-created[i], i))


def test_calls_csv_parses_with_one_row_per_call_and_an_exact_size(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    path = m.mountpoint / "calls.csv"
    fake.reset_counters()
    size = os.stat(path).st_size  # before any read
    data = path.read_bytes()
    assert size == len(data) > 0
    rows = list(csv.DictReader(io.StringIO(data.decode(), newline="")))
    ids = window(fake)
    assert [r["id"] for r in rows] == ids
    assert tuple(rows[0]) == COLUMNS
    for r in rows:
        call = json.loads((m.calls / r["id"] / "call.json").read_text())
        assert r["createdAt"] == call["createdAt"]
        assert r["status"] == call["status"]
        assert r["endedAt"] == (call.get("endedAt") or "")
        assert r["assistantId"] == (call.get("assistantId") or "")
        assert r["type"] == call["type"]
        listed = set(os.listdir(m.calls / r["id"])) - {"call.json"}
        assert set(r["artifacts"].split()) == listed
        if call.get("endedAt") and call.get("startedAt"):
            took = parse_time(call["endedAt"]) - parse_time(call["startedAt"])  # type: ignore[operator]
            assert float(r["duration"]) == pytest.approx(took, abs=0.01)
    number = fake.calls[ids[0]].call["customer"]["number"]
    assert number.encode() not in data
    counts = fake.counters()
    # The listing made the table: no request per call (call.json reads above included).
    assert counts["api.get"] == 0 and counts["api.list"] <= 1
    assert {"calls.csv", "calls.jsonl"} <= set(os.listdir(m.mountpoint))


def test_calls_jsonl_matches_the_csv_and_survives_a_remount(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    jsonl = (m.mountpoint / "calls.jsonl").read_bytes()
    assert os.stat(m.mountpoint / "calls.jsonl").st_size == len(jsonl)
    rows = [json.loads(line) for line in jsonl.decode().splitlines()]
    assert [r["id"] for r in rows] == window(fake)
    for r in rows:
        names = set(artifact_files(fake.calls[r["id"]].call))
        assert names <= set(r["artifacts"])
    m.stop()
    fake.reset_counters()
    again = mount_factory(name="again", cache_dir=m.cache_dir)
    assert (again.mountpoint / "calls.jsonl").read_bytes() == jsonl
    assert fake.counters()["api.get"] == 0
