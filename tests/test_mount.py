"""Real mounts of the fake Vapi, checked with plain open/stat/wave/zgrep/mmap."""

from __future__ import annotations

import errno
import gzip
import json
import mmap
import os
import subprocess
import time
import wave
from collections.abc import Callable
from pathlib import Path

import pytest

from vapifs.calls import artifact_files
from vapifs.demo.server import FakeVapi

from .conftest import VAPIFS, MountFactory, over_tls

pytestmark = pytest.mark.mount


def expected_files(fake: FakeVapi) -> dict[str, dict[str, bytes]]:
    """call id -> {file name: source bytes} for every artifact the fake holds."""
    out: dict[str, dict[str, bytes]] = {}
    for call_id, fc in fake.calls.items():
        names = {kind: name for name, kind in artifact_files(fc.call).items()}
        out[call_id] = {names[kind]: data for kind, data in fc.artifacts.items()}
    return out


def read_all(mountpoint: Path, fake: FakeVapi) -> None:
    for call_id, files in expected_files(fake).items():
        for name, data in files.items():
            assert (mountpoint / "calls" / call_id / name).read_bytes() == data, name


def test_listing_shows_the_window_and_resolves_older_ids(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    listed = os.listdir(m.calls)
    now = time.time()
    for call_id, fc in fake.calls.items():
        created = fc.call["createdAt"]
        age_days = (now - _ts(created)) / 86400
        if age_days < 13.9:
            assert call_id in listed
        elif age_days > 14.1:
            assert call_id not in listed
            assert os.stat(m.calls / call_id).st_mtime == pytest.approx(_ts(created), abs=1)
    assert len(listed) == len(set(listed)), "a call listed twice"


def _ts(iso: str) -> float:
    from vapifs.calls import parse_time

    ts = parse_time(iso)
    assert ts is not None
    return ts


@over_tls
def test_every_artifact_is_byte_identical_with_exact_sizes_first(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    for call_id, files in expected_files(fake).items():
        directory = m.calls / call_id
        names = set(os.listdir(directory))
        assert set(files) <= names
        assert "call.json" in names
        for name, data in files.items():
            assert os.stat(directory / name).st_size == len(data), name
        for name, data in files.items():
            assert (directory / name).read_bytes() == data, f"{call_id}/{name}"
        call = json.loads((directory / "call.json").read_text())
        assert call["id"] == call_id
        assert "presigned" not in (directory / "call.json").read_text().lower()


@over_tls
def test_ls_l_of_a_call_learns_sizes_without_downloading_recordings(
    mount_factory: MountFactory, tls: bool
) -> None:
    with FakeVapi(seed=21, big_stereo_mb=24, tls=tls) as fake:
        m = mount_factory(server=fake, name="lsl")
        call_id, fc = max(
            ((c, fc) for c, fc in fake.calls.items() if "stereo" in fc.artifacts),
            key=lambda item: len(item[1].artifacts["stereo"]),
        )
        fake.reset_counters()
        out = subprocess.run(
            ["ls", "-l", str(m.calls / call_id)], capture_output=True, text=True, timeout=30
        )
        assert out.returncode == 0, out.stderr
        sizes = {line.split()[-1]: int(line.split()[4]) for line in out.stdout.splitlines()[1:]}
        for name, kind in artifact_files(fc.call).items():
            assert sizes[name] == len(fc.artifacts[kind]), name
        # Sizes come from one-byte ranges; only the logs (whose decompressed size is in
        # their gzip trailer) are fetched, and they are small.
        logs = len(fc.artifacts.get("logs", b""))
        assert fake.counters()["storage.bytes"] <= logs + len(fc.artifacts), fake.counters()
        # The first read after such a listing is whole and correct.
        assert (m.calls / call_id / "stereo.wav").read_bytes() == fc.artifacts["stereo"]
        m.stop()


def test_wave_reads_the_stereo_header_and_length(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    checked = 0
    for call_id, files in expected_files(fake).items():
        if "stereo.wav" not in files:
            continue
        source = fake.calls[call_id].artifacts["stereo"]
        import io

        with (
            wave.open(io.BytesIO(source)) as want,
            wave.open(str(m.calls / call_id / "stereo.wav")) as got,
        ):
            assert got.getnchannels() == 2
            assert got.getframerate() == want.getframerate()
            assert got.getnframes() == want.getnframes()
            assert got.readframes(want.getnframes()) == want.readframes(want.getnframes())
        checked += 1
    assert checked >= 3


def test_zgrep_counts_match_the_source(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    checked = 0
    for call_id, files in expected_files(fake).items():
        if "call-logs.jsonl.gz" not in files:
            continue
        want = sum(
            1
            for line in gzip.decompress(files["call-logs.jsonl.gz"]).splitlines()
            if b"ERROR" in line
        )
        result = subprocess.run(
            ["zgrep", "-c", "ERROR", str(m.calls / call_id / "call-logs.jsonl.gz")],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert int(result.stdout.strip()) == want
        checked += 1
    assert checked >= 3


def test_tail_read_and_mmap(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    call_id, files = next((c, f) for c, f in expected_files(fake).items() if "stereo.wav" in f)
    data = files["stereo.wav"]
    path = m.calls / call_id / "stereo.wav"
    with open(path, "rb") as f:
        f.seek(-100, os.SEEK_END)
        assert f.read() == data[-100:]
        f.seek(0)
        with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
            assert len(mapped) == len(data)
            assert (
                mapped[len(data) // 2 : len(data) // 2 + 4096]
                == data[len(data) // 2 : len(data) // 2 + 4096]
            )
            assert mapped[:] == data


@over_tls
def test_slow_reader_outlives_one_second_signed_urls(
    mount_factory: MountFactory, tls: bool
) -> None:
    # A file larger than the read-ahead window, so downloads keep starting for the whole read,
    # each on a URL that lives one second.
    with FakeVapi(seed=3, big_stereo_mb=40, tls=tls) as big:
        big.set_knobs(url_ttl=1.0)
        m = mount_factory(server=big, name="slow")
        call_id, data = max(
            (
                (c, fc.artifacts["stereo"])
                for c, fc in big.calls.items()
                if "stereo" in fc.artifacts
            ),
            key=lambda item: len(item[1]),
        )
        got = bytearray()
        started = time.monotonic()
        with open(m.calls / call_id / "stereo.wav", "rb", buffering=0) as f:
            while time.monotonic() - started < 10:
                chunk = f.read(64 * 1024)
                assert chunk
                got += chunk
                time.sleep(0.3)
            f.seek(len(data) - 3 * 1024 * 1024)
            tail = f.read()
        assert len(got) >= 64 * 1024 * 30
        assert bytes(got) == data[: len(got)]
        assert tail == data[-3 * 1024 * 1024 :]
        assert big.counters().get("api.resolve", 0) >= 3
        m.stop()


def test_remount_reads_from_disk_with_no_storage_request(
    fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    m = mount_factory()
    read_all(m.mountpoint, fake)
    m.stop()
    fake.reset_counters()
    m2 = mount_factory()
    read_all(m2.mountpoint, fake)
    counters = fake.counters()
    assert counters.get("storage.requests", 0) == 0
    assert counters.get("api.resolve", 0) == 0
    m2.stop()
    # Neither the cache nor the logs hold a signed URL, a signature or the key.
    secrets = [fake.api_key.encode(), b"X-Amz-Signature", b"X-Amz-Credential", b"presigned"]
    for path in [*m.cache_dir.rglob("*"), m.log_file, m2.log_file, *tmp_path.glob("*.stderr")]:
        if path.is_file():
            blob = path.read_bytes()
            for secret in secrets:
                assert secret not in blob, f"{secret!r} found in {path}"


def test_writes_answer_erofs(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    call_id = next(iter(expected_files(fake)))
    directory = m.calls / call_id
    os.listdir(directory)
    attempts: list[Callable[[], object]] = [
        lambda: open(directory / "call.json", "wb"),  # noqa: SIM115
        lambda: open(directory / "new.txt", "w"),  # noqa: SIM115
        lambda: os.mkdir(directory / "sub"),
        lambda: os.unlink(directory / "call.json"),
        lambda: os.rename(directory / "call.json", directory / "x.json"),
        lambda: os.chmod(directory / "call.json", 0o777),
        lambda: os.rmdir(directory),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS


def test_names_that_are_not_call_ids_cost_no_request(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    os.listdir(m.calls)
    fake.reset_counters()
    for name in [
        "not-a-uuid",
        "..",
        "x" * 255,
        ".Trash-0",
        "autorun.inf",
        "ABCDEF01-2345-4678-9abc-def012345678",
    ]:
        with pytest.raises(OSError) as info:
            os.stat(m.calls / name / "call.json")
        assert info.value.errno == errno.ENOENT
    assert fake.counters().get("api.requests", 0) == 0


def test_unknown_call_id_is_enoent(fake: FakeVapi, mount_factory: MountFactory) -> None:
    m = mount_factory()
    with pytest.raises(FileNotFoundError):
        os.stat(m.calls / "00000000-0000-4000-8000-000000000000")


def test_wrong_key_is_one_line_and_exit_1(fake: FakeVapi, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = dict(os.environ, VAPI_PRIVATE_API_KEY="wrong-key")
    result = subprocess.run(
        [
            *VAPIFS,
            "mount",
            str(mountpoint),
            "--api-url",
            fake.api_url,
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused" in lines[0], result.stderr
    assert "wrong-key" not in result.stderr
    assert not os.path.ismount(mountpoint)


def test_daemon_mount_and_umount(fake: FakeVapi, tmp_path: Path) -> None:
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
    started = time.monotonic()
    result = subprocess.run(
        [
            *VAPIFS,
            "mount",
            str(mountpoint),
            "--api-url",
            fake.api_url,
            "--cache-dir",
            str(tmp_path / "c"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    try:
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 20
        assert os.path.ismount(mountpoint)
        assert sorted(os.listdir(mountpoint)) == [
            "by-assistant",
            "by-date",
            "calls",
            "calls.csv",
            "calls.jsonl",
        ]
    finally:
        done = subprocess.run([*VAPIFS, "umount", str(mountpoint)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not os.path.ismount(mountpoint)


def test_missing_mountpoint_is_exit_1(fake: FakeVapi, tmp_path: Path) -> None:
    env = dict(os.environ, VAPI_PRIVATE_API_KEY=fake.api_key)
    result = subprocess.run(
        [*VAPIFS, "mount", str(tmp_path / "nope"), "--api-url", fake.api_url],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert "does not exist" in result.stderr


@over_tls
def test_demo_mounts_the_fake_shows_the_tour_and_unmounts(tmp_path: Path, tls: bool) -> None:
    mountpoint = tmp_path / "vapi-demo"
    out = subprocess.run(
        [
            *VAPIFS,
            "demo",
            str(mountpoint),
            "--no-wait",
            "--cache-dir",
            str(tmp_path / "cache"),
            *(["--tls"] if tls else []),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    scheme = "https" if tls else "http"
    for expected in (
        f"the fake Vapi at {scheme}://127.0.0.1:",
        "is mounted on",
        "calls of the last 14 days",
        "stereo.wav: 2 channels",
        "ffprobe ",
        "$ zgrep -c WARN calls/",
        "$ grep -c INFO calls/",
        '"level":"ERROR"',
        "signed URLs removed",
        "unmounted",
    ):
        assert expected in text, f"{expected!r} not in the tour:\n{text}"
    assert "Signature" not in text and "expires=" not in text.lower()
    assert not os.path.ismount(mountpoint)
