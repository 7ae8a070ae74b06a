"""The fake's signed storage URLs: SigV4-shaped queries with an HMAC the storage checks."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from urllib.parse import quote, urlencode

from vapifs.demo.data import FakeCall


def object_path(fc: FakeCall, kind: str) -> str:
    """Where an artifact lives on the fake storage host."""
    return f"/{fc.call['orgId']}/{fc.id}/{kind}{fc.suffixes[kind]}"


class Signer:
    """Signs storage paths with a secret of its own, and tells a good signature from a bad
    or an expired one."""

    def __init__(self, secret: bytes) -> None:
        self.secret = secret

    def _signature(self, path: str, date: str, expires: str, expires_at: str) -> str:
        msg = f"{path}\n{date}\n{expires}\n{expires_at}".encode()
        return hmac.new(self.secret, msg, hashlib.sha256).hexdigest()

    def query(self, path: str, now: float, ttl: float) -> str:
        """The query that makes `path` readable for `ttl` seconds from `now`."""
        date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
        expires = str(max(1, math.ceil(ttl)))
        # X-Amz-Date has one-second resolution; a precise expiry keeps short TTLs exact.
        expires_at = str(int((now + ttl) * 1000))
        return urlencode(
            [
                ("X-Amz-Algorithm", "AWS4-HMAC-SHA256"),
                ("X-Amz-Credential", f"fake/{date[:8]}/auto/s3/aws4_request"),
                ("X-Amz-Date", date),
                ("X-Amz-Expires", expires),
                ("X-Amz-SignedHeaders", "host"),
                ("X-Fake-Expires-At", expires_at),
                ("X-Amz-Signature", self._signature(path, date, expires, expires_at)),
            ],
            quote_via=quote,
        )

    def verify(self, path: str, query: dict[str, str]) -> str:
        """ "ok", "bad" (missing or wrong signature) or "expired"."""
        try:
            date, expires = query["X-Amz-Date"], query["X-Amz-Expires"]
            expires_at, signature = query["X-Fake-Expires-At"], query["X-Amz-Signature"]
        except KeyError:
            return "bad"
        good = self._signature(path, date, expires, expires_at)
        if not hmac.compare_digest(good, signature):
            return "bad"
        try:
            deadline = int(expires_at) / 1000
        except ValueError:
            return "bad"
        return "expired" if time.time() > deadline else "ok"
