"""Real mounts: decompressed logs, by-date/by-assistant links, the window and its refresh."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from vapifs.calls import artifact_files, parse_time
from vapifs.demo.data import extra_call, generate_calls, light_calls
from vapifs.demo.server import FakeVapi
from vapifs.walk import SCAN_AHEAD, SCAN_DIRS

from .conftest import MountFactory

pytestmark = pytest.mark.mount


def created(fake: FakeVapi, call_id: str) -> float:
    ts = parse_time(fake.calls[call_id].created_at)
    assert ts is not None
    return ts


def in_window(fake: FakeVapi, days: float = 14.0) -> set[str]:
    horizon = time.time() - days * 86400
    return {i for i in fake.calls if created(fake, i) >= horizon}


def listings(fake: FakeVapi) -> list[dict[str, str]]:
    """GET /call queries, without the key check a mount starts with."""
    return [q for q in fake.list_queries if q != {"limit": "1"}]


def with_logs(fake: FakeVapi) -> list[str]:
    return sorted(i for i, fc in fake.calls.items() if "logs" in fc.artifacts)


def test_decompressed_logs_grep_stat_and_random_access(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    for call_id in with_logs(fake):
        plain = gzip.decompress(fake.calls[call_id].artifacts["logs"])
        path = m.calls / call_id / "call-logs.jsonl"
        fake.reset_counters()
        assert os.stat(path).st_size == len(plain)  # before any read
        with open(path, "rb") as f:
            f.seek(-1024, os.SEEK_END)
            assert f.read() == plain[-1024:]
            f.seek(0)
            assert f.read(1024) == plain[:1024]
        assert path.read_bytes() == plain
        grep = subprocess.run(["grep", "-c", "ERROR", str(path)], capture_output=True, text=True)
        assert int(grep.stdout) == plain.count(b"ERROR")
        assert fake.counters().get(f"storage.get:{call_id}/logs", 0) == 1
    no_logs = [i for i, fc in fake.calls.items() if "logs" not in fc.artifacts]
    for call_id in no_logs:
        assert not (m.calls / call_id / "call-logs.jsonl").exists()


def test_logs_work_with_plain_tools(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    call_id = with_logs(fake)[0]
    plain = gzip.decompress(fake.calls[call_id].artifacts["logs"])
    path = m.calls / call_id / "call-logs.jsonl"
    gunzip = subprocess.run(
        ["gunzip", "-c", str(m.calls / call_id / "call-logs.jsonl.gz")], capture_output=True
    )
    assert gunzip.stdout == plain == path.read_bytes()
    less = subprocess.run(["less", "-F", str(path)], capture_output=True, env={"TERM": "dumb"})
    assert less.stdout == plain
    # rg counts lines, like grep -c.
    rg = subprocess.run(["rg", "-c", "ERROR", str(path)], capture_output=True, text=True)
    want_lines = sum(1 for line in plain.splitlines() if b"ERROR" in line)
    assert int(rg.stdout or 0) == want_lines
    jq = subprocess.run(["jq", "-r", ".level", str(path)], capture_output=True, text=True)
    assert jq.returncode == 0
    assert jq.stdout.count("ERROR") == plain.count(b'"level":"ERROR"')


def test_the_logs_size_survives_a_remount_without_a_download(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    call_id = with_logs(fake)[0]
    path = m.calls / call_id / "call-logs.jsonl"
    size = os.stat(path).st_size
    m.stop()
    fake.reset_counters()
    again = mount_factory(cache_dir=m.cache_dir)
    assert os.stat(again.calls / call_id / "call-logs.jsonl").st_size == size
    assert fake.counters().get("storage.requests", 0) == 0


def _groups(fake: FakeVapi, zone: ZoneInfo) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    days: dict[str, set[str]] = {}
    assistants: dict[str, set[str]] = {}
    for call_id in in_window(fake):
        day = datetime.fromtimestamp(created(fake, call_id), zone).strftime("%Y-%m-%d")
        days.setdefault(day, set()).add(call_id)
        assistants.setdefault(str(fake.calls[call_id].call["assistantId"]), set()).add(call_id)
    return days, assistants


@pytest.mark.parametrize("zone", ["UTC", "Pacific/Kiritimati"])
def test_by_date_and_by_assistant_link_to_calls(
    fake: FakeVapi, mount_factory: MountFactory, zone: str
) -> None:
    m = mount_factory("--timezone", zone)
    assert sorted(os.listdir(m.mountpoint)) == [
        "by-assistant",
        "by-date",
        "calls",
        "calls.csv",
        "calls.jsonl",
    ]
    days, assistants = _groups(fake, ZoneInfo(zone))
    for view, groups in (("by-date", days), ("by-assistant", assistants)):
        root = m.mountpoint / view
        assert set(os.listdir(root)) == set(groups)
        for key, ids in groups.items():
            assert set(os.listdir(root / key)) == ids, f"{view}/{key}"
            for call_id in ids:
                link = root / key / call_id
                assert os.readlink(link) == f"../../calls/{call_id}"
                assert os.path.islink(link)
                assert link.resolve() == (m.calls / call_id).resolve()
                assert (link / "call.json").is_file()


def test_names_outside_the_views_cost_no_request(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    days = os.listdir(m.mountpoint / "by-date")
    day = days[0]
    some_call = next(iter(in_window(fake)))
    fake.reset_counters()
    for name in (
        "by-date/yesterday",
        "by-date/1999-01-01",
        "by-date/2026-13-45",
        f"by-date/{day}/not-a-call",
        f"by-date/{day}/00000000-0000-4000-8000-000000000000",
        "by-assistant/nobody",
        "by-assistant/..hidden",
        f"by-assistant/{some_call}",
        "by-week",
    ):
        with pytest.raises(FileNotFoundError):
            os.stat(m.mountpoint / name)
    assert fake.counters().get("api.requests", 0) == 0


def test_a_new_call_appears_with_one_incremental_request(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--dir-ttl", "1s")
    before = set(os.listdir(m.calls))
    assert before == in_window(fake)
    fake.reset_counters()
    new = extra_call(1, base_seed=fake.seed, org_id=fake.org_id)
    fake.add_call(new)
    deadline = time.monotonic() + 5
    while new.id not in os.listdir(m.calls):
        assert time.monotonic() < deadline, "the new call did not appear"
        time.sleep(0.2)
    assert set(os.listdir(m.calls)) == before | {new.id}
    queries = listings(fake)
    assert len(queries) == 1, queries  # one incremental request: no full listing
    assert "createdAtGt" in queries[0] and "createdAtGe" not in queries[0]
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert new.id in os.listdir(m.mountpoint / "by-date" / today)
    assistant = str(new.call["assistantId"])
    assert new.id in os.listdir(m.mountpoint / "by-assistant" / assistant)

    # A remount starts from the remembered listing and asks only for newer calls.
    m.stop()
    fake.reset_counters()
    again = mount_factory("--dir-ttl", "1s", cache_dir=m.cache_dir)
    time.sleep(1.1)
    assert set(os.listdir(again.calls)) == before | {new.id}
    queries = listings(fake)
    assert len(queries) == 1 and "createdAtGt" in queries[0], queries


def test_assistant_filter_lists_once_per_assistant(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    _, assistants = _groups(fake, ZoneInfo("UTC"))
    chosen = sorted(assistants)[:2]
    fake.reset_counters()
    m = mount_factory(*[arg for a in chosen for arg in ("--assistant", a)])
    assert set(os.listdir(m.calls)) == assistants[chosen[0]] | assistants[chosen[1]]
    assert sorted(os.listdir(m.mountpoint / "by-assistant")) == chosen
    assert sorted(q.get("assistantId", "") for q in listings(fake)) == chosen


def test_since_and_until_dates(fake: FakeVapi, mount_factory: MountFactory) -> None:
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    since, until = today - timedelta(days=4), today - timedelta(days=1)
    m = mount_factory("--since", since.strftime("%Y-%m-%d"), "--until", until.strftime("%Y-%m-%d"))
    expected = {i for i in fake.calls if since.timestamp() <= created(fake, i) < until.timestamp()}
    assert expected, "the fake has calls in that range"
    assert set(os.listdir(m.calls)) == expected
    days = {(since + timedelta(days=d)).strftime("%Y-%m-%d") for d in range(3)}
    assert set(os.listdir(m.mountpoint / "by-date")) <= days


def test_since_duration(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory("--since", "3d")
    assert set(os.listdir(m.calls)) == in_window(fake, 3)


def test_bad_window_options_are_usage_errors(fake: FakeVapi, tmp_path: Path) -> None:
    from .conftest import VAPIFS

    env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
    bad = (
        ["--since", "14"],
        ["--since", "2025"],
        ["--since", "soon"],
        ["--timezone", "Mars/Olympus"],
    )
    # mount and prefetch read --since/--until/--timezone alike, and refuse the same values.
    for command in (["mount", str(tmp_path)], ["prefetch"]):
        for args in bad:
            if "--since" not in args:
                args = [*args, "--since", "1d"]
            result = subprocess.run(
                [
                    *VAPIFS,
                    *command,
                    "--api-url",
                    fake.api_url,
                    "--cache-dir",
                    str(tmp_path / "c"),
                    *args,
                ],
                capture_output=True,
                text=True,
                env=env,
            )
            assert result.returncode == 2, (command, args, result.stderr)
            assert result.stderr.startswith("vapifs: ") and result.stderr.count("\n") == 1


@pytest.mark.slow
def test_ten_thousand_calls_list_in_seconds(mount_factory: MountFactory, tmp_path: Path) -> None:
    with FakeVapi(light_calls(10_000)) as big:
        m = mount_factory(cache_dir=tmp_path / "big-cache", server=big, name="big")
        started = time.monotonic()
        listed = os.listdir(m.calls)
        first = time.monotonic() - started
        assert len(listed) == 10_000
        started = time.monotonic()
        assert len(os.listdir(m.mountpoint / "by-date")) >= 10
        assert sum(len(os.listdir(d)) for d in (m.mountpoint / "by-date").iterdir()) == 10_000
        views = time.monotonic() - started
        print(f"ls calls: {first:.2f}s; by-date walk: {views:.2f}s")
        assert first < 5.0
        m.stop()


def probed_calls(fake: FakeVapi) -> set[str]:
    """Calls whose artifacts storage was asked for since the counters were reset."""
    return {
        key.split(":", 1)[1].split("/")[0]
        for key, n in fake.counters().items()
        if key.startswith("storage.get:") and n
    }


def test_a_walk_over_call_directories_learns_the_next_ones_ahead(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        m = mount_factory(cache_dir=tmp_path / "walk", server=fake, name="walk")
        ids = sorted(os.listdir(m.calls))  # the order of `ls -l calls/*/`
        with_artifacts = {i for i in ids if fake.calls[i].artifacts}
        assert len(ids) > SCAN_DIRS + SCAN_AHEAD
        fake.reset_counters()
        for call_id in ids[:SCAN_DIRS]:
            os.listdir(m.calls / call_id)
        ahead = set(ids[SCAN_DIRS : SCAN_DIRS + SCAN_AHEAD]) & with_artifacts
        deadline = time.monotonic() + 10
        while not ahead <= probed_calls(fake) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ahead <= probed_calls(fake)
        settled = -1
        while fake.counters()["storage.requests"] != settled:  # the last calls finish
            settled = fake.counters()["storage.requests"]
            time.sleep(0.5)
        # Only so far ahead, and one byte per recording (logs whole: their view needs them).
        assert not probed_calls(fake) & set(ids[SCAN_DIRS + SCAN_AHEAD :])
        walked = ids[: SCAN_DIRS + SCAN_AHEAD]
        recordings = sum(
            len(data)
            for i in walked
            for kind, data in fake.calls[i].artifacts.items()
            if kind != "logs"
        )
        logs = sum(len(fake.calls[i].artifacts.get("logs", b"")) for i in walked)
        assert fake.counters()["storage.bytes"] <= logs + recordings // 100
        # The walk then finds them known: exact sizes, no further request for them.
        fake.reset_counters()
        for call_id in ids[SCAN_DIRS : SCAN_DIRS + 8]:
            assert set(artifact_files(fake.calls[call_id].call)) <= set(
                os.listdir(m.calls / call_id)
            )
            for name, kind in artifact_files(fake.calls[call_id].call).items():
                size = os.stat(m.calls / call_id / name).st_size
                assert size == len(fake.calls[call_id].artifacts[kind])
        assert not probed_calls(fake) & set(ids[SCAN_DIRS : SCAN_DIRS + 8])
        m.stop()

    # Directories listed out of any order start nothing in the background.
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        m = mount_factory(cache_dir=tmp_path / "no-walk", server=fake, name="nowalk")
        ids = sorted(os.listdir(m.calls))
        fake.reset_counters()
        picked = [ids[0], ids[9], ids[3], ids[20], ids[14]]
        for call_id in picked:
            os.listdir(m.calls / call_id)
        time.sleep(1.0)
        assert probed_calls(fake) <= set(picked)
        m.stop()


def test_a_walk_inside_one_assistant_sizes_that_assistants_calls_only(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        m = mount_factory(cache_dir=tmp_path / "walk", server=fake, name="walk")
        os.listdir(m.calls)
        group = max((m.mountpoint / "by-assistant").iterdir(), key=lambda d: len(os.listdir(d)))
        ids = sorted(os.listdir(group))  # `ls -l by-assistant/<id>/*/`
        assert len(ids) > SCAN_DIRS + 4
        fake.reset_counters()
        for call_id in ids[:SCAN_DIRS]:
            os.listdir(group / call_id)  # through the symlink, into calls/<id>/
        ahead = set(ids[SCAN_DIRS:]) & {i for i in ids if fake.calls[i].artifacts}
        deadline = time.monotonic() + 10
        while not ahead <= probed_calls(fake) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ahead <= probed_calls(fake)
        time.sleep(0.5)
        assert probed_calls(fake) <= set(ids), "sized calls of other assistants"
        m.stop()
