"""Per-call entries: call objects in memory and on disk, their files, how long each is trusted."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from . import calls as C
from .meta import MetaStore
from .nodes import Node, Nodes
from .reader import ArtifactStore

NEGATIVE_TTL = 60.0
# A call that ended less than this long ago may still get its recordings and logs (seconds).
RECENT = 3600.0
# A call that may still change is read again after this fraction of the time since it ended.
BACKOFF = 10.0


@dataclass
class Entry:
    call: dict[str, Any]
    fetched_at: float
    node: Node
    files: dict[str, Node] = field(default_factory=dict)
    built: bool = False  # files are built on first use: a listing of 10,000 calls needs none
    previous: dict[str, Node] = field(default_factory=dict)  # nodes to reuse when building
    recheck: bool = False  # ask the API again at the next use (an artifact of it went away)


class Entries:
    """The calls known to the tree, by id: each with its directory, built on first use."""

    def __init__(
        self,
        nodes: Nodes,
        store: ArtifactStore,
        meta: MetaStore,
        *,
        dir_ttl: float = 60.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._nodes = nodes
        self._store = store
        self._meta = meta
        self.dir_ttl = dir_ttl
        self._now = wall_clock
        self._calls: dict[str, Entry] = {}
        self._dir_nodes: dict[str, Node] = {}
        self._missing: dict[str, float] = {}  # call id -> when the API last answered 404
        self._gone: set[tuple[str, str]] = set()  # artifacts past retention: not shown

    def get(self, call_id: str) -> Entry | None:
        return self._calls.get(call_id)

    def calls(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """The call objects in memory of these ids."""
        return {i: e.call for i in ids if (e := self._calls.get(i)) is not None}

    def missing(self, call_id: str) -> None:
        """The API answered 404 for this id: not asked again for NEGATIVE_TTL."""
        self._missing[call_id] = self._now()

    def known_missing(self, call_id: str) -> bool:
        missing_since = self._missing.get(call_id)
        return missing_since is not None and self._now() - missing_since < NEGATIVE_TTL

    # -- trust -----------------------------------------------------------------------------

    def stale(self, entry: Entry) -> bool:
        """Whether the API must be asked for this call again before it is used."""
        after = self._recheck_after(entry.call)
        return entry.recheck or not 0 <= self._now() - entry.fetched_at < after

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

    def _settled(self, call: dict[str, Any]) -> bool:
        """Whether the call object will not change any more: ended a while ago, artifacts named."""
        ended = C.is_ended(call) and self._now() - C.modified_at(call) >= RECENT
        return ended and bool(C.artifact_files(call))

    # -- memory and disk -------------------------------------------------------------------

    async def load(self, call_id: str) -> Entry | None:
        """The entry a previous mount stored, with its artifacts' versions; None if none."""
        doc, versions = await trio.to_thread.run_sync(self._load_call, call_id)
        if doc is None or not isinstance(doc.get("call"), dict):
            return None
        entry = self.install(doc["call"], float(doc.get("fetched_at", 0.0)))
        self._store.seed_versions(call_id, versions)
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

    def stored_calls(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Call objects a previous mount stored (blocking: call it in a thread)."""
        out = {}
        for call_id in ids:
            doc = self._meta.get("call", call_id)
            call = doc.get("call") if doc is not None else None
            if isinstance(call, dict):
                out[call_id] = call
        return out

    async def persist(self, entries: list[Entry]) -> None:
        docs = [(e.node.call_id, {"call": e.call, "fetched_at": e.fetched_at}) for e in entries]

        def write() -> None:
            for call_id, doc in docs:
                assert call_id is not None
                self._meta.put("call", call_id, doc)

        await trio.to_thread.run_sync(write)

    # -- entries and their files -----------------------------------------------------------

    def directory(self, call_id: str, mtime: float) -> Node:
        """The directory of a call: one inode per call id for the life of the mount."""
        entry = self._calls.get(call_id)
        if entry is not None:
            return entry.node
        return self._dir_node(call_id, mtime)

    def _dir_node(self, call_id: str, mtime: float) -> Node:
        node = self._dir_nodes.get(call_id)
        if node is None:
            node = self._nodes.new(name=call_id, is_dir=True, mtime=mtime, call_id=call_id)
            self._dir_nodes[call_id] = node
        node.mtime = mtime
        return node

    def install(self, call: dict[str, Any], fetched_at: float) -> Entry:
        call_id = str(call["id"])
        created = C.created_at(call)
        old = self._calls.get(call_id)
        mtime = created if created is not None else C.modified_at(call)
        previous = {} if old is None else old.files if old.built else old.previous
        entry = Entry(call, fetched_at, self._dir_node(call_id, mtime), previous=previous)
        self._calls[call_id] = entry
        self._missing.pop(call_id, None)
        if old is not None and old.call != call:
            # call.json and transcript.txt change with it: the kernel must not keep their
            # old pages or sizes. A new artifact is a new name: nothing to drop for it.
            for node in previous.values():
                if node.content is not None:
                    self._nodes.stale(node)
        return entry

    def files(self, entry: Entry) -> dict[str, Node]:
        """The files of a call directory, built on first use."""
        if entry.built:
            return entry.files
        call = entry.call
        call_id = str(call["id"])
        modified = C.modified_at(call)
        # An ended call's files keep their pages in the kernel across opens even while the
        # call is still re-read: an artifact that changes gets a new version, and a call
        # object that changes its call.json, and either drops those pages (Nodes.stale).
        immutable = C.is_ended(call)
        previous = entry.previous

        def file(name: str, **kw: Any) -> Node:
            node = previous.get(name)
            if node is None:
                node = self._nodes.new(name=name, is_dir=False, mtime=modified, call_id=call_id)
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

    # -- changes ---------------------------------------------------------------------------

    def version_changed(self, call_id: str, kind: str) -> None:
        """The artifact has a new version: the kernel drops the pages of its files."""
        entry = self._calls.get(call_id)
        if entry is None:
            return
        for child in entry.files.values():
            if child.kind == kind:
                self._nodes.stale(child)

    def gz_size_changed(self, key: str) -> None:
        """The decompressed size first given (the gzip trailer's) was wrong: drop old attributes."""
        call_id = key.split("/", 1)[0]
        entry = self._calls.get(call_id)
        if entry is None:
            return
        for child in entry.files.values():
            if child.gunzip:
                self._nodes.stale(child)

    def artifact_gone(self, call_id: str, kind: str) -> None:
        """The artifact is past retention: its files leave the call directory, and the call
        itself is asked for again at its next use."""
        self._gone.add((call_id, kind))
        entry = self._calls.get(call_id)
        if entry is not None:
            for name, child in list(entry.files.items()):
                if child.kind == kind:
                    del entry.files[name]
                    self._nodes.drop(entry.node.inode, child)
            entry.recheck = True

    def pop(self, call_id: str) -> Entry | None:
        """Take the call out of the tree (past retention); its names go with `drop_names`."""
        return self._calls.pop(call_id, None)

    def drop_names(self, call_id: str, entry: Entry | None, parent: int) -> None:
        """Make the kernel forget a call taken out: its files, and its directory in `parent`."""
        if entry is not None:
            for child in entry.files.values():
                self._nodes.drop(entry.node.inode, child)
        directory = self._dir_nodes.pop(call_id, None)
        if directory is not None:
            self._nodes.drop(parent, directory)
