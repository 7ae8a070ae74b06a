"""The sizes and bytes of a call's remote files: artifacts, and the decompressed view of logs."""

from __future__ import annotations

from dataclasses import dataclass

import trio

from .errors import NetworkError, VapifsError
from .gzview import GzipViews
from .lifecycle import Lifecycle
from .nodes import Node
from .reader import ArtifactStore, Stream
from .version import Version


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
        return gz_key(self.call_id, self.kind, self.version)

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


def gz_key(call_id: str, kind: str, version: Version) -> str:
    """The key of one version of a gzip artifact in the gzip views."""
    return f"{call_id}/{kind}@{version.token()}"


def light(child: Node, files: dict[str, Node]) -> bool:
    """Whether a listing learns this file's size from one byte rather than its first block.

    `ls -l` of a call wants sizes, not contents. An artifact behind a decompressed view is
    fetched whole-block all the same: that view's size is in the gzip trailer of the same,
    small, file.
    """
    return not any(c.gunzip and c.kind == child.kind for c in files.values())


class CallFiles:
    """Remote files by node. After each await into the store, what it told is applied
    (`Lifecycle.catch_up`), so that an answer never predates a change it caused."""

    def __init__(self, store: ArtifactStore, gz: GzipViews, lifecycle: Lifecycle) -> None:
        self._store = store
        self._gz = gz
        self._lifecycle = lifecycle

    async def version(self, child: Node, *, light: bool = False, head: bool = False) -> Version:
        """The artifact's version (see store.version for `light` and `head`)."""
        assert child.call_id is not None and child.kind is not None
        try:
            return await self._store.version(child.call_id, child.kind, light=light, head=head)
        finally:
            self._lifecycle.catch_up()

    async def prepare(self, child: Node, light: bool = False, head: bool = False) -> None:
        """Learn what the attributes of a remote file need: its version, its decompressed size.

        `light` learns a size without fetching the file's first block, `head` with its first
        bytes only (see store.version).
        """
        if child.kind is None or child.call_id is None:
            return
        await self.version(child, light=light, head=head)
        if child.gunzip:
            await self.gz_size(child)

    async def gz_size(self, child: Node) -> None:
        """Learn the size of a decompressed view."""
        await self._gz.size(await self._gz_source(child))

    async def prefetch(self, child: Node, nbytes: int, tail: int) -> None:
        """Bring the first `nbytes` (and the last `tail`) of the artifact into the caches."""
        assert child.call_id is not None and child.kind is not None
        try:
            await self._store.prefetch(child.call_id, child.kind, nbytes, tail)
        finally:
            self._lifecycle.catch_up()

    def size(self, node: Node) -> int:
        """Size for attributes; the file must have been looked up (version known)."""
        assert node.kind is not None and node.call_id is not None
        version = self._store.known_version(node.call_id, node.kind)
        if version is None:
            return 0
        if node.gunzip:
            return self._gz.known_size(gz_key(node.call_id, node.kind, version)) or 0
        return version.size

    async def read(self, node: Node, offset: int, size: int, stream: Stream | None) -> bytes:
        assert node.kind is not None and node.call_id is not None
        try:
            if node.gunzip:
                return await self._read_gunzipped(node, offset, size, stream)
            return await self._store.read(node.call_id, node.kind, offset, size, stream)
        finally:
            self._lifecycle.catch_up()

    async def _read_gunzipped(
        self, node: Node, offset: int, size: int, stream: Stream | None
    ) -> bytes:
        assert node.kind is not None and node.call_id is not None
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

    async def _gz_source(self, node: Node, stream: Stream | None = None) -> _GzSource:
        assert node.call_id is not None and node.kind is not None
        version = await self.version(node)
        return _GzSource(self._store, node.call_id, node.kind, version, stream or Stream())
