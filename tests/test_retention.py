"""Retention: what the server no longer has, or what is older than --max-cache-age, leaves
the cache dir (checked by searching its bytes for the call's audio, transcript and id)."""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from vapifs.calls import artifact_files, modified_at
from vapifs.demo.data import FakeCall
from vapifs.demo.server import FakeVapi

from .conftest import Mount, MountFactory
from .test_faults import errno_of

pytestmark = pytest.mark.mount


def _names(fc: FakeCall) -> dict[str, str]:
    return {kind: name for name, kind in artifact_files(fc.call).items()}


def _transcript(fc: FakeCall) -> list[str]:
    text = (fc.call.get("artifact") or {}).get("transcript") or ""
    return [line for line in text.splitlines() if len(line) >= 16]


def _needles(fake: FakeVapi, fc: FakeCall, kinds: set[str] | None = None) -> dict[str, bytes]:
    """Bytes that say the cache holds something of this call and of no other: its audio and
    logs, and (for the whole call) its id, its customer's number and its transcript."""
    found: dict[str, bytes] = {}
    if kinds is None:
        found["call id"] = fc.id.encode()
        number = (fc.call.get("customer") or {}).get("number")
        if number:
            found["number"] = str(number).encode()
        others = {line for o in fake.calls.values() if o is not fc for line in _transcript(o)}
        own = [line for line in _transcript(fc) if line not in others]
        if own:
            found["transcript"] = own[0].encode()
    for kind, data in fc.artifacts.items():
        if kinds is not None and kind not in kinds:
            continue
        for k in (1, 2, 3):
            chunk = data[len(data) * k // 4 :][:64]
            if len(data) >= 256 and len(set(chunk)) > 1:
                found[f"{kind} at {k}/4"] = chunk
    assert found
    return found


def _in_cache(cache_dir: Path, needles: dict[str, bytes]) -> list[str]:
    blob = b"".join(_contents(p) for p in cache_dir.rglob("*") if p.is_file())
    return sorted(what for what, needle in needles.items() if needle in blob)


def _contents(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:  # a temporary file renamed into place since it was listed
        return b""


def _within(seconds: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds:g}s"
        time.sleep(0.2)


def _settled_calls(fake: FakeVapi) -> list[FakeCall]:
    """Calls in the window that ended hours ago with a recording and logs."""
    now = time.time()
    return [
        fc
        for fc in sorted(fake.calls.values(), key=lambda fc: fc.created_at, reverse=True)
        if fc.call["status"] == "ended"
        and {"stereo", "mono", "logs"} <= set(fc.artifacts)
        and 7200 < now - modified_at(fc.call) < 12 * 86400
    ]


def _read_all(m: Mount, fc: FakeCall) -> None:
    path = m.calls / fc.id
    for name in os.listdir(path):  # recordings, call.json, transcript, both views of the logs
        data = (path / name).read_bytes()
        kind = artifact_files(fc.call).get(name)
        if kind is not None:
            assert data == fc.artifacts[kind], name


def test_a_call_past_retention_leaves_nothing_in_the_cache_after_revalidation(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    gone, kept = _settled_calls(fake)[:2]
    m = mount_factory("--revalidate", "3s")
    assert gone.id in os.listdir(m.calls)  # the stored listing names it too
    _read_all(m, gone)
    _read_all(m, kept)
    needles, others = _needles(fake, gone), _needles(fake, kept)
    _within(5, lambda: _in_cache(m.cache_dir, needles) == sorted(needles))  # the search sees
    fake.forget_call(gone.id)
    time.sleep(3.5)  # past --revalidate: the next look asks the API, which answers 404
    assert errno_of(lambda: os.listdir(m.calls / gone.id)) == errno.ENOENT
    _within(5, lambda: _in_cache(m.cache_dir, needles) == [])
    assert gone.id not in os.listdir(m.calls)
    for view in ("by-date", "by-assistant"):
        for group in os.listdir(m.mountpoint / view):
            assert gone.id not in os.listdir(m.mountpoint / view / group)
    assert _in_cache(m.cache_dir, others) == sorted(others)  # only that call went
    m.stop()
    assert _in_cache(m.cache_dir, needles) == []
    again = mount_factory(cache_dir=m.cache_dir, name="again")
    assert gone.id not in os.listdir(again.calls)
    assert "Traceback" not in m.log_text()


def test_an_artifact_past_retention_leaves_its_call_and_the_cache(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    fc = _settled_calls(fake)[0]
    names = _names(fc)
    m = mount_factory("--revalidate", "3s")
    _read_all(m, fc)
    stereo, rest = _needles(fake, fc, {"stereo"}), _needles(fake, fc, {"mono"})
    _within(5, lambda: _in_cache(m.cache_dir, {**stereo, **rest}) == sorted({**stereo, **rest}))
    fake.forget_artifact(fc.id, "stereo")
    time.sleep(3.5)
    assert names["stereo"] not in os.listdir(m.calls / fc.id)  # the listing checks sizes
    # The kernel is told to forget the name once the listing that found it gone is answered.
    _within(2, lambda: errno_of(lambda: os.stat(m.calls / fc.id / names["stereo"])) == errno.ENOENT)
    _within(5, lambda: _in_cache(m.cache_dir, stereo) == [])
    assert (m.calls / fc.id / names["mono"]).read_bytes() == fc.artifacts["mono"]
    assert _in_cache(m.cache_dir, rest) == sorted(rest)


def test_max_cache_age_drops_old_data_at_start_and_as_it_ages(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    first, second = _settled_calls(fake)[:2]
    m = mount_factory(name="plain")
    _read_all(m, first)
    m.stop()
    needles = _needles(fake, first)
    assert _in_cache(m.cache_dir, needles) == sorted(needles)
    time.sleep(2.5)
    # At start: everything older than the age goes, whatever the server says.
    start = mount_factory("--max-cache-age", "2s", cache_dir=m.cache_dir, name="start")
    _within(5, lambda: _in_cache(m.cache_dir, needles) == [])
    start.stop()
    aged = mount_factory("--max-cache-age", "8s", cache_dir=m.cache_dir, name="aged")
    # Then as it ages: bytes fetched now stay a while, then go; the files still read.
    started = time.monotonic()
    _read_all(aged, second)
    recent = _needles(fake, second, {"stereo", "mono"})
    assert _in_cache(m.cache_dir, recent) == sorted(recent)
    _within(8 + 8, lambda: _in_cache(m.cache_dir, recent) == [])
    assert time.monotonic() - started > 8 - 1
    _read_all(aged, second)
    _read_all(aged, first)
    assert "Traceback" not in aged.log_text()
