"""rate.Governor: one pace for every API request, slowed by 429s, and the client that obeys it."""

from __future__ import annotations

import httpx
import pytest
import trio

from vapifs.api import VapiClient
from vapifs.rate import MIN_RATE, RECOVER_SECONDS, Governor
from vapifs.retry import RetryPolicy

API = "http://api.test"
SIGNED = "https://storage.test/rec.wav?X-Amz-Expires=1800"


async def test_requests_go_at_the_rate_after_a_burst(autojump_clock: trio.abc.Clock) -> None:
    governor = Governor(10.0, burst=5)
    times: list[float] = []

    async def one() -> None:
        await governor.acquire()
        times.append(trio.current_time())

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        for _ in range(25):
            nursery.start_soon(one)
    times = sorted(t - start for t in times)
    assert times[4] == pytest.approx(0.0, abs=1e-6)  # the burst
    # then one every 0.1 s: 20 more take 2 s
    assert times[-1] == pytest.approx(2.0, abs=0.01)
    for window_start in [t / 10 for t in range(0, 30)]:
        # never more than burst + rate * 1 s in any second
        assert sum(window_start <= t < window_start + 1.0 for t in times) <= 5 + 10


async def test_a_429_pauses_everyone_halves_the_pace_and_it_recovers_slowly(
    autojump_clock: trio.abc.Clock,
) -> None:
    governor = Governor(10.0, burst=1)
    await governor.acquire()
    governor.refused(3.0)
    assert governor.rate == pytest.approx(5.0)
    start = trio.current_time()
    await governor.acquire()
    assert trio.current_time() - start == pytest.approx(3.0, abs=0.01)  # Retry-After honoured
    await governor.acquire()
    assert trio.current_time() - start == pytest.approx(3.2, abs=0.01)  # at half the pace
    for _ in range(8):
        governor.refused(None)
    assert governor.rate >= MIN_RATE
    await trio.sleep(RECOVER_SECONDS + 5)
    await governor.acquire()
    assert governor.rate == pytest.approx(10.0)


async def test_a_429_storm_never_reaches_the_caller(autojump_clock: trio.abc.Clock) -> None:
    answers = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal answers
        answers += 1
        if answers <= 12:  # more 429s than attempts a request has
            return httpx.Response(429, headers={"Retry-After": "1"}, json={"message": "slow"})
        if request.url.path == "/call":
            return httpx.Response(200, json=[])
        return httpx.Response(302, headers={"Location": SIGNED})

    governor = Governor(5.0)
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = VapiClient(
            client, API, "sk-rate-test-6c1d0f", policy=RetryPolicy(attempts=3), governor=governor
        )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(api.list_calls)
            for kind in ("stereo", "mono", "logs"):
                nursery.start_soon(api.resolve, "c", kind)
    assert api.throttled == 12 == governor.refusals
    assert answers == 16


async def test_without_a_governor_429_uses_up_attempts(autojump_clock: trio.abc.Clock) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(429, json={"message": "slow"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = VapiClient(client, API, "sk-rate-test-6c1d0f", policy=RetryPolicy(attempts=3))
        with pytest.raises(Exception, match="gave up after 3 tries"):
            await api.resolve("c", "stereo")
