"""Freed block buffers are reused: reading blocks one after another faults no new pages."""

from __future__ import annotations

import resource
import sys

import pytest

from vapifs.heap import keep_freed_blocks

MiB = 1 << 20


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_blocks_turned_over_reuse_their_memory() -> None:
    assert keep_freed_blocks()
    assert keep_freed_blocks()  # once is enough, again is harmless

    def turn_over(rounds: int) -> int:
        before = faults()
        for i in range(rounds):
            # A memory cache's worth of blocks, all dropped, then the next ones.
            held = [bytes([i]) * MiB for _ in range(16)]
            assert all(len(b) == MiB for b in held)
            del held
        return faults() - before

    turn_over(1)  # the first ones take their pages once
    pages = 16 * 10 * MiB // 4096
    assert turn_over(10) < pages // 20  # a page fault per page of every block, before
