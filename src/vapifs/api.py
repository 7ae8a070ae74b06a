"""The Vapi REST client: list and get calls, resolve artifacts to signed URLs."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin

import httpx
import trio

from .errors import (
    CertificateError,
    KeyRejected,
    NetworkError,
    NotFound,
    ProtocolError,
    VapifsError,
)
from .rate import Governor
from .redact import REDACTOR, redact_url
from .retry import RetryPolicy, parse_retry_after
from .tls import untrusted

log = logging.getLogger("vapifs.api")

# Artifact kind -> API endpoint under /call/{id}/.
ENDPOINTS: dict[str, str] = {
    "mono": "mono-recording",
    "stereo": "stereo-recording",
    "customer": "customer-recording",
    "assistant": "assistant-recording",
    "video": "video-recording",
    "logs": "call-logs",
    "pcap": "pcap",
}

_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}
# A connection that cannot even be opened (refused, no route, connect timeout) means the API
# is down or we are offline, not busy: a few quick tries, then an honest error. Once known
# down, a request tries once, so that offline reads fail at once and the first request after
# the network returns succeeds.
_CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)
_CONNECT_ATTEMPTS = 3
# With a governor, a 429 slows every request down and is tried again without using up an
# attempt, this many times at most: a reader waits (within its read timeout), never fails.
_MAX_THROTTLED = 30


@dataclass(frozen=True)
class Resolution:
    """Where an artifact's bytes can be fetched right now.

    `url` is a signed storage URL (a bearer secret: memory only), or the API endpoint itself
    when the API served the body directly, in which case `headers` carries the key.
    """

    url: str = field(repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)
    direct: bool = False


def _error_message(response: httpx.Response) -> str:
    """The `message` of a Vapi JSON error body, made safe to print."""
    try:
        body = json.loads(response.content[:4096])
    except (ValueError, UnicodeDecodeError):
        return f"HTTP {response.status_code}"
    message: Any = body.get("message") if isinstance(body, dict) else None
    if isinstance(message, list):
        message = "; ".join(str(m) for m in message)
    text = str(message) if message else f"HTTP {response.status_code}"
    return REDACTOR(text[:300])


class VapiClient:
    """Talks to the Vapi API through an injected `httpx.AsyncClient` (never following redirects)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        api_key: str,
        *,
        policy: RetryPolicy | None = None,
        governor: Governor | None = None,
    ) -> None:
        self._client = client
        self.governor = governor  # paces every request, retries included
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._policy = policy or RetryPolicy()
        REDACTOR.add_secret(api_key)
        # Sees every call object as the API sent it (presigned URLs included), before any
        # caller strips them: the resolver keeps those URLs in memory and saves round trips.
        self.on_calls: Callable[[list[dict[str, Any]]], None] | None = None
        self.requests = 0
        # Every HTTP attempt, retries included, by kind: list (GET /call), get, resolve.
        self.attempts: dict[str, int] = dict.fromkeys(("list", "get", "resolve"), 0)
        self.failures = 0  # attempts that ended in a transport error or an error status
        self.throttled = 0  # attempts the API refused with 429
        self.unreachable = False  # the last attempt could not connect

    def _stop_retrying(self, exc: httpx.TransportError, attempt: int, was_down: bool) -> bool:
        if not isinstance(exc, _CONNECT_FAILURES):
            return False
        self.unreachable = True
        return was_down or attempt + 1 >= _CONNECT_ATTEMPTS

    async def _send(
        self, method: str, path: str, params: dict[str, str] | None = None
    ) -> httpx.Response:
        """One API request with retries; returns a 2xx/3xx response (body read) or raises."""
        url = self._base + path
        last: str = "no attempt"
        was_down = self.unreachable
        tries = 0
        attempt = 0
        throttled = 0
        while attempt < self._policy.attempts:
            retry_after: float | None = None
            tries += 1
            await self._pace()
            try:
                self.requests += 1
                self.attempts["list" if path.rstrip("/") == "/call" else "get"] += 1
                request = self._client.build_request(method, url, params=params, headers=self._auth)
                response = await self._client.send(request, follow_redirects=False)
            except httpx.TransportError as exc:
                self.failures += 1
                if reason := untrusted(exc, url, "the API at"):
                    raise CertificateError(reason) from None
                last = f"{type(exc).__name__}"
                if self._stop_retrying(exc, attempt, was_down):
                    break
            else:
                self.unreachable = False
                status = response.status_code
                if status < 400:
                    return response
                self.failures += 1
                if status == 401:
                    raise KeyRejected(f"the API key was refused: {_error_message(response)}")
                if status == 404:
                    raise NotFound(_error_message(response))
                if status not in _RETRY_STATUS:
                    raise ProtocolError(
                        f"{method} {path}: HTTP {status}: {_error_message(response)}"
                    )
                last = f"HTTP {status}"
                retry_after = parse_retry_after(response.headers.get("retry-after"))
                if status == 429 and self._slow_down(retry_after, throttled):
                    throttled += 1
                    continue
            attempt += 1
            if attempt < self._policy.attempts:
                delay = self._policy.delay(attempt - 1, retry_after)
                log.debug("api: %s %s failed (%s); retrying in %.2fs", method, path, last, delay)
                await trio.sleep(delay)
        raise NetworkError(f"{method} {path}: gave up after {_tries(tries)} ({last})")

    async def _pace(self) -> None:
        if self.governor is not None:
            await self.governor.acquire()

    def _slow_down(self, retry_after: float | None, throttled: int) -> bool:
        """A 429: tell the governor; True when it is to be tried again at once (it waits)."""
        self.throttled += 1
        if self.governor is None or throttled >= _MAX_THROTTLED:
            return False
        self.governor.refused(retry_after)
        return True

    async def _json(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET a JSON document; malformed JSON is retried like a server error."""
        for attempt in range(self._policy.attempts):
            response = await self._send("GET", path, params)
            try:
                return response.json()
            except (ValueError, UnicodeDecodeError):
                if attempt + 1 == self._policy.attempts:
                    break
                await trio.sleep(self._policy.delay(attempt))
        raise ProtocolError(f"GET {path}: the API answered malformed JSON")

    async def check_key(self) -> None:
        """One cheap request that proves the key works (raises KeyRejected on 401)."""
        await self._json("/call", {"limit": "1"})

    async def list_calls(self, **filters: str) -> list[dict[str, Any]]:
        """`GET /call` with filters (limit, createdAtGe, createdAtLe, ...); odd items dropped."""
        body = await self._json("/call", filters)
        if not isinstance(body, list):
            raise ProtocolError("GET /call: expected a JSON array")
        calls = [item for item in body if isinstance(item, dict)]
        if self.on_calls is not None:
            self.on_calls(calls)
        return calls

    async def get_call(self, call_id: str) -> dict[str, Any]:
        """`GET /call/{id}`; NotFound when the call does not exist."""
        body = await self._json(f"/call/{call_id}")
        if not isinstance(body, dict):
            raise ProtocolError(f"GET /call/{call_id}: expected a JSON object")
        if self.on_calls is not None:
            self.on_calls([body])
        return body

    async def resolve(self, call_id: str, kind: str) -> Resolution:
        """Ask where an artifact lives: a 302 gives a signed URL, a 200 serves it directly."""
        path = f"/call/{call_id}/{ENDPOINTS[kind]}"
        url = self._base + path
        last = "no attempt"
        was_down = self.unreachable
        tries = 0
        attempt = 0
        throttled = 0
        while attempt < self._policy.attempts:
            retry_after: float | None = None
            tries += 1
            again = False
            await self._pace()
            try:
                self.requests += 1
                self.attempts["resolve"] += 1
                request = self._client.build_request("GET", url, headers=self._auth)
                response = await self._client.send(request, follow_redirects=False, stream=True)
            except httpx.TransportError as exc:
                self.failures += 1
                if reason := untrusted(exc, url, "the API at"):
                    raise CertificateError(reason) from None
                last = type(exc).__name__
                if self._stop_retrying(exc, attempt, was_down):
                    break
            else:
                self.unreachable = False
                try:
                    status = response.status_code
                    if status in (301, 302, 303, 307, 308):
                        location = response.headers.get("location")
                        if not location:
                            raise ProtocolError(f"{path}: redirect without a Location")
                        return Resolution(urljoin(url, location))
                    if 200 <= status < 300:
                        # The body itself: fetch it from the API by range, with the key.
                        return Resolution(url, dict(self._auth), direct=True)
                    self.failures += 1
                    await response.aread()
                    if status == 401:
                        raise KeyRejected(f"the API key was refused: {_error_message(response)}")
                    if status == 404:
                        raise NotFound(f"{call_id}/{kind}: {_error_message(response)}")
                    if status not in _RETRY_STATUS:
                        raise ProtocolError(f"{path}: HTTP {status}: {_error_message(response)}")
                    last = f"HTTP {status}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    again = status == 429 and self._slow_down(retry_after, throttled)
                finally:
                    await response.aclose()
            if again:
                throttled += 1
                continue
            attempt += 1
            if attempt < self._policy.attempts:
                await trio.sleep(self._policy.delay(attempt - 1, retry_after))
        raise NetworkError(f"{path}: gave up after {_tries(tries)} ({last})")


def _tries(n: int) -> str:
    return "1 try" if n == 1 else f"{n} tries"


def describe(exc: BaseException) -> str:
    """A one-line, secret-free description of an error for logs and messages."""
    if isinstance(exc, VapifsError):
        return REDACTOR(str(exc))
    if isinstance(exc, httpx.HTTPError):
        try:
            where = redact_url(str(exc.request.url))
        except RuntimeError:  # an error raised outside a request has no URL to name
            return type(exc).__name__
        return f"{type(exc).__name__} on {where}"
    return REDACTOR(f"{type(exc).__name__}: {exc}")
