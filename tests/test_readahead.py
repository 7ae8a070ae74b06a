"""How reads reach the network: read-ahead for streams, exact ranges for seeks, background fill."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import pytest

from vapifs.demo.server import FakeVapi
from vapifs.loads import MAX_RUN_BLOCKS

from .blockfiles import files_of, records
from .conftest import MountFactory

pytestmark = pytest.mark.mount

KIB = 1024
MIB = 1024 * KIB


def big_call(fake: FakeVapi) -> tuple[str, bytes]:
    return max(
        ((c, fc.artifacts["stereo"]) for c, fc in fake.calls.items() if "stereo" in fc.artifacts),
        key=lambda item: len(item[1]),
    )


def blocks_on_disk(cache_dir: Path, call_id: str, kind: str = "stereo") -> int:
    return sum(len(records(p)) for p in files_of(cache_dir, call_id, kind))


def test_a_sequential_read_goes_out_as_few_large_requests(mount_factory: MountFactory) -> None:
    with FakeVapi(seed=11, big_stereo_mb=48) as fake:
        m = mount_factory(server=fake, name="seq")
        call_id, data = big_call(fake)
        fake.reset_counters()
        assert (m.calls / call_id / "stereo.wav").read_bytes() == data
        gets = fake.counters()[f"storage.get:{call_id}/stereo"]
        # 48 MB in runs of up to 8 MiB: a handful of requests, not one per block.
        assert gets <= len(data) // (4 * MIB) + 4, gets
        m.stop()


def test_a_long_stream_asks_for_whole_runs_once_its_window_has_grown(
    mount_factory: MountFactory,
) -> None:
    # Read-ahead tops up a run at a time: a top-up of a run and one block more would send
    # that block as a request of its own, nearly doubling the requests of a long stream.
    with FakeVapi(seed=13, big_stereo_mb=100) as fake:
        m = mount_factory(server=fake, name="runs")
        call_id, data = big_call(fake)
        fake.reset_counters()
        with open(m.calls / call_id / "stereo.wav", "rb", buffering=0) as f:
            got = b"".join(iter(lambda: f.read(MIB), b""))
        assert got == data
        gets = fake.counters()[f"storage.get:{call_id}/stereo"]
        blocks = -(-len(data) // MIB)
        # The window's first reads ask for a few blocks at a time (six requests for the
        # first 13 blocks, two to spare), then each request is a run of MAX_RUN_BLOCKS.
        assert gets <= 8 + -(-(blocks - 13) // MAX_RUN_BLOCKS), (gets, blocks)
        m.stop()


@pytest.mark.parametrize("slow_first", [False, True])
def test_on_a_fast_link_seeks_never_start_a_background_fill(
    mount_factory: MountFactory, slow_first: bool
) -> None:
    with FakeVapi(seed=15, big_stereo_mb=48) as fake:
        m = mount_factory(server=fake, name="fast")
        call_id, data = big_call(fake)
        rng = random.Random(8)
        with open(m.calls / call_id / "stereo.wav", "rb", buffering=0) as f:
            assert f.read(4 * KIB) == data[: 4 * KIB]
            fake.reset_counters()
            for i in range(12):
                # With slow_first, the first seek is slow (say, it paid for a connection far
                # away) and the rest are not: that one must not make the link look slow.
                stall = 1.0 if slow_first and i == 0 else 0.0
                fake.set_knobs(stall_rate=stall, stall_seconds=0.08)
                offset = rng.randrange(0, len(data) - 64 * KIB)
                f.seek(offset)
                assert f.read(64 * KIB) == data[offset : offset + 64 * KIB]
            time.sleep(0.5)
        counters = fake.counters()
        assert counters["storage.bytes"] < 12 * 512 * KIB
        # Each seek is one request on a kept-alive connection, not a new connection each:
        # a connection costs a round trip of its own on a real link.
        assert counters[f"storage.get:{call_id}/stereo"] >= 12
        assert counters["storage.connections"] <= 2, counters
        m.stop()


def test_seeks_fetch_only_what_they_read(mount_factory: MountFactory) -> None:
    with FakeVapi(seed=12, big_stereo_mb=48) as fake:
        m = mount_factory(server=fake, name="seek")
        call_id, data = big_call(fake)
        rng = random.Random(5)
        with open(m.calls / call_id / "stereo.wav", "rb", buffering=0) as f:
            assert f.read(4 * KIB) == data[: 4 * KIB]
            fake.reset_counters()
            for _ in range(3):  # fewer seeks than start a background fill
                offset = rng.randrange(8 * MIB, len(data) - 64 * KIB)
                f.seek(offset)
                assert f.read(64 * KIB) == data[offset : offset + 64 * KIB]
            sent = fake.counters()["storage.bytes"]
        # The kernel may round each read up a little; whole 1 MiB blocks would be 3 MiB.
        assert sent < 3 * 512 * KIB, sent
        m.stop()


def test_scrubbing_fetches_the_whole_file_in_the_background(
    mount_factory: MountFactory,
) -> None:
    with FakeVapi(seed=13, big_stereo_mb=24) as fake:
        # Every storage answer 30 ms late: a link where each seek costs a round trip.
        fake.set_knobs(stall_rate=1.0, stall_seconds=0.03)
        m = mount_factory(server=fake, name="scrub")
        call_id, data = big_call(fake)
        rng = random.Random(6)
        path = m.calls / call_id / "stereo.wav"
        with open(path, "rb", buffering=0) as f:
            assert f.read(4 * KIB) == data[: 4 * KIB]
            for _ in range(8):
                offset = rng.randrange(0, len(data) - 64 * KIB)
                f.seek(offset)
                assert f.read(64 * KIB) == data[offset : offset + 64 * KIB]
            # The fill is done when every block of the file is on disk.
            blocks = -(-len(data) // MIB)
            deadline = time.monotonic() + 30
            while blocks_on_disk(m.cache_dir, call_id) < blocks and time.monotonic() < deadline:
                time.sleep(0.1)
        assert blocks_on_disk(m.cache_dir, call_id) == blocks
        assert fake.counters()["storage.bytes"] >= len(data)
        m.stop()
        # Everything is on disk now: another mount reads the file with the network gone.
        fake.set_knobs(stall_rate=0.0)
        fake.pause()
        m2 = mount_factory(server=fake, name="scrub")
        with open(m2.calls / call_id / "stereo.wav", "rb") as f:
            for _ in range(20):
                offset = rng.randrange(0, len(data) - 64 * KIB)
                f.seek(offset)
                assert f.read(64 * KIB) == data[offset : offset + 64 * KIB]
        fake.resume()
        m2.stop()


def test_closing_the_file_stops_the_background_fill(mount_factory: MountFactory) -> None:
    with FakeVapi(seed=14, big_stereo_mb=200) as fake:
        m = mount_factory(server=fake, name="abandon")
        call_id, data = big_call(fake)
        fake.set_knobs(stall_rate=1.0, stall_seconds=0.03)
        rng = random.Random(7)
        fd = os.open(m.calls / call_id / "stereo.wav", os.O_RDONLY)
        try:
            os.pread(fd, 4 * KIB, 0)
            for _ in range(6):
                offset = rng.randrange(0, len(data) - 64 * KIB)
                assert os.pread(fd, 64 * KIB, offset) == data[offset : offset + 64 * KIB]
            # The seeks alone read well under 8 MiB: more than that is the fill at work.
            deadline = time.monotonic() + 20
            while fake.counters()["storage.bytes"] < 24 * MIB and time.monotonic() < deadline:
                time.sleep(0.05)
            assert fake.counters()["storage.bytes"] >= 24 * MIB, "no background fill started"
        finally:
            os.close(fd)
        time.sleep(1.0)
        sent = fake.counters()["storage.bytes"]
        time.sleep(1.0)
        # Nothing more comes once the reader is gone (200 MB would take a few seconds).
        assert fake.counters()["storage.bytes"] - sent < 32 * MIB
        assert fake.counters()["storage.bytes"] < len(data)
        m.stop()
