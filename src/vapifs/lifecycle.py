"""Calls over time: re-read when stale, their artifacts' changes applied, dropped when gone."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import trio

from . import calls as C
from .api import VapiClient
from .changes import Change, Changes
from .entries import Entries, Entry
from .errors import NetworkError, NotFound, VapifsError
from .gzview import GzipViews
from .meta import MetaStore
from .nodes import CALLS_INODE
from .reader import ArtifactStore
from .window import Window

log = logging.getLogger("vapifs.tree")


class Lifecycle:
    """Calls by id, kept current: memory, then the metadata store, then `GET /call/{id}`."""

    def __init__(
        self,
        api: VapiClient,
        store: ArtifactStore,
        meta: MetaStore,
        entries: Entries,
        window: Window,
        gz: GzipViews,
        *,
        changes: Changes | None = None,
        nursery: trio.Nursery | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._store = store
        self._meta = meta
        self._entries = entries
        self._window = window
        self._gz = gz
        self._changes = changes
        self._nursery = nursery  # for background work; without one, none is done
        self._now = wall_clock
        self._call_locks: dict[str, trio.Lock] = {}

    async def call(self, call_id: str) -> Entry:
        """The call's entry, asking the API when the one known is stale (or there is none)."""
        entry = self._entries.get(call_id)
        if entry is not None and not self._entries.stale(entry):
            return entry
        if self._entries.known_missing(call_id):
            raise NotFound(call_id)
        lock = self._call_locks.setdefault(call_id, trio.Lock())
        async with lock:
            entry = self._entries.get(call_id)
            if entry is None:
                entry = await self._entries.load(call_id)
            if entry is not None and not self._entries.stale(entry):
                return entry
            try:
                call = await self._api.get_call(call_id)
            except NotFound:
                self._entries.missing(call_id)
                if entry is not None:  # it was there: past the org's retention
                    await self._forget_call(call_id)
                raise
            except NetworkError:
                if entry is not None:
                    return entry  # offline: what we saw before is still the best answer
                raise
            if call.get("id") != call_id:
                raise NotFound(call_id)
            entry = self._entries.install(C.sanitize(call), self._now())
            await self._entries.persist([entry])
            return entry

    # -- what the store tells ------------------------------------------------------------

    def catch_up(self) -> None:
        """Apply the changes the store told since the last look, without waiting."""
        if self._changes is None:
            return
        for change in self._changes.take():
            self._apply(change)

    async def follow(self) -> None:
        """Apply changes as they come (a background task): the kernel hears at once."""
        assert self._changes is not None
        while True:
            await self._changes.wait()
            try:
                self.catch_up()
            except Exception:  # background work must never take the mount down
                log.exception("cannot apply a change of an artifact")

    def _apply(self, change: Change) -> None:
        if change.gone:
            self._artifact_gone(change.call_id, change.kind)
        else:
            self._entries.version_changed(change.call_id, change.kind)

    def _artifact_gone(self, call_id: str, kind: str) -> None:
        """An artifact answered 404 after it had been seen (the store dropped its blocks):
        its files leave the call directory, and the call itself is asked for again."""
        self._entries.artifact_gone(call_id, kind)
        self._gz.forget(f"{call_id}/{kind}@")
        if self._nursery is not None:
            self._nursery.start_soon(self._after_gone, call_id, kind)

    async def _after_gone(self, call_id: str, kind: str) -> None:
        try:
            await trio.to_thread.run_sync(self._delete_gz_docs, f"{call_id}/{kind}@")
            await self.call(call_id)  # a call past retention answers 404: all of it goes
        except VapifsError as exc:
            log.debug("%s: after %s went away: %s", call_id, kind, exc)
        except Exception:  # background work must never take the mount down
            log.exception("%s: after %s went away", call_id, kind)

    def _delete_gz_docs(self, prefix: str) -> None:
        for key, _ in self._meta.items("gzsize"):
            if key.startswith(prefix):
                self._meta.delete("gzsize", key)

    # -- retention -----------------------------------------------------------------------

    async def _forget_call(self, call_id: str) -> None:
        """The call answered 404 after it had been seen (past the org's retention): drop
        everything kept of it (blocks, call object, versions, sizes, its place in the
        listing) and its names from the kernel's cache."""
        log.warning("%s is gone from the server; dropping everything cached of it", call_id)
        entry = self._entries.pop(call_id)
        for kind in dict.fromkeys(kind for kind, _stem, _ext in C.ARTIFACTS):
            await self._store.forget(call_id, kind)
        self._gz.forget(f"{call_id}/")

        def forget_docs() -> None:
            self._meta.delete("call", call_id)
            self._delete_gz_docs(f"{call_id}/")

        await trio.to_thread.run_sync(forget_docs)
        self._entries.drop_names(call_id, entry, CALLS_INODE)
        await self._window.drop(call_id)

    async def drop_older_than(self, ts: float) -> int:
        """--max-cache-age: drop every cached thing older than `ts` (wall clock), whatever
        the server says; returns how many artifacts were dropped."""
        try:
            dropped = await self._store.drop_older_than(ts)
        finally:
            self.catch_up()
        for call_id, kind in dropped:
            self._gz.forget(f"{call_id}/{kind}@")
        prefixes = tuple(f"{call_id}/{kind}@" for call_id, kind in dropped)

        def docs() -> None:
            for call_id, doc in self._meta.items("call"):
                fetched_at = doc.get("fetched_at")
                if not isinstance(fetched_at, (int, float)) or fetched_at < ts:
                    self._meta.delete("call", call_id)
            for key, _ in self._meta.items("gzsize"):
                if key.startswith(prefixes):
                    self._meta.delete("gzsize", key)
            listing = self._meta.get("listing", "calls")
            listed_at = listing.get("listed_at") if listing else None
            if listing is not None and (not isinstance(listed_at, (int, float)) or listed_at < ts):
                self._meta.delete("listing", "calls")

        await trio.to_thread.run_sync(docs)
        return len(dropped)
