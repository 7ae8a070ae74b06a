"""`vapifs prefetch`: fills the cache alone or through a running mount, filters, resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from vapifs.calls import artifact_files, created_at
from vapifs.demo.server import FakeVapi

from .blockfiles import block_files, records
from .conftest import VAPIFS, MountFactory
from .test_stats import settled

pytestmark = pytest.mark.mount


def prefetch_cmd(server: FakeVapi, cache_dir: Path, *args: str) -> list[str]:
    return [
        *VAPIFS,
        "prefetch",
        *args,
        "--json",
        "--api-url",
        server.api_url,
        "--cache-dir",
        str(cache_dir),
    ]


def key_env(server: FakeVapi, with_key: bool = True) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "VAPI_PRIVATE_API_KEY"}
    if with_key:
        env["VAPI_PRIVATE_API_KEY"] = server.api_key
    return env


def prefetch(
    server: FakeVapi, cache_dir: Path, *args: str, with_key: bool = True, code: int = 0
) -> dict[str, Any]:
    out = subprocess.run(
        prefetch_cmd(server, cache_dir, *args),
        env=key_env(server, with_key),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == code, out.stderr
    assert out.stderr == "", "prefetch printed on a stderr that is not a terminal"
    report = json.loads(out.stdout)
    assert isinstance(report, dict)
    return report


def window(server: FakeVapi, days: float, kinds: set[str] | None = None) -> dict[str, bytes]:
    """'<call id>/<file name>' -> source bytes, for the artifacts of calls of the last days."""
    now = time.time()
    out = {}
    for call_id, fc in server.calls.items():
        created = created_at(fc.call)
        assert created is not None
        if now - created > days * 86400:
            continue
        for name, kind in artifact_files(fc.call).items():
            if kinds is None or kind in kinds:
                out[f"{call_id}/{name}"] = fc.artifacts[kind]
    return out


def fetched_artifacts(server: FakeVapi) -> set[str]:
    return {
        k.split(":", 1)[1] for k, v in server.counters().items() if k.startswith("storage.get:")
    }


def test_prefetch_alone_fills_the_cache_for_an_offline_mount(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    expected = window(fake, 1)
    assert expected
    total = sum(len(b) for b in expected.values())
    report = prefetch(fake, cache, "--since", "1d")
    assert report["files"] == report["done"] == len(expected)
    assert report["failed"] == [] and report["through_mounts"] == []
    assert report["bytes_total"] == report["bytes_on_disk"] == total
    assert report["bytes_already_cached"] == 0
    assert report["bytes_network"] == fake.counters()["storage.bytes"] >= total

    # Again: everything is cached, nothing is fetched but the listing.
    fake.reset_counters()
    again = prefetch(fake, cache, "--since", "1d")
    assert again["bytes_network"] == 0 and again["bytes_already_cached"] == total
    counters = fake.counters()
    assert counters["storage.requests"] == 0 and counters["api.resolve"] == 0

    fake.pause()
    m = mount_factory(cache_dir=cache)
    for path, data in expected.items():
        assert (m.calls / path).read_bytes() == data, path


def test_artifacts_and_paths_limit_what_is_fetched(fake: FakeVapi, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    expected = window(fake, 3, {"stereo", "logs"})
    report = prefetch(fake, cache, "--since", "3d", "--artifacts", "stereo,logs", "-j", "3")
    assert report["done"] == report["files"] == len(expected)
    assert report["bytes_total"] == sum(len(b) for b in expected.values())
    assert fetched_artifacts(fake) == {
        f"{path.split('/')[0]}/{'stereo' if 'stereo' in path else 'logs'}" for path in expected
    }

    # By call id, no mount and no window: that call only, all of its artifacts by default.
    old = next(
        fc
        for fc in fake.calls.values()
        if fc.artifacts and f"{fc.id}/call-logs.jsonl.gz" not in window(fake, 14)
    )
    fake.reset_counters()
    report = prefetch(fake, cache, old.id)
    assert report["done"] == len(old.artifacts)
    assert fetched_artifacts(fake) == {f"{old.id}/{kind}" for kind in old.artifacts}

    # One file by its path in the tree.
    fc = next(fc for fc in fake.calls.values() if "pcap" in fc.artifacts and fc.id != old.id)
    fake.reset_counters()
    report = prefetch(fake, cache, f"calls/{fc.id}/capture.pcap")
    assert report["done"] == 1 and fetched_artifacts(fake) == {f"{fc.id}/pcap"}

    out = subprocess.run(
        prefetch_cmd(fake, cache, "--since", "1d", "--artifacts", "stereo,nope"),
        env=key_env(fake),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and "nope" in out.stderr


def test_prefetch_goes_through_a_running_mount(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    m = mount_factory()
    expected = window(fake, 1)
    total = sum(len(b) for b in expected.values())
    # No key: prefetch cannot talk to the API itself, and must not need to.
    report = prefetch(fake, m.cache_dir, "--since", "1d", with_key=False)
    assert report["through_mounts"] == [str(m.mountpoint)]
    assert report["files"] == report["done"] == len(expected)
    assert report["bytes_total"] == total
    # Every request the fake saw came from the mount, as its own figures show.
    doc = settled(m.mountpoint, fake)
    assert report["bytes_network"] == doc["bytes"]["network"] == fake.counters()["storage.bytes"]
    assert report["bytes_network"] >= total
    assert report["bytes_on_disk"] is None

    # A path inside the mount is read through it too, whatever the cache dir says.
    other = next(
        fc for fc in fake.calls.values() if fc.artifacts and f"{fc.id}/stereo.wav" not in expected
    )
    report = prefetch(fake, tmp_path / "elsewhere", str(m.calls / other.id), with_key=False)
    assert report["through_mounts"] == [str(m.mountpoint)]
    assert report["done"] == len(other.artifacts)
    settled(m.mountpoint, fake)
    assert not (tmp_path / "elsewhere").exists()

    # --artifacts holds through a mount too: it is asked about the selected files only.
    fake.reset_counters()
    report = prefetch(fake, m.cache_dir, "--since", "3d", "--artifacts", "logs", with_key=False)
    logs = window(fake, 3, {"logs"})
    assert report["done"] == len(logs)
    # (the mount may read the next calls' logs ahead of what looks like a walk: logs only)
    assert {artifact.split("/")[1] for artifact in fetched_artifacts(fake)} == {"logs"}

    # The mount now holds it all: another run fetches nothing.
    fake.reset_counters()
    report = prefetch(fake, m.cache_dir, "--since", "1d", with_key=False)
    assert report["bytes_network"] == 0 and report["bytes_already_cached"] == total
    assert fake.counters()["storage.requests"] == 0


def test_an_interrupted_prefetch_resumes_with_what_is_missing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with FakeVapi(seed=7, big_stereo_mb=40) as big:
        proc = subprocess.Popen(
            prefetch_cmd(big, cache, "--since", "1d", "-j", "1"),
            env=key_env(big),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        # Past the sizing (a block per file) and well into the big recording: then every
        # new storage request hangs, and the run is interrupted while it waits.
        deadline = time.monotonic() + 60
        while big.counters()["storage.bytes"] < 12 << 20:
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.005)
        big.set_knobs(stall_rate=1.0, stall_seconds=60)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 130, err
        first = json.loads(out)
        assert first["interrupted"] is True
        assert 0 < first["bytes_on_disk"] < first["bytes_total"]
        big.set_knobs(stall_rate=0.0)
        big.pause()
        big.resume()

        big.reset_counters()
        second = prefetch(big, cache, "--since", "1d")
        assert second["done"] == second["files"] == first["files"]
        assert second["bytes_already_cached"] == first["bytes_on_disk"]
        missing = second["bytes_total"] - second["bytes_already_cached"]
        assert second["bytes_network"] == big.counters()["storage.bytes"] == missing
        assert second["bytes_on_disk"] == second["bytes_total"]


def test_prefetch_and_cache_take_the_mounts_settings_from_the_config_file(
    fake: FakeVapi, tmp_path: Path
) -> None:
    # An analyst who set cache-dir and api-url in config.toml warms the cache the mount
    # reads, without repeating them; mount's own --since (the window) is not prefetch's.
    cache = tmp_path / "configured-cache"
    home = tmp_path / "config"
    (home / "vapifs").mkdir(parents=True)
    (home / "vapifs" / "config.toml").write_text(
        f'cache-dir = "{cache}"\napi_url = "{fake.api_url}"\nsince = "1d"\ndir-ttl = 5\n'
    )
    env = {**key_env(fake), "XDG_CONFIG_HOME": str(home)}
    fc = next(fc for fc in fake.calls.values() if "stereo" in fc.artifacts)
    out = subprocess.run(
        [*VAPIFS, "prefetch", fc.id, "--artifacts", "stereo", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["bytes_total"] == len(fc.artifacts["stereo"])
    stats = subprocess.run(
        [*VAPIFS, "cache", "stats"], env=env, capture_output=True, text=True, timeout=60
    )
    assert stats.returncode == 0, stats.stderr
    assert str(cache) in stats.stdout
    stored = sum(n for p in block_files(cache) for n, _crc in records(p).values())
    assert stored >= len(fc.artifacts["stereo"])

    # A flag still beats the file; a bad value in the file is a one-line error.
    other = tmp_path / "flag-cache"
    again = subprocess.run(
        [*VAPIFS, "cache", "stats", "--cache-dir", str(other)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.returncode == 0 and str(other) in again.stdout
    (home / "vapifs" / "config.toml").write_text('cache-size = "lots"\n')
    bad = subprocess.run(
        [*VAPIFS, "prefetch", fc.id, "--json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
