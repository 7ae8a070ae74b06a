"""Versions of artifacts: the one each is at, revalidated once per interval, and what else goes."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from .changes import Change, Changes
from .defaults import DEFAULT_REVALIDATE
from .ends import HEAD_BYTES, Ends
from .errors import NetworkError, NotFound
from .loads import Loads
from .meta import MetaStore
from .version import Version

log = logging.getLogger("vapifs.reader")


@dataclass
class _Artifact:
    version: Version | None = None
    checked_at: float = 0.0
    stored_at: float = 0.0  # when this version was first fetched (the age of its bytes)
    lock: trio.Lock = field(default_factory=trio.Lock)


class Versions:
    """Which version of each artifact the store serves, from memory, the disk or the server.

    A version is checked against the server at most once per `revalidate_after`; a new one
    drops every block of the others, in memory and on disk.
    """

    def __init__(
        self,
        meta: MetaStore,
        loads: Loads,
        ends: Ends,
        *,
        revalidate_after: float = DEFAULT_REVALIDATE,
        read_timeout: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
        changes: Changes | None = None,
    ) -> None:
        self.meta = meta
        self._loads = loads
        self._ends = ends
        self.cache = loads.cache
        self.fetcher = loads.fetcher
        self.revalidate_after = revalidate_after
        self.read_timeout = read_timeout
        self._now = wall_clock
        self._artifacts: dict[tuple[str, str], _Artifact] = {}
        # Told of a new version of an artifact, and of one known before that answered 404
        # (past the org's retention, it was dropped).
        self._changes = changes

    def known_version(self, call_id: str, kind: str) -> Version | None:
        """The version in memory, without any I/O (for cheap attributes)."""
        state = self._artifacts.get((call_id, kind))
        return state.version if state else None

    async def version(
        self, call_id: str, kind: str, *, light: bool = False, head: bool = False
    ) -> Version:
        """The artifact's current version (size, ETag), checked at most once per interval.

        Discovery fetches block 0 as well, so a player's first read is already cached, unless
        `light` (a directory listing, which wants sizes of many files and reads few): then
        one byte, or `head` (a walk that reads headers): its first HEAD_BYTES. When the
        network is down, a version seen before is used as it is.
        """
        state = self._artifacts.setdefault((call_id, kind), _Artifact())
        if state.version is not None and self._fresh(state):
            return state.version
        async with state.lock:
            if state.version is None:
                doc = await trio.to_thread.run_sync(self.meta.get, "artifact", f"{call_id}/{kind}")
                if doc is not None:
                    self._take_doc(state, doc)
            if state.version is not None and self._fresh(state):
                return state.version
            if state.version is None:
                self._loads.inflight.check_gave_up(call_id, kind)
            try:
                await self._discover(call_id, kind, state, light, head)
            except NotFound:
                if state.version is not None:
                    # It was there and is no more: past retention. Nothing of it stays here.
                    log.warning("%s/%s is gone from the server; dropping it", call_id, kind)
                    await self.forget(call_id, kind)
                    if self._changes is not None:
                        self._changes.tell(Change(call_id, kind, gone=True))
                raise
            except NetworkError as exc:
                if state.version is None:
                    raise
                log.warning(
                    "%s/%s: cannot check for a newer version (%s); serving the cached one",
                    call_id,
                    kind,
                    exc,
                )
            assert state.version is not None
            return state.version

    async def changed(self, call_id: str, kind: str, new: Version) -> None:
        """A read found the artifact at `new` (its bytes changed under a download)."""
        state = self._artifacts.setdefault((call_id, kind), _Artifact())
        async with state.lock:
            await self._adopt(call_id, kind, state, new)

    def stored_versions(self, call_id: str, kinds: set[str]) -> dict[str, Any]:
        """The stored version documents of some artifacts (blocking: call it in a thread)."""
        docs = {}
        for kind in kinds:
            doc = self.meta.get("artifact", f"{call_id}/{kind}")
            if doc is not None:
                docs[kind] = doc
        return docs

    def seed_versions(self, call_id: str, docs: dict[str, Any]) -> None:
        """Adopt versions loaded by `stored_versions` where nothing newer is known."""
        for kind, doc in docs.items():
            state = self._artifacts.setdefault((call_id, kind), _Artifact())
            if state.version is None:
                self._take_doc(state, doc)

    @staticmethod
    def _take_doc(state: _Artifact, doc: Any) -> None:
        try:
            state.version = Version.from_json(doc["version"])
            state.checked_at = float(doc["checked_at"])
            state.stored_at = float(doc.get("stored_at", state.checked_at))
        except (KeyError, TypeError, ValueError, AttributeError):
            state.version = None

    async def forget(self, call_id: str, kind: str, *, keep_version: bool = False) -> None:
        """Drop everything kept of an artifact: its blocks (memory and disk) and its stored
        version; the version in memory too, unless `keep_version` (the file is still shown,
        with its size, and fetched again when read)."""
        state = self._artifacts.get((call_id, kind))
        if not keep_version:
            self._artifacts.pop((call_id, kind), None)
        elif state is not None:
            state.stored_at = self._now()  # what is fetched from now on is new
        self._loads.inflight.forget_give_up(call_id, kind)
        self._loads.memory.drop_artifact(call_id, kind)

        def drop() -> None:
            self.cache.drop_artifact(call_id, kind)
            self.meta.delete("artifact", f"{call_id}/{kind}")

        await trio.to_thread.run_sync(drop)

    async def drop_older_than(self, ts: float) -> list[tuple[str, str]]:
        """Drop every artifact whose bytes were first fetched before `ts` (wall clock), and
        any block file untouched since; returns the artifacts dropped."""

        def old_docs() -> list[tuple[str, str]]:
            found = []
            for key, doc in self.meta.items("artifact"):
                call_id, _, kind = key.partition("/")
                state = _Artifact()
                self._take_doc(state, doc)
                if state.version is None or state.stored_at < ts:
                    found.append((call_id, kind))
            return found

        doomed = set(await trio.to_thread.run_sync(old_docs))
        doomed.update(
            key for key, state in self._artifacts.items() if state.version and state.stored_at < ts
        )
        for call_id, kind in sorted(doomed):
            await self.forget(call_id, kind, keep_version=True)
            if self._changes is not None:
                self._changes.tell(Change(call_id, kind))  # pages the kernel keeps go too
        await trio.to_thread.run_sync(self.cache.drop_older_than, ts)
        return sorted(doomed)

    def _fresh(self, state: _Artifact) -> bool:
        return 0 <= self._now() - state.checked_at < self.revalidate_after

    async def _discover(
        self, call_id: str, kind: str, state: _Artifact, light: bool, head: bool = False
    ) -> None:
        got: list[bytes] = []
        start = b""

        async def keep(index: int, data: bytes) -> None:
            got.append(data)

        with trio.move_on_after(self.read_timeout) as scope:
            if light:
                new = await self.fetcher.probe(call_id, kind)
            elif head:
                new, start = await self.fetcher.fetch_start(call_id, kind, HEAD_BYTES)
            else:
                new = await self.fetcher.fetch(call_id, kind, 0, 1, None, keep)
        if scope.cancelled_caught:
            raise NetworkError(f"{call_id}/{kind}: no answer within {self.read_timeout:g}s")
        await self._adopt(call_id, kind, state, new)
        self._loads.stats.bytes_from_network += len(start)
        if start and len(start) == min(new.size, self._loads.block_size):
            got.append(start)  # the whole first block: the file is that small
        elif start:
            self._ends.keep(call_id, kind, new.token(), "head", start)
        if got:
            await self._loads.arrived(call_id, kind, new, 0, got[0])

    async def _adopt(self, call_id: str, kind: str, state: _Artifact, new: Version) -> None:
        """Make `new` the artifact's version; drop every block of any other version."""
        old = state.version
        state.version = new
        state.checked_at = self._now()
        if old != new or not state.stored_at:
            state.stored_at = state.checked_at
        if old is not None and old != new:
            log.warning("%s/%s changed on the server; dropping its cached blocks", call_id, kind)
            self._loads.memory.drop_artifact(call_id, kind)
            if self._changes is not None:
                self._changes.tell(Change(call_id, kind))
        doc = {
            "version": new.to_json(),
            "checked_at": state.checked_at,
            "stored_at": state.stored_at,
        }

        def store() -> None:  # one trip to a worker thread for both
            self.cache.drop_other_versions(call_id, kind, new)
            self.meta.put("artifact", f"{call_id}/{kind}", doc)

        await trio.to_thread.run_sync(store)
