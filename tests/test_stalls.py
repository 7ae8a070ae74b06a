"""A network that accepts and never answers: bounded reads, prompt exits, honest unmounts."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vapifs.demo.server import FakeVapi

from .conftest import VAPIFS, MountFactory
from .test_faults import errno_of, recordings

pytestmark = pytest.mark.mount

MiB = 1 << 20
TIMEOUT = 8.0  # --read-timeout of these mounts


class Blackhole:
    """A TCP server on loopback that accepts every connection and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = self.sock.accept()
                self.accepted.append(conn)

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            with contextlib.suppress(OSError):
                conn.close()


@pytest.fixture
def blackhole() -> Iterator[Blackhole]:
    hole = Blackhole()
    yield hole
    hole.close()


def _read_mib(path: Path) -> tuple[int | None, float]:
    """The errno of reading the second MiB of `path` (opening it by name fetched the first),
    and how long it took from the first byte asked."""
    with open(path, "rb", buffering=0) as f:
        f.seek(MiB)
        started = time.monotonic()
        code = errno_of(lambda: f.read(MiB))
        return code, time.monotonic() - started


def test_silent_storage_fails_a_read_once_within_the_read_timeout(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--read-timeout", f"{TIMEOUT:g}s")
    call_id, name, data = recordings(fake)[0]
    path = m.calls / call_id / name
    assert os.stat(path).st_size == len(data)  # sized: the read itself is what waits
    fake.set_knobs(storage_stall=True, stall_seconds=120)
    code, elapsed = _read_mib(path)
    assert code == errno.EIO
    # The bound fired once, and the kernel's retry of the same page did not wait again.
    assert TIMEOUT - 1 < elapsed < TIMEOUT + 5, f"{elapsed:.1f}s"
    assert fake.counters().get("fault.storage_stall", 0) >= 1
    # Nothing has changed: the same range fails at once, however often it is asked.
    for _ in range(2):
        code, elapsed = _read_mib(path)
        assert code == errno.EIO
        assert elapsed < 1.0, f"{elapsed:.1f}s"
    # Storage answers again: the stuck download is abandoned (--stall-timeout) and retried.
    fake.set_knobs(storage_stall=False)
    deadline = time.monotonic() + 20
    while True:
        try:
            assert path.read_bytes() == data
            break
        except OSError:
            assert time.monotonic() < deadline, "the file never read again"
            time.sleep(0.5)
    assert "Traceback" not in m.log_text()


def test_a_silent_api_fails_a_read_within_the_read_timeout(
    fake: FakeVapi, mount_factory: MountFactory, blackhole: Blackhole, tmp_path: Path
) -> None:
    call_id, name, data = recordings(fake)[0]
    warm = mount_factory(name="warm")
    assert os.stat(warm.calls / call_id / name).st_size == len(data)  # call and size stored
    warm.stop()
    m = mount_factory("--read-timeout", f"{TIMEOUT:g}s", "--api-url", blackhole.url, name="silent")
    path = m.calls / call_id / name
    assert os.stat(path).st_size == len(data)  # from the disk, no request
    code, elapsed = _read_mib(path)
    assert code == errno.EIO
    assert elapsed < TIMEOUT + 5, f"{elapsed:.1f}s"
    assert blackhole.accepted, "the read never reached the silent server"
    code, elapsed = _read_mib(path)
    assert (code, elapsed < 1.0) == (errno.EIO, True), f"{elapsed:.1f}s"
    assert "Traceback" not in m.log_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_read_exits_within_5s_and_the_reader_gets_eio(
    signum: int, fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--read-timeout", "60s")
    call_id, name, data = recordings(fake)[0]
    path = m.calls / call_id / name
    assert os.stat(path).st_size == len(data)
    fake.set_knobs(storage_stall=True, stall_seconds=120)
    result: dict[str, object] = {}

    def reader() -> None:
        code, elapsed = _read_mib(path)
        result.update(code=code, elapsed=elapsed)

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not fake.counters().get("fault.storage_stall"):
        assert time.monotonic() < deadline, "the read never reached storage"
        time.sleep(0.05)
    time.sleep(0.5)
    started = time.monotonic()
    m.proc.send_signal(signum)
    m.proc.wait(10)
    assert time.monotonic() - started < 5.0
    thread.join(5)
    assert not thread.is_alive(), "the reader is still blocked"
    assert result["code"] == errno.EIO
    assert not os.path.ismount(m.mountpoint)
    assert "Traceback" not in m.log_text()


def _umount(mountpoint: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*VAPIFS, "umount", *flags, str(mountpoint)], capture_output=True, text=True, timeout=30
    )


def test_umount_of_a_busy_mount_names_the_holder_and_lazy_unmounts(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    call_id, name, data = recordings(fake)[0]
    path = m.calls / call_id / name
    with open(path, "rb") as f:
        busy = _umount(m.mountpoint)
        assert busy.returncode == 1
        lines = busy.stderr.strip().splitlines()
        assert len(lines) == 1, busy.stderr
        assert "busy" in lines[0] and "-z" in lines[0]
        assert f"{os.getpid()} (" in lines[0] and "open file" in lines[0]
        assert os.path.ismount(m.mountpoint) and m.proc.poll() is None
        lazy = _umount(m.mountpoint, "--lazy")
        assert lazy.returncode == 0, lazy.stderr
        assert not os.path.ismount(m.mountpoint)
        assert f.read() == data  # an open file keeps reading after a lazy unmount
        assert m.proc.poll() is None
    started = time.monotonic()
    m.proc.wait(10)  # once the last file is closed the mount ends
    assert time.monotonic() - started < 5.0
    assert m.proc.returncode == 0
    assert "Traceback" not in m.log_text()


def test_lazy_umount_stops_the_mount_within_5s_with_a_request_in_flight(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--read-timeout", "60s")
    call_id, _, _ = recordings(fake)[0]
    fake.set_knobs(api_stall=True, stall_seconds=120)
    result: list[int | None] = []
    # A lookup waits on the silent API; the kernel counts the mount busy meanwhile.
    thread = threading.Thread(
        target=lambda: result.append(errno_of(lambda: os.stat(m.calls / call_id))), daemon=True
    )
    thread.start()
    time.sleep(1.0)
    busy = _umount(m.mountpoint)
    assert busy.returncode == 1 and "busy" in busy.stderr, busy.stderr
    assert _umount(m.mountpoint, "-z").returncode == 0
    started = time.monotonic()
    m.proc.wait(10)
    assert time.monotonic() - started < 5.0
    thread.join(5)
    assert result == [errno.EIO]
