"""Faults under real mounts: identical bytes or an exact errno, always within a time bound."""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vapifs.calls import artifact_files
from vapifs.demo.data import generate_calls
from vapifs.demo.server import FakeVapi

from .conftest import Mount, MountFactory, over_tls

pytestmark = pytest.mark.mount

MiB = 1 << 20


# -- helpers shared with test_secrets ---------------------------------------------------------


def secrets_of(fake: FakeVapi) -> list[bytes]:
    """What must never be found on disk, in a log or in a command line."""
    secret: bytes = fake._secret
    return [
        fake.api_key.encode(),
        b"X-Amz-Signature",
        b"X-Amz-Credential",
        b"presigned",
        secret,
        secret.hex().encode(),
    ]


def assert_no_secrets(fake: FakeVapi, root: Path, *mounts: Mount, skip: Path | None = None) -> None:
    """Every file under `root` (cache dirs, logs, stderr) and each mount's command line."""
    secrets = secrets_of(fake)
    for top, dirs, names in os.walk(root):
        # Not into mounts (their files are the recordings), nor where the user keeps the key.
        dirs[:] = [d for d in dirs if not os.path.ismount(os.path.join(top, d))]
        for name in names:
            path = Path(top, name)
            if (skip is not None and path.is_relative_to(skip)) or not path.is_file():
                continue
            if path.is_symlink():
                continue
            blob = path.read_bytes()
            for secret in secrets:
                assert secret not in blob, f"{secret!r} found in {path}"
    for m in mounts:
        cmdline = Path(f"/proc/{m.proc.pid}/cmdline")
        if cmdline.exists():
            blob = cmdline.read_bytes()
            for secret in secrets:
                assert secret not in blob, f"{secret!r} in the command line of the mount"


def log_lines(m: Mount, *levels: str) -> list[str]:
    return [line for line in m.log_text().splitlines() if any(f" {lv} " in line for lv in levels)]


def assert_quiet_log(m: Mount, allowed_warnings: int = 0) -> None:
    """No traceback, and no more warnings than the failures a reader saw."""
    text = m.log_text()
    assert "Traceback" not in text, text
    noisy = log_lines(m, "WARNING", "ERROR", "CRITICAL")
    assert len(noisy) <= allowed_warnings, "\n".join(noisy)


def recordings(fake: FakeVapi) -> list[tuple[str, str, bytes]]:
    """(call id, file name, bytes) of every stereo recording, biggest first."""
    out = []
    for call_id, fc in fake.calls.items():
        if "stereo" in fc.artifacts:
            name = next(n for n, k in artifact_files(fc.call).items() if k == "stereo")
            out.append((call_id, name, fc.artifacts["stereo"]))
    return sorted(out, key=lambda item: -len(item[2]))


def read_once_back(path: Path, within: float = 6.0) -> bytes:
    """The file's bytes once the network is back (a give-up is remembered for a moment)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return path.read_bytes()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.25)


def errno_of(action: Callable[[], object]) -> int | None:
    try:
        action()
    except OSError as exc:
        return exc.errno
    return None


@pytest.fixture
def storm_fake(tls: bool) -> Iterator[FakeVapi]:
    """A fake whose 8 first recordings are 3-6 MB of distinct bytes: many ranged requests."""
    calls = generate_calls(seed=11)
    rng = random.Random(11)
    grown = 0
    for fc in calls:
        if "stereo" in fc.artifacts and grown < 8:
            fc.artifacts["stereo"] = rng.randbytes(3 * MiB + rng.randint(0, 3 * MiB))
            grown += 1
    with FakeVapi(calls, seed=11, tls=tls) as server:
        yield server


# -- the tests ------------------------------------------------------------------------------


@over_tls
def test_eight_readers_through_a_fault_storm_get_every_byte(
    storm_fake: FakeVapi, mount_factory: MountFactory, tmp_path: Path
) -> None:
    fake = storm_fake
    fake.set_knobs(
        url_ttl=1.0, cut_rate=0.10, api_500_rate=0.05, api_429_rate=0.05, retry_after=0.3
    )
    m = mount_factory(server=fake)
    files = recordings(fake)[:8]
    assert len(files) == 8 and all(len(d) >= 3 * MiB for _, _, d in files)
    results: dict[str, bytes | BaseException] = {}

    def reader(call_id: str, name: str) -> None:
        try:
            got = bytearray()
            with open(m.calls / call_id / name, "rb") as f:
                while chunk := f.read(256 * 1024):
                    got += chunk
            results[call_id] = bytes(got)
        except BaseException as exc:
            results[call_id] = exc

    started = time.monotonic()
    threads = [threading.Thread(target=reader, args=(c, n)) for c, n, _ in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started
    for call_id, _name, data in files:
        got = results.get(call_id)
        assert isinstance(got, bytes), f"{call_id}: {got!r}"
        assert len(got) == len(data) and got == data, call_id
    assert elapsed < 30, f"{elapsed:.1f}s"
    counters = fake.counters()
    # The storm really hit (cuts, API 500s and 429s, as the fake counts what it injected),
    # and every file's URL was resolved (presigned URLs from the listing live 1 s).
    injected = sum(counters.get(f"fault.{f}", 0) for f in ("cut", "api_500", "api_429"))
    assert injected > 0, counters
    assert counters["storage.expired"] + counters["api.resolve"] >= 8
    assert counters["storage.requests"] > 24
    print(f"8 readers, {sum(len(d) for *_, d in files) / MiB:.0f} MiB: {elapsed:.1f}s {counters}")
    assert_quiet_log(m)
    assert_no_secrets(fake, tmp_path, m)


def test_a_stalled_connection_is_abandoned_and_the_read_completes(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--stall-timeout", "2s")
    call_id, name, data = recordings(fake)[0]
    path = m.calls / call_id / name
    assert os.stat(path).st_size == len(data)  # block 0 is fetched with the size
    before = fake.counters()["storage.requests"]
    fake.set_knobs(stall_rate=1.0, stall_seconds=60)

    def unstall() -> None:
        deadline = time.monotonic() + 10
        while fake.counters()["storage.requests"] == before and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.set_knobs(stall_rate=0.0)  # only the first request stalls

    helper = threading.Thread(target=unstall)
    helper.start()
    started = time.monotonic()
    got = path.read_bytes()
    elapsed = time.monotonic() - started
    helper.join()
    assert got == data
    assert 1.5 < elapsed < 2.0 + 3.0, f"{elapsed:.1f}s"
    assert_quiet_log(m)


def test_storage_that_ignores_range_still_gives_identical_bytes(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    fake.set_knobs(ignore_range=True)
    m = mount_factory()
    for call_id, name, data in recordings(fake)[:3]:
        with open(m.calls / call_id / name, "rb") as f:
            f.seek(len(data) // 2)
            assert f.read(1000) == data[len(data) // 2 : len(data) // 2 + 1000]
            f.seek(0)
            assert f.read() == data
    assert_quiet_log(m)


@pytest.mark.parametrize("knob", ["wrong_content_range", "gzip_ranged"])
def test_a_wrong_range_or_encoding_is_never_served_as_data(
    knob: str, fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--read-timeout", "5s")
    files = recordings(fake)
    warm_id, warm_name, warm = files[0]  # size known, block 0 fetched, the rest not
    cold_id, cold_name, cold = files[1]  # nothing known yet
    assert os.stat(m.calls / warm_id / warm_name).st_size == len(warm)
    os.listdir(m.calls / cold_id)  # the call is known; its files are not yet sized
    fake.set_knobs(**{knob: True})
    for call_id, name, data in ((warm_id, warm_name, warm), (cold_id, cold_name, cold)):
        started = time.monotonic()
        try:
            got = (m.calls / call_id / name).read_bytes()
        except OSError as exc:
            assert exc.errno == errno.EIO, exc
        else:
            assert got == data, "wrong bytes were served"
        assert time.monotonic() - started < 5 + 2
    fake.set_knobs(**{knob: False})
    for call_id, name, data in ((warm_id, warm_name, warm), (cold_id, cold_name, cold)):
        assert read_once_back(m.calls / call_id / name) == data
    text = m.log_text()
    assert "Traceback" not in text


def test_api_down_with_nothing_cached_fails_within_the_read_timeout(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    call_id, name, _data = recordings(fake)[0]
    fake.pause()
    try:
        m = mount_factory("--read-timeout", "5s")
        for action in (
            lambda: os.listdir(m.calls),
            lambda: os.stat(m.calls / call_id),
            lambda: (m.calls / call_id / name).read_bytes(),
        ):
            started = time.monotonic()
            assert errno_of(action) == errno.EIO
            assert time.monotonic() - started < 5 + 1.5
    finally:
        fake.resume()
    assert "Traceback" not in m.log_text()


@pytest.mark.parametrize("knob", ["api_down", "storage_down"])
def test_a_dropping_server_fails_reads_within_the_read_timeout(
    knob: str, fake: FakeVapi, mount_factory: MountFactory
) -> None:
    fake.set_knobs(url_ttl=1.0)  # no reusable signed URL: every fetch needs the API
    m = mount_factory("--read-timeout", "5s")
    call_id, name, data = recordings(fake)[0]
    path = m.calls / call_id / name
    assert os.stat(path).st_size == len(data)
    time.sleep(1.0)  # the URL resolved for the size has expired
    fake.set_knobs(**{knob: True})
    started = time.monotonic()
    assert errno_of(path.read_bytes) == errno.EIO
    elapsed = time.monotonic() - started
    assert elapsed < 5 + 1.5, f"{elapsed:.1f}s"
    fake.set_knobs(**{knob: False})
    assert read_once_back(path) == data
    assert_quiet_log(m, allowed_warnings=1)  # one failed read, one line


def hostile_names(rng: random.Random, n: int) -> list[bytes]:
    probes = [
        b".Trash",
        b".Trash-0",
        b".Trash-1000",
        b".xdg-volume-info",
        b"autorun.inf",
        b".hidden",
        b"desktop.ini",
        b".DS_Store",
        b"._.DS_Store",
        b"Thumbs.db",
        b".directory",
        b"...",
        b".. ",
        b"..\\..",
        b"%2e%2e",
        b"x" * 255,
        b"x" * 1024,
        b"\xff\xfe",
        b"CALL.JSON",
        b"call.json\n",
        b"0000-00-00",
        b"2024-02-30x",
        b"ABCDEF01-2345-4678-9ABC-DEF012345678",
        b"abcdef01-2345-4678-9abc-def01234567",
    ]
    names = list(probes)
    alphabet = bytes(b for b in range(1, 256) if b != ord("/"))
    while len(names) < n:
        length = rng.choice((1, 2, 3, 8, 36, 64, 200, 255))
        name = bytes(rng.choice(alphabet) for _ in range(length))
        if name not in (b".", b".."):
            names.append(name)
    return names


def test_ten_thousand_hostile_lookups_cost_no_request(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory()
    root = m.mountpoint
    call_id, name, data = recordings(fake)[0]
    day = sorted(os.listdir(root / "by-date"))[0]
    assistant = sorted(os.listdir(root / "by-assistant"))[0]
    os.listdir(root / "calls" / call_id)
    levels = [
        root,
        root / "calls",
        root / "calls" / call_id,
        root / "by-date",
        root / "by-date" / day,
        root / "by-assistant",
        root / "by-assistant" / assistant,
    ]
    fake.reset_counters()
    rng = random.Random(5)
    names = hostile_names(rng, 10_000)
    started = time.monotonic()
    wrong: list[tuple[bytes, int | None]] = []
    for i, junk in enumerate(names):
        where = bytes(levels[i % len(levels)]) + b"/" + junk
        code = errno_of(lambda: os.stat(where))  # noqa: B023
        if code != errno.ENOENT:
            wrong.append((where, code))
    elapsed = time.monotonic() - started
    assert wrong == []
    # Longer than FUSE's 1024-byte name limit: the kernel answers without asking the mount.
    for level in levels:
        assert errno_of(lambda: os.stat(bytes(level) + b"/" + b"y" * 4096)) == errno.ENAMETOOLONG  # noqa: B023
        # ".." is the kernel's: it never reaches vapifs as a name, nor leaves the mount below
        # its root.
        if level != root:
            assert os.stat(bytes(level) + b"/..").st_dev == os.stat(root).st_dev
    assert fake.counters()["api.requests"] == 0
    assert fake.counters()["storage.requests"] == 0
    print(f"{len(names)} hostile lookups: {elapsed:.2f}s")
    assert elapsed < 15
    assert (root / "calls" / call_id / name).read_bytes() == data
    assert_quiet_log(m)


def test_a_listing_survives_odd_call_objects(fake: FakeVapi, mount_factory: MountFactory) -> None:
    fake.set_knobs(odd_calls=True)
    m = mount_factory()
    listed = set(os.listdir(m.calls))
    good = {c for c, fc in fake.calls.items() if time.time() - _created(fc.call) < 13.9 * 86400}
    assert good <= listed
    assert all(len(name) == 36 for name in listed)
    call_id, name, data = recordings(fake)[0]
    assert (m.calls / call_id / name).read_bytes() == data
    assert "Traceback" not in m.log_text()
    # One line per skipped object at most, never a line per field.
    assert len(log_lines(m, "WARNING")) <= 5


def _created(call: dict[str, object]) -> float:
    from vapifs.calls import created_at

    ts = created_at(call)
    assert ts is not None
    return ts


def test_a_silent_api_bounds_listings_and_lookups(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    m = mount_factory("--read-timeout", "1s")
    call_id, name, data = recordings(fake)[0]
    fake.set_knobs(api_stall=True, stall_seconds=60)
    for action in (
        lambda: os.listdir(m.calls),
        lambda: os.stat(m.calls / call_id),
        lambda: os.listdir(m.mountpoint / "by-date"),
    ):
        started = time.monotonic()
        assert errno_of(action) == errno.EIO
        elapsed = time.monotonic() - started
        assert elapsed < 1 + 2 + 1.5, f"{elapsed:.1f}s"  # --read-timeout, its margin, slack
    fake.set_knobs(api_stall=False)
    assert read_once_back(m.calls / call_id / name) == data
    assert call_id in os.listdir(m.calls)
    assert "Traceback" not in m.log_text()
