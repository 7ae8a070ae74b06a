"""Walks as the tree meets them: the orders a walk may follow, and what is fetched ahead of it."""

from __future__ import annotations

from .callfiles import CallFiles, light
from .entries import Entries
from .lifecycle import Lifecycle
from .nodes import Node
from .reader import HEAD_BYTES
from .views import Views
from .walk import AHEAD_FILE_BYTES, FILES_AHEAD, SCAN_AHEAD, Hold, Order, Pattern, Walks
from .window import Window


class Ahead:
    """Tells the walks each step a program takes, with the work to do ahead of it."""

    def __init__(
        self,
        walks: Walks,
        window: Window,
        views: Views,
        entries: Entries,
        lifecycle: Lifecycle,
        files: CallFiles,
    ) -> None:
        self.walks = walks
        self._window = window
        self._views = views
        self._entries = entries
        self._lifecycle = lifecycle
        self._files = files
        self._orders: dict[tuple[str, str], Order] = {}  # walkable orders, by (list, how)

    def listed(self, call_id: str) -> None:
        """A program listed this call's directory."""
        self.walks.step(
            "dirs", call_id, lambda: self._walk_orders(call_id), self._size_call, ahead=SCAN_AHEAD
        )

    def step(self, how: str, name: str, call_id: str) -> None:
        """Tell the walks that a lookup or a file's first read reached `name` in this call."""
        self.walks.step(
            f"{how}:{name}",
            call_id,
            lambda: self._walk_orders(call_id),
            lambda ahead, hold: self._file_ahead(how, name, ahead, hold),
            ahead=FILES_AHEAD,
            name=name,
        )

    def reads_heads(self, child: Node) -> bool:
        """Whether opening this file should fetch a head rather than its first block: when
        the walk it belongs to reads headers (a file opened alone gets its first block, so
        that whatever a player reads first is already here)."""
        if child.gunzip or child.call_id is None:
            return False
        return self.walks.reads_heads(child.name, child.call_id)

    def _walk_orders(self, call_id: str) -> list[Order]:
        """The orders a walk over `call_id` may follow: calls/, its day, its assistant,
        each as listed (newest first) and as a shell's glob sorts names, and both reversed
        (bash looks `calls/*/FILE` up in the reverse of the directory's order)."""
        lists: list[tuple[str, list[str]]] = [("calls", self._window.ids)]
        day = self._window.day(call_id)
        if day is not None:
            lists.append((f"date/{day}", self._views.ids("date", day)))
        assistant = self._window.assistant.get(call_id)
        if assistant:
            lists.append((f"assistant/{assistant}", self._views.ids("assistant", assistant)))
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
        files = self._entries.files(await self._lifecycle.call(call_id))
        for child in files.values():
            if child.kind is not None:
                await self._files.prepare(child, light(child, files))

    async def _file_ahead(self, phase: str, name: str, call_id: str, hold: Hold) -> None:
        """Ahead of a walk over one file name: its size when the walk looks files up, and
        what the walk reads of each file (a head, or all of it) when it reads them."""
        files = self._entries.files(await self._lifecycle.call(call_id))
        child = files.get(name)
        if child is None or child.kind is None:
            return
        pattern = self.walks.pattern(name)
        if phase == "lookup" and pattern is None:
            await self._files.prepare(child, light=light(child, files))
            return
        if pattern is None or child.gunzip:  # the decompressed view reads the whole gzip
            pattern = Pattern(1 << 62, 0, True)
        head = not pattern.whole and pattern.head <= HEAD_BYTES
        version = await self._files.version(child, head=head)
        want = version.size if pattern.whole else pattern.head
        want = min(version.size, AHEAD_FILE_BYTES, want)
        # A tail read starts at a page boundary: a margin covers the next file's too, and
        # one size for every file of the walk lets a second fetch find the first.
        tail = 0 if pattern.whole or not pattern.tail else HEAD_BYTES // 4
        if pattern.tail > tail // 2:
            tail = HEAD_BYTES
        await hold(want + tail)
        await self._files.prefetch(child, want, tail)
        if child.gunzip:
            await self._files.gz_size(child)
