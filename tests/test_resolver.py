"""resolver.Resolver: reuse, refresh before expiry, invalidation and single flight."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import httpx
import pytest
import trio

from vapifs.api import VapiClient
from vapifs.errors import NotFound
from vapifs.resolver import Resolver
from vapifs.urlbook import Resolution, UrlBook, url_lifetime

API = "http://api.test"
KEY = "sk-resolver-test-51c0e8"

# Builds the query string of the n-th signed URL the fake API hands out.
Query = Callable[[int], str]


def amz_date(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).strftime("%Y%m%dT%H%M%SZ")


class FakeApi:
    """Answers every artifact endpoint with a 302 to a new signed URL, optionally slowly."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.query: Query = lambda n: f"X-Amz-Signature=s{n}"
        self.delay = 0.0
        self.status = 302

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.paths.append(request.url.path)
        if self.delay:
            await trio.sleep(self.delay)
        if self.status != 302:
            return httpx.Response(self.status, json={"message": "Not Found"})
        n = len(self.paths)
        location = f"https://storage.test{request.url.path}.wav?{self.query(n)}"
        return httpx.Response(302, headers={"Location": location})


@pytest.fixture
def fake() -> FakeApi:
    return FakeApi()


@pytest.fixture
async def api(fake: FakeApi) -> AsyncIterator[VapiClient]:
    async with httpx.AsyncClient(transport=httpx.MockTransport(fake)) as client:
        yield VapiClient(client, API, KEY)


async def test_reuse_within_max_age(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    resolver = Resolver(api, UrlBook(max_age=60))
    first = await resolver.get("c1", "stereo")
    assert first.url == "https://storage.test/call/c1/stereo-recording.wav?X-Amz-Signature=s1"
    for _ in range(9):
        await trio.sleep(5)
        assert await resolver.get("c1", "stereo") is first
    assert fake.paths == ["/call/c1/stereo-recording"]
    assert resolver.resolutions == 1


async def test_refresh_after_max_age(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    resolver = Resolver(api, UrlBook(max_age=60))
    first = await resolver.get("c1", "mono")
    await trio.sleep(59.9)
    assert await resolver.get("c1", "mono") is first
    await trio.sleep(0.2)
    second = await resolver.get("c1", "mono")
    assert second is not first
    assert second.url.endswith("X-Amz-Signature=s2")
    assert len(fake.paths) == 2
    # The new one is reused for a full max_age again.
    await trio.sleep(59.9)
    assert await resolver.get("c1", "mono") is second
    assert len(fake.paths) == 2


async def test_keys_are_separate(api: VapiClient, fake: FakeApi) -> None:
    resolver = Resolver(api, UrlBook(max_age=60))
    a = await resolver.get("c1", "mono")
    b = await resolver.get("c1", "stereo")
    c = await resolver.get("c2", "mono")
    assert len({a.url, b.url, c.url}) == 3
    assert await resolver.get("c1", "mono") is a
    assert fake.paths == [
        "/call/c1/mono-recording",
        "/call/c1/stereo-recording",
        "/call/c2/mono-recording",
    ]


async def test_announced_lifetime_caps_reuse_to_half(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    # Signed just now for 40 s: reused for (just under) 20 s although max_age is 10 minutes.
    fake.query = lambda n: (
        f"X-Amz-Date={amz_date(time.time())}&X-Amz-Expires=40&X-Amz-Signature=s{n}"
    )
    resolver = Resolver(api, UrlBook(max_age=600))
    first = await resolver.get("c1", "logs")
    await trio.sleep(19.4)
    assert await resolver.get("c1", "logs") is first
    await trio.sleep(0.7)
    assert await resolver.get("c1", "logs") is not first
    assert fake.paths == ["/call/c1/call-logs"] * 2


async def test_url_already_expired_is_never_reused(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.query = lambda n: f"X-Amz-Date={amz_date(time.time() - 3600)}&X-Amz-Expires=60&n={n}"
    resolver = Resolver(api, UrlBook(max_age=600))
    urls = {(await resolver.get("c1", "pcap")).url for _ in range(3)}
    assert len(urls) == 3
    assert len(fake.paths) == 3


async def test_long_lifetime_does_not_extend_max_age(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.query = lambda n: f"X-Amz-Date={amz_date(time.time())}&X-Amz-Expires=86400&n={n}"
    resolver = Resolver(api, UrlBook(max_age=30))
    first = await resolver.get("c1", "video")
    await trio.sleep(29.9)
    assert await resolver.get("c1", "video") is first
    await trio.sleep(0.2)
    assert await resolver.get("c1", "video") is not first


async def test_invalidate_forces_a_new_resolution(api: VapiClient, fake: FakeApi) -> None:
    resolver = Resolver(api, UrlBook(max_age=600))
    first = await resolver.get("c1", "mono")
    resolver.invalidate("c1", "mono", first)
    second = await resolver.get("c1", "mono")
    assert second is not first
    assert len(fake.paths) == 2
    # Invalidating a stale resolution (another reader already got a new one) changes nothing.
    resolver.invalidate("c1", "mono", first)
    assert await resolver.get("c1", "mono") is second
    # Nor does invalidating a key that holds nothing, or another key.
    resolver.invalidate("c9", "mono", second)
    resolver.invalidate("c1", "stereo", second)
    assert await resolver.get("c1", "mono") is second
    assert len(fake.paths) == 2


async def test_concurrent_gets_cause_one_resolution(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.delay = 1.0
    resolver = Resolver(api, UrlBook(max_age=60))
    got: list[Resolution] = []

    async def one() -> None:
        got.append(await resolver.get("c1", "stereo"))

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert len(got) == 10
    assert all(r is got[0] for r in got)
    assert fake.paths == ["/call/c1/stereo-recording"]
    assert resolver.resolutions == 1
    assert trio.current_time() - started == pytest.approx(1.0)


async def test_concurrent_gets_for_different_keys_run_in_parallel(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    fake.delay = 1.0
    resolver = Resolver(api, UrlBook(max_age=60))
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        for kind in ("mono", "stereo", "customer", "assistant"):
            nursery.start_soon(resolver.get, "c1", kind)
    assert len(fake.paths) == 4
    assert trio.current_time() - started == pytest.approx(1.0)


async def test_failed_resolution_is_not_cached(api: VapiClient, fake: FakeApi) -> None:
    fake.status = 404
    resolver = Resolver(api, UrlBook(max_age=60))
    for _ in range(2):
        with pytest.raises(NotFound):
            await resolver.get("c1", "video")
    assert len(fake.paths) == 2
    fake.status = 302
    assert (await resolver.get("c1", "video")).url.endswith("X-Amz-Signature=s3")
    assert len(fake.paths) == 3
    assert resolver.resolutions == 1


async def test_many_keys_stay_correct_after_pruning(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    resolver = Resolver(api, UrlBook(max_age=10))
    early = [await resolver.get(f"old{i}", "mono") for i in range(200)]
    await trio.sleep(11)
    fresh = [await resolver.get(f"new{i}", "mono") for i in range(100)]
    assert len(fake.paths) == 300
    # The expired ones resolve again; the fresh ones are still reused.
    assert await resolver.get("old0", "mono") is not early[0]
    assert all([await resolver.get(f"new{i}", "mono") is fresh[i] for i in range(100)])
    assert len(fake.paths) == 301


# --- url_lifetime ---------------------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC).timestamp()


def test_lifetime_from_amz_date_and_expires() -> None:
    url = (
        "https://r2.example/b/o.wav?X-Amz-Algorithm=AWS4-HMAC-SHA256"
        "&X-Amz-Date=20250301T115500Z&X-Amz-Expires=1800&X-Amz-Signature=abc"
    )
    assert url_lifetime(url, now=NOW) == pytest.approx(1500.0)


def test_lifetime_from_goog_date_and_expires() -> None:
    url = "https://storage.googleapis.com/b/o?X-Goog-Date=20250301T120000Z&X-Goog-Expires=900"
    assert url_lifetime(url, now=NOW) == pytest.approx(900.0)


def test_lifetime_parameter_names_are_case_insensitive() -> None:
    url = "https://s3.example/o?x-amz-date=20250301T120000Z&x-amz-expires=60"
    assert url_lifetime(url, now=NOW) == pytest.approx(60.0)


def test_lifetime_of_expired_url_is_negative() -> None:
    url = "https://s3.example/o?X-Amz-Date=20250301T100000Z&X-Amz-Expires=3600"
    assert url_lifetime(url, now=NOW) == pytest.approx(-3600.0)


def test_lifetime_without_date_is_the_expires_value() -> None:
    assert url_lifetime("https://s3.example/o?X-Amz-Expires=300", now=NOW) == 300.0


def test_lifetime_from_expires_epoch() -> None:
    url = f"https://cdn.example/o.wav?Expires={int(NOW) + 600}&Signature=x&Key-Pair-Id=k"
    assert url_lifetime(url, now=NOW) == pytest.approx(600.0)


@pytest.mark.parametrize(
    "url",
    [
        "https://storage.test/o.wav",
        "https://storage.test/o.wav?X-Amz-Signature=abc",
        "https://storage.test/o.wav?X-Amz-Expires=soon",
        "https://storage.test/o.wav?X-Amz-Date=yesterday&X-Amz-Expires=60",
        "https://storage.test/o.wav?Expires=never",
        "https://storage.test/o.wav?Expires=",
    ],
)
def test_lifetime_unknown(url: str) -> None:
    assert url_lifetime(url, now=NOW) is None


# --- presigned URLs carried by call objects -------------------------------------------------


async def test_offered_presigned_urls_spare_a_resolution(
    autojump_clock: trio.abc.Clock, api: VapiClient, fake: FakeApi
) -> None:
    signed = amz_date(time.time())
    young = f"https://storage.test/c1-stereo.wav?X-Amz-Date={signed}&X-Amz-Expires=1800&sig=a"
    dying = f"https://storage.test/c1-mono.wav?X-Amz-Date={signed}&X-Amz-Expires=2&sig=b"
    call = {"id": "c1", "artifact": {"presignedStereoUrl": young, "presignedMonoUrl": dying}}
    book = UrlBook(max_age=60)
    book.offer_calls([call, {"id": 7}, {"artifact": {"presignedMonoUrl": young}}])
    resolver = Resolver(api, book)
    assert (await resolver.get("c1", "stereo")).url == young
    assert fake.paths == []
    # Too short-lived to be worth keeping: resolved through the API.
    assert (await resolver.get("c1", "mono")).url != dying
    assert fake.paths == ["/call/c1/mono-recording"]
    # Reused no longer than max_age, like a resolution.
    await trio.sleep(60.1)
    assert (await resolver.get("c1", "stereo")).url != young
    assert fake.paths == ["/call/c1/mono-recording", "/call/c1/stereo-recording"]


async def test_the_api_client_writes_listed_urls_into_the_book_the_resolver_reads(
    autojump_clock: trio.abc.Clock, fake: FakeApi
) -> None:
    signed = amz_date(time.time())
    listed = f"https://storage.test/c1-logs.gz?X-Amz-Date={signed}&X-Amz-Expires=1800&sig=l"
    got = f"https://storage.test/c2-pcap?X-Amz-Date={signed}&X-Amz-Expires=1800&sig=g"
    calls = {
        "/call": [{"id": "c1", "artifact": {"presignedLogUrl": listed}}],
        "/call/c2": {"id": "c2", "artifact": {"presignedPcapUrl": got}},
    }

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path in calls:
            return httpx.Response(200, json=calls[request.url.path])
        return await fake(request)

    book = UrlBook(max_age=60)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = VapiClient(client, API, KEY, book=book)
        resolver = Resolver(api, book)
        await api.list_calls(limit="10")
        await api.get_call("c2")
        assert (await resolver.get("c1", "logs")).url == listed
        assert (await resolver.get("c2", "pcap")).url == got
        assert fake.paths == []  # no resolve: both came with the call objects
        assert resolver.presigned_used == 2 and resolver.resolutions == 0
        # An API client without a book keeps nothing.
        bookless = VapiClient(client, API, KEY)
        other = Resolver(bookless, UrlBook(max_age=60))
        await bookless.list_calls(limit="10")
        assert (await other.get("c1", "logs")).url != listed
        assert fake.paths == ["/call/c1/call-logs"]
