"""Signed URLs per artifact, in memory only: those resolved and those call objects carried."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import trio

from .calls import presigned_urls

Key = tuple[str, str]  # (call id, artifact kind)


@dataclass(frozen=True)
class Resolution:
    """Where an artifact's bytes can be fetched right now.

    `url` is a signed storage URL (a bearer secret: memory only), or the API endpoint itself
    when the API served the body directly, in which case `headers` carries the key.
    """

    url: str = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    direct: bool = False


def url_lifetime(url: str, now: float | None = None) -> float | None:
    """Seconds a signed URL says it stays valid, from its query (SigV4, GCS, CloudFront)."""
    query = {k.lower(): v[0] for k, v in parse_qs(urlsplit(url).query).items() if v}
    now = time.time() if now is None else now
    expires = query.get("x-amz-expires") or query.get("x-goog-expires")
    date = query.get("x-amz-date") or query.get("x-goog-date")
    try:
        if expires is not None:
            seconds = float(expires)
            if date:
                signed = datetime.strptime(date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
                return signed.timestamp() + seconds - now
            return seconds
        if "expires" in query:
            return float(query["expires"]) - now
    except ValueError:
        return None
    return None


@dataclass
class _Entry:
    resolution: Resolution
    fresh_until: float
    offered: bool = False  # came with a call object, not used yet


class UrlBook:
    """The resolution to use for each artifact, each for at most `max_age` seconds.

    Written by the resolver (what the API resolved) and by the API client (the presigned URLs
    that every call object it receives carries); read by the resolver. A URL is held for half
    of its announced lifetime at most, so that it is replaced before it expires.
    """

    def __init__(
        self, *, max_age: float = 60.0, clock: Callable[[], float] = trio.current_time
    ) -> None:
        self.max_age = max_age
        self._clock = clock
        self._entries: dict[Key, _Entry] = {}
        self._locks: dict[Key, trio.Lock] = {}
        self.presigned_used = 0  # resolves spared by URLs that came with call objects

    def get(self, call_id: str, kind: str) -> Resolution | None:
        """The fresh resolution held for the artifact, if any; the first use of one that came
        with a call object counts as a resolve spared."""
        entry = self._entries.get((call_id, kind))
        if entry is None or self._clock() >= entry.fresh_until:
            return None
        if entry.offered:
            entry.offered = False
            self.presigned_used += 1
        return entry.resolution

    def peek(self, call_id: str, kind: str) -> Resolution | None:
        """Like `get`, counting nothing (a second look, under the artifact's lock)."""
        entry = self._entries.get((call_id, kind))
        if entry is None or self._clock() >= entry.fresh_until:
            return None
        return entry.resolution

    def lock(self, call_id: str, kind: str) -> trio.Lock:
        """The lock under which the artifact is resolved: one resolution in flight per key."""
        return self._locks.setdefault((call_id, kind), trio.Lock())

    def keep(self, call_id: str, kind: str, resolution: Resolution) -> None:
        """Hold a resolution the API just gave, for `max_age` or half its URL's lifetime."""
        age = self.max_age
        lifetime = url_lifetime(resolution.url)
        if lifetime is not None:
            age = min(age, max(0.0, lifetime / 2))
        self._entries[(call_id, kind)] = _Entry(resolution, self._clock() + age)
        self._prune()

    def offer_calls(self, calls: list[dict[str, Any]]) -> None:
        """Keep the presigned URLs that call objects carry, as if they had been resolved.

        They come with every listing; using them while they are young spares one API round
        trip per artifact. Short-lived ones are not worth keeping.
        """
        now_wall = time.time()
        now = self._clock()
        for call in calls:
            call_id = call.get("id")
            if not isinstance(call_id, str):
                continue
            urls, expires_at = presigned_urls(call)
            for kind, url in urls.items():
                age = self.max_age
                lifetime = url_lifetime(url, now_wall)
                if lifetime is not None:
                    age = min(age, lifetime / 2)
                if expires_at is not None:
                    age = min(age, (expires_at - now_wall) / 2)
                if age < 2.0:
                    continue
                entry = self._entries.get((call_id, kind))
                if entry is not None and now < entry.fresh_until:
                    continue
                self._entries[(call_id, kind)] = _Entry(Resolution(url), now + age, offered=True)
        self._prune()

    def invalidate(self, call_id: str, kind: str, resolution: Resolution) -> None:
        """Forget `resolution` (if still current): the storage host refused it."""
        entry = self._entries.get((call_id, kind))
        if entry is not None and entry.resolution is resolution:
            del self._entries[(call_id, kind)]

    def _prune(self) -> None:
        now = self._clock()
        if len(self._entries) > 256:
            for key in [k for k, e in self._entries.items() if e.fresh_until <= now]:
                del self._entries[key]
                lock = self._locks.get(key)
                if lock is not None and not lock.locked():
                    del self._locks[key]
