"""The decompressed view of a gzip artifact: its exact size and random reads, bytes as gunzip."""

from __future__ import annotations

import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio
from cachetools import LRUCache

from .errors import ProtocolError

log = logging.getLogger("vapifs.gzview")

CHUNK = 1 << 20  # decompressed bytes between two checkpoints
STEP = 256 << 10  # compressed bytes fed to zlib at a time
# DEFLATE cannot expand more than about 1032:1, so below this compressed size the trailer's
# ISIZE (the length modulo 2**32) cannot have wrapped.
NO_WRAP_LIMIT = (1 << 32) // 1032
_MAGIC = b"\x1f\x8b"
# Below these, inflating costs a few microseconds: not worth a thread hop.
_INLINE_INPUT = 4096
_INLINE_OUTPUT = 64 << 10


class Source(Protocol):
    """One version of one compressed file: a stable key, its size, and ranged reads."""

    @property
    def key(self) -> str: ...

    @property
    def size(self) -> int: ...

    async def read(self, offset: int, size: int) -> bytes: ...


class SizeStore(Protocol):
    """Where exact sizes survive a remount (the metadata store)."""

    def get(self, ns: str, key: str) -> dict[str, Any] | None: ...

    def put(self, ns: str, key: str, doc: dict[str, Any]) -> bool: ...


@dataclass
class _Point:
    """Where to resume inflating to produce decompressed bytes from `out` onwards."""

    out: int
    pos: int  # compressed offset of the next input byte
    state: Any = None  # a zlib decompressobj (never advanced once stored), or None: new member


@dataclass
class _Step:
    data: bytes
    state: Any
    consumed: int
    finished: bool  # the stream ended (last member done, trailing bytes ignored as gunzip does)
    members: int


def _inflate(state: Any, data: bytes, at_eof: bool, need: int) -> _Step:
    """Inflate up to `need` bytes from `data`; `state` is advanced in place (pass a copy)."""
    out: list[bytes] = []
    view = memoryview(data)
    i = 0
    members = 0
    finished = False
    while need > 0:
        rest = view[i:]
        if state is None:
            if len(rest) < 2:
                finished = at_eof
                break
            if rest[:2] != _MAGIC:
                # gunzip ignores zero padding and trailing garbage after the last member
                finished = True
                break
            state = zlib.decompressobj(31)
        if not rest and not at_eof:
            break
        try:
            piece = state.decompress(rest, need)
        except zlib.error as exc:
            raise ProtocolError(f"corrupt gzip data near byte {i}: {exc}") from None
        out.append(piece)
        need -= len(piece)
        if state.eof:
            i = len(data) - len(state.unused_data)
            state = None
            members += 1
            continue
        i = len(data) - len(state.unconsumed_tail)
        if not rest and not piece:
            log.warning("gzip data ends before its stream does (truncated): serving what inflates")
            finished = True
            break
    return _Step(b"".join(out), state, i, finished, members)


def trailer_isize(tail: bytes) -> int:
    """ISIZE of a gzip trailer (the last member's length modulo 2**32) from the last 4 bytes."""
    value: int = struct.unpack("<I", tail[-4:])[0]
    return value


@dataclass
class _View:
    source: Source
    points: list[_Point] = field(default_factory=list)
    total: int | None = None  # exact decompressed length, once a pass reached the end
    lock: trio.Lock = field(default_factory=trio.Lock)


class GzipViews:
    """Decompressed views of many gzip files, sharing one bounded memory of output chunks.

    A view keeps a checkpoint (a copy of the inflater) every CHUNK bytes of output, so any
    chunk is rebuilt from the nearest checkpoint before it, and the compressed bytes are read
    again through the source (the artifact store, which caches them). Sizes are exact: counted
    by inflating, or taken from the gzip trailer when that is trustworthy and then checked in
    the background; either way remembered in `sizes` under the source's versioned key.
    """

    def __init__(
        self,
        sizes: SizeStore | None = None,
        *,
        nursery: trio.Nursery | None = None,
        chunk_size: int = CHUNK,
        step: int = STEP,
        memory_bytes: int = 32 << 20,
        max_views: int = 256,
        count_below: int = 1 << 20,
        on_size_change: Callable[[str], None] | None = None,
    ) -> None:
        self._sizes = sizes
        self._nursery = nursery
        self.chunk_size = chunk_size
        self.step = step
        self._count_below = count_below
        self._chunks: LRUCache[tuple[str, int], bytes] = LRUCache(
            maxsize=memory_bytes, getsizeof=len
        )
        self._views: LRUCache[str, _View] = LRUCache(maxsize=max_views)
        self._known: LRUCache[str, int] = LRUCache(maxsize=100_000)
        self._size_locks: dict[str, trio.Lock] = {}
        self.on_size_change = on_size_change
        self.inflated_bytes = 0  # output produced, for tests and stats

    def forget(self, prefix: str) -> None:
        """Drop from memory the views and sizes of sources whose key starts with `prefix`."""
        for cache in (self._views, self._known):
            for key in [k for k in cache if k.startswith(prefix)]:
                cache.pop(key, None)
        for chunk in [c for c in self._chunks if c[0].startswith(prefix)]:
            self._chunks.pop(chunk, None)

    def _view(self, source: Source) -> _View:
        view = self._views.get(source.key)
        if view is None or view.source.size != source.size:
            view = _View(source, [_Point(0, 0)])
            self._views[source.key] = view
        else:
            view.source = source
        return view

    def known_size(self, key: str) -> int | None:
        """The decompressed size if already known, without any I/O."""
        return self._known.get(key)

    async def size(self, source: Source) -> int:
        """The decompressed size, exact (see the class docstring for how it is found)."""
        known = self._known.get(source.key)
        if known is not None:
            return known
        lock = self._size_locks.setdefault(source.key, trio.Lock())
        try:
            async with lock:
                known = self._known.get(source.key)
                if known is not None:
                    return known
                return await self._find_size(source)
        finally:
            if not lock.statistics().tasks_waiting:
                self._size_locks.pop(source.key, None)

    async def _find_size(self, source: Source) -> int:
        if self._sizes is not None:
            doc = await trio.to_thread.run_sync(self._sizes.get, "gzsize", source.key)
            size = doc.get("size") if doc else None
            if doc and isinstance(size, int) and not isinstance(size, bool) and size >= 0:
                self._known[source.key] = size
                if doc.get("exact") is False and self._nursery is not None:
                    self._nursery.start_soon(self._verify, source, size)
                return size
        if source.size == 0:
            await self._remember(source.key, 0, exact=True)
            return 0
        if self._nursery is not None and self._count_below <= source.size < NO_WRAP_LIMIT:
            # Counting would download and inflate the whole file just for a stat: take the
            # trailer's ISIZE, right for a single member, and check it in the background (a
            # concatenation of members disagrees: the count then wins).
            tail = await source.read(source.size - 4, 4)
            if len(tail) == 4:
                isize = trailer_isize(tail)
                await self._remember(source.key, isize, exact=False)
                self._nursery.start_soon(self._verify, source, isize)
                return isize
        total = await self._count(source)
        await self._remember(source.key, total, exact=True)
        return total

    async def _remember(self, key: str, size: int, *, exact: bool) -> None:
        self._known[key] = size
        if self._sizes is not None:
            await trio.to_thread.run_sync(
                self._sizes.put, "gzsize", key, {"size": size, "exact": exact}
            )

    async def _count(self, source: Source) -> int:
        """Inflate to the end (filling checkpoints and chunks on the way) and return the length."""
        view = self._view(source)
        async with view.lock:
            while view.total is None:
                await self._produce(view, len(view.points) - 1)
            return view.total

    async def _verify(self, source: Source, claimed: int) -> None:
        try:
            total = await self._count(source)
        except Exception as exc:
            log.warning("%s: cannot check the decompressed size: %s", source.key, exc)
            return
        await self._remember(source.key, total, exact=True)
        if total != claimed:
            log.warning(
                "%s: decompressed size is %d, not %d as its trailer says (several members?)",
                source.key,
                total,
                claimed,
            )
            if self.on_size_change is not None:
                self.on_size_change(source.key)

    async def read(self, source: Source, offset: int, size: int) -> bytes:
        """Decompressed bytes [offset, offset+size), clipped at the end of the stream."""
        if size <= 0 or offset < 0:
            return b""
        view = self._view(source)
        cs = self.chunk_size
        parts: list[bytes] = []
        index = offset // cs
        end = offset + size
        while index * cs < end:
            data = await self._chunk(view, index)
            if data is None:
                break
            start = max(offset - index * cs, 0)
            parts.append(data[start : end - index * cs])
            if len(data) < cs:
                break
            index += 1
        return b"".join(parts)

    async def _chunk(self, view: _View, index: int) -> bytes | None:
        """Decompressed chunk `index` (shorter at the end; None past it)."""
        key = (view.source.key, index)
        data = self._chunks.get(key)
        if data is not None:
            return data
        async with view.lock:
            data = self._chunks.get(key)
            if data is not None:
                return data
            while True:
                if view.total is not None and index > 0 and index * self.chunk_size >= view.total:
                    return None
                start = min(index, len(view.points) - 1)
                data = await self._produce(view, start)
                if start == index:
                    return data

    async def _produce(self, view: _View, index: int) -> bytes:
        """Inflate chunk `index` from its checkpoint; store it and the next checkpoint."""
        point = view.points[index]
        state = point.state.copy() if point.state is not None else None
        pos = point.pos
        need = self.chunk_size
        parts: list[bytes] = []
        csize = view.source.size
        finished = False
        while need > 0:
            data = await view.source.read(pos, self.step) if pos < csize else b""
            if pos < csize and not data:
                raise ProtocolError(f"{view.source.key}: no bytes at offset {pos}")
            at_eof = pos + len(data) >= csize
            if len(data) <= _INLINE_INPUT and need <= _INLINE_OUTPUT:
                step = _inflate(state, data, at_eof, need)
            else:
                step = await trio.to_thread.run_sync(_inflate, state, data, at_eof, need)
            parts.append(step.data)
            need -= len(step.data)
            state = step.state
            pos += step.consumed
            if step.finished:
                finished = True
                break
            if not step.data and not step.consumed and not at_eof:
                raise ProtocolError(f"{view.source.key}: inflating made no progress at {pos}")
        out = b"".join(parts)
        self.inflated_bytes += len(out)
        self._chunks[(view.source.key, index)] = out
        if finished or len(out) < self.chunk_size:
            total = point.out + len(out)
            if view.total is None:
                view.total = total
            del view.points[index + 1 :]
        elif index + 1 == len(view.points):
            view.points.append(_Point(point.out + len(out), pos, state))
        return out
