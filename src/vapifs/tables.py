"""The root's calls.csv and calls.jsonl: made once per listing, with no request per call."""

from __future__ import annotations

import trio

from . import calls as C
from . import table
from .entries import Entries
from .nodes import CSV_INODE, JSONL_INODE, ROOT_INODE, Node, Nodes
from .window import Window

# The table of the window at the root: name -> (inode, how the rows are written).
TABLES = {"calls.csv": (CSV_INODE, table.to_csv), "calls.jsonl": (JSONL_INODE, table.to_jsonl)}


class Tables:
    """The two files of the window's table, remade when the window changes."""

    def __init__(self, nodes: Nodes, window: Window, entries: Entries) -> None:
        self._nodes = nodes
        self._window = window
        self._entries = entries
        root = nodes.get(ROOT_INODE)
        self.nodes = [
            nodes.add(Node(inode, name, False, root.mtime, content=b""))
            for name, (inode, _) in TABLES.items()
        ]
        self._table_of: list[str] | None = None  # the window the tables were made of
        self._lock = trio.Lock()

    def node(self, name: str) -> Node | None:
        entry = TABLES.get(name)
        return self._nodes.get(entry[0]) if entry is not None else None

    async def make(self) -> None:
        """Make calls.csv and calls.jsonl of the current window, once per listing.

        From the call objects the listing brought (or a previous mount stored): no request
        per call, and the size is exact before anything is read.
        """
        await self._window.refresh()
        ids = self._window.ids
        if self._table_of is ids:
            return
        async with self._lock:
            if self._table_of is ids:
                return
            known = self._entries.calls(ids)
            missing = [i for i in ids if i not in known]
            if missing:
                known.update(await trio.to_thread.run_sync(self._entries.stored_calls, missing))
            created = self._window.created
            objects = [
                known.get(i) or {"id": i, "createdAt": C.format_time(created.get(i, 0.0))}
                for i in ids
            ]

            def render() -> list[bytes]:
                rows = [table.row(call) for call in objects]
                return [write(rows) for _, write in TABLES.values()]

            if len(objects) > 200:
                contents = await trio.to_thread.run_sync(render)
            else:
                contents = render()
            root = self._nodes.get(ROOT_INODE)
            newest = max(self._window.created.values(), default=root.mtime)
            for node, content in zip(self.nodes, contents, strict=True):
                node.content = content
                node.mtime = newest
            self._table_of = ids
