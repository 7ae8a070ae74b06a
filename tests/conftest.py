"""Shared fixtures: the fake Vapi on loopback and real `vapifs mount -f` subprocesses."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vapifs.demo.server import FakeVapi

ROOT = Path(__file__).resolve().parent.parent
VAPIFS = [sys.executable, "-m", "vapifs.cli"]


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # A mount test that cannot mount must fail, never skip: say so early and clearly.
    if any(item.get_closest_marker("mount") for item in items) and not os.path.exists("/dev/fuse"):
        raise pytest.UsageError("/dev/fuse is missing: mount tests cannot run here")


@pytest.fixture
def tls() -> bool:
    """Whether the fake speaks HTTPS; the core mount tests run both ways (`over_tls`)."""
    return False


# Runs a test over plain HTTP and over HTTPS (a throwaway CA, verification on): the test
# takes `tls` and passes it to every FakeVapi it makes; `fake` and `mount_factory` follow it.
over_tls = pytest.mark.parametrize("tls", [False, True], ids=["http", "https"])


@pytest.fixture
def fake(tls: bool) -> Iterator[FakeVapi]:
    with FakeVapi(seed=7, tls=tls) as server:
        yield server


@dataclass
class Mount:
    mountpoint: Path
    cache_dir: Path
    log_file: Path
    proc: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    @property
    def calls(self) -> Path:
        return self.mountpoint / "calls"

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        force_unmount(self.mountpoint)


PR_SET_PDEATHSIG = 1


def _die_with_us() -> None:
    """In a mount's child process: SIGTERM (a clean unmount) should pytest itself be killed,
    so that no mount outlives the run that made it."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def force_unmount(mountpoint: Path) -> None:
    for _ in range(50):
        if not os.path.ismount(mountpoint):
            return
        subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
        time.sleep(0.1)


def wait_mounted(mountpoint: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"vapifs mount exited early with status {proc.returncode}")
        if os.path.ismount(mountpoint):
            return
        time.sleep(0.05)
    raise AssertionError("vapifs mount did not come up in time")


MountFactory = Callable[..., Mount]


@pytest.fixture
def mount_factory(tmp_path: Path, fake: FakeVapi) -> Iterator[MountFactory]:
    """Start `vapifs mount -f` subprocesses against the fake; all are stopped afterwards."""
    mounts: list[Mount] = []

    def start(
        *extra: str,
        cache_dir: Path | None = None,
        server: FakeVapi | None = None,
        name: str = "mnt",
        key: str | None = None,
        base: Path | None = None,
        trust: bool = True,
    ) -> Mount:
        server = server or fake
        mountpoint = (base or tmp_path) / name
        mountpoint.mkdir(exist_ok=True)
        cache_dir = cache_dir or tmp_path / "cache"
        log_file = tmp_path / f"{name}-{len(mounts)}.log"
        env = dict(os.environ, VAPI_PRIVATE_API_KEY=key or server.api_key)
        args = [
            *VAPIFS,
            "mount",
            str(mountpoint),
            "-f",
            "--api-url",
            server.api_url,
            "--cache-dir",
            str(cache_dir),
            "--log-file",
            str(log_file),
            *(["--ca-file", server.ca_file] if server.ca_file and trust else []),
            *extra,
        ]
        stderr = open(tmp_path / f"{name}-{len(mounts)}.stderr", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            args, env=env, stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_die_with_us
        )
        stderr.close()
        mount = Mount(mountpoint, cache_dir, log_file, proc, args)
        mounts.append(mount)
        wait_mounted(mountpoint, proc)
        return mount

    yield start
    for mount in mounts:
        with contextlib.suppress(Exception):
            mount.stop()
