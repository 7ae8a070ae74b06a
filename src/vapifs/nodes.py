"""The nodes of the tree: one per inode, and what the kernel is told when one changes or goes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import NotFound

ROOT_INODE = 1
CALLS_INODE = 2
BY_DATE_INODE = 3
BY_ASSISTANT_INODE = 4
CSV_INODE = 5
JSONL_INODE = 6
_FIRST_FREE_INODE = JSONL_INODE + 1


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


class Nodes:
    """Inodes to nodes for the life of a mount, and the kernel's view of them.

    `invalidate` drops what the kernel keeps of an inode (pages, attributes); `forget` drops
    a name from its cache: (directory inode, name). Without them (no kernel) nothing is told.
    """

    def __init__(
        self,
        started: float,
        *,
        invalidate: Callable[[int], None] | None = None,
        forget: Callable[[int, str], None] | None = None,
    ) -> None:
        self._invalidate = invalidate
        self._forget = forget
        self._nodes: dict[int, Node] = {
            ROOT_INODE: Node(ROOT_INODE, "", True, started),
            CALLS_INODE: Node(CALLS_INODE, "calls", True, started),
            BY_DATE_INODE: Node(BY_DATE_INODE, "by-date", True, started, group=("date", "")),
            BY_ASSISTANT_INODE: Node(
                BY_ASSISTANT_INODE, "by-assistant", True, started, group=("assistant", "")
            ),
        }
        self._next_inode = _FIRST_FREE_INODE

    def get(self, inode: int) -> Node:
        try:
            return self._nodes[inode]
        except KeyError:
            raise NotFound(f"no inode {inode}") from None

    def add(self, node: Node) -> Node:
        """Place a node of a fixed inode (below the first free one)."""
        assert node.inode < _FIRST_FREE_INODE and node.inode not in self._nodes
        self._nodes[node.inode] = node
        return node

    def new(self, **kw: Any) -> Node:
        node = Node(inode=self._next_inode, **kw)
        self._next_inode += 1
        self._nodes[node.inode] = node
        return node

    def stale(self, node: Node) -> None:
        """The node's bytes or size changed: the kernel must not keep its old pages."""
        node.stale_pages = True
        if self._invalidate is not None:
            self._invalidate(node.inode)

    def drop(self, parent: int, node: Node) -> None:
        """Make the kernel forget a name and the pages it keeps of it; the node is gone
        (a kernel that still holds it gets ENOENT)."""
        self._nodes.pop(node.inode, None)
        self.stale(node)
        if self._forget is not None:
            self._forget(parent, node.name)
