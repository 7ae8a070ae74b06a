"""Signed URLs per artifact on demand: resolved through the API when the URL book has none."""

from __future__ import annotations

from .api import VapiClient
from .urlbook import Resolution, UrlBook


class Resolver:
    """Resolves (call, kind) to a `Resolution`, reusing the one `book` holds while it is fresh.

    What the API resolves goes into the book, which keeps it for a while and replaces it
    before it expires; storage answers that mean "expired" call `invalidate`. One resolution
    per key is in flight at a time, however many readers ask.
    """

    def __init__(self, api: VapiClient, book: UrlBook) -> None:
        self._api = api
        self._book = book
        self.resolutions = 0

    @property
    def presigned_used(self) -> int:
        """Resolves spared by URLs that came with call objects."""
        return self._book.presigned_used

    async def get(self, call_id: str, kind: str) -> Resolution:
        held = self._book.get(call_id, kind)
        if held is not None:
            return held
        async with self._book.lock(call_id, kind):
            held = self._book.peek(call_id, kind)
            if held is not None:
                return held
            resolution = await self._api.resolve(call_id, kind)
            self.resolutions += 1
            self._book.keep(call_id, kind, resolution)
            return resolution

    def invalidate(self, call_id: str, kind: str, resolution: Resolution) -> None:
        """Forget `resolution` (if still current): the storage host refused it."""
        self._book.invalidate(call_id, kind, resolution)
