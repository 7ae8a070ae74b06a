"""The virtual tree: names and inodes to nodes, and each request to the room that answers it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from datetime import UTC, tzinfo
from typing import Any

import trio

from . import calls as C
from .ahead import Ahead
from .api import VapiClient
from .callfiles import CallFiles, light
from .changes import Changes
from .entries import Entries
from .errors import NotFound, VapifsError
from .gzview import GzipViews
from .lifecycle import Lifecycle
from .meta import MetaStore
from .nodes import BY_ASSISTANT_INODE, BY_DATE_INODE, CALLS_INODE, ROOT_INODE, Node, Nodes
from .reader import ArtifactStore, Stream
from .tables import Tables
from .views import Views
from .walk import Walks
from .window import Window

__all__ = ["CALLS_INODE", "ROOT_INODE", "Node", "Tree"]

log = logging.getLogger("vapifs.tree")


class Tree:
    """Names to nodes and nodes to bytes, without any FUSE in sight.

    `changes` is what the artifact store tells (new versions, artifacts gone); `on_invalidate`
    and `on_forget` tell the kernel to drop an inode's pages and to forget a name.
    """

    def __init__(
        self,
        api: VapiClient,
        store: ArtifactStore,
        meta: MetaStore,
        *,
        window_days: float = 14.0,
        since: float | None = None,
        until: float | None = None,
        assistants: Sequence[str] = (),
        timezone: tzinfo = UTC,
        dir_ttl: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
        nursery: trio.Nursery | None = None,
        changes: Changes | None = None,
        on_invalidate: Callable[[int], None] | None = None,
        on_forget: Callable[[int, str], None] | None = None,
    ) -> None:
        self._now = wall_clock
        self._nodes = Nodes(self._now(), invalidate=on_invalidate, forget=on_forget)
        self._entries = Entries(self._nodes, store, meta, dir_ttl=dir_ttl, wall_clock=wall_clock)
        gz = GzipViews(meta, nursery=nursery, on_size_change=self._entries.gz_size_changed)
        self._views = Views(self._nodes, timezone)
        self._window = Window(
            api,
            meta,
            self._entries,
            self._views,
            window_days=window_days,
            since=since,
            until=until,
            assistants=assistants,
            dir_ttl=dir_ttl,
            wall_clock=wall_clock,
            nursery=nursery,
        )
        self._lifecycle = Lifecycle(
            api,
            store,
            meta,
            self._entries,
            self._window,
            gz,
            changes=changes,
            nursery=nursery,
            wall_clock=wall_clock,
        )
        self._files = CallFiles(store, gz, self._lifecycle)
        self.walks = Walks(nursery)
        self._ahead = Ahead(
            self.walks, self._window, self._views, self._entries, self._lifecycle, self._files
        )
        self._tables = Tables(self._nodes, self._window, self._entries)
        if nursery is not None and changes is not None:
            nursery.start_soon(self._lifecycle.follow)

    def node(self, inode: int) -> Node:
        self._lifecycle.catch_up()
        return self._nodes.get(inode)

    async def lookup(self, parent: int, name: str) -> Node:
        self._lifecycle.catch_up()
        if parent == ROOT_INODE:
            table = self._tables.node(name)
            if table is not None:
                await self._tables.make()
                return table
            for root_child in self._root_children():
                if root_child.name == name:
                    return root_child
            raise NotFound(name)
        if parent == CALLS_INODE:
            if not C.is_call_id(name):
                raise NotFound(name)  # no request for names that cannot be calls
            return (await self._lifecycle.call(name)).node
        node = self._nodes.get(parent)
        if node.group is not None:
            if not self._views.could_hold(node, name):
                raise NotFound(name)  # no request for names that cannot be there
            await self._window.refresh()
            return self._views.find(node, name)
        if node.is_dir and node.call_id is not None:
            entry = await self._lifecycle.call(node.call_id)
            child = self._entries.files(entry).get(name)
            if child is None:
                raise NotFound(name)
            if child.kind is not None:
                self._ahead.step("lookup", name, node.call_id)
            await self._files.prepare(child, head=self._ahead.reads_heads(child))
            return child
        raise NotFound(name)

    def _root_children(self) -> list[Node]:
        return [self._nodes.get(i) for i in (BY_ASSISTANT_INODE, BY_DATE_INODE, CALLS_INODE)]

    async def children(self, inode: int) -> list[Node]:
        self._lifecycle.catch_up()
        node = self._nodes.get(inode)
        if inode == ROOT_INODE:
            try:
                await self._tables.make()
            except VapifsError as exc:
                log.warning("calls.csv, calls.jsonl: left out of the listing: %s", exc)
                return self._root_children()
            return self._root_children() + self._tables.nodes
        if inode == CALLS_INODE:
            await self._window.refresh()
            created = self._window.created
            return [self._entries.directory(i, created.get(i, 0.0)) for i in self._window.ids]
        if node.group is not None:
            await self._window.refresh()
            return self._views.children(node)
        if node.call_id is None:
            return []
        self._ahead.listed(node.call_id)
        files = self._entries.files(await self._lifecycle.call(node.call_id))
        usable: dict[str, bool] = {}

        async def probe(child: Node) -> None:
            try:
                await self._files.prepare(child, light=light(child, files))
                usable[child.name] = True
            except VapifsError as exc:
                log.warning("%s/%s: left out of the listing: %s", node.call_id, child.name, exc)

        async with trio.open_nursery() as nursery:
            for child in files.values():
                if child.kind is None:
                    usable[child.name] = True
                else:
                    nursery.start_soon(probe, child)
        return [c for c in files.values() if usable.get(c.name)]

    def size(self, node: Node) -> int:
        """Size for attributes; remote files must have been looked up (version known)."""
        self._lifecycle.catch_up()
        if node.content is not None:
            return len(node.content)
        if node.target is not None:
            return len(node.target.encode())
        if node.kind is not None and node.call_id is not None:
            return self._files.size(node)
        return 0

    async def read(self, node: Node, offset: int, size: int, stream: Stream | None) -> bytes:
        self._lifecycle.catch_up()
        if node.content is not None:
            return node.content[offset : offset + size]
        if node.kind is None or node.call_id is None:
            raise NotFound(node.name)
        call_id, name = node.call_id, node.name
        if stream is not None and stream.next_offset < 0:  # the first read of this open
            self._ahead.step("read", name, call_id)
            stream.head_first = self._ahead.reads_heads(node)
        data = await self._files.read(node, offset, size, stream)
        end = offset + len(data)
        self.walks.read(name, call_id, offset, end, max(end, self.size(node)))
        return data

    async def call_object(self, call_id: str) -> dict[str, Any]:
        """The call object (presigned fields removed), as `call.json` shows it."""
        self._lifecycle.catch_up()
        return (await self._lifecycle.call(call_id)).call

    async def calls_between(self, since: float, until: float | None = None) -> list[dict[str, Any]]:
        """Calls created in [since, until], newest first, fetched from the API and remembered
        (so that a later mount resolves them offline) without touching the `calls/` window."""
        self._lifecycle.catch_up()
        bounds = {"createdAtGe": C.format_time(since)}
        if until is not None:
            bounds["createdAtLe"] = C.format_time(until)
        calls = await self._window.page(**bounds)
        now = self._now()
        await self._entries.persist([self._entries.install(call, now) for call in calls])
        return calls

    async def drop_older_than(self, ts: float) -> int:
        """--max-cache-age: drop every cached thing older than `ts` (wall clock), whatever
        the server says; returns how many artifacts were dropped."""
        self._lifecycle.catch_up()
        return await self._lifecycle.drop_older_than(ts)
