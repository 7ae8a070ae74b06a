"""The tree and the reader driven directly, without FUSE, against the fake Vapi in process.

trio's virtual clock jumps over TTLs and revalidation intervals, so that what a mount does
over minutes and days is checked in milliseconds, with the fake's own request counters.
"""

from __future__ import annotations

import gzip
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from vapifs.api import VapiClient
from vapifs.calls import artifact_files
from vapifs.changes import Change, Changes
from vapifs.core import Core, opened_core
from vapifs.demo.data import extra_call
from vapifs.demo.server import FakeVapi
from vapifs.entries import NEGATIVE_TTL
from vapifs.errors import NotFound
from vapifs.nodes import BY_ASSISTANT_INODE, BY_DATE_INODE
from vapifs.tree import CALLS_INODE, Tree

from .inprocess import CoreSettings, InProcessTransport

READ_TIMEOUT = 10 * 86400.0
UNKNOWN_ID = "00000000-0000-4000-8000-000000000000"


@dataclass
class Layer:
    tree: Tree
    core: Core
    fake: FakeVapi

    async def call_files(self, call_id: str) -> dict[str, Any]:
        directory = await self.tree.lookup(CALLS_INODE, call_id)
        return {node.name: node for node in await self.tree.children(directory.inode)}

    async def read_file(self, call_id: str, name: str) -> bytes:
        directory = await self.tree.lookup(CALLS_INODE, call_id)
        node = await self.tree.lookup(directory.inode, name)
        size = self.tree.size(node)
        return await self.tree.read(node, 0, size, None)


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the run has been idle for a moment of real time: disk
    work runs in threads, and a jump while one is under way would fire a timeout early."""
    return trio.testing.MockClock(autojump_threshold=0.1)


@pytest.fixture
def fake() -> Any:
    with FakeVapi(seed=7) as server:
        yield server


@asynccontextmanager
async def layer(fake: FakeVapi, cache_dir: Path, **tree_options: Any) -> AsyncIterator[Layer]:
    started = time.time()

    def wall() -> float:  # the wall clock, moving with trio's (virtual) clock
        return started + trio.current_time()

    # Bounds far beyond the virtual sleeps of these tests: a jump must never reach them.
    settings = CoreSettings(
        fake.api_url, cache_dir, read_timeout=READ_TIMEOUT, stall_timeout=READ_TIMEOUT
    )
    async with opened_core(
        settings,
        fake.api_key,
        None,
        revalidate_after=tree_options.pop("revalidate_after", 86400.0),
        wall_clock=wall,
        transport=InProcessTransport(fake),
    ) as core:
        tree = Tree(
            core.api,
            core.store,
            core.meta,
            nursery=core.nursery,
            changes=core.changes,
            wall_clock=wall,
            **tree_options,
        )
        yield Layer(tree, core, fake)
        await core.store.flush()


def in_window(fake: FakeVapi, now: float, days: float = 14.0) -> set[str]:
    from vapifs.calls import created_at

    return {i for i, fc in fake.calls.items() if now - (created_at(fc.call) or 0) <= days * 86400}


def a_call_with(fake: FakeVapi, kind: str) -> str:
    return next(i for i, fc in fake.calls.items() if kind in fc.artifacts)


async def names(tree: Tree) -> set[str]:
    return {node.name for node in await tree.children(CALLS_INODE)}


async def test_files_read_through_the_tree_are_the_source(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "stereo")
    async with layer(fake, tmp_path / "cache") as ly:
        files = await ly.call_files(call_id)
        for name, kind in artifact_files(fake.calls[call_id].call).items():
            assert name in files
            assert await ly.read_file(call_id, name) == fake.calls[call_id].artifacts[kind]


async def test_the_listing_is_reused_within_dir_ttl_then_asks_only_for_newer_calls(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with layer(fake, tmp_path / "cache", dir_ttl=60.0) as ly:
        assert await names(ly.tree) == in_window(fake, time.time())
        fake.reset_counters()
        new = extra_call(1, base_seed=fake.seed, org_id=fake.org_id)
        fake.add_call(new)
        await trio.sleep(59.0)
        assert new.id not in await names(ly.tree)  # still within the TTL: no request
        assert fake.counters()["api.list"] == 0
        await trio.sleep(2.0)
        assert new.id in await names(ly.tree)
        assert len(fake.list_queries) == 1, fake.list_queries
        assert "createdAtGt" in fake.list_queries[0]  # only calls newer than the newest seen


async def test_an_unknown_call_id_is_asked_once_per_negative_ttl(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with layer(fake, tmp_path / "cache") as ly:
        fake.reset_counters()
        for _ in range(5):
            with pytest.raises(NotFound):
                await ly.tree.lookup(CALLS_INODE, UNKNOWN_ID)
            await trio.sleep(NEGATIVE_TTL / 10)
        assert fake.counters()["api.get"] == 1
        await trio.sleep(NEGATIVE_TTL)
        with pytest.raises(NotFound):
            await ly.tree.lookup(CALLS_INODE, UNKNOWN_ID)
        assert fake.counters()["api.get"] == 2


async def test_an_artifact_is_revalidated_once_per_interval(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "stereo")
    stereo = fake.calls[call_id].artifacts["stereo"]
    async with layer(fake, tmp_path / "cache", revalidate_after=3600.0) as ly:
        assert await ly.read_file(call_id, "stereo.wav") == stereo
        await ly.core.store.flush()
    fake.reset_counters()
    # A new process (as after a remount): within the interval, the version on disk is trusted.
    async with layer(fake, tmp_path / "cache", revalidate_after=3600.0) as ly:
        await trio.sleep(1800.0)
        assert await ly.read_file(call_id, "stereo.wav") == stereo
        assert fake.counters()["storage.requests"] == 0
        await trio.sleep(1801.0)
        assert await ly.read_file(call_id, "stereo.wav") == stereo
        # Past the interval: the version is checked (a small request), the bytes stay local.
        assert fake.counters()[f"storage.get:{call_id}/stereo"] >= 1
        assert fake.counters()["storage.bytes"] < len(stereo)


async def test_a_changed_artifact_is_seen_at_revalidation_and_never_spliced(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "stereo")
    async with layer(fake, tmp_path / "cache", revalidate_after=600.0) as ly:
        old = fake.calls[call_id].artifacts["stereo"]
        assert await ly.read_file(call_id, "stereo.wav") == old
        new = old[:44] + bytes(b ^ 0x5A for b in old[44:])
        fake.swap_artifact(call_id, "stereo", new)
        assert await ly.read_file(call_id, "stereo.wav") == old  # within the interval
        await trio.sleep(601.0)
        assert await ly.read_file(call_id, "stereo.wav") == new


async def test_api_errors_are_retried_with_backoff_in_bounded_time(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    fake.set_knobs(api_429_rate=1.0, retry_after=2.0)
    async with layer(fake, tmp_path / "cache") as ly:
        started = trio.current_time()
        with trio.move_on_after(6.5):
            await names(ly.tree)
            pytest.fail("a listing succeeded while every request was refused")
        refused = fake.counters()["fault.api_429"]
        # Retry-After is honoured: about one try every 2 s, never a tight loop.
        assert 2 <= refused <= 5, refused
        fake.set_knobs(api_429_rate=0.0)
        assert await names(ly.tree) == in_window(fake, time.time())
        assert trio.current_time() - started < 120.0


async def test_the_core_opens_its_caches_after_the_hook_and_stops_its_tasks_on_exit(
    fake: FakeVapi, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    settings = CoreSettings(fake.api_url, cache_dir)
    seen: list[bool] = []

    class Refused(Exception):
        pass

    async def refuse(api: VapiClient) -> None:
        seen.append(cache_dir.exists())
        raise Refused

    with pytest.raises(Refused):
        async with opened_core(
            settings, fake.api_key, None, revalidate_after=60.0, before_caches=refuse
        ):
            pytest.fail("the core opened although the hook refused")
    assert seen == [False]
    assert not cache_dir.exists()  # nothing was opened

    async def check(api: VapiClient) -> None:
        await api.check_key()
        seen.append(cache_dir.exists())

    stopped = trio.Event()

    async def background() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    async with opened_core(
        settings,
        fake.api_key,
        None,
        revalidate_after=60.0,
        before_caches=check,
        transport=InProcessTransport(fake),
    ) as core:
        assert cache_dir.is_dir()
        core.nursery.start_soon(background)
        await trio.testing.wait_all_tasks_blocked()
    assert seen == [False, False]
    assert stopped.is_set()
    assert core.client.is_closed


# -- the window remembered -------------------------------------------------------------------


async def test_a_remount_starts_from_the_stored_listing_and_asks_only_for_newer_calls(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    async with layer(fake, tmp_path / "cache") as ly:
        listed = [node.name for node in await ly.tree.children(CALLS_INODE)]
    assert set(listed) == in_window(fake, time.time())
    fake.reset_counters()
    async with layer(fake, tmp_path / "cache") as ly:
        # Within --dir-ttl of the stored listing: the same calls, in order, with no request.
        assert [node.name for node in await ly.tree.children(CALLS_INODE)] == listed
        assert fake.list_queries == []
        new = extra_call(1, base_seed=fake.seed, org_id=fake.org_id)
        fake.add_call(new)
        await trio.sleep(61.0)
        assert [node.name for node in await ly.tree.children(CALLS_INODE)] == [new.id, *listed]
        assert len(fake.list_queries) == 1 and "createdAtGt" in fake.list_queries[0]
    fake.set_knobs(api_down=True)
    async with layer(fake, tmp_path / "cache") as ly:
        await trio.sleep(61.0)  # the listing wants a refresh, and the API is unreachable
        assert [node.name for node in await ly.tree.children(CALLS_INODE)] == [new.id, *listed]


async def test_offline_with_no_listing_stored_the_window_is_the_calls_on_disk(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    by_age = sorted(fake.calls.values(), key=lambda fc: fc.created_at, reverse=True)
    inside = [fc.id for fc in by_age if fc.id in in_window(fake, time.time(), days=13)]
    opened = inside[1:4]
    async with layer(fake, tmp_path / "cache") as ly:
        for call_id in opened:  # by id, as from links in a ticket: no listing
            assert (await ly.tree.call_object(call_id))["id"] == call_id
    assert fake.list_queries == []
    fake.set_knobs(api_down=True)
    async with layer(fake, tmp_path / "cache") as ly:
        for _ in range(2):
            assert [node.name for node in await ly.tree.children(CALLS_INODE)] == opened
        days = await ly.tree.children(BY_DATE_INODE)
        assert {c.name for d in days for c in await ly.tree.children(d.inode)} == set(opened)


# -- changes reaching the tree ---------------------------------------------------------------


async def until(check: Callable[[], bool]) -> None:
    """Wait until background work (which may run in threads) makes `check` true."""
    with trio.fail_after(60.0):
        while not check():
            await trio.sleep(0.5)


@dataclass
class Kernel:
    """What the tree tells the kernel, recorded."""

    invalidated: list[int] = field(default_factory=list)
    forgotten: list[tuple[int, str]] = field(default_factory=list)

    def options(self) -> dict[str, Any]:
        return {"on_invalidate": self.invalidated.append, "on_forget": self.forget}

    def forget(self, parent: int, name: str) -> None:
        self.forgotten.append((parent, name))


async def test_a_new_version_is_applied_before_the_lookup_that_found_it_returns(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "stereo")
    kernel = Kernel()
    async with layer(fake, tmp_path / "cache", revalidate_after=600.0, **kernel.options()) as ly:
        directory = await ly.tree.lookup(CALLS_INODE, call_id)
        stereo = await ly.tree.lookup(directory.inode, "stereo.wav")
        assert not stereo.stale_pages and kernel.invalidated == []
        old = fake.calls[call_id].artifacts["stereo"]
        fake.swap_artifact(call_id, "stereo", old[:44] + bytes(b ^ 0x5A for b in old[44:]))
        await trio.sleep(601.0)
        # The tree's background task waits for changes too: the one this lookup causes is
        # applied all the same before it returns, with no checkpoint in between.
        assert await ly.tree.lookup(directory.inode, "stereo.wav") is stereo
        assert stereo.stale_pages and kernel.invalidated == [stereo.inode]


async def test_a_change_the_store_finds_alone_reaches_the_kernel_at_once(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "stereo")
    kernel = Kernel()
    async with layer(fake, tmp_path / "cache", revalidate_after=600.0, **kernel.options()) as ly:
        directory = await ly.tree.lookup(CALLS_INODE, call_id)
        stereo = await ly.tree.lookup(directory.inode, "stereo.wav")
        old = fake.calls[call_id].artifacts["stereo"]
        fake.swap_artifact(call_id, "stereo", old[:44] + bytes(b ^ 0x5A for b in old[44:]))
        await trio.sleep(601.0)
        await ly.core.store.version(call_id, "stereo")  # as a read-ahead would: no tree call
        await trio.testing.wait_all_tasks_blocked()
        assert kernel.invalidated == [stereo.inode] and stereo.stale_pages


async def test_an_artifact_gone_leaves_its_directory_and_the_call_is_asked_again(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "stereo")
    kernel = Kernel()
    async with layer(fake, tmp_path / "cache", revalidate_after=600.0, **kernel.options()) as ly:
        assert "stereo.wav" in await ly.call_files(call_id)
        directory = await ly.tree.lookup(CALLS_INODE, call_id)
        stereo = await ly.tree.lookup(directory.inode, "stereo.wav")
        fake.forget_artifact(call_id, "stereo")
        await trio.sleep(601.0)
        gets = fake.counters()["api.get"]
        with pytest.raises(NotFound):
            await ly.tree.lookup(directory.inode, "stereo.wav")
        # Applied before the lookup answered, though a task of the tree waits for changes.
        assert kernel.forgotten == [(directory.inode, "stereo.wav")]
        assert stereo.inode in kernel.invalidated
        with pytest.raises(NotFound):
            ly.tree.node(stereo.inode)
        assert "stereo.wav" not in {c.name for c in await ly.tree.children(directory.inode)}
        # Once as the listing found the call stale, once more (in the background) because
        # one of its artifacts went away.
        await until(lambda: fake.counters()["api.get"] == gets + 2)
        await trio.sleep(5.0)
        assert fake.counters()["api.get"] == gets + 2


async def test_a_call_gone_leaves_the_window_the_views_and_the_stored_listing(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    kernel = Kernel()
    async with layer(fake, tmp_path / "cache", revalidate_after=600.0, **kernel.options()) as ly:
        listed = [node.name for node in await ly.tree.children(CALLS_INODE)]
        gone = listed[1]
        days = [
            d
            for d in await ly.tree.children(BY_DATE_INODE)
            if gone in {c.name for c in await ly.tree.children(d.inode)}
        ]
        assert len(days) == 1
        await ly.tree.lookup(CALLS_INODE, gone)
        fake.forget_call(gone)
        await trio.sleep(601.0)
        with pytest.raises(NotFound):
            await ly.tree.lookup(CALLS_INODE, gone)
        assert (CALLS_INODE, gone) in kernel.forgotten
        assert (days[0].inode, gone) in kernel.forgotten
        assert [node.name for node in await ly.tree.children(CALLS_INODE)] == [
            i for i in listed if i != gone
        ]
        for view in (BY_DATE_INODE, BY_ASSISTANT_INODE):
            for group in await ly.tree.children(view):
                assert gone not in {c.name for c in await ly.tree.children(group.inode)}
    fake.reset_counters()
    async with layer(fake, tmp_path / "cache") as ly:
        assert gone not in await names(ly.tree)
        assert fake.list_queries == []  # from the stored listing, rewritten without it


async def test_a_trailer_that_lies_about_the_decompressed_size_drops_its_attributes(
    fake: FakeVapi, tmp_path: Path, clock: trio.testing.MockClock
) -> None:
    call_id = a_call_with(fake, "logs")
    first, second = random.Random(7).randbytes(1_200_000), b"a second member\n" * 100
    fake.swap_artifact(call_id, "logs", gzip.compress(first) + gzip.compress(second))
    kernel = Kernel()
    async with layer(fake, tmp_path / "cache", **kernel.options()) as ly:
        directory = await ly.tree.lookup(CALLS_INODE, call_id)
        plain = await ly.tree.lookup(directory.inode, "call-logs.jsonl")
        assert ly.tree.size(plain) == len(second)  # the last member's trailer, checked later
        assert kernel.invalidated == []
        await until(lambda: plain.inode in kernel.invalidated)
        assert plain.stale_pages
        assert ly.tree.size(plain) == len(first) + len(second)
        assert await ly.tree.read(plain, 0, len(first) + 10, None) == first + second[:10]


async def test_a_change_told_while_a_task_waits_is_still_there_for_the_next_take() -> None:
    changes = Changes()
    woke: list[list[Change]] = []

    async def follow() -> None:
        await changes.wait()
        woke.append(changes.take())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(follow)
        await trio.testing.wait_all_tasks_blocked()
        changes.tell(Change("a", "stereo"))
        assert changes.take() == [Change("a", "stereo")]  # not handed to the waiting task
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []  # woken, it found nothing to take: it waits on
        changes.tell(Change("a", "mono"))
        changes.tell(Change("a", "stereo", gone=True))
    assert woke == [[Change("a", "mono"), Change("a", "stereo", gone=True)]]
