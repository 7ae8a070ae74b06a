"""The virtual tree: inodes, names and attributes of calls and their files, and the call window."""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, tzinfo
from typing import Any

import trio

from . import calls as C
from . import table
from .api import VapiClient
from .errors import NetworkError, NotFound, VapifsError
from .gzview import GzipViews
from .meta import MetaStore
from .reader import HEAD_BYTES, ArtifactStore, Stream
from .version import Version
from .walk import AHEAD_FILE_BYTES, FILES_AHEAD, SCAN_AHEAD, Hold, Order, Pattern, Walks

log = logging.getLogger("vapifs.tree")

ROOT_INODE = 1
CALLS_INODE = 2
BY_DATE_INODE = 3
BY_ASSISTANT_INODE = 4
CSV_INODE = 5
JSONL_INODE = 6
# The table of the window at the root: name -> (inode, how the rows are written).
TABLES = {"calls.csv": (CSV_INODE, table.to_csv), "calls.jsonl": (JSONL_INODE, table.to_jsonl)}
PAGE_LIMIT = 1000
NEGATIVE_TTL = 60.0
# A call that ended less than this long ago may still get its recordings and logs (seconds).
RECENT = 3600.0
# A call that may still change is read again after this fraction of the time since it ended.
BACKOFF = 10.0
DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# by-assistant/<name>: whatever the API calls an assistant, as long as it is one path element.
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,254}$")
# The two views over the window: directory name -> view.
VIEWS = {"by-date": "date", "by-assistant": "assistant"}


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
    # The artifact changed on the server: pages the kernel keeps are of the old version.
    stale_pages: bool = False
    target: str | None = None  # a symbolic link to this relative path
    gunzip: bool = False  # the decompressed view of the gzip artifact `kind`
    group: tuple[str, str] | None = None  # a directory of a view: (view, day or assistant)


@dataclass
class _Call:
    call: dict[str, Any]
    fetched_at: float
    node: Node
    files: dict[str, Node] = field(default_factory=dict)
    built: bool = False  # files are built on first use: a listing of 10,000 calls needs none
    previous: dict[str, Node] = field(default_factory=dict)  # nodes to reuse when building
    recheck: bool = False  # ask the API again at the next use (an artifact of it went away)


@dataclass(frozen=True)
class _GzSource:
    """One version of a gzip artifact, read through the artifact store (which caches it)."""

    store: ArtifactStore
    call_id: str
    kind: str
    version: Version
    stream: Stream

    @property
    def key(self) -> str:
        return f"{self.call_id}/{self.kind}@{self.version.token()}"

    @property
    def size(self) -> int:
        return self.version.size

    async def read(self, offset: int, size: int) -> bytes:
        data = await self.store.read(self.call_id, self.kind, offset, size, self.stream)
        if self.store.known_version(self.call_id, self.kind) != self.version:
            raise _SourceChanged(self.key)
        return data


class _SourceChanged(VapifsError):
    """The gzip artifact changed on the server while its decompressed view was being read."""


def _light(child: Node, files: dict[str, Node]) -> bool:
    """Whether a listing learns this file's size from one byte rather than its first block.

    `ls -l` of a call wants sizes, not contents. An artifact behind a decompressed view is
    fetched whole-block all the same: that view's size is in the gzip trailer of the same,
    small, file.
    """
    return not any(c.gunzip and c.kind == child.kind for c in files.values())


class Tree:
    """Names to nodes and nodes to bytes, without any FUSE in sight."""

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
        gz: GzipViews | None = None,
        wall_clock: Callable[[], float] = time.time,
        nursery: trio.Nursery | None = None,
    ) -> None:
        self._api = api
        self._store = store
        self._meta = meta
        self.window = window_days * 86400.0
        self.since = since  # a fixed start of the window, instead of `window` back from now
        self.until = until  # calls created before this time only
        self.assistants = tuple(dict.fromkeys(assistants))
        self.timezone = timezone
        self.dir_ttl = dir_ttl
        self._gz = gz if gz is not None else GzipViews(meta)
        self._gz.on_size_change = self._gz_size_changed
        self._now = wall_clock
        started = self._now()
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "", True, started),
            CALLS_INODE: Node(CALLS_INODE, "calls", True, started),
            BY_DATE_INODE: Node(BY_DATE_INODE, "by-date", True, started, group=("date", "")),
            BY_ASSISTANT_INODE: Node(
                BY_ASSISTANT_INODE, "by-assistant", True, started, group=("assistant", "")
            ),
        }
        for name, (inode, _) in TABLES.items():
            self._nodes[inode] = Node(inode, name, False, started, content=b"")
        self._next_inode = JSONL_INODE + 1
        self._calls: dict[str, _Call] = {}
        self._dir_nodes: dict[str, Node] = {}
        self._missing: dict[str, float] = {}
        self._call_locks: dict[str, trio.Lock] = {}
        self._window_ids: list[str] = []
        self._window_created: dict[str, float] = {}
        self._window_assistant: dict[str, str | None] = {}
        # Newest createdAt seen per listing stream ("" unfiltered, else an assistant id).
        self._newest: dict[str, float] = {}
        self._listed_from: float | None = None  # start of what the listing covers
        self._groups: dict[str, dict[str, list[str]]] = {"date": {}, "assistant": {}}
        self._group_nodes: dict[tuple[str, str], Node] = {}
        self._links: dict[tuple[int, str], Node] = {}
        self._listed_at = -1.0
        self._listing_loaded = False
        self._list_lock = trio.Lock()
        store.on_version_change = self._version_changed
        self.on_invalidate: Callable[[int], None] | None = None
        self._nursery = nursery  # for background work; without one, none is done
        self.walks = Walks(nursery)
        self._orders: dict[tuple[str, str], Order] = {}  # walkable orders, by (list, how)
        self._save_lock = trio.Lock()  # listings are stored one after the other
        self._listings_made = 0  # listings made, and the newest of them stored
        self._listing_stored = 0
        self._offline = False  # calls/ shows the call objects on disk, the API unreachable
        self._table_of: list[str] | None = None  # the window the tables were made of
        self._table_lock = trio.Lock()
        self._gone: set[tuple[str, str]] = set()  # artifacts past retention: not shown
        store.on_gone = self._artifact_gone
        # Drops a name from the kernel's cache: (directory inode, name).
        self.on_forget: Callable[[int, str], None] | None = None

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
            if name in TABLES:
                await self._tables()
                return self._nodes[TABLES[name][0]]
            for root_child in self._root_children():
                if root_child.name == name:
                    return root_child
            raise NotFound(name)
        if parent == CALLS_INODE:
            if not C.is_call_id(name):
                raise NotFound(name)  # no request for names that cannot be calls
            return (await self._call(name)).node
        node = self.node(parent)
        if node.group is not None:
            return await self._group_lookup(node, name)
        if node.is_dir and node.call_id is not None:
            entry = await self._call(node.call_id)
            child = self._files(entry).get(name)
            if child is None:
                raise NotFound(name)
            if child.kind is not None:
                self._walk_step("lookup", name, node.call_id)
            await self._prepare(child, head=self._first_request_is_a_head(child))
            return child
        raise NotFound(name)

    def _root_children(self) -> list[Node]:
        return [self._nodes[i] for i in (BY_ASSISTANT_INODE, BY_DATE_INODE, CALLS_INODE)]

    async def _tables(self) -> None:
        """Make calls.csv and calls.jsonl of the current window, once per listing.

        From the call objects the listing brought (or a previous mount stored): no request
        per call, and the size is exact before anything is read.
        """
        await self._refresh_window()
        ids = self._window_ids
        if self._table_of is ids:
            return
        async with self._table_lock:
            if self._table_of is ids:
                return
            known = {i: e.call for i in ids if (e := self._calls.get(i)) is not None}
            missing = [i for i in ids if i not in known]
            if missing:
                known.update(await trio.to_thread.run_sync(self._stored_calls, missing))
            objects = [
                known.get(i)
                or {"id": i, "createdAt": C.format_time(self._window_created.get(i, 0.0))}
                for i in ids
            ]

            def render() -> list[bytes]:
                rows = [table.row(call) for call in objects]
                return [write(rows) for _, write in TABLES.values()]

            if len(objects) > 200:
                contents = await trio.to_thread.run_sync(render)
            else:
                contents = render()
            newest = max(self._window_created.values(), default=self._nodes[ROOT_INODE].mtime)
            for (inode, _), content in zip(TABLES.values(), contents, strict=True):
                self._nodes[inode].content = content
                self._nodes[inode].mtime = newest
            self._table_of = ids

    def _stored_calls(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Call objects a previous mount stored (blocking: call it in a thread)."""
        out = {}
        for call_id in ids:
            doc = self._meta.get("call", call_id)
            call = doc.get("call") if doc is not None else None
            if isinstance(call, dict):
                out[call_id] = call
        return out

    async def _prepare(self, child: Node, light: bool = False, head: bool = False) -> None:
        """Learn what the attributes of a remote file need: its version, its decompressed size.

        `light` learns a size without fetching the file's first block, `head` with its first
        bytes only (see store.version).
        """
        if child.kind is None or child.call_id is None:
            return
        await self._store.version(child.call_id, child.kind, light=light, head=head)
        if child.gunzip:
            await self._gz.size(await self._gz_source(child))

    async def children(self, inode: int) -> list[Node]:
        node = self.node(inode)
        if inode == ROOT_INODE:
            try:
                await self._tables()
            except VapifsError as exc:
                log.warning("calls.csv, calls.jsonl: left out of the listing: %s", exc)
                return self._root_children()
            return self._root_children() + [self._nodes[i] for i, _ in TABLES.values()]
        if inode == CALLS_INODE:
            await self._refresh_window()
            return [self._window_node(call_id) for call_id in self._window_ids]
        if node.group is not None:
            return await self._group_children(node)
        if node.call_id is None:
            return []
        call_id = node.call_id
        self.walks.step(
            "dirs", call_id, lambda: self._walk_orders(call_id), self._size_call, ahead=SCAN_AHEAD
        )
        entry = await self._call(node.call_id)
        files = self._files(entry)
        usable: dict[str, bool] = {}

        async def probe(child: Node) -> None:
            try:
                await self._prepare(child, light=_light(child, files))
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

    def _walk_step(self, how: str, name: str, call_id: str) -> None:
        """Tell the walks that a lookup or a file's first read reached `name` in this call."""
        self.walks.step(
            f"{how}:{name}",
            call_id,
            lambda: self._walk_orders(call_id),
            lambda ahead, hold: self._file_ahead(how, name, ahead, hold),
            ahead=FILES_AHEAD,
            name=name,
        )

    def _walk_orders(self, call_id: str) -> list[Order]:
        """The orders a walk over `call_id` may follow: calls/, its day, its assistant,
        each as listed (newest first) and as a shell's glob sorts names, and both reversed
        (bash looks `calls/*/FILE` up in the reverse of the directory's order)."""
        lists: list[tuple[str, list[str]]] = [("calls", self._window_ids)]
        created = self._window_created.get(call_id)
        if created is not None:
            day = _day(created, self.timezone)
            lists.append((f"date/{day}", self._groups["date"].get(day, [])))
        assistant = self._window_assistant.get(call_id)
        if assistant:
            lists.append((f"assistant/{assistant}", self._groups["assistant"].get(assistant, [])))
        orders = []
        for name, ids in lists:
            for how in ("listed", "sorted", "listed-reversed", "sorted-reversed"):
                order = self._orders.get((name, how))
                if order is None or order.source is not ids:
                    walked = sorted(ids) if how.startswith("sorted") else list(ids)
                    if how.endswith("reversed"):
                        walked.reverse()
                    order = Order(ids, walked)
                    self._orders[(name, how)] = order
                orders.append(order)
        return orders

    async def _size_call(self, call_id: str, hold: Hold) -> None:
        """Learn the attributes of a call's files ahead of a walk over directories, one after
        the other: calls go several at a time, as many as storage takes at once."""
        files = self._files(await self._call(call_id))
        for child in files.values():
            if child.kind is not None:
                await self._prepare(child, _light(child, files))

    def _first_request_is_a_head(self, child: Node) -> bool:
        """Whether opening this file should fetch a head rather than its first block: when
        the walk it belongs to reads headers (a file opened alone gets its first block, so
        that whatever a player reads first is already here)."""
        if child.gunzip or child.call_id is None:
            return False
        return self.walks.reads_heads(child.name, child.call_id)

    async def _file_ahead(self, phase: str, name: str, call_id: str, hold: Hold) -> None:
        """Ahead of a walk over one file name: its size when the walk looks files up, and
        what the walk reads of each file (a head, or all of it) when it reads them."""
        files = self._files(await self._call(call_id))
        child = files.get(name)
        if child is None or child.kind is None:
            return
        pattern = self.walks.pattern(name)
        if phase == "lookup" and pattern is None:
            await self._prepare(child, light=_light(child, files))
            return
        if pattern is None or child.gunzip:  # the decompressed view reads the whole gzip
            pattern = Pattern(1 << 62, 0, True)
        head = not pattern.whole and pattern.head <= HEAD_BYTES
        version = await self._store.version(call_id, child.kind, head=head)
        want = version.size if pattern.whole else pattern.head
        want = min(version.size, AHEAD_FILE_BYTES, want)
        # A tail read starts at a page boundary: a margin covers the next file's too, and
        # one size for every file of the walk lets a second fetch find the first.
        tail = 0 if pattern.whole or not pattern.tail else HEAD_BYTES // 4
        if pattern.tail > tail // 2:
            tail = HEAD_BYTES
        await hold(want + tail)
        await self._store.prefetch(call_id, child.kind, want, tail)
        if child.gunzip:
            await self._gz.size(await self._gz_source(child))

    def size(self, node: Node) -> int:
        """Size for attributes; remote files must have been looked up (version known)."""
        if node.content is not None:
            return len(node.content)
        if node.target is not None:
            return len(node.target.encode())
        if node.kind is not None and node.call_id is not None:
            version = self._store.known_version(node.call_id, node.kind)
            if version is None:
                return 0
            if node.gunzip:
                return self._gz.known_size(self._gz_key(node.call_id, node.kind, version)) or 0
            return version.size
        return 0

    async def read(self, node: Node, offset: int, size: int, stream: Stream | None) -> bytes:
        if node.content is not None:
            return node.content[offset : offset + size]
        if node.kind is None or node.call_id is None:
            raise NotFound(node.name)
        call_id, name = node.call_id, node.name
        if stream is not None and stream.next_offset < 0:  # the first read of this open
            self._walk_step("read", name, call_id)
            stream.head_first = not node.gunzip and self.walks.reads_heads(name, call_id)
        data = await self._read(node, offset, size, stream)
        end = offset + len(data)
        self.walks.read(name, call_id, offset, end, max(end, self.size(node)))
        return data

    async def _read(self, node: Node, offset: int, size: int, stream: Stream | None) -> bytes:
        assert node.kind is not None and node.call_id is not None
        if node.gunzip:
            # Several reads of the .gz may serve one read of its view: one bound for all.
            timeout = self._store.read_timeout
            with trio.move_on_after(timeout):
                for _ in range(3):
                    try:
                        source = await self._gz_source(node, stream)
                        return await self._gz.read(source, offset, size)
                    except _SourceChanged:
                        continue
                raise NetworkError(f"{node.call_id}/{node.kind} keeps changing on the server")
            exc = NetworkError(f"{node.call_id}/{node.name}: not read within {timeout:g}s")
            self._store.gave_up(node.call_id, node.kind, exc)
            raise exc
        return await self._store.read(node.call_id, node.kind, offset, size, stream)

    # -- decompressed logs ---------------------------------------------------------------

    @staticmethod
    def _gz_key(call_id: str, kind: str, version: Version) -> str:
        return f"{call_id}/{kind}@{version.token()}"

    async def _gz_source(self, node: Node, stream: Stream | None = None) -> _GzSource:
        assert node.call_id is not None and node.kind is not None
        version = await self._store.version(node.call_id, node.kind)
        return _GzSource(self._store, node.call_id, node.kind, version, stream or Stream())

    def _gz_size_changed(self, key: str) -> None:
        """The decompressed size first given (the gzip trailer's) was wrong: drop old attributes."""
        call_id = key.split("/", 1)[0]
        entry = self._calls.get(call_id)
        if entry is None or self.on_invalidate is None:
            return
        for child in entry.files.values():
            if child.gunzip:
                child.stale_pages = True
                self.on_invalidate(child.inode)

    # -- views: by-date and by-assistant --------------------------------------------------

    async def _regroup(self) -> None:
        """Rebuild both views from the window, as `calls/` shows it."""
        args = (self._window_ids, self._window_created, self._window_assistant, self.timezone)
        if len(self._window_ids) > 200:
            self._groups = await trio.to_thread.run_sync(_group, *args)
        else:
            self._groups = _group(*args)

    def _group_node(self, view: str, key: str) -> Node:
        node = self._group_nodes.get((view, key))
        if node is None:
            node = self._new_node(name=key, is_dir=True, mtime=0.0, group=(view, key))
            self._group_nodes[(view, key)] = node
        ids = self._groups[view].get(key)
        if ids:
            node.mtime = self._window_created.get(ids[0], node.mtime)  # its newest call
        return node

    def _link(self, parent: Node, call_id: str) -> Node:
        node = self._links.get((parent.inode, call_id))
        if node is None:
            node = self._new_node(
                name=call_id,
                is_dir=False,
                mtime=self._window_created.get(call_id, 0.0),
                target=f"../../calls/{call_id}",
                immutable=True,
            )
            self._links[(parent.inode, call_id)] = node
        return node

    async def _group_lookup(self, node: Node, name: str) -> Node:
        assert node.group is not None
        view, key = node.group
        if not key:  # by-date/ or by-assistant/
            if not (DAY_RE.match(name) if view == "date" else _GROUP_NAME_RE.match(name)):
                raise NotFound(name)  # no request for names that cannot be there
            await self._refresh_window()
            if name not in self._groups[view]:
                raise NotFound(name)
            return self._group_node(view, name)
        if not C.is_call_id(name):
            raise NotFound(name)
        await self._refresh_window()
        if name not in self._groups[view].get(key, ()):
            raise NotFound(name)
        return self._link(node, name)

    async def _group_children(self, node: Node) -> list[Node]:
        assert node.group is not None
        view, key = node.group
        await self._refresh_window()
        if not key:
            return [self._group_node(view, k) for k in sorted(self._groups[view])]
        return [self._link(node, call_id) for call_id in self._groups[view].get(key, ())]

    def _version_changed(self, call_id: str, kind: str) -> None:
        entry = self._calls.get(call_id)
        if entry is None or self.on_invalidate is None:
            return
        for child in entry.files.values():
            if child.kind == kind:
                child.stale_pages = True
                self.on_invalidate(child.inode)

    # -- retention -----------------------------------------------------------------------

    def _forget_node(self, parent: int, node: Node) -> None:
        """Make the kernel forget a name and the pages it keeps of it; the node is gone
        (a kernel that still holds it gets ENOENT)."""
        self._nodes.pop(node.inode, None)
        node.stale_pages = True
        if self.on_invalidate is not None:
            self.on_invalidate(node.inode)
        if self.on_forget is not None:
            self.on_forget(parent, node.name)

    def _artifact_gone(self, call_id: str, kind: str) -> None:
        """An artifact answered 404 after it had been seen (the store dropped its blocks):
        its files leave the call directory, and the call itself is asked for again."""
        self._gone.add((call_id, kind))
        entry = self._calls.get(call_id)
        if entry is not None:
            for name, child in list(entry.files.items()):
                if child.kind == kind:
                    del entry.files[name]
                    self._forget_node(entry.node.inode, child)
            entry.recheck = True
        self._gz.forget(f"{call_id}/{kind}@")
        if self._nursery is not None:
            self._nursery.start_soon(self._after_gone, call_id, kind)

    async def _after_gone(self, call_id: str, kind: str) -> None:
        try:
            await trio.to_thread.run_sync(self._delete_gz_docs, f"{call_id}/{kind}@")
            await self._call(call_id)  # a call past retention answers 404: all of it goes
        except VapifsError as exc:
            log.debug("%s: after %s went away: %s", call_id, kind, exc)
        except Exception:  # background work must never take the mount down
            log.exception("%s: after %s went away", call_id, kind)

    def _delete_gz_docs(self, prefix: str) -> None:
        for key, _ in self._meta.items("gzsize"):
            if key.startswith(prefix):
                self._meta.delete("gzsize", key)

    async def _forget_call(self, call_id: str) -> None:
        """The call answered 404 after it had been seen (past the org's retention): drop
        everything kept of it (blocks, call object, versions, sizes, its place in the
        listing) and its names from the kernel's cache."""
        log.warning("%s is gone from the server; dropping everything cached of it", call_id)
        entry = self._calls.pop(call_id, None)
        for kind in dict.fromkeys(kind for kind, _stem, _ext in C.ARTIFACTS):
            await self._store.forget(call_id, kind)
        self._gz.forget(f"{call_id}/")

        def forget_docs() -> None:
            self._meta.delete("call", call_id)
            self._delete_gz_docs(f"{call_id}/")

        await trio.to_thread.run_sync(forget_docs)
        if entry is not None:
            for child in entry.files.values():
                self._forget_node(entry.node.inode, child)
        directory = self._dir_nodes.pop(call_id, None)
        if directory is not None:
            self._forget_node(CALLS_INODE, directory)
        if call_id in self._window_created:
            created = self._window_created.pop(call_id)
            assistant = self._window_assistant.pop(call_id, None)
            for view, key in (("date", _day(created, self.timezone)), ("assistant", assistant)):
                group = self._group_nodes.get((view, key or ""))
                link = self._links.pop((group.inode, call_id), None) if group else None
                if group is not None and link is not None:
                    self._forget_node(group.inode, link)
            self._window_ids = [i for i in self._window_ids if i != call_id]
            await self._regroup()
            if self._listed_from is not None:
                self._listings_made += 1
                await self._save_window([], self._listing_doc(), self._listings_made)

    async def drop_older_than(self, ts: float) -> int:
        """--max-cache-age: drop every cached thing older than `ts` (wall clock), whatever
        the server says; returns how many artifacts were dropped."""
        dropped = await self._store.drop_older_than(ts)
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
                doc, versions = await trio.to_thread.run_sync(self._load_call, call_id)
                if doc is not None and isinstance(doc.get("call"), dict):
                    entry = self._install(doc["call"], float(doc.get("fetched_at", 0.0)))
                    self._store.seed_versions(call_id, versions)
            if entry is not None and not self._stale(entry):
                return entry
            try:
                call = await self._api.get_call(call_id)
            except NotFound:
                self._missing[call_id] = self._now()
                if entry is not None:  # it was there: past the org's retention
                    await self._forget_call(call_id)
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

    def _load_call(self, call_id: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """A stored call object and its artifacts' stored versions, in one trip to the disk.

        Listing a call directory then needs no further disk trip per file.
        """
        doc = self._meta.get("call", call_id)
        call = doc.get("call") if doc is not None else None
        if not isinstance(call, dict):
            return None, {}
        kinds = set(C.artifact_files(call).values())
        return doc, self._store.stored_versions(call_id, kinds)

    def _recheck_after(self, call: dict[str, Any]) -> float:
        """How long a stored call object is trusted before the API is asked again.

        A call still going on is read again after the dir TTL. Vapi attaches recordings and
        logs a little after a call ends: a call that ended within RECENT, or that names no
        artifact yet, is read again too, less and less often as its end recedes (a tenth of
        the time since it ended, from the dir TTL up to --revalidate). Other ended calls do
        not change in practice: they are checked once per --revalidate, as their artifacts
        are (a call past the org's retention answers 404, and is then dropped).
        """
        longest = max(self.dir_ttl, self._store.revalidate_after)
        if not C.is_ended(call):
            return self.dir_ttl
        if self._settled(call):
            return self._store.revalidate_after
        since_end = self._now() - C.modified_at(call)
        return min(max(self.dir_ttl, since_end / BACKOFF), longest)

    def _stale(self, entry: _Call) -> bool:
        after = self._recheck_after(entry.call)
        return entry.recheck or not 0 <= self._now() - entry.fetched_at < after

    def _settled(self, call: dict[str, Any]) -> bool:
        """Whether the call object will not change any more: ended a while ago, artifacts named."""
        ended = C.is_ended(call) and self._now() - C.modified_at(call) >= RECENT
        return ended and bool(C.artifact_files(call))

    def _dir_node(self, call_id: str, mtime: float) -> Node:
        """The directory of a call: one inode per call id for the life of the mount."""
        node = self._dir_nodes.get(call_id)
        if node is None:
            node = self._new_node(name=call_id, is_dir=True, mtime=mtime, call_id=call_id)
            self._dir_nodes[call_id] = node
        node.mtime = mtime
        return node

    def _install(self, call: dict[str, Any], fetched_at: float) -> _Call:
        call_id = str(call["id"])
        created = C.created_at(call)
        old = self._calls.get(call_id)
        mtime = created if created is not None else C.modified_at(call)
        previous = {} if old is None else old.files if old.built else old.previous
        entry = _Call(call, fetched_at, self._dir_node(call_id, mtime), previous=previous)
        self._calls[call_id] = entry
        self._missing.pop(call_id, None)
        if old is not None and old.call != call:
            # call.json and transcript.txt change with it: the kernel must not keep their
            # old pages or sizes. A new artifact is a new name: nothing to drop for it.
            for node in previous.values():
                if node.content is not None:
                    node.stale_pages = True
                    if self.on_invalidate is not None:
                        self.on_invalidate(node.inode)
        return entry

    def _files(self, entry: _Call) -> dict[str, Node]:
        """The files of a call directory, built on first use."""
        if entry.built:
            return entry.files
        call = entry.call
        call_id = str(call["id"])
        modified = C.modified_at(call)
        # An ended call's files keep their pages in the kernel across opens even while the
        # call is still re-read: an artifact that changes gets a new version, and a call
        # object that changes its call.json, and either drops those pages (on_invalidate).
        immutable = C.is_ended(call)
        previous = entry.previous

        def file(name: str, **kw: Any) -> Node:
            node = previous.get(name)
            if node is None:
                node = self._new_node(name=name, is_dir=False, mtime=modified, call_id=call_id)
            node.mtime = modified
            node.immutable = immutable
            node.kind = kw.get("kind")
            node.content = kw.get("content")
            node.gunzip = False
            return node

        body = (json.dumps(call, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()
        entry.files["call.json"] = file("call.json", content=body)
        text = C.transcript(call)
        if text is not None:
            entry.files["transcript.txt"] = file(
                "transcript.txt", content=(text.rstrip("\n") + "\n").encode()
            )
        for name, kind in C.artifact_files(call).items():
            if (call_id, kind) in self._gone:
                continue
            entry.files[name] = file(name, kind=kind)
            if name.endswith(".gz"):
                plain = name[: -len(".gz")]
                entry.files[plain] = file(plain, kind=kind)
                entry.files[plain].gunzip = True
        entry.built = True
        entry.previous = {}
        return entry.files

    async def _persist_calls(self, entries: list[_Call]) -> None:
        docs = [(e.node.call_id, {"call": e.call, "fetched_at": e.fetched_at}) for e in entries]

        def write() -> None:
            for call_id, doc in docs:
                assert call_id is not None
                self._meta.put("call", call_id, doc)

        await trio.to_thread.run_sync(write)

    async def call_object(self, call_id: str) -> dict[str, Any]:
        """The call object (presigned fields removed), as `call.json` shows it."""
        return (await self._call(call_id)).call

    async def calls_between(self, since: float, until: float | None = None) -> list[dict[str, Any]]:
        """Calls created in [since, until], newest first, fetched from the API and remembered
        (so that a later mount resolves them offline) without touching the `calls/` window."""
        bounds = {"createdAtGe": C.format_time(since)}
        if until is not None:
            bounds["createdAtLe"] = C.format_time(until)
        calls = await self._page(**bounds)
        now = self._now()
        await self._persist_calls([self._install(call, now) for call in calls])
        return calls

    # -- the window ----------------------------------------------------------------------

    def _window_node(self, call_id: str) -> Node:
        entry = self._calls.get(call_id)
        if entry is not None:
            return entry.node
        return self._dir_node(call_id, self._window_created.get(call_id, 0.0))

    def _horizon(self, now: float) -> float:
        return self.since if self.since is not None else now - self.window

    def _filter(self) -> dict[str, Any]:
        """What the listing depends on besides time: a remembered listing must match it."""
        return {"assistants": sorted(self.assistants), "until": self.until}

    async def _refresh_window(self) -> None:
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
            fresh: list[dict[str, Any]] = []
            try:
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
                    fresh.extend(await self._page(**bounds))
            except NetworkError as exc:
                if self._listed_from is None and not await self._list_offline(horizon, exc):
                    raise
                if self._listed_from is not None:
                    log.warning(
                        "calls: cannot refresh the listing (%s); showing what is known", exc
                    )
                self._listed_at = now - self.dir_ttl + min(10.0, self.dir_ttl)
                return
            self._offline = False
            installed = [self._install(call, now) for call in fresh]
            for entry in installed:
                call_id = entry.node.call_id
                assert call_id is not None
                created = C.created_at(entry.call)
                created = created if created is not None else now
                assistant = entry.call.get("assistantId")
                assistant = assistant if isinstance(assistant, str) else None
                self._window_created[call_id] = created
                self._window_assistant[call_id] = assistant
                stream = (assistant or "") if self.assistants else ""
                self._newest[stream] = max(created, self._newest.get(stream, created))
            if not complete:
                self._listed_from = horizon
            until = self.until if self.until is not None else float("inf")
            ids = {i for i, ts in self._window_created.items() if horizon <= ts < until}
            self._window_ids = sorted(ids, key=lambda i: (-self._window_created[i], i))
            self._window_created = {i: self._window_created[i] for i in self._window_ids}
            self._window_assistant = {i: self._window_assistant.get(i) for i in self._window_ids}
            await self._regroup()
            self._listed_at = now
            listing = self._listing_doc()
            self._listings_made += 1
            if self._nursery is not None:
                # The listing is answered now; storing 10,000 call objects can take seconds.
                self._nursery.start_soon(self._save_window, installed, listing, self._listings_made)
            else:
                await self._save_window(installed, listing, self._listings_made)

    def _listing_doc(self) -> dict[str, Any]:
        return {
            "listed_at": self._listed_at,
            "from": self._listed_from,
            "filter": self._filter(),
            "newest": dict(self._newest),
            "calls": [
                [i, self._window_created[i], self._window_assistant[i]] for i in self._window_ids
            ],
        }

    async def _save_window(
        self, installed: list[_Call], listing: dict[str, Any], number: int
    ) -> None:
        """Store new call objects, then the listing that names them (unless a newer one was
        stored first); an unmount waits for it, so that the next mount finds them offline."""
        with trio.CancelScope(shield=True):
            async with self._save_lock:
                try:
                    await self._persist_calls(installed)
                    if number > self._listing_stored:
                        await trio.to_thread.run_sync(self._meta.put, "listing", "calls", listing)
                        self._listing_stored = number
                except Exception:  # background work must never take the mount down
                    log.exception("calls: cannot store the listing")

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
            if call_id not in self._calls:
                self._install(call, fetched_at)
            assistant = call.get("assistantId")
            self._window_created[call_id] = C.created_at(call) or 0.0
            self._window_assistant[call_id] = assistant if isinstance(assistant, str) else None
        ids = self._window_created
        self._window_ids = sorted(ids, key=lambda i: (-ids[i], i))
        await self._regroup()
        if not self._offline:
            self._offline = True
            log.warning(
                "calls: cannot list the calls (%s); showing the %d stored on disk",
                exc,
                len(self._window_ids),
            )
        return True

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
        self._window_created = {i: ts for i, ts, _ in rows}
        self._window_assistant = {i: a if isinstance(a, str) else None for i, _, a in rows}
        self._window_ids = [i for i, _, _ in rows]
        self._newest = newest
        self._listed_from = listed_from
        self._listed_at = listed_at
        await self._regroup()

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
            if len(page) > 50:  # a full page takes milliseconds to sift: not on the loop
                calls, oldest = await trio.to_thread.run_sync(_sift, page, seen)
            else:
                calls, oldest = _sift(page, seen)
            out.extend(calls)
            if len(page) < PAGE_LIMIT or not calls or oldest is None:
                return out
            older_than = oldest[1]


def _sift(
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


def _day(created: float, zone: tzinfo) -> str:
    """The by-date directory of a call created at `created`."""
    return datetime.fromtimestamp(created, zone).strftime("%Y-%m-%d")


def _group(
    ids: list[str], created: dict[str, float], assistant: dict[str, str | None], zone: tzinfo
) -> dict[str, dict[str, list[str]]]:
    """Both views of a window: day -> ids and assistant -> ids, each newest first."""
    days: dict[str, list[str]] = {}
    assistants: dict[str, list[str]] = {}
    for call_id in ids:
        day = _day(created[call_id], zone)
        days.setdefault(day, []).append(call_id)
        name = assistant.get(call_id)
        if name is not None and _GROUP_NAME_RE.match(name):
            assistants.setdefault(name, []).append(call_id)
    return {"date": days, "assistant": assistants}
