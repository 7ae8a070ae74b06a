"""The call window of calls/: listed once, then only newer calls, remembered across mounts."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import trio

from . import calls as C
from .api import VapiClient
from .entries import Entries, Entry
from .errors import NetworkError
from .meta import MetaStore
from .views import Views, day

log = logging.getLogger("vapifs.tree")

PAGE_LIMIT = 1000


class Window:
    """The calls `calls/` lists, newest first, with when each was created and its assistant.

    `ids` is a new list whenever the window changes: whoever derives something from it (the
    tables, the walks' orders) knows it is current by its identity.
    """

    def __init__(
        self,
        api: VapiClient,
        meta: MetaStore,
        entries: Entries,
        views: Views,
        *,
        window_days: float = 14.0,
        since: float | None = None,
        until: float | None = None,
        assistants: Sequence[str] = (),
        dir_ttl: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._api = api
        self._meta = meta
        self._entries = entries
        self._views = views
        self.window = window_days * 86400.0
        self.since = since  # a fixed start of the window, instead of `window` back from now
        self.until = until  # calls created before this time only
        self.assistants = tuple(dict.fromkeys(assistants))
        self.dir_ttl = dir_ttl
        self._now = wall_clock
        self._nursery = nursery  # for storing listings in the background
        self.ids: list[str] = []
        self.created: dict[str, float] = {}
        self.assistant: dict[str, str | None] = {}
        # Newest createdAt seen per listing stream ("" unfiltered, else an assistant id).
        self._newest: dict[str, float] = {}
        self._listed_from: float | None = None  # start of what the listing covers
        self._listed_at = -1.0
        self._listing_loaded = False
        self._list_lock = trio.Lock()
        self._save_lock = trio.Lock()  # listings are stored one after the other
        self._listings_made = 0  # listings made, and the newest of them stored
        self._listing_stored = 0
        self._offline = False  # calls/ shows the call objects on disk, the API unreachable

    def _horizon(self, now: float) -> float:
        return self.since if self.since is not None else now - self.window

    def _filter(self) -> dict[str, Any]:
        """What the listing depends on besides time: a remembered listing must match it."""
        return {"assistants": sorted(self.assistants), "until": self.until}

    async def refresh(self) -> None:
        """List the window once, then only calls newer than the newest seen (per stream).

        A stream is the whole organisation, or one assistant with --assistant. Nothing is ever
        listed twice: a remount starts from the remembered listing and asks for newer calls.
        """
        if 0 <= self._now() - self._listed_at < self.dir_ttl:
            return
        async with self._list_lock:
            if not self._listing_loaded:
                await self._load_listing()
            if 0 <= self._now() - self._listed_at < self.dir_ttl:
                return
            now = self._now()
            horizon = self._horizon(now)
            complete = self._listed_from is not None and self._listed_from <= horizon
            if complete and self.until is not None and self._listed_at >= self.until:
                self._listed_at = now  # the window is closed: nothing new can appear in it
                return
            try:
                fresh = await self._list_new(horizon, complete)
            except NetworkError as exc:
                if self._listed_from is None and not await self._list_offline(horizon, exc):
                    raise
                if self._listed_from is not None:
                    log.warning(
                        "calls: cannot refresh the listing (%s); showing what is known", exc
                    )
                self._listed_at = now - self.dir_ttl + min(10.0, self.dir_ttl)
                return
            await self._take(fresh, now, horizon, complete)

    async def _list_new(self, horizon: float, complete: bool) -> list[dict[str, Any]]:
        """The calls of the window not listed yet: all of them the first time."""
        fresh: list[dict[str, Any]] = []
        for stream in self.assistants or ("",):
            bounds: dict[str, str] = {}
            if stream:
                bounds["assistantId"] = stream
            if self.until is not None:
                bounds["createdAtLt"] = C.format_time(self.until)
            newest = self._newest.get(stream)
            if complete and newest is not None:
                bounds["createdAtGt"] = C.format_time(newest)
            else:
                bounds["createdAtGe"] = C.format_time(horizon)
            fresh.extend(await self.page(**bounds))
        return fresh

    async def _take(
        self, fresh: list[dict[str, Any]], now: float, horizon: float, complete: bool
    ) -> None:
        """Make the window of what it held and the calls just listed; store it."""
        self._offline = False
        installed = [self._entries.install(call, now) for call in fresh]
        for entry in installed:
            call_id = entry.node.call_id
            assert call_id is not None
            created = C.created_at(entry.call)
            created = created if created is not None else now
            assistant = entry.call.get("assistantId")
            assistant = assistant if isinstance(assistant, str) else None
            self.created[call_id] = created
            self.assistant[call_id] = assistant
            stream = (assistant or "") if self.assistants else ""
            self._newest[stream] = max(created, self._newest.get(stream, created))
        if not complete:
            self._listed_from = horizon
        until = self.until if self.until is not None else float("inf")
        ids = {i for i, ts in self.created.items() if horizon <= ts < until}
        self.ids = sorted(ids, key=lambda i: (-self.created[i], i))
        self.created = {i: self.created[i] for i in self.ids}
        self.assistant = {i: self.assistant.get(i) for i in self.ids}
        await self._regroup()
        self._listed_at = now
        listing = self._listing_doc()
        self._listings_made += 1
        if self._nursery is not None:
            # The listing is answered now; storing 10,000 call objects can take seconds.
            self._nursery.start_soon(self._save, installed, listing, self._listings_made)
        else:
            await self._save(installed, listing, self._listings_made)

    async def _regroup(self) -> None:
        await self._views.regroup(self.ids, self.created, self.assistant)

    async def drop(self, call_id: str) -> None:
        """Take a call out of the window (past the org's retention), and out of the
        listing stored for the next mount."""
        if call_id not in self.created:
            return
        created = self.created.pop(call_id)
        assistant = self.assistant.pop(call_id, None)
        self._views.forget(call_id, created, assistant)
        self.ids = [i for i in self.ids if i != call_id]
        await self._regroup()
        if self._listed_from is not None:
            self._listings_made += 1
            await self._save([], self._listing_doc(), self._listings_made)

    def day(self, call_id: str) -> str | None:
        """The by-date directory of a call of the window."""
        created = self.created.get(call_id)
        return day(created, self._views.timezone) if created is not None else None

    # -- what is remembered ----------------------------------------------------------------

    def _listing_doc(self) -> dict[str, Any]:
        return {
            "listed_at": self._listed_at,
            "from": self._listed_from,
            "filter": self._filter(),
            "newest": dict(self._newest),
            "calls": [[i, self.created[i], self.assistant[i]] for i in self.ids],
        }

    async def _save(self, installed: list[Entry], listing: dict[str, Any], number: int) -> None:
        """Store new call objects, then the listing that names them (unless a newer one was
        stored first); an unmount waits for it, so that the next mount finds them offline."""
        with trio.CancelScope(shield=True):
            async with self._save_lock:
                try:
                    await self._entries.persist(installed)
                    if number > self._listing_stored:
                        await trio.to_thread.run_sync(self._meta.put, "listing", "calls", listing)
                        self._listing_stored = number
                except Exception:  # background work must never take the mount down
                    log.exception("calls: cannot store the listing")

    async def _load_listing(self) -> None:
        """The listing a previous mount remembered, when it covers this mount's window."""
        self._listing_loaded = True
        doc = await trio.to_thread.run_sync(self._meta.get, "listing", "calls")
        if doc is None or doc.get("filter") != self._filter():
            return
        try:
            rows = [(str(r[0]), float(r[1]), r[2]) for r in doc["calls"]]
            listed_at = float(doc["listed_at"])
            listed_from = float(doc["from"])
            newest = {str(k): float(v) for k, v in doc["newest"].items()}
        except (KeyError, TypeError, ValueError, IndexError, AttributeError):
            return
        if listed_from > self._horizon(self._now()):
            return  # this mount looks further back: list again
        rows = [r for r in rows if C.is_call_id(r[0])]
        self.created = {i: ts for i, ts, _ in rows}
        self.assistant = {i: a if isinstance(a, str) else None for i, _, a in rows}
        self.ids = [i for i, _, _ in rows]
        self._newest = newest
        self._listed_from = listed_from
        self._listed_at = listed_at
        await self._regroup()

    async def _list_offline(self, horizon: float, exc: NetworkError) -> bool:
        """With no listing stored and no network, list the window from the call objects on
        disk (calls opened by id, prefetched...). Not stored: once the network is back, the
        window is listed from the API as usual. False when there is none."""
        until = self.until if self.until is not None else float("inf")
        wanted = set(self.assistants)

        def load() -> list[tuple[dict[str, Any], float]]:
            found = []
            for _, doc in self._meta.items("call"):
                call, fetched_at = doc.get("call"), doc.get("fetched_at", 0.0)
                if not isinstance(call, dict) or not isinstance(fetched_at, (int, float)):
                    continue
                created = C.created_at(call)
                call_id = call.get("id")
                if created is None or not isinstance(call_id, str) or not C.is_call_id(call_id):
                    continue
                if horizon <= created < until and (not wanted or call.get("assistantId") in wanted):
                    found.append((call, float(fetched_at)))
            return found

        stored = await trio.to_thread.run_sync(load)
        if not stored:
            return False
        for call, fetched_at in stored:
            call_id = str(call["id"])
            if self._entries.get(call_id) is None:
                self._entries.install(call, fetched_at)
            assistant = call.get("assistantId")
            self.created[call_id] = C.created_at(call) or 0.0
            self.assistant[call_id] = assistant if isinstance(assistant, str) else None
        ids = self.created
        self.ids = sorted(ids, key=lambda i: (-ids[i], i))
        await self._regroup()
        if not self._offline:
            self._offline = True
            log.warning(
                "calls: cannot list the calls (%s); showing the %d stored on disk",
                exc,
                len(self.ids),
            )
        return True

    # -- the API ---------------------------------------------------------------------------

    async def page(self, **bounds: str) -> list[dict[str, Any]]:
        """Every call matching `bounds`, paging backwards by createdAtLe, deduplicated by id."""
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        older_than: str | None = None
        while True:
            params = dict(bounds, limit=str(PAGE_LIMIT))
            if older_than is not None:
                params["createdAtLe"] = older_than
            page = await self._api.list_calls(**params)
            if len(page) > 50:  # a full page takes milliseconds to sift: not on the loop
                calls, oldest = await trio.to_thread.run_sync(sift, page, seen)
            else:
                calls, oldest = sift(page, seen)
            out.extend(calls)
            if len(page) < PAGE_LIMIT or not calls or oldest is None:
                return out
            older_than = oldest[1]


def sift(
    page: list[dict[str, Any]], seen: set[str]
) -> tuple[list[dict[str, Any]], tuple[float, str] | None]:
    """The calls of a page not seen before (sanitized; `seen` is updated), and its oldest time."""
    out: list[dict[str, Any]] = []
    oldest: tuple[float, str] | None = None
    for call in page:
        call_id = call.get("id")
        created = C.created_at(call)
        if not isinstance(call_id, str) or not C.is_call_id(call_id) or created is None:
            log.warning("calls: skipped an unreadable call object in the listing")
            continue
        raw = call["createdAt"]
        if oldest is None or created < oldest[0]:
            oldest = (created, raw)
        if call_id in seen:
            continue
        seen.add(call_id)
        out.append(C.sanitize(call))
    return out, oldest
