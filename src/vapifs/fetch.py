"""Ranged GETs on signed URLs, delivered block by block, with retries that resume."""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
import trio

from .defaults import DEFAULT_STORAGE_CONNECTIONS
from .errors import CertificateError, KeyRejected, NetworkError, VersionChanged
from .resolver import Resolver
from .retry import RETRY_STATUS, Attempts, RetryPolicy, parse_retry_after
from .tls import untrusted
from .urlbook import Resolution
from .version import Version

log = logging.getLogger("vapifs.fetch")

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)
# Storage answers that mean "this signed URL is no good any more: ask the API for another".
_REFUSED = {400, 401, 403, 404, 410}

Sink = Callable[[int, bytes], Awaitable[None]]  # (block index, block)
_PieceSink = Callable[[int, bytes], Awaitable[None]]  # (offset, piece)
_PieceEnd = Callable[[int, int], int]


def version_of(response: httpx.Response, size: int) -> Version:
    etag = response.headers.get("etag")
    if etag is not None and etag.startswith("W/"):
        etag = etag[2:]
    return Version(size, etag, response.headers.get("last-modified"))


class _Retry(Exception):
    """This try failed in a way worth another (after a backoff)."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class _Refused(Exception):
    """The storage host refused the signed URL: resolve again, right away."""


@dataclass
class _Progress:
    """Where a run stands; kept up to date block by block so a failed try resumes exactly."""

    pos: int  # the first byte not yet delivered (always at a piece boundary)
    end: int  # one past the last byte wanted (clipped to the size once known)
    version: Version | None  # the version every delivered piece belongs to
    piece_end: _PieceEnd  # (piece start, artifact size) -> where that piece ends


class _Pieces:
    """Received chunks, cut into pieces with at most one copy per byte (the join).

    A chunk cut between two pieces is kept as views of it, never copied in halves: with
    socket reads as large as a block, that would copy most bytes twice.
    """

    def __init__(self) -> None:
        self._chunks: list[bytes | memoryview] = []
        self.size = 0

    def add(self, chunk: bytes | memoryview) -> None:
        if chunk:
            self._chunks.append(chunk)
            self.size += len(chunk)

    def take(self, n: int) -> bytes:
        """The first `n` bytes (n <= size)."""
        out: list[bytes | memoryview] = []
        got = 0
        chunks = self._chunks
        i = 0
        while got < n:
            chunk = chunks[i]
            if got + len(chunk) <= n:
                out.append(chunk)
                got += len(chunk)
                i += 1
            else:
                cut = n - got
                view = memoryview(chunk)
                out.append(view[:cut])
                chunks[i] = view[cut:]
                got = n
        del chunks[:i]
        self.size -= n
        if len(out) == 1 and isinstance(out[0], bytes):
            return out[0]  # a whole chunk: no copy at all
        return b"".join(out)


class Fetcher:
    """Downloads runs of whole blocks of an artifact and hands each block to a sink.

    A run is requested as one ranged GET; a connection cut, a stall or a refused URL resumes
    from the first block not yet delivered, so no block is ever assembled from two responses.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        resolver: Resolver,
        *,
        block_size: int,
        policy: RetryPolicy | None = None,
        max_connections: int = DEFAULT_STORAGE_CONNECTIONS,
        max_refusals: int = 6,
    ) -> None:
        self._client = client
        self._resolver = resolver
        self.block_size = block_size
        self._policy = policy or RetryPolicy()
        self._limiter = trio.CapacityLimiter(max_connections)
        self._max_refusals = max_refusals
        self.requests = 0
        self.bytes_received = 0  # body bytes off the wire, skipped ones included
        self.failures = 0  # requests that were refused or are retried

    async def fetch(
        self,
        call_id: str,
        kind: str,
        first: int,
        count: int,
        expect: Version | None,
        sink: Sink,
    ) -> Version:
        """Fetch blocks [first, first+count) (clipped to the artifact's end); return its version.

        With `expect` None the version is learnt from the response (size discovery).
        Raises VersionChanged when the server's version differs from `expect`.
        """
        bs = self.block_size

        async def by_index(pos: int, data: bytes) -> None:
            await sink(pos // bs, data)

        def block_end(pos: int, size: int) -> int:
            return min((pos // bs + 1) * bs, size)

        state = _Progress(first * bs, (first + count) * bs, expect, block_end)
        return await self._run(call_id, kind, state, by_index)

    async def probe(self, call_id: str, kind: str) -> Version:
        """The artifact's version (size, ETag) at the cost of one byte on the wire."""

        async def drop(pos: int, data: bytes) -> None:
            pass

        def one_byte(pos: int, size: int) -> int:
            return min(1, size)

        return await self._run(call_id, kind, _Progress(0, 1, None, one_byte), drop)

    async def fetch_start(self, call_id: str, kind: str, n: int) -> tuple[Version, bytes]:
        """The artifact's version and its first `n` bytes, in one request (a header probe)."""
        parts: list[bytes] = []

        async def keep(pos: int, data: bytes) -> None:
            parts.append(data)

        def to_n(pos: int, size: int) -> int:
            return min(n, size)

        version = await self._run(call_id, kind, _Progress(0, n, None, to_n), keep)
        return version, b"".join(parts)

    async def fetch_bytes(
        self, call_id: str, kind: str, start: int, end: int, expect: Version
    ) -> bytes:
        """Exactly bytes [start, end) of `expect`, for reads that do not warrant whole blocks."""
        parts: list[bytes] = []

        async def keep(pos: int, data: bytes) -> None:
            parts.append(data)

        def to_end(pos: int, size: int) -> int:
            return min(end, size)

        await self._run(call_id, kind, _Progress(start, end, expect, to_end), keep)
        return b"".join(parts)

    async def _run(self, call_id: str, kind: str, state: _Progress, sink: _PieceSink) -> Version:
        """Fetch bytes [state.pos, state.end) piece by piece, with retries that resume."""
        # A failed try keeps what it achieved (pieces delivered, version learnt): the next
        # one resumes at the first undelivered piece and must match that version.
        if state.version is not None:
            state.end = min(state.end, state.version.size)
        attempts = Attempts(self._policy, f"{call_id}/{kind}: storage")
        refusals = 0
        while state.version is None or state.pos < state.end:
            resolution = await self._resolver.get(call_id, kind)
            start_pos = state.pos
            try:
                async with self._limiter:
                    await self._one_request(resolution, call_id, kind, state, sink)
            except _Refused as exc:
                self.failures += 1
                self._resolver.invalidate(call_id, kind, resolution)
                refusals += 1
                if refusals > self._max_refusals:
                    raise NetworkError(
                        f"{call_id}/{kind}: storage kept refusing fresh signed URLs ({exc})"
                    ) from None
                log.debug("fetch: %s/%s: %s; resolving again", call_id, kind, exc)
                continue
            except _Retry as exc:
                self.failures += 1
                if state.pos > start_pos:
                    attempts.progressed()
                await attempts.failed(str(exc), exc.retry_after)
                continue
            if state.version is not None and state.version.size == 0:
                break
        assert state.version is not None
        return state.version

    async def _one_request(
        self,
        resolution: Resolution,
        call_id: str,
        kind: str,
        state: _Progress,
        sink: _PieceSink,
    ) -> None:
        """One GET of bytes [state.pos, state.end); advances `state` piece by piece."""
        pos, end = state.pos, state.end
        headers = {"Range": f"bytes={pos}-{end - 1}", "Accept-Encoding": "identity"}
        headers.update(resolution.headers)
        self.requests += 1
        try:
            request = self._client.build_request("GET", resolution.url, headers=headers)
            response = await self._client.send(request, stream=True, follow_redirects=False)
        except httpx.TransportError as exc:
            if reason := untrusted(exc, resolution.url, "the storage host"):
                raise CertificateError(f"{call_id}/{kind}: {reason}") from None
            raise _Retry(type(exc).__name__) from None
        try:
            body = classify(
                response,
                pos,
                end,
                state.version,
                direct=resolution.direct,
                what=f"{call_id}/{kind}",
            )
            if state.version is None:
                state.version = body.version
            state.end = min(end, state.version.size)
            if pos < state.end:
                await self._stream(response, body, state, sink)
        finally:
            await response.aclose()

    async def _stream(
        self, response: httpx.Response, body: Body, state: _Progress, sink: _PieceSink
    ) -> None:
        """Hand the wanted bytes of `response`'s body to `sink`, piece by piece."""
        assert state.version is not None
        pos, size = state.pos, state.version.size
        body_end = min(body.end, state.end)
        skip = body.skip
        pending = _Pieces()
        need = state.piece_end(pos, size) - pos
        try:
            # Bytes exactly as stored: never let httpx decode them. For an identity body
            # aiter_bytes() is the same and also works on a body already read.
            chunks = response.aiter_raw() if body.encoded else response.aiter_bytes()
            async for chunk in chunks:
                self.bytes_received += len(chunk)
                if pos >= body_end:
                    break  # more than the range (never data) or the rest of a whole body
                if skip:
                    if len(chunk) <= skip:
                        skip -= len(chunk)
                        continue
                    chunk = chunk[skip:]
                    skip = 0
                # Never buffer past what the response says it carries: a body longer
                # than its Content-Range must not complete a block with foreign bytes.
                room = body_end - pos - pending.size
                pending.add(chunk if len(chunk) <= room else memoryview(chunk)[:room])
                while pending.size >= need and pos < body_end:
                    await sink(pos, pending.take(need))
                    pos += need
                    state.pos = pos
                    need = state.piece_end(pos, size) - pos
                if pos >= body_end and not body.to_the_end:
                    break
            # Otherwise the body is read to its end, which adds nothing but lets the
            # connection go back to the pool: a response closed early costs a new
            # connection (a round trip of its own) for the next request.
        except (httpx.TransportError, httpx.StreamError) as exc:
            raise _Retry(f"{type(exc).__name__} after {pos} bytes") from None
        if pos < body_end:
            raise _Retry("storage closed the body early")


@dataclass(frozen=True)
class Body:
    """What a storage response holds for a request of bytes [pos, end)."""

    version: Version  # of the artifact, as the response tells it
    end: int  # one past the last artifact byte the body carries
    skip: int = 0  # body bytes before the first one asked (a host that ignored Range)
    to_the_end: bool = False  # the body is exactly the range: read it to its end
    encoded: bool = False  # stored compressed: these bytes are taken raw, as stored


def classify(
    response: httpx.Response,
    pos: int,
    end: int,
    version: Version | None,
    *,
    direct: bool = False,
    what: str = "artifact",
) -> Body:
    """What the response to a GET of bytes [pos, end) of `what` holds, from its status and
    headers alone (nothing of its body is read).

    Raises _Refused (resolve again), _Retry (try again after a backoff), KeyRejected (a
    direct resolution's key was refused) or VersionChanged (`version` is no longer the
    server's). A body that holds nothing wanted has `end` <= `pos`.
    """
    status = response.status_code
    if status in _REFUSED:
        if direct and status == 401:
            raise KeyRejected("the API key was refused")
        raise _Refused(f"storage answered HTTP {status}")
    if status in RETRY_STATUS:
        raise _Retry(
            f"storage answered HTTP {status}",
            parse_retry_after(response.headers.get("retry-after")),
        )
    if status == 416:
        return _unsatisfied(response, pos, version, what)
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    encoded = encoding not in ("", "identity")
    if status == 206:
        body = _partial(response, pos, end, encoded, encoding)
    elif status == 200:
        if encoded:
            raise _Retry(f"storage ignored Range and sent a {encoding}-encoded body")
        # The host ignored Range: skip to the wanted offset in the whole body.
        length = response.headers.get("content-length")
        if length is None or not length.isdigit():
            raise _Retry("storage ignored Range and sent no Content-Length")
        total = int(length)
        body = Body(version_of(response, total), total, skip=pos)
    else:
        raise _Retry(f"storage answered HTTP {status}")
    if version is not None and body.version != version:
        raise VersionChanged(f"{what} changed on the server", body.version)
    return body


def _unsatisfied(response: httpx.Response, pos: int, version: Version | None, what: str) -> Body:
    """A 416: past the end of an artifact of unknown size (its `bytes */N` tells the
    version), a changed size, or a host in trouble."""
    match = _UNSATISFIED.match(response.headers.get("content-range", ""))
    if match:
        new = version_of(response, int(match.group(1)))
        if version is None and pos >= new.size:
            return Body(new, new.size)
        if version is not None and new != version:
            raise VersionChanged(f"{what} changed size", new)
    raise _Retry("storage answered HTTP 416")


def _partial(response: httpx.Response, pos: int, end: int, encoded: bool, encoding: str) -> Body:
    """A 206: its Content-Range must be exactly the bytes asked, or a prefix of them."""
    match = _CONTENT_RANGE.match(response.headers.get("content-range", ""))
    if not match or match.group(3) == "*":
        raise _Retry("storage sent a 206 without a usable Content-Range")
    r_start, r_stop, total = int(match.group(1)), int(match.group(2)), int(match.group(3))
    # A body of exactly the range ends with its last byte: reading to its end costs no wait
    # and puts the connection back in the pool.
    exact = response.headers.get("content-length") == str(r_stop - r_start + 1)
    if encoded and not exact:
        # Compressed on the way (a proxy, say): these are not the stored bytes.
        raise _Retry(f"storage sent a {encoding}-encoded body")
    # Otherwise the object is stored compressed (logs uploaded with Content-Encoding: gzip)
    # and these are exactly its bytes: take them raw.
    if r_start != pos or r_stop >= max(end, pos + 1) or r_stop >= total:
        raise _Retry(f"storage sent bytes {r_start}-{r_stop}, not the {pos}-{end - 1} asked")
    return Body(version_of(response, total), r_stop + 1, to_the_end=exact, encoded=encoded)
