"""The Vapi REST client: list and get calls, resolve artifacts to signed URLs."""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import urljoin

import httpx

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
from .retry import RETRY_STATUS, Attempts, RetryPolicy, parse_retry_after
from .tls import untrusted
from .urlbook import Resolution, UrlBook

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

# A connection that cannot even be opened (refused, no route, connect timeout) means the API
# is down or we are offline, not busy: a few quick tries, then an honest error. Once known
# down, a request tries once, so that offline reads fail at once and the first request after
# the network returns succeeds.
_CONNECT_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout)
_CONNECT_ATTEMPTS = 3
# With a governor, a 429 slows every request down and is tried again without using up an
# attempt, this many times at most: a reader waits (within its read timeout), never fails.
_MAX_THROTTLED = 30


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
        book: UrlBook | None = None,
    ) -> None:
        self._client = client
        self.governor = governor  # paces every request, retries included
        self._base = base_url.rstrip("/")
        self._auth = {"Authorization": f"Bearer {api_key}"}
        self._policy = policy or RetryPolicy()
        REDACTOR.add_secret(api_key)
        # Is shown every call object as the API sent it (presigned URLs included), before any
        # caller strips them: the resolver finds those URLs there and saves round trips.
        self._book = book
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

    async def _request(
        self, what: str, path: str, params: dict[str, str] | None = None, *, stream: bool = False
    ) -> httpx.Response:
        """One GET with retries: a response under 400 (its body read unless `stream`, then
        the caller closes it), or the error that the last answer amounts to."""
        url = self._base + path
        was_down = self.unreachable
        attempts = Attempts(self._policy, f"GET {path}")
        throttled = 0
        while True:
            await self._pace()
            try:
                self.requests += 1
                self.attempts[what] += 1
                request = self._client.build_request("GET", url, params=params, headers=self._auth)
                response = await self._client.send(request, follow_redirects=False, stream=stream)
            except httpx.TransportError as exc:
                self.failures += 1
                if reason := untrusted(exc, url, "the API at"):
                    raise CertificateError(reason) from None
                if self._stop_retrying(exc, attempts.failures, was_down):
                    raise attempts.stop(type(exc).__name__) from None
                await attempts.failed(type(exc).__name__)
                continue
            self.unreachable = False
            status = response.status_code
            if status < 400:
                return response
            try:
                await response.aread()
            finally:
                await response.aclose()
            self.failures += 1
            if status == 401:
                raise KeyRejected(f"the API key was refused: {_error_message(response)}")
            if status == 404:
                raise NotFound(_error_message(response))
            if status not in RETRY_STATUS:
                raise ProtocolError(f"GET {path}: HTTP {status}: {_error_message(response)}")
            retry_after = parse_retry_after(response.headers.get("retry-after"))
            if status == 429 and self._slow_down(retry_after, throttled):
                throttled += 1
                attempts.again()
                continue
            await attempts.failed(f"HTTP {status}", retry_after)

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
        attempts = Attempts(self._policy, f"GET {path}")
        while True:
            response = await self._request("list" if path == "/call" else "get", path, params)
            try:
                return response.json()
            except (ValueError, UnicodeDecodeError):
                try:
                    await attempts.failed("malformed JSON")
                except NetworkError:
                    raise ProtocolError(f"GET {path}: the API answered malformed JSON") from None

    async def check_key(self) -> None:
        """One cheap request that proves the key works (raises KeyRejected on 401)."""
        await self._json("/call", {"limit": "1"})

    async def list_calls(self, **filters: str) -> list[dict[str, Any]]:
        """`GET /call` with filters (limit, createdAtGe, createdAtLe, ...); odd items dropped."""
        body = await self._json("/call", filters)
        if not isinstance(body, list):
            raise ProtocolError("GET /call: expected a JSON array")
        calls = [item for item in body if isinstance(item, dict)]
        if self._book is not None:
            self._book.offer_calls(calls)
        return calls

    async def get_call(self, call_id: str) -> dict[str, Any]:
        """`GET /call/{id}`; NotFound when the call does not exist."""
        body = await self._json(f"/call/{call_id}")
        if not isinstance(body, dict):
            raise ProtocolError(f"GET /call/{call_id}: expected a JSON object")
        if self._book is not None:
            self._book.offer_calls([body])
        return body

    async def resolve(self, call_id: str, kind: str) -> Resolution:
        """Ask where an artifact lives: a 302 gives a signed URL, a 200 serves it directly."""
        path = f"/call/{call_id}/{ENDPOINTS[kind]}"
        try:
            # Streamed: a body served directly is fetched later, by range, not here.
            response = await self._request("resolve", path, stream=True)
        except NotFound as exc:
            raise NotFound(f"{call_id}/{kind}: {exc}") from None
        try:
            status = response.status_code
            if status in (301, 302, 303, 307, 308):
                location = response.headers.get("location")
                if not location:
                    raise ProtocolError(f"{path}: redirect without a Location")
                return Resolution(urljoin(self._base + path, location))
            if 200 <= status < 300:
                # The body itself: fetch it from the API by range, with the key.
                return Resolution(self._base + path, dict(self._auth), direct=True)
            self.failures += 1
            raise ProtocolError(f"GET {path}: unexpected HTTP {status}")
        finally:
            await response.aclose()


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
