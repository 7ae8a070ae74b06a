"""Real mounts: many calls at once, inside the API's rate limit, with read-ahead across files."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import threading
import time
import wave
from pathlib import Path
from typing import Any

import pytest

from vapifs.calls import artifact_files
from vapifs.defaults import STATS_FILE
from vapifs.demo.data import generate_calls
from vapifs.demo.server import FakeVapi
from vapifs.reader import HEAD_BYTES
from vapifs.walk import FILES_AHEAD, SCAN_DIRS, WALK_IDLE

from .conftest import VAPIFS, Mount, MountFactory

pytestmark = pytest.mark.mount


def test_ls_zgrep_and_prefetch_together_stay_under_the_rate_limit(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    # Signed URLs too short-lived to keep: every artifact costs a resolve, all of them API
    # requests, against an org limit of 20 a second.
    with FakeVapi(generate_calls(count=24, seed=5)) as fake:
        fake.set_knobs(url_ttl=3.0, api_rate_limit=20.0)
        m = mount_factory("--api-rate", "15", server=fake, cache_dir=tmp_path / "c", name="rl")
        fake.reset_counters()
        env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
        ls = f"ls -l {m.calls}/*/ | grep -c '^-'"
        zgrep = f"zgrep -c INFO {m.calls}/*/call-logs.jsonl.gz"
        prefetch = [*VAPIFS, "prefetch", "--since", "30d", "--cache-dir", str(m.cache_dir)]
        results: dict[str, subprocess.CompletedProcess[str]] = {}

        def run(name: str, cmd: list[str]) -> None:
            results[name] = subprocess.run(
                cmd, capture_output=True, text=True, timeout=120, env=env
            )

        threads = [
            threading.Thread(target=run, args=("ls", ["bash", "-c", ls])),
            threading.Thread(target=run, args=("zgrep", ["bash", "-c", zgrep])),
            threading.Thread(target=run, args=("prefetch", prefetch)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for name, result in results.items():
            assert result.returncode == 0, (name, result.stderr)
            assert result.stderr == "", (name, result.stderr)
        listed = set(os.listdir(m.calls))
        with_logs = [i for i in listed if "logs" in fake.calls[i].artifacts]
        lines = results["zgrep"].stdout.splitlines()
        assert len(lines) == len(with_logs)
        for line in lines:
            path, count = line.rsplit(":", 1)
            call_id = Path(path).parent.name
            text = gzip.decompress(fake.calls[call_id].artifacts["logs"]).decode()
            assert int(count) == sum("INFO" in x for x in text.splitlines())
        counts = fake.counters()
        sent, refused = counts["api.requests"], counts.get("fault.api_429", 0)
        assert counts["api.resolve"] > 60  # the limit was really in play
        assert refused <= 0.02 * sent, (refused, sent)
        assert "429" not in m.log_text() and "gave up" not in m.log_text()
        m.stop()


def fetched(fake: FakeVapi, kind: str) -> dict[str, int]:
    """Call id -> storage bytes sent of its `kind` artifact since the counters were reset."""
    out = {}
    for key, n in fake.counters().items():
        if key.startswith("storage.bytes:") and key.endswith(f"/{kind}") and n:
            out[key.split(":", 1)[1].split("/")[0]] = n
    return out


def settle(fake: FakeVapi) -> None:
    """Wait until storage has been quiet for half a second."""
    last = -1
    while fake.counters()["storage.requests"] != last:
        last = fake.counters()["storage.requests"]
        time.sleep(0.5)


def live_stats(m: Mount) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((m.mountpoint / STATS_FILE).read_bytes())
    return doc


def test_a_walk_reading_logs_gets_the_next_ones_fetched_ahead_up_to_the_budget(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        m = mount_factory(server=fake, cache_dir=tmp_path / "c", name="logs")
        ids = sorted(os.listdir(m.calls))  # a shell glob's order
        logs = [i for i in ids if "logs" in fake.calls[i].artifacts]
        assert len(logs) > 6 + FILES_AHEAD
        fake.reset_counters()
        for call_id in logs[:6]:
            got = (m.calls / call_id / "call-logs.jsonl.gz").read_bytes()
            assert got == fake.calls[call_id].artifacts["logs"]
        here = ids.index(logs[5])
        # At least half the budget ahead of it (it is topped up by halves).
        ahead = set(ids[here + 1 : here + 1 + FILES_AHEAD // 2]) & set(logs)
        deadline = time.monotonic() + 10
        while not ahead <= set(fetched(fake, "logs")) and time.monotonic() < deadline:
            time.sleep(0.05)
        settle(fake)
        got_ahead = set(fetched(fake, "logs")) - set(logs[:6])
        assert ahead <= got_ahead  # fetched ahead of the walk...
        assert got_ahead <= set(ids[: here + 1 + FILES_AHEAD])  # ...and no further
        # Only logs: the walk reads nothing else of these calls.
        assert not {i for i in fetched(fake, "stereo") if i not in logs[:6]}
        # The walk then finds them here: no request of its own.
        fake.reset_counters()
        for call_id in logs[6:9]:
            got = (m.calls / call_id / "call-logs.jsonl.gz").read_bytes()
            assert got == fake.calls[call_id].artifacts["logs"]
            assert fake.counters().get(f"storage.get:{call_id}/logs", 0) == 0
        assert live_stats(m)["walks"]["walks"] >= 1


def test_a_walk_reading_only_headers_fetches_no_whole_recordings(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        m = mount_factory(server=fake, cache_dir=tmp_path / "c", name="heads")
        ids = sorted(os.listdir(m.calls))
        stereo = [i for i in ids if "stereo.wav" in artifact_files(fake.calls[i].call)]
        assert len(stereo) > 2 * SCAN_DIRS
        fake.reset_counters()
        paths = [str(m.calls / call_id / "stereo.wav") for call_id in stereo]
        soxi = subprocess.run(["soxi", "-D", *paths], capture_output=True, text=True, timeout=60)
        assert soxi.returncode == 0, soxi.stderr
        durations = [float(x) for x in soxi.stdout.split()]
        for call_id, seconds in zip(stereo, durations, strict=True):
            with wave.open(io.BytesIO(fake.calls[call_id].artifacts["stereo"])) as w:
                assert seconds == pytest.approx(w.getnframes() / w.getframerate(), abs=0.01)
        settle(fake)
        sent = fetched(fake, "stereo")
        # Until the walk is recognised, files are opened as if alone (their first block);
        # from then on only their ends, however large the file (the kernel's read-ahead
        # may make one read reach further, and that file's next one then its first block).
        later = stereo[SCAN_DIRS:]
        sizes = {i: len(fake.calls[i].artifacts["stereo"]) for i in later}
        big = [i for i in later if sizes[i] > 2 * HEAD_BYTES]
        partial = [i for i in big if sent.get(i, 0) <= 2 * HEAD_BYTES]
        assert len(partial) >= 0.8 * len(big), {i: (sent.get(i), sizes[i]) for i in later}
        assert sum(sent.get(i, 0) for i in later) <= 0.25 * sum(sizes.values())
        assert fake.counters()["storage.bytes"] <= sum(sent.values()) + 64 * len(ids)


def test_one_file_read_alone_fetches_nothing_of_other_calls(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    ids = sorted(os.listdir(m.calls))
    call_id = next(i for i in ids if {"logs", "stereo"} <= set(fake.calls[i].artifacts))
    fake.reset_counters()
    assert (m.calls / call_id / "stereo.wav").read_bytes() == fake.calls[call_id].artifacts[
        "stereo"
    ]
    with gzip.open(m.calls / call_id / "call-logs.jsonl.gz") as f:
        assert f.read() == gzip.decompress(fake.calls[call_id].artifacts["logs"])
    time.sleep(1.0)
    touched = {
        key.split(":", 1)[1].split("/")[0]
        for key, n in fake.counters().items()
        if key.startswith("storage.get:") and n
    }
    assert touched == {call_id}
    assert live_stats(m)["walks"]["ahead_started"] == 0


def test_a_walk_that_stops_has_its_read_ahead_cancelled_within_seconds(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        warm = mount_factory(server=fake, cache_dir=tmp_path / "c", name="warm")
        ids = sorted(os.listdir(warm.calls))
        logs = [i for i in ids if "logs" in fake.calls[i].artifacts]
        for i in (1, 3, 0, 2):  # cached, in an order no walk follows
            (warm.calls / logs[i] / "call-logs.jsonl.gz").read_bytes()
        assert live_stats(warm)["walks"]["walks"] == 0
        warm.stop()
        m = mount_factory(server=fake, cache_dir=tmp_path / "c", name="stop")
        assert sorted(os.listdir(m.calls)) == ids
        fake.set_knobs(stall_rate=1.0, stall_seconds=20.0)  # storage answers, then stalls
        for call_id in logs[:SCAN_DIRS]:  # the walk: from the cache, work ahead begins
            (m.calls / call_id / "call-logs.jsonl.gz").read_bytes()
        stats = live_stats(m)["walks"]
        assert stats["walks"] >= 1 and stats["ahead_running"] > 0
        stopped = time.monotonic()
        while live_stats(m)["walks"]["ahead_running"] and time.monotonic() - stopped < 10:
            time.sleep(0.1)
        took = time.monotonic() - stopped
        stats = live_stats(m)["walks"]
        assert stats["ahead_running"] == 0 and stats["ahead_cancelled"] > 0
        assert took < WALK_IDLE + 2.0
        requests = fake.counters()["storage.requests"]
        time.sleep(3.0)
        assert fake.counters()["storage.requests"] == requests  # nothing retried after it
        fake.set_knobs(stall_rate=0.0)


def test_a_shell_glob_over_every_calls_log_is_walked_ahead(
    mount_factory: MountFactory, tmp_path: Path
) -> None:
    with FakeVapi(generate_calls(count=48, seed=3)) as fake:
        m = mount_factory(server=fake, cache_dir=tmp_path / "c", name="glob")
        os.listdir(m.calls)
        fake.reset_counters()
        zgrep = subprocess.run(
            ["bash", "-c", f"zgrep -c INFO {m.calls}/*/call-logs.jsonl.gz"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert zgrep.returncode == 0, zgrep.stderr
        logs = [i for i in os.listdir(m.calls) if "logs" in fake.calls[i].artifacts]
        assert len(zgrep.stdout.splitlines()) == len(logs)
        walks = live_stats(m)["walks"]
        # bash looks the files up in the reverse of the listing's order, then zgrep reads
        # them in a glob's: both are walks, and most logs were fetched ahead of them.
        assert walks["walks"] >= 1
        assert walks["ahead_started"] >= len(logs) // 2
        assert all(fake.counters()[f"storage.get:{i}/logs"] == 1 for i in logs)
