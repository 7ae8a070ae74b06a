"""The virtual tree: inodes, names and attributes of calls and their files, and the call window."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import calls as C
from .api import VapiClient
from .cache import MetaStore
from .errors import NetworkError, NotFound, VapifsError
from .reader import ArtifactStore, Stream

log = logging.getLogger("vapifs.tree")

ROOT_INODE = 1
CALLS_INODE = 2
PAGE_LIMIT = 1000
NEGATIVE_TTL = 60.0


@dataclass
class Node:
    """One entry of the tree. Remote files have `kind`; generated files have `content`."""

    inode: int
    name: str
    is_dir: bool
    mtime: float
    call_id: str | None = None
    kind: str | None = None
    content: bytes | None = None
    immutable: bool = False


@dataclass
class _Call:
    call: dict[str, Any]
    fetched_at: float
    node: Node
    files: dict[str, Node] = field(default_factory=dict)


class Tree:
    """Names to nodes and nodes to bytes, without any FUSE in sight."""

    def __init__(
        self,
        api: VapiClient,
        store: ArtifactStore,
        meta: MetaStore,
        *,
        window_days: float = 14.0,
        dir_ttl: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._store = store
        self._meta = meta
        self.window = window_days * 86400.0
        self.dir_ttl = dir_ttl
        self._now = wall_clock
        started = self._now()
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "", True, started),
            CALLS_INODE: Node(CALLS_INODE, "calls", True, started),
        }
        self._next_inode = CALLS_INODE + 1
        self._calls: dict[str, _Call] = {}
        self._missing: dict[str, float] = {}
        self._call_locks: dict[str, trio.Lock] = {}
        self._window_ids: list[str] = []
        self._window_created: dict[str, float] = {}
        self._listed_at = -1.0
        self._listing_loaded = False
        self._list_lock = trio.Lock()
        store.on_version_change = self._version_changed
        self.on_invalidate: Callable[[int], None] | None = None

    # -- nodes ---------------------------------------------------------------------------

    def node(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"no inode {inode}") from None

    def _new_node(self, **kw: Any) -> Node:
        node = Node(inode=self._next_inode, **kw)
        self._next_inode += 1
        self._nodes[node.inode] = node
        return node

    async def lookup(self, parent: int, name: str) -> Node:
        if parent == ROOT_INODE:
            if name == "calls":
                return self._nodes[CALLS_INODE]
            raise NotFound(name)
        if parent == CALLS_INODE:
            if not C.is_call_id(name):
                raise NotFound(name)  # no request for names that cannot be calls
            return (await self._call(name)).node
        node = self.node(parent)
        if node.is_dir and node.call_id is not None:
            entry = await self._call(node.call_id)
            child = entry.files.get(name)
            if child is None:
                raise NotFound(name)
            if child.kind is not None:
                await self._store.version(node.call_id, child.kind)  # size before first read
            return child
        raise NotFound(name)

    async def children(self, inode: int) -> list[Node]:
        node = self.node(inode)
        if inode == ROOT_INODE:
            return [self._nodes[CALLS_INODE]]
        if inode == CALLS_INODE:
            await self._refresh_window()
            return [await self._window_node(call_id) for call_id in self._window_ids]
        if node.call_id is None:
            return []
        entry = await self._call(node.call_id)
        out: list[Node] = []
        usable: dict[str, bool] = {}

        async def probe(child: Node) -> None:
            assert child.kind is not None and node.call_id is not None
            try:
                await self._store.version(node.call_id, child.kind)
                usable[child.name] = True
            except VapifsError as exc:
                log.warning("%s/%s: left out of the listing: %s", node.call_id, child.name, exc)

        async with trio.open_nursery() as nursery:
            for child in entry.files.values():
                if child.kind is None:
                    usable[child.name] = True
                else:
                    nursery.start_soon(probe, child)
        out = [c for c in entry.files.values() if usable.get(c.name)]
        return out

    def size(self, node: Node) -> int:
        """Size for attributes; remote files must have been looked up (version known)."""
        if node.content is not None:
            return len(node.content)
        if node.kind is not None and node.call_id is not None:
            version = self._store.known_version(node.call_id, node.kind)
            return version.size if version is not None else 0
        return 0

    async def read(self, node: Node, offset: int, size: int, stream: Stream | None) -> bytes:
        if node.content is not None:
            return node.content[offset : offset + size]
        if node.kind is None or node.call_id is None:
            raise NotFound(node.name)
        return await self._store.read(node.call_id, node.kind, offset, size, stream)

    def _version_changed(self, call_id: str, kind: str) -> None:
        entry = self._calls.get(call_id)
        if entry is None or self.on_invalidate is None:
            return
        for child in entry.files.values():
            if child.kind == kind:
                self.on_invalidate(child.inode)

    # -- calls ---------------------------------------------------------------------------

    async def _call(self, call_id: str) -> _Call:
        """The call's entry: memory, then the metadata store, then `GET /call/{id}`."""
        entry = self._calls.get(call_id)
        if entry is not None and not self._stale(entry):
            return entry
        missing_since = self._missing.get(call_id)
        if missing_since is not None and self._now() - missing_since < NEGATIVE_TTL:
            raise NotFound(call_id)
        lock = self._call_locks.setdefault(call_id, trio.Lock())
        async with lock:
            entry = self._calls.get(call_id)
            if entry is None:
                doc = await trio.to_thread.run_sync(self._meta.get, "call", call_id)
                if doc is not None and isinstance(doc.get("call"), dict):
                    entry = self._install(doc["call"], float(doc.get("fetched_at", 0.0)))
            if entry is not None and not self._stale(entry):
                return entry
            try:
                call = await self._api.get_call(call_id)
            except NotFound:
                self._missing[call_id] = self._now()
                raise
            except NetworkError:
                if entry is not None:
                    return entry  # offline: what we saw before is still the best answer
                raise
            if call.get("id") != call_id:
                raise NotFound(call_id)
            entry = self._install(C.sanitize(call), self._now())
            await self._persist_calls([entry])
            return entry

    def _stale(self, entry: _Call) -> bool:
        """Ended calls do not change in practice; others are re-read after the dir TTL."""
        if C.is_ended(entry.call):
            return False
        return self._now() - entry.fetched_at >= self.dir_ttl

    def _install(self, call: dict[str, Any], fetched_at: float) -> _Call:
        call_id = str(call["id"])
        created = C.created_at(call)
        old = self._calls.get(call_id)
        mtime = created if created is not None else C.modified_at(call)
        if old is not None:
            dir_node = old.node
            dir_node.mtime = mtime
        else:
            dir_node = self._new_node(name=call_id, is_dir=True, mtime=mtime, call_id=call_id)
        entry = _Call(call, fetched_at, dir_node)
        modified = C.modified_at(call)
        immutable = C.is_ended(call)
        previous = old.files if old is not None else {}

        def file(name: str, **kw: Any) -> Node:
            node = previous.get(name)
            if node is None:
                node = self._new_node(name=name, is_dir=False, mtime=modified, call_id=call_id)
            node.mtime = modified
            node.immutable = immutable
            node.kind = kw.get("kind")
            node.content = kw.get("content")
            return node

        body = (json.dumps(call, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()
        entry.files["call.json"] = file("call.json", content=body)
        text = C.transcript(call)
        if text is not None:
            entry.files["transcript.txt"] = file(
                "transcript.txt", content=(text.rstrip("\n") + "\n").encode()
            )
        for name, kind in C.artifact_files(call).items():
            entry.files[name] = file(name, kind=kind)
        self._calls[call_id] = entry
        self._missing.pop(call_id, None)
        return entry

    async def _persist_calls(self, entries: list[_Call]) -> None:
        docs = [(e.node.call_id, {"call": e.call, "fetched_at": e.fetched_at}) for e in entries]

        def write() -> None:
            for call_id, doc in docs:
                assert call_id is not None
                self._meta.put("call", call_id, doc)

        await trio.to_thread.run_sync(write)

    # -- the window ----------------------------------------------------------------------

    async def _window_node(self, call_id: str) -> Node:
        entry = self._calls.get(call_id)
        if entry is not None:
            return entry.node
        try:
            return (await self._call(call_id)).node
        except VapifsError:
            created = self._window_created.get(call_id, 0.0)
            node = self._new_node(name=call_id, is_dir=True, mtime=created, call_id=call_id)
            return node

    async def _refresh_window(self) -> None:
        if 0 <= self._now() - self._listed_at < self.dir_ttl:
            return
        async with self._list_lock:
            if not self._listing_loaded:
                await self._load_listing()
            if 0 <= self._now() - self._listed_at < self.dir_ttl:
                return
            now = self._now()
            try:
                if self._window_ids:
                    newest = max(self._window_created.values(), default=now - self.window)
                    fresh = await self._page(createdAtGt=C.format_time(newest))
                else:
                    fresh = await self._page(createdAtGe=C.format_time(now - self.window))
            except NetworkError as exc:
                if not self._window_ids and not self._listing_loaded:
                    raise
                log.warning("calls: cannot refresh the listing (%s); showing what is known", exc)
                self._listed_at = now - self.dir_ttl + min(10.0, self.dir_ttl)
                return
            installed = [self._install(call, now) for call in fresh]
            for entry in installed:
                created = C.created_at(entry.call)
                assert entry.node.call_id is not None
                self._window_created[entry.node.call_id] = created if created is not None else now
            horizon = now - self.window
            ids = {i for i, ts in self._window_created.items() if ts >= horizon}
            self._window_ids = sorted(ids, key=lambda i: (-self._window_created[i], i))
            self._window_created = {i: self._window_created[i] for i in self._window_ids}
            self._listed_at = now
            await self._persist_calls(installed)
            listing = {
                "listed_at": now,
                "calls": [[i, self._window_created[i]] for i in self._window_ids],
            }
            await trio.to_thread.run_sync(self._meta.put, "listing", "calls", listing)

    async def _load_listing(self) -> None:
        self._listing_loaded = True
        doc = await trio.to_thread.run_sync(self._meta.get, "listing", "calls")
        if doc is None:
            return
        try:
            pairs = [(str(i), float(ts)) for i, ts in doc["calls"]]
            listed_at = float(doc["listed_at"])
        except (KeyError, TypeError, ValueError):
            return
        self._window_created = {i: ts for i, ts in pairs if C.is_call_id(i)}
        self._window_ids = list(self._window_created)
        self._listed_at = listed_at

    async def _page(self, **bounds: str) -> list[dict[str, Any]]:
        """Every call matching `bounds`, paging backwards by createdAtLe, deduplicated by id."""
        seen: set[str] = set()
        out: list[dict[str, Any]] = []
        older_than: str | None = None
        while True:
            params = dict(bounds, limit=str(PAGE_LIMIT))
            if older_than is not None:
                params["createdAtLe"] = older_than
            page = await self._api.list_calls(**params)
            fresh = 0
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
                fresh += 1
                out.append(C.sanitize(call))
            if len(page) < PAGE_LIMIT or fresh == 0 or oldest is None:
                return out
            older_than = oldest[1]
