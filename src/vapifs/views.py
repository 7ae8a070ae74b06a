"""The by-date and by-assistant views: the window grouped by day and by assistant, as links."""

from __future__ import annotations

import re
from datetime import datetime, tzinfo

import trio

from . import calls as C
from .errors import NotFound
from .nodes import Node, Nodes

DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# by-assistant/<name>: whatever the API calls an assistant, as long as it is one path element.
_GROUP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,254}$")


class Views:
    """Both views of the window, as last given by `regroup`: days and assistants to call ids."""

    def __init__(self, nodes: Nodes, timezone: tzinfo) -> None:
        self._nodes = nodes
        self.timezone = timezone
        self._groups: dict[str, dict[str, list[str]]] = {"date": {}, "assistant": {}}
        self._created: dict[str, float] = {}  # the window's: call id -> createdAt
        self._group_nodes: dict[tuple[str, str], Node] = {}
        self._links: dict[tuple[int, str], Node] = {}

    async def regroup(
        self, ids: list[str], created: dict[str, float], assistant: dict[str, str | None]
    ) -> None:
        """Rebuild both views from the window, as `calls/` shows it."""
        args = (ids, created, assistant, self.timezone)
        if len(ids) > 200:
            self._groups = await trio.to_thread.run_sync(group, *args)
        else:
            self._groups = group(*args)
        self._created = created

    def ids(self, view: str, key: str) -> list[str]:
        """The calls of one day or one assistant, newest first."""
        return self._groups[view].get(key, [])

    def could_hold(self, node: Node, name: str) -> bool:
        """Whether `name` can be in this directory of a view at all: no request otherwise."""
        assert node.group is not None
        view, key = node.group
        if not key:  # by-date/ or by-assistant/
            return bool(DAY_RE.match(name) if view == "date" else _GROUP_NAME_RE.match(name))
        return C.is_call_id(name)

    def find(self, node: Node, name: str) -> Node:
        """A day or assistant of by-date/ or by-assistant/, or a call of one of them."""
        assert node.group is not None
        view, key = node.group
        if not key:
            if name not in self._groups[view]:
                raise NotFound(name)
            return self._group_node(view, name)
        if name not in self._groups[view].get(key, ()):
            raise NotFound(name)
        return self._link(node, name)

    def children(self, node: Node) -> list[Node]:
        assert node.group is not None
        view, key = node.group
        if not key:
            return [self._group_node(view, k) for k in sorted(self._groups[view])]
        return [self._link(node, call_id) for call_id in self._groups[view].get(key, ())]

    def forget(self, call_id: str, created: float, assistant: str | None) -> None:
        """Make the kernel forget the links to a call taken out of the window."""
        for view, key in (("date", day(created, self.timezone)), ("assistant", assistant)):
            group_node = self._group_nodes.get((view, key or ""))
            link = self._links.pop((group_node.inode, call_id), None) if group_node else None
            if group_node is not None and link is not None:
                self._nodes.drop(group_node.inode, link)

    def _group_node(self, view: str, key: str) -> Node:
        node = self._group_nodes.get((view, key))
        if node is None:
            node = self._nodes.new(name=key, is_dir=True, mtime=0.0, group=(view, key))
            self._group_nodes[(view, key)] = node
        ids = self._groups[view].get(key)
        if ids:
            node.mtime = self._created.get(ids[0], node.mtime)  # its newest call
        return node

    def _link(self, parent: Node, call_id: str) -> Node:
        node = self._links.get((parent.inode, call_id))
        if node is None:
            node = self._nodes.new(
                name=call_id,
                is_dir=False,
                mtime=self._created.get(call_id, 0.0),
                target=f"../../calls/{call_id}",
                immutable=True,
            )
            self._links[(parent.inode, call_id)] = node
        return node


def day(created: float, zone: tzinfo) -> str:
    """The by-date directory of a call created at `created`."""
    return datetime.fromtimestamp(created, zone).strftime("%Y-%m-%d")


def group(
    ids: list[str], created: dict[str, float], assistant: dict[str, str | None], zone: tzinfo
) -> dict[str, dict[str, list[str]]]:
    """Both views of a window: day -> ids and assistant -> ids, each newest first."""
    days: dict[str, list[str]] = {}
    assistants: dict[str, list[str]] = {}
    for call_id in ids:
        when = day(created[call_id], zone)
        days.setdefault(when, []).append(call_id)
        name = assistant.get(call_id)
        if name is not None and _GROUP_NAME_RE.match(name):
            assistants.setdefault(name, []).append(call_id)
    return {"date": days, "assistant": assistants}
