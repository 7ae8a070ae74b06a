"""One version of an artifact on the server (size and validators) and its short token."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Version:
    """One version of an artifact on the server: its size plus whatever validators it sent."""

    size: int
    etag: str | None = None
    last_modified: str | None = None

    def token(self) -> str:
        # Asked for on every read: computed once per Version (frozen, so it cannot go stale).
        cached: str | None = self.__dict__.get("_token")
        if cached is None:
            raw = json.dumps([self.size, self.etag, self.last_modified], separators=(",", ":"))
            cached = hashlib.sha256(raw.encode()).hexdigest()[:16]
            object.__setattr__(self, "_token", cached)
        return cached

    def to_json(self) -> dict[str, Any]:
        return {"size": self.size, "etag": self.etag, "last_modified": self.last_modified}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Version:
        size = d.get("size")
        etag = d.get("etag")
        last_modified = d.get("last_modified")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError("version size must be a non-negative integer")
        if etag is not None and not isinstance(etag, str):
            raise ValueError("version etag must be a string or null")
        if last_modified is not None and not isinstance(last_modified, str):
            raise ValueError("version last_modified must be a string or null")
        return cls(size=size, etag=etag, last_modified=last_modified)
