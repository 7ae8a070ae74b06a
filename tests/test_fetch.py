"""fetch.Fetcher against an in-memory storage host: ranges, resumes, refusals, versions."""

from __future__ import annotations

import gzip
import random
import re
from collections.abc import AsyncIterator, Callable

import httpcore
import httpx
import pytest
import trio

from vapifs.api import VapiClient
from vapifs.core import SOCKET_READ, http_client, larger_socket_reads
from vapifs.errors import KeyRejected, NetworkError, VersionChanged
from vapifs.fetch import Fetcher, _Pieces
from vapifs.resolver import Resolver
from vapifs.retry import RetryPolicy
from vapifs.urlbook import UrlBook
from vapifs.version import Version

API = "http://api.test"
STORAGE = "https://storage.test/rec.wav"
KEY = "sk-fetch-test-7f3a91c2"
BS = 16
BODY = bytes((i * 37 + 11) % 251 for i in range(300))  # 18 whole blocks and one of 12 bytes
ETAG = '"v1"'
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"
V1 = Version(len(BODY), ETAG, LAST_MODIFIED)
POLICY = RetryPolicy(attempts=4, base_delay=0.5, max_delay=2.0)

# A fault answers one storage request instead of the normal handler; None means "serve".
Fault = Callable[[httpx.Request], httpx.Response] | None


def block(index: int, body: bytes = BODY) -> bytes:
    return body[index * BS : (index + 1) * BS]


class CutStream(httpx.AsyncByteStream):
    """A body that yields `data` in small chunks, then fails like a dropped connection."""

    def __init__(self, data: bytes, exc: type[httpx.TransportError], chunk: int = 10) -> None:
        self._data = data
        self._exc = exc
        self._chunk = chunk

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self._data), self._chunk):
            yield self._data[i : i + self._chunk]
        raise self._exc("connection dropped mid-body")


class Storage:
    """A signed-URL storage host with Range/Content-Range/ETag, plus the API that points at it."""

    def __init__(self, body: bytes = BODY, etag: str = ETAG) -> None:
        self.body = body
        self.etag = etag
        self.faults: list[Fault] = []
        self.requests: list[httpx.Request] = []
        self.resolutions = 0
        self.direct = False

    def headers(self) -> dict[str, str]:
        return {"ETag": self.etag, "Last-Modified": LAST_MODIFIED, "Accept-Ranges": "bytes"}

    def serve(self, request: httpx.Request) -> httpx.Response:
        size = len(self.body)
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", request.headers.get("range", ""))
        if match is None:
            return httpx.Response(200, headers=self.headers(), content=self.body)
        start, stop = int(match.group(1)), int(match.group(2))
        if start >= size:
            headers = {**self.headers(), "Content-Range": f"bytes */{size}"}
            return httpx.Response(416, headers=headers)
        stop = min(stop, size - 1)
        headers = {**self.headers(), "Content-Range": f"bytes {start}-{stop}/{size}"}
        return httpx.Response(206, headers=headers, content=self.body[start : stop + 1])

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.host == "api.test":
            assert request.headers["authorization"] == f"Bearer {KEY}"
            self.resolutions += 1
            if self.direct:
                if request.headers.get("range"):
                    self.requests.append(request)
                    return self.next(request)
                return httpx.Response(200, headers={"Content-Type": "audio/wav"}, content=b"RIFF")
            url = f"{STORAGE}?X-Amz-Signature=sig{self.resolutions}"
            return httpx.Response(302, headers={"Location": url})
        assert request.url.host == "storage.test"
        assert "authorization" not in request.headers
        self.requests.append(request)
        return self.next(request)

    def next(self, request: httpx.Request) -> httpx.Response:
        if self.faults:
            fault = self.faults.pop(0)
            if fault is not None:
                return fault(request)
        return self.serve(request)

    @property
    def ranges(self) -> list[str | None]:
        return [r.headers.get("range") for r in self.requests]


class Sink:
    """Collects delivered blocks and fails the test if one is delivered twice."""

    def __init__(self) -> None:
        self.blocks: list[tuple[int, bytes]] = []

    async def __call__(self, index: int, data: bytes) -> None:
        assert index not in self.indexes, f"block {index} delivered twice"
        self.blocks.append((index, data))

    @property
    def indexes(self) -> list[int]:
        return [i for i, _ in self.blocks]


def expect_blocks(sink: Sink, indexes: range, body: bytes = BODY) -> None:
    assert sink.indexes == list(indexes)
    for index, data in sink.blocks:
        assert data == block(index, body), f"block {index} has the wrong bytes"


class Rig:
    def __init__(self, storage: Storage, client: httpx.AsyncClient, **kwargs: int) -> None:
        self.storage = storage
        self.api = VapiClient(client, API, KEY, policy=POLICY)
        self.resolver = Resolver(self.api, UrlBook(max_age=600))
        self.fetcher = Fetcher(client, self.resolver, block_size=BS, policy=POLICY, **kwargs)
        self.sink = Sink()

    async def fetch(self, first: int, count: int, expect: Version | None = None) -> Version:
        return await self.fetcher.fetch("call-1", "mono", first, count, expect, self.sink)


async def make_rig(storage: Storage, **kwargs: int) -> AsyncIterator[Rig]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(storage)) as client:
        yield Rig(storage, client, **kwargs)


@pytest.fixture
def storage() -> Storage:
    return Storage()


@pytest.fixture
async def rig(storage: Storage) -> AsyncIterator[Rig]:
    async for r in make_rig(storage):
        yield r


# --- the normal path ------------------------------------------------------------------------


async def test_blocks_in_order_with_exact_bytes_and_version(rig: Rig, storage: Storage) -> None:
    version = await rig.fetch(2, 5)
    assert version == V1
    expect_blocks(rig.sink, range(2, 7))
    assert storage.ranges == ["bytes=32-111"]
    assert storage.requests[0].headers["accept-encoding"] == "identity"
    assert storage.requests[0].url.params["X-Amz-Signature"] == "sig1"
    assert storage.resolutions == 1
    assert rig.fetcher.requests == 1
    assert rig.fetcher.bytes_received == 80


async def test_known_version_is_returned_and_range_clipped_to_size(
    rig: Rig, storage: Storage
) -> None:
    version = await rig.fetch(17, 5, V1)
    assert version is V1
    expect_blocks(rig.sink, range(17, 19))
    assert rig.sink.blocks[-1][1] == BODY[288:]
    assert len(rig.sink.blocks[-1][1]) == 12
    assert storage.ranges == ["bytes=272-299"]


async def test_unknown_version_learnt_and_last_short_block(rig: Rig, storage: Storage) -> None:
    version = await rig.fetch(17, 5)
    assert version == V1
    expect_blocks(rig.sink, range(17, 19))
    assert len(rig.sink.blocks[-1][1]) == 12
    assert storage.ranges == ["bytes=272-351"]


async def test_whole_artifact_reassembles_exactly(rig: Rig) -> None:
    assert await rig.fetch(0, 100) == V1
    expect_blocks(rig.sink, range(19))
    assert b"".join(data for _, data in rig.sink.blocks) == BODY


async def test_weak_etag_is_normalised(storage: Storage) -> None:
    storage.etag = 'W/"v1"'
    async for rig in make_rig(storage):
        assert await rig.fetch(0, 1) == V1


async def test_reads_past_the_end_deliver_nothing(rig: Rig, storage: Storage) -> None:
    # Known size: no request at all.
    assert await rig.fetch(19, 3, V1) is V1
    assert storage.requests == []
    # Unknown size: the 416's `bytes */N` tells the version.
    assert await rig.fetch(30, 2) == V1
    assert rig.sink.blocks == []
    assert storage.ranges == ["bytes=480-511"]


@pytest.mark.parametrize("answer", [416, 200])
async def test_zero_length_artifact(answer: int) -> None:
    storage = Storage(body=b"")

    def whole(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Length": "0"}
        return httpx.Response(200, headers=headers, content=b"")

    # 416 `bytes */0` is what the storage host answers; some hosts ignore Range and send 200.
    storage.faults = [whole] if answer == 200 else []
    async for rig in make_rig(storage):
        assert await rig.fetch(0, 1) == Version(0, ETAG, LAST_MODIFIED)
        assert rig.sink.blocks == []
        assert len(storage.requests) == 1
        # Once the size is known to be zero, nothing is requested.
        assert await rig.fetch(0, 1, Version(0, ETAG, LAST_MODIFIED)) == Version(
            0, ETAG, LAST_MODIFIED
        )
        assert len(storage.requests) == 1


async def test_probe_asks_for_one_byte_and_learns_the_version(rig: Rig, storage: Storage) -> None:
    assert await rig.fetcher.probe("call-1", "mono") == V1
    assert storage.ranges == ["bytes=0-0"]
    assert rig.fetcher.bytes_received == 1


async def test_probe_of_an_empty_artifact() -> None:
    storage = Storage(body=b"")
    async for rig in make_rig(storage):
        assert await rig.fetcher.probe("call-1", "mono") == Version(0, ETAG, LAST_MODIFIED)
        assert storage.ranges == ["bytes=0-0"]


async def test_range_ignored_skips_to_the_offset(rig: Rig, storage: Storage) -> None:
    def whole(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers=storage.headers(), content=BODY)

    storage.faults = [whole]
    assert await rig.fetch(3, 2) == V1
    expect_blocks(rig.sink, range(3, 5))
    assert len(storage.requests) == 1


async def test_range_ignored_in_small_chunks_at_the_end(rig: Rig, storage: Storage) -> None:
    def whole(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Length": str(len(BODY))}
        return httpx.Response(200, headers=headers, stream=CutStream(BODY, httpx.ReadError, 7))

    # The stream ends in an error only after the whole body: every block is there first.
    storage.faults = [whole]
    assert await rig.fetch(15, 10, V1) is V1
    expect_blocks(rig.sink, range(15, 19))
    assert len(storage.requests) == 1


async def test_concurrent_fetches_resolve_once(rig: Rig, storage: Storage) -> None:
    sinks = [Sink() for _ in range(6)]

    async def one(i: int) -> None:
        await rig.fetcher.fetch("call-1", "mono", i * 3, 3, V1, sinks[i])

    async with trio.open_nursery() as nursery:
        for i in range(6):
            nursery.start_soon(one, i)
    for i, sink in enumerate(sinks):
        expect_blocks(sink, range(i * 3, min(i * 3 + 3, 19)))
    assert storage.resolutions == 1
    assert len(storage.requests) == 6


# --- refused signed URLs --------------------------------------------------------------------


def refuse(status: int) -> Fault:
    def answer(request: httpx.Request) -> httpx.Response:
        body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code></Error>"
        return httpx.Response(status, content=body, headers={"Content-Type": "application/xml"})

    return answer


@pytest.mark.parametrize("status", [400, 401, 403, 410])
async def test_refused_url_is_resolved_again(rig: Rig, storage: Storage, status: int) -> None:
    storage.faults = [refuse(status)]
    assert await rig.fetch(0, 3) == V1
    expect_blocks(rig.sink, range(3))
    assert storage.resolutions == 2
    assert rig.resolver.resolutions == 2
    sigs = [r.url.params["X-Amz-Signature"] for r in storage.requests]
    assert sigs == ["sig1", "sig2"]
    assert storage.ranges == ["bytes=0-47", "bytes=0-47"]


async def test_refused_url_mid_run_resumes_with_a_fresh_url(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Range": "bytes 0-79/300"}
        return httpx.Response(206, headers=headers, stream=CutStream(BODY[:40], httpx.ReadError))

    storage.faults = [cut, refuse(403)]
    assert await rig.fetch(0, 5) == V1
    expect_blocks(rig.sink, range(5))
    assert storage.ranges == ["bytes=0-79", "bytes=32-79", "bytes=32-79"]
    assert storage.resolutions == 2


async def test_persistently_refused_url_gives_up(rig: Rig, storage: Storage) -> None:
    storage.faults = [refuse(403)] * 50
    with pytest.raises(NetworkError, match="refusing"):
        await rig.fetch(0, 2)
    # max_refusals (6) fresh URLs after the first: 7 requests, each with its own resolution.
    assert len(storage.requests) == 7
    assert storage.resolutions == 7
    assert rig.sink.blocks == []


# --- cut bodies, stalls and server errors ---------------------------------------------------


@pytest.mark.parametrize("exc", [httpx.ReadError, httpx.RemoteProtocolError])
async def test_cut_body_resumes_from_first_undelivered_block(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage, exc: type[httpx.TransportError]
) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        # 40 of the 80 bytes asked: blocks 2 and 3 whole, then 8 bytes of block 4, then a cut.
        headers = {**storage.headers(), "Content-Range": "bytes 32-111/300"}
        return httpx.Response(206, headers=headers, stream=CutStream(BODY[32:72], exc))

    storage.faults = [cut]
    assert await rig.fetch(2, 5) == V1
    expect_blocks(rig.sink, range(2, 7))
    assert storage.ranges == ["bytes=32-111", "bytes=64-111"]
    assert storage.resolutions == 1


async def test_cut_with_unknown_version_keeps_the_learnt_version(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Range": "bytes 0-79/300"}
        return httpx.Response(206, headers=headers, stream=CutStream(BODY[:20], httpx.ReadError))

    def changed(request: httpx.Request) -> httpx.Response:
        response = storage.serve(request)
        response.headers["ETag"] = '"v2"'
        return response

    # After a block of version v1 was delivered, a resumed request must not mix in v2 blocks.
    storage.faults = [cut, changed]
    with pytest.raises(VersionChanged) as info:
        await rig.fetch(0, 5)
    assert info.value.new_version == Version(300, '"v2"', LAST_MODIFIED)
    expect_blocks(rig.sink, range(1))
    assert storage.ranges == ["bytes=0-79", "bytes=16-79"]


async def test_progress_resets_the_retry_budget(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        # Each answer carries exactly one whole block, then the connection drops.
        response = storage.serve(request)
        start = int(request.headers["range"].split("=")[1].split("-")[0])
        stream = CutStream(BODY[start : start + BS], httpx.ReadError)
        return httpx.Response(206, headers=response.headers, stream=stream)

    storage.faults = [cut] * 8  # twice the policy's attempts, but every try makes progress
    assert await rig.fetch(0, 8, V1) is V1
    expect_blocks(rig.sink, range(8))
    assert len(storage.requests) == 8


async def test_short_but_honest_range_is_completed(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def short(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Range": "bytes 32-55/300"}
        return httpx.Response(206, headers=headers, content=BODY[32:56])

    storage.faults = [short]
    assert await rig.fetch(2, 3, V1) is V1
    expect_blocks(rig.sink, range(2, 5))
    assert storage.ranges == ["bytes=32-79", "bytes=48-79"]


async def test_body_longer_than_its_content_range_never_fills_a_block(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def overlong(request: httpx.Request) -> httpx.Response:
        # Says bytes 32-39, sends 32 bytes: the 24 extra ones must not complete block 2.
        headers = {**storage.headers(), "Content-Range": "bytes 32-39/300"}
        return httpx.Response(206, headers=headers, content=BODY[32:40] + b"\0" * 24)

    storage.faults = [overlong]
    assert await rig.fetch(2, 2, V1) is V1
    expect_blocks(rig.sink, range(2, 4))


async def test_stall_is_retried(autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage) -> None:
    def stall(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("stalled", request=request)

    storage.faults = [stall, stall]
    assert await rig.fetch(0, 2, V1) is V1
    expect_blocks(rig.sink, range(2))
    assert len(storage.requests) == 3
    assert storage.resolutions == 1


async def test_persistent_server_error_gives_up(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    storage.faults = [lambda r: httpx.Response(500)] * 50
    started = trio.current_time()
    with pytest.raises(NetworkError, match="gave up after 4 tries"):
        await rig.fetch(0, 2, V1)
    assert len(storage.requests) == POLICY.attempts
    assert rig.sink.blocks == []
    # Three backoffs, each at most base * 2**n capped at max_delay: 0.5 + 1 + 2.
    assert trio.current_time() - started <= 3.5


async def test_server_error_burst_then_success(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    storage.faults = [lambda r: httpx.Response(503)] * 3
    assert await rig.fetch(0, 2, V1) is V1
    expect_blocks(rig.sink, range(2))
    assert len(storage.requests) == 4


async def test_storage_retry_after_is_honoured(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    storage.faults = [lambda r: httpx.Response(429, headers={"Retry-After": "3"})]
    started = trio.current_time()
    assert await rig.fetch(0, 1, V1) is V1
    assert trio.current_time() - started == pytest.approx(3.0)
    expect_blocks(rig.sink, range(1))


# --- answers that must never be delivered as data -------------------------------------------


async def test_shifted_content_range_is_never_delivered(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def shifted(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Range": "bytes 48-127/300"}
        return httpx.Response(206, headers=headers, content=BODY[48:128])

    storage.faults = [shifted]
    assert await rig.fetch(2, 5, V1) is V1
    expect_blocks(rig.sink, range(2, 7))
    assert storage.ranges == ["bytes=32-111", "bytes=32-111"]


async def test_persistently_wrong_content_range_gives_up(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def shifted(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Range": "bytes 48-127/300"}
        return httpx.Response(206, headers=headers, content=BODY[48:128])

    storage.faults = [shifted] * 50
    with pytest.raises(NetworkError):
        await rig.fetch(2, 5, V1)
    assert rig.sink.blocks == []
    assert len(storage.requests) == POLICY.attempts


@pytest.mark.parametrize(
    "content_range", [None, "bytes 32-111/*", "bytes 32-400/300", "bytes 31-110/300", "junk"]
)
async def test_unusable_content_range_is_never_delivered(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage, content_range: str | None
) -> None:
    def bad(request: httpx.Request) -> httpx.Response:
        headers = storage.headers()
        if content_range is not None:
            headers["Content-Range"] = content_range
        return httpx.Response(206, headers=headers, content=bytes(80))

    storage.faults = [bad]
    assert await rig.fetch(2, 5, V1) is V1
    expect_blocks(rig.sink, range(2, 7))
    assert len(storage.requests) == 2


async def test_gzip_encoded_range_is_never_delivered(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    # A proxy compressing on the way: right Content-Range, but the body is not those bytes.
    packed = gzip.compress(BODY[: 2 * BS])

    def encoded(request: httpx.Request) -> httpx.Response:
        headers = {
            **storage.headers(),
            "Content-Encoding": "gzip",
            "Content-Range": f"bytes 0-{2 * BS - 1}/{len(BODY)}",
        }
        return httpx.Response(206, headers=headers, content=packed)

    storage.faults = [encoded] * 50
    with pytest.raises(NetworkError, match="gzip"):
        await rig.fetch(0, 2)
    assert rig.sink.blocks == []
    assert len(storage.requests) == POLICY.attempts
    # A transient encoded answer, then a plain one: only the plain bytes are delivered.
    storage.faults = [encoded]
    assert await rig.fetch(0, 2) == V1
    expect_blocks(rig.sink, range(2))


async def test_an_object_stored_gzipped_is_served_as_stored(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    # Logs uploaded with Content-Encoding: gzip: the host labels the stored bytes so, and
    # Content-Length equals the range: they are the artifact's bytes, never to be decoded.
    def labelled(request: httpx.Request) -> httpx.Response:
        headers = {
            **storage.headers(),
            "Content-Encoding": "gzip",
            "Content-Range": f"bytes 0-{2 * BS - 1}/{len(BODY)}",
        }
        # Content-Length is the stored length; `stream=` keeps httpx from decoding it here.
        headers["Content-Length"] = str(2 * BS)
        return httpx.Response(206, headers=headers, stream=httpx.ByteStream(BODY[: 2 * BS]))

    storage.faults = [labelled]
    assert await rig.fetch(0, 2) == V1
    expect_blocks(rig.sink, range(2))
    assert len(storage.requests) == 1


async def test_ignored_range_without_length_is_never_delivered(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def unknown_length(request: httpx.Request) -> httpx.Response:
        stream = CutStream(BODY, httpx.ReadError, 50)
        return httpx.Response(200, headers=storage.headers(), stream=stream)

    storage.faults = [unknown_length]
    assert await rig.fetch(0, 2, V1) is V1
    expect_blocks(rig.sink, range(2))
    assert len(storage.requests) == 2


# --- version changes ------------------------------------------------------------------------


async def test_new_etag_raises_version_changed(rig: Rig, storage: Storage) -> None:
    storage.etag = '"v2"'
    with pytest.raises(VersionChanged) as info:
        await rig.fetch(0, 3, V1)
    assert info.value.new_version == Version(300, '"v2"', LAST_MODIFIED)
    assert rig.sink.blocks == []
    assert len(storage.requests) == 1


async def test_new_size_raises_version_changed(rig: Rig, storage: Storage) -> None:
    storage.body = BODY + b"more"
    with pytest.raises(VersionChanged) as info:
        await rig.fetch(0, 3, V1)
    assert info.value.new_version == Version(304, ETAG, LAST_MODIFIED)
    assert rig.sink.blocks == []


async def test_unsatisfiable_range_after_shrinking_raises_version_changed(
    rig: Rig, storage: Storage
) -> None:
    storage.body = BODY[:200]
    with pytest.raises(VersionChanged) as info:
        await rig.fetch(15, 2, V1)
    assert info.value.new_version == Version(200, ETAG, LAST_MODIFIED)
    assert storage.ranges == ["bytes=240-271"]
    assert rig.sink.blocks == []


async def test_range_ignored_with_new_version_raises(rig: Rig, storage: Storage) -> None:
    storage.etag = '"v2"'
    storage.faults = [lambda r: httpx.Response(200, headers=storage.headers(), content=BODY)]
    with pytest.raises(VersionChanged):
        await rig.fetch(1, 2, V1)
    assert rig.sink.blocks == []


# --- the API serving the body itself --------------------------------------------------------


async def test_direct_resolution_fetches_from_the_api_with_the_key(
    rig: Rig, storage: Storage
) -> None:
    storage.direct = True
    assert await rig.fetch(1, 2) == V1
    expect_blocks(rig.sink, range(1, 3))
    (request,) = storage.requests
    assert request.url == f"{API}/call/call-1/mono-recording"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["range"] == "bytes=16-47"


async def test_direct_resolution_refused_key_is_key_rejected(rig: Rig, storage: Storage) -> None:
    storage.direct = True
    storage.faults = [lambda r: httpx.Response(401, json={"message": "Invalid Key"})]
    with pytest.raises(KeyRejected):
        await rig.fetch(0, 1)
    assert rig.sink.blocks == []


async def test_connection_limit_is_respected(autojump_clock: trio.abc.Clock) -> None:
    storage = Storage()
    in_flight = 0
    peak = 0

    async def slow(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        if request.url.host == "storage.test":
            in_flight += 1
            peak = max(peak, in_flight)
            await trio.sleep(1)
            in_flight -= 1
        return storage(request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(slow)) as client:
        rig = Rig(storage, client, max_connections=2)
        sinks = [Sink() for _ in range(6)]
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            for i, sink in enumerate(sinks):
                nursery.start_soon(rig.fetcher.fetch, "call-1", "mono", i, 1, V1, sink)
        assert peak == 2
        assert trio.current_time() - started == pytest.approx(3.0)
        for i, sink in enumerate(sinks):
            expect_blocks(sink, range(i, i + 1))


# --- fetch_bytes: exact byte ranges ---------------------------------------------------------


async def test_fetch_bytes_unaligned_range(rig: Rig, storage: Storage) -> None:
    assert await rig.fetcher.fetch_bytes("call-1", "mono", 5, 50, V1) == BODY[5:50]
    assert await rig.fetcher.fetch_bytes("call-1", "mono", 290, 400, V1) == BODY[290:]
    assert await rig.fetcher.fetch_bytes("call-1", "mono", 300, 310, V1) == b""
    assert storage.ranges == ["bytes=5-49", "bytes=290-299"]


async def test_fetch_bytes_cut_is_retried_whole(
    autojump_clock: trio.abc.Clock, rig: Rig, storage: Storage
) -> None:
    def cut(request: httpx.Request) -> httpx.Response:
        headers = {**storage.headers(), "Content-Range": "bytes 5-49/300"}
        return httpx.Response(206, headers=headers, stream=CutStream(BODY[5:30], httpx.ReadError))

    storage.faults = [cut]
    assert await rig.fetcher.fetch_bytes("call-1", "mono", 5, 50, V1) == BODY[5:50]
    assert storage.ranges == ["bytes=5-49", "bytes=5-49"]


async def test_fetch_bytes_version_change(rig: Rig, storage: Storage) -> None:
    storage.etag = '"v2"'
    with pytest.raises(VersionChanged) as info:
        await rig.fetcher.fetch_bytes("call-1", "mono", 5, 50, V1)
    assert info.value.new_version == Version(300, '"v2"', LAST_MODIFIED)


@pytest.mark.parametrize("seed", range(5))
def test_pieces_cut_from_chunks_of_any_size_are_exact(seed: int) -> None:
    rng = random.Random(seed)
    data = rng.randbytes(3 << 20)
    pieces, out = _Pieces(), []
    pos = 0
    while pos < len(data):
        size = rng.choice([1, 4096, 65536, 1 << 20, rng.randrange(1, 3 << 20)])
        pieces.add(data[pos : pos + size])
        pos += size
        while pieces.size >= 300_000:
            piece = pieces.take(300_000)
            assert type(piece) is bytes
            out.append(piece)
    if pieces.size:
        out.append(pieces.take(pieces.size))
    assert pieces.size == 0 and b"".join(out) == data


def test_http_connections_read_large_chunks() -> None:
    larger_socket_reads()
    assert httpcore.AsyncHTTP11Connection.READ_NUM_BYTES >= SOCKET_READ


async def test_the_client_keeps_no_cookies() -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("cookie"))
        return httpx.Response(200, headers={"Set-Cookie": "session=abc; Path=/"}, content=b"x")

    transport = httpx.MockTransport(handler)
    async with http_client(read_timeout=5, stall_timeout=5, transport=transport) as client:
        for _ in range(2):
            assert (await client.get("http://storage.test/obj")).content == b"x"
        assert len(client.cookies) == 0
    assert seen == [None, None]
