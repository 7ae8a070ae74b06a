"""Secrets and bad input: the key and signed URLs stay out of sight; bad options are one line."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vapifs.demo.server import FakeVapi

from .conftest import VAPIFS, MountFactory
from .test_faults import assert_no_secrets, errno_of, log_lines, recordings

pytestmark = pytest.mark.mount


def run_mount(
    args: list[str], *, env_key: str | None, cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VAPI_PRIVATE_API_KEY"}
    if env_key is not None:
        env["VAPI_PRIVATE_API_KEY"] = env_key
    return subprocess.run(
        [*VAPIFS, "mount", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def key_file(path: Path, content: bytes, mode: int = 0o600) -> str:
    path.write_bytes(content)
    path.chmod(mode)
    return str(path)


def test_bad_options_and_key_files_are_one_line_exit_2_and_nothing_mounted(
    fake: FakeVapi, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    key = fake.api_key.encode()
    files = {
        "missing": str(tmp_path / "nope"),
        "0644": key_file(tmp_path / "k644", key + b"\n", 0o644),
        "0640": key_file(tmp_path / "k640", key + b"\n", 0o640),
        "empty": key_file(tmp_path / "kempty", b""),
        "blank": key_file(tmp_path / "kblank", b"  \n\n"),
        "two keys": key_file(tmp_path / "ktwo", key + b"\n" + key + b"\n"),
        "binary": key_file(tmp_path / "kbin", b"\xff\xfe\x00key"),
        "directory": str(tmp_path),
        "fifo": str(fifo),  # would block a plain open()
        "dangling": str(tmp_path / "dangling"),
    }
    common = ["--api-url", fake.api_url, "--cache-dir", str(tmp_path / "cache")]
    cases: list[tuple[str, list[str], str | None]] = [
        ("unknown option", ["--bogus"], fake.api_key),
        ("no mountpoint", [], fake.api_key),
        ("bad --cache-size", ["--cache-size", "lots"], fake.api_key),
        ("tiny --cache-size", ["--cache-size", "10"], fake.api_key),
        ("bad -o value", ["-o", "uid=abc"], fake.api_key),
        ("bad -o umask", ["-o", "umask=999"], fake.api_key),
        ("bad --since", ["--since", "yesterday"], fake.api_key),
        ("impossible --since date", ["--since", "2026-13-45"], fake.api_key),
        ("impossible --until date", ["--until", "2026-02-30"], fake.api_key),
        ("bad --read-timeout", ["--read-timeout", "soon"], fake.api_key),
        ("zero --read-timeout", ["--read-timeout", "0"], fake.api_key),
        ("zero --stall-timeout", ["--stall-timeout", "0s"], fake.api_key),
        ("no key at all", [], None),
        ("empty key variable", [], ""),
        ("key variable with spaces", [], "two words"),
        *((f"{what} key file", ["--api-key-file", path], None) for what, path in files.items()),
    ]
    for what, extra, env_key in cases:
        args = [*common, *extra] if what == "no mountpoint" else [str(mnt), *common, *extra]
        started = time.monotonic()
        result = run_mount(args, env_key=env_key, cwd=tmp_path, timeout=20)
        assert time.monotonic() - started < 10, what
        assert result.returncode == 2, f"{what}: {result.returncode} {result.stderr}"
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vapifs: "), f"{what}: {result.stderr!r}"
        assert "Traceback" not in result.stderr
        assert fake.api_key not in result.stderr, what
        assert not os.path.ismount(mnt), what
    assert fake.counters()["api.requests"] == 0  # all refused before any request


def test_a_0600_key_file_mounts_and_the_key_is_nowhere(
    fake: FakeVapi, tmp_path: Path, mount_factory: MountFactory
) -> None:
    (tmp_path / "config").mkdir()
    path = key_file(tmp_path / "config" / "key", fake.api_key.encode() + b"\n")
    # The environment holds a wrong key: the file wins, and is the only source.
    m = mount_factory("--api-key-file", path, "--debug", key="not-the-key")
    call_id, name, data = recordings(fake)[0]
    assert (m.calls / call_id / name).read_bytes() == data
    pid = m.proc.pid
    limits = Path(f"/proc/{pid}/limits").read_text()
    core = next(line for line in limits.splitlines() if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    time.sleep(2.5)  # the runtime figures are written every 2 s
    check_modes(m.cache_dir, m.log_file)
    assert_no_secrets(fake, tmp_path, m, skip=tmp_path / "config")
    m.stop()
    assert_no_secrets(fake, tmp_path, skip=tmp_path / "config")


def check_modes(cache_dir: Path, log_file: Path) -> None:
    """The cache dir 0700 and everything in it: dirs 0700, files 0600; the log 0600."""
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    seen = 0
    for path in cache_dir.rglob("*"):
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path}: {mode:o}"
        seen += 1
    assert seen > 5
    assert list(cache_dir.glob("run/*.json")), "the runtime figures were checked too"
    assert stat.S_IMODE(log_file.stat().st_mode) == 0o600


def test_the_mount_process_is_not_dumpable_and_drops_the_key_variable() -> None:
    code = (
        "import ctypes, os\n"
        "from vapifs.mount import _harden_process\n"
        "os.environ['VAPI_PRIVATE_API_KEY'] = 'k'\n"
        "_harden_process()\n"
        "libc = ctypes.CDLL(None)\n"
        "print(libc.prctl(3, 0, 0, 0, 0), 'VAPI_PRIVATE_API_KEY' in os.environ)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["0", "False"]


def test_a_key_revoked_while_mounted_reads_eacces_with_one_log_line(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    fake.set_knobs(url_ttl=3.0)  # too short-lived to be kept from listings: reads resolve
    m = mount_factory()
    files = recordings(fake)
    call_id, name, data = files[0]
    other_id, other_name, _ = files[1]
    assert os.stat(m.calls / call_id / name).st_size == len(data)
    os.listdir(m.calls / other_id)
    old_key = fake.api_key
    fake.api_key = "rotated-" + old_key  # revoked in the dashboard
    time.sleep(2.0)  # the URLs resolved so far go stale
    for path in (m.calls / call_id / name, m.calls / other_id / other_name):
        started = time.monotonic()
        assert errno_of(path.read_bytes) == errno.EACCES, path
        assert time.monotonic() - started < 5
    # A call never seen before cannot even be looked up.
    unseen = next(c for c in fake.calls if c not in (call_id, other_id))
    assert errno_of(lambda: os.stat(m.calls / unseen)) == errno.EACCES
    refused = [line for line in log_lines(m, "WARNING", "ERROR") if "refused" in line]
    assert len(refused) == 3, "\n".join(refused)  # one line per failed file
    assert "Traceback" not in m.log_text()
    fake.api_key = old_key
    assert_no_secrets(fake, tmp_path, m)


def test_an_unusable_cache_dir_or_log_file_is_one_line_exit_1(
    fake: FakeVapi, tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "plain").write_text("not a directory\n")
    for extra in (
        ["--cache-dir", str(tmp_path / "plain" / "cache")],
        ["-f", "--cache-dir", str(tmp_path / "plain" / "cache")],
        ["-f", "--log-file", str(tmp_path / "plain" / "x.log")],
        ["--log-file", str(tmp_path / "plain" / "x.log")],
    ):
        result = run_mount(
            [str(mnt), "--api-url", fake.api_url, *extra], env_key=fake.api_key, cwd=tmp_path
        )
        assert result.returncode == 1, extra
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("vapifs: cannot "), result.stderr
        assert not os.path.ismount(mnt)
