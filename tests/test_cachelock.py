"""One cache dir, one process: a second one refuses in one line naming the first."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from vapifs.demo.server import FakeVapi

from .conftest import VAPIFS, MountFactory, force_unmount
from .test_prefetch import key_env, prefetch, prefetch_cmd

pytestmark = pytest.mark.mount


def _mount(
    fake: FakeVapi, mountpoint: Path, cache_dir: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    mountpoint.mkdir(exist_ok=True)
    return subprocess.run(
        [
            *VAPIFS,
            "mount",
            str(mountpoint),
            "--api-url",
            fake.api_url,
            "--cache-dir",
            str(cache_dir),
            *extra,
        ],
        env=dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key),
        capture_output=True,
        text=True,
        timeout=60,
    )


def _refusal(result: subprocess.CompletedProcess[str], cache_dir: Path) -> int:
    """The pid a refused mount names; asserts the refusal is one line, exit status 1."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(cache_dir) in lines[0] and "in use by process" in lines[0]
    assert "--cache-dir" in lines[0]
    found = re.search(r"process (\d+)", lines[0])
    assert found
    return int(found.group(1))


def test_a_second_mount_on_the_same_cache_dir_refuses_naming_the_first(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    first = mount_factory("--cache-size", "12M")
    refused = _mount(fake, tmp_path / "second", first.cache_dir, "-f", "--cache-size", "12M")
    assert _refusal(refused, first.cache_dir) == first.proc.pid
    assert not os.path.ismount(tmp_path / "second")
    assert os.listdir(first.calls)  # the first one is unharmed
    # A kill -9 leaves no lock behind: the next mount takes the dir at once.
    first.proc.kill()
    first.proc.wait(10)
    force_unmount(first.mountpoint)
    again = mount_factory(cache_dir=first.cache_dir, name="again")
    assert os.listdir(again.calls)


def test_a_daemon_mount_is_named_by_its_own_pid(fake: FakeVapi, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    daemon = _mount(fake, tmp_path / "mnt", cache)
    assert daemon.returncode == 0, daemon.stderr
    try:
        pid = _refusal(_mount(fake, tmp_path / "other", cache), cache)
        assert pid != os.getpid()
        # The process that asked for the mount has exited; the daemon is the one named.
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"mount" in args and str(tmp_path / "mnt").encode() in args
    finally:
        subprocess.run([*VAPIFS, "umount", str(tmp_path / "mnt")], capture_output=True, timeout=30)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert (
        not Path(f"/proc/{pid}").exists()
        or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
    )


def test_a_mount_beside_a_standalone_prefetch_refuses_and_prefetch_through_it_works(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    fake.set_knobs(api_stall=True, stall_seconds=60)  # keeps the prefetch busy listing
    proc = subprocess.Popen(
        prefetch_cmd(fake, cache, "--since", "30d"),
        env=key_env(fake),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not (cache / "lock").exists() or not (cache / "lock").read_text().startswith(
            f"{proc.pid} "
        ):
            assert time.monotonic() < deadline, "the prefetch never took the cache dir"
            time.sleep(0.05)
        refused = _mount(fake, tmp_path / "mnt", cache, "-f")
        assert _refusal(refused, cache) == proc.pid
        assert "prefetch" in refused.stderr
    finally:
        fake.set_knobs(api_stall=False)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    m = mount_factory(cache_dir=cache)
    # With the mount on the dir, prefetch reads through it (no key needed) instead of refusing.
    report = prefetch(fake, cache, "--since", "2d", with_key=False)
    assert report["through_mounts"] == [str(m.mountpoint)]
    assert report["failed"] == [] and report["done"] == report["files"] > 0
