"""What the artifact store tells the tree: an artifact has a new version, or is gone."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import trio


@dataclass(frozen=True)
class Change:
    """An artifact seen to change on the server: a new version (the old one's bytes are
    dropped), or `gone`: it answered 404 after it had been seen, and nothing of it is kept."""

    call_id: str
    kind: str
    gone: bool = False


class Changes:
    """Changes told without waiting, kept in order until taken.

    The store tells; the tree takes them at each of its operations and after each await into
    the store, so that its answers already reflect them, and a task of its own waits for
    more, so that the kernel hears of a change found in the background (a read-ahead) at
    once. A change stays here until taken: unlike a memory channel's, it is never handed to a
    task blocked waiting, where a look right after the await that caused it would miss it.
    """

    def __init__(self) -> None:
        self._pending: deque[Change] = deque()
        self._arrived = trio.Event()

    def tell(self, change: Change) -> None:
        self._pending.append(change)
        self._arrived.set()

    def take(self) -> list[Change]:
        """Every change told since the last take, oldest first."""
        if not self._pending:
            return []
        taken = list(self._pending)
        self._pending.clear()
        return taken

    async def wait(self) -> None:
        """Return once a change is there to take."""
        while not self._pending:
            if self._arrived.is_set():
                self._arrived = trio.Event()
            await self._arrived.wait()
