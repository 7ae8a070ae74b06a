"""Re-reads of a call's files come from the kernel's page cache, also for calls just ended."""

from __future__ import annotations

import json

import pytest

from vapifs.defaults import STATS_FILE
from vapifs.demo.data import extra_call
from vapifs.demo.server import FakeVapi

from .conftest import MountFactory

pytestmark = pytest.mark.mount


def test_a_call_ended_minutes_ago_is_reread_from_the_page_cache(
    fake: FakeVapi, mount_factory: MountFactory
) -> None:
    # Ended just now: its call object is still read again now and then, in case recordings
    # come late, but its files' bytes are fixed by their version.
    new = extra_call(3, base_seed=fake.seed, org_id=fake.org_id)
    fake.add_call(new)
    m = mount_factory()
    path = m.calls / new.id / "stereo.wav"
    assert path.read_bytes() == new.artifacts["stereo"]
    reads = json.loads((m.mountpoint / STATS_FILE).read_bytes())["reads"]
    for _ in range(3):
        assert path.read_bytes() == new.artifacts["stereo"]
    # Not one read reached the mount: the kernel kept the pages across opens.
    assert json.loads((m.mountpoint / STATS_FILE).read_bytes())["reads"] == reads
