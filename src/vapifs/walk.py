"""Walks across call directories: recognising them, and the work done ahead of them.

A program that goes through call directories one after another (`ls -l calls/*/`, `du`,
`zgrep PATTERN calls/*/call-logs.jsonl.gz`, `soxi calls/*/stereo.wav`) pays the mount's round
trips once per directory. When its steps follow an order the tree knows (a listing, or the
sorted order of a shell's glob), the next calls' attributes, or their same file, are fetched
ahead of it, a bounded number of calls and bytes ahead, and the work stops when the walk
stops or turns away. What a walk reads of each file (its head, or all of it) is learnt from
the files it has read so far, and is what is fetched ahead.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from .errors import VapifsError
from .reader import HEAD_BYTES

log = logging.getLogger("vapifs.walk")

# A walk is SCAN_DIRS steps, each the next call in the same order, within SCAN_SECONDS.
SCAN_DIRS = 4
SCAN_SECONDS = 2.0
SCAN_AHEAD = 32  # calls sized ahead of a walk over directories
FILES_AHEAD = 16  # calls whose file is fetched ahead of a walk over one file name
AHEAD_PARALLEL = 16  # calls worked on at once, for every walk of the mount together
# Bytes fetched ahead and not yet read, for every walk of the mount together: a small part
# of the memory cache, so that read-ahead never pushes out what readers use now.
AHEAD_BYTES = 16 << 20
AHEAD_FILE_BYTES = 8 << 20  # of one file
# A step may skip calls (a glob of one file name skips calls without that file).
MAX_GAP = 3
# A walk with no step for this long has stopped: the work ahead of it is cancelled.
WALK_IDLE = 2.0
# What the last files of a name were read to tells what the next ones will be.
EXTENT_MEMORY = 3
GAP_BYTES = 256 << 10  # a read this close after the head's end extends the head

Hold = Callable[[int], Awaitable[None]]  # takes bytes of the budget for one call's work
Action = Callable[[str, Hold], Awaitable[None]]  # work ahead on one call id


@dataclass
class Order:
    """Call ids in an order a program may walk them."""

    source: list[str]  # the list this order was made from (rebuilt when it is replaced)
    ids: list[str]
    position: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.position = {call_id: i for i, call_id in enumerate(self.ids)}


@dataclass
class _Read:
    """What a program read of one file."""

    size: int
    head: int = 0  # bytes [0, head) were read
    tail: int = 0  # and the last `tail` bytes
    bytes: int = 0  # in all


@dataclass(frozen=True)
class Pattern:
    """What a walk reads of each file: its first `head` bytes and last `tail`, or all."""

    head: int
    tail: int
    whole: bool


@dataclass
class _Walk:
    steps: list[tuple[float, str]] = field(default_factory=list)
    order: Order | None = None
    here: int = -1
    ahead: int = 0  # positions below this have had their work started
    deadline: float = 0.0  # the walk has stopped if it takes no step before this
    scopes: set[trio.CancelScope] = field(default_factory=set)  # its work ahead
    waiting: dict[str, trio.Event] = field(default_factory=dict)  # set when it gets there


@dataclass
class WalkStats:
    walks: int = 0  # walks recognised
    ahead_started: int = 0  # calls worked on ahead of a walk
    ahead_running: int = 0
    ahead_cancelled: int = 0  # work ahead cancelled: the walk stopped or turned away


class _Budget:
    """Bytes that may be fetched ahead and not read yet, shared by every walk of a mount."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self._changed = trio.Event()

    async def take(self, n: int) -> int:
        n = min(n, self.total)
        while self.free < n:
            await self._changed.wait()
        self.free -= n
        return n

    def give(self, n: int) -> None:
        if n:
            self.free = min(self.total, self.free + n)
            self._changed.set()
            self._changed = trio.Event()


class Walks:
    """The walks of a mount, by what they visit: directories, or one file name in each."""

    def __init__(self, nursery: trio.Nursery | None) -> None:
        self._nursery = nursery  # without one, nothing is done ahead
        self._walks: dict[str, _Walk] = {}
        self._limiter = trio.CapacityLimiter(AHEAD_PARALLEL)
        self.budget = _Budget(AHEAD_BYTES)
        # File name -> the latest files read of that name: call id -> (furthest byte, whole).
        self._extents: dict[str, OrderedDict[str, _Read]] = {}
        self._seen: dict[str, float] = {}  # file name -> when a walk over it last stepped
        self.stats = WalkStats()

    # -- what was read ---------------------------------------------------------------------

    def read(self, name: str, call_id: str, offset: int, end: int, size: int) -> None:
        """A program read bytes [offset, end) of `name` of `call_id`, `size` bytes long."""
        extents = self._extents.setdefault(name, OrderedDict())
        seen = extents.pop(call_id, None) or _Read(size)
        extents[call_id] = seen
        seen.size = size
        seen.bytes += max(0, end - offset)
        if offset <= seen.head:
            seen.head = max(seen.head, end)
        elif end >= size:  # the end of the file, apart from its head: a probe of its tail
            seen.tail = max(seen.tail, size - offset)
        elif offset <= seen.head + GAP_BYTES:  # sequential reads may end out of order
            seen.head = max(seen.head, end)
        while len(extents) > EXTENT_MEMORY + 1:
            extents.popitem(last=False)

    def pattern(self, name: str, call_id: str | None = None) -> Pattern | None:
        """What the current walk reads of a file of this name, learnt from the last files
        read (other than `call_id`); None when nothing is known yet."""
        extents = self._extents.get(name)
        if not extents:
            return None
        others = [v for c, v in extents.items() if c != call_id][-EXTENT_MEMORY:]
        if not others:
            return None
        whole = any(r.head >= r.size or r.bytes >= 0.9 * r.size for r in others)
        return Pattern(max(r.head for r in others), max(r.tail for r in others), whole)

    def reads_heads(self, name: str, call_id: str | None = None) -> bool:
        """Whether a file of this name, opened now, will likely be read for its ends only:
        what the files before it in a walk were, or, before anything is known, any file
        met by a walk (one that reads more pays one more round trip, once)."""
        pattern = self.pattern(name, call_id)
        if pattern is not None:
            return not pattern.whole and pattern.head <= HEAD_BYTES
        seen = self._seen.get(name)
        return seen is not None and trio.current_time() - seen < SCAN_SECONDS + WALK_IDLE

    # -- steps -----------------------------------------------------------------------------

    def step(
        self,
        key: str,
        call_id: str,
        orders: Callable[[], list[Order]],
        action: Action,
        *,
        ahead: int,
        name: str | None = None,
    ) -> None:
        """A program visited `call_id` in a walk of kind `key`; do `action` ahead of it."""
        if self._nursery is None:
            return
        now = trio.current_time()
        walk = self._walks.setdefault(key, _Walk())
        reached = walk.waiting.pop(call_id, None)
        if reached is not None:
            reached.set()
        order = walk.order
        if order is not None and now < walk.deadline:
            pos = order.position.get(call_id)
            if pos is not None and walk.here <= pos <= walk.here + MAX_GAP:
                walk.here = max(walk.here, pos)
                if name is not None:
                    self._seen[name] = now
                walk.steps = [(now, call_id)]
                self._extend(walk, now)
                self._top_up(walk, action, ahead)
                return
        if order is not None:
            self._stop(walk)  # it stopped, or turned away
        steps = [(t, c) for t, c in walk.steps if now - t < SCAN_SECONDS and c != call_id]
        steps.append((now, call_id))
        walk.steps = steps = steps[-SCAN_DIRS:]
        if len(steps) < SCAN_DIRS:
            return
        ids = [c for _, c in steps]
        for candidate in orders():
            if not all(c in candidate.position for c in ids):
                continue
            at = [candidate.position[c] for c in ids]
            if any(not 0 < b - a <= MAX_GAP for a, b in itertools.pairwise(at)):
                continue
            walk.order, walk.here, walk.ahead = candidate, at[-1], at[-1] + 1
            self.stats.walks += 1
            if name is not None:
                self._seen[name] = now
            self._extend(walk, now)
            self._top_up(walk, action, ahead)
            return

    def _extend(self, walk: _Walk, now: float) -> None:
        walk.deadline = now + WALK_IDLE
        for scope in walk.scopes:
            scope.deadline = walk.deadline

    def _stop(self, walk: _Walk) -> None:
        for scope in walk.scopes:
            scope.cancel()
        walk.order, walk.steps = None, []

    def _top_up(self, walk: _Walk, action: Action, ahead: int) -> None:
        assert self._nursery is not None and walk.order is not None
        ids = walk.order.ids
        stop = min(walk.here + 1 + ahead, len(ids))
        start = max(walk.here + 1, walk.ahead)
        if not (stop - start >= max(1, ahead // 2) or (stop == len(ids) and start < stop)):
            return
        walk.ahead = stop
        for call_id in ids[start:stop]:
            self.stats.ahead_started += 1
            scope = trio.CancelScope(deadline=walk.deadline)
            walk.scopes.add(scope)
            reached = walk.waiting[call_id] = trio.Event()
            self._nursery.start_soon(self._one, walk, scope, reached, action, call_id)

    async def _one(
        self,
        walk: _Walk,
        scope: trio.CancelScope,
        reached: trio.Event,
        action: Action,
        call_id: str,
    ) -> None:
        """Work ahead on one call; the bytes it fetched count against the budget until the
        walk gets there (or stops)."""
        held = 0

        async def hold(nbytes: int) -> None:
            nonlocal held
            if nbytes > 0:
                held += await self.budget.take(nbytes)

        try:
            with scope:
                async with self._limiter:
                    self.stats.ahead_running += 1
                    try:
                        await action(call_id, hold)
                    except VapifsError as exc:  # the walk meets (and reports) it there
                        log.debug("%s: work ahead of a walk: %s", call_id, exc)
                    except Exception:  # background work must never take the mount down
                        log.exception("%s: work ahead of a walk", call_id)
                    finally:
                        self.stats.ahead_running -= 1
                if held:
                    await reached.wait()
            if scope.cancelled_caught:
                self.stats.ahead_cancelled += 1
        finally:
            self.budget.give(held)
            walk.scopes.discard(scope)
            if walk.waiting.get(call_id) is reached:
                del walk.waiting[call_id]
