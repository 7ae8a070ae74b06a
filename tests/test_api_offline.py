"""The API client when the network is down: few quick tries, then at once, then recovery."""

from __future__ import annotations

import httpx
import pytest
import trio

from vapifs.api import VapiClient
from vapifs.errors import NetworkError


async def test_connection_refused_is_not_retried_for_long(autojump_clock: trio.abc.Clock) -> None:
    up = False
    tries = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal tries
        tries += 1
        if not up:
            raise httpx.ConnectError("connection refused", request=request)
        return httpx.Response(200, json={"id": "x"})

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = VapiClient(client, "http://api.invalid", "key")
        started = trio.current_time()
        with pytest.raises(NetworkError, match="gave up after 3 tries"):
            await api.get_call("x")
        assert tries == 3
        assert trio.current_time() - started < 1.0
        # Known to be down: one try each, no backoff.
        tries = 0
        started = trio.current_time()
        with pytest.raises(NetworkError, match="gave up after 1 try"):
            await api.resolve("x", "stereo")
        assert tries == 1
        assert trio.current_time() == started
        # The first request once the network is back succeeds.
        up = True
        assert await api.get_call("x") == {"id": "x"}
        assert not api.unreachable


async def test_server_errors_keep_their_full_retries(autojump_clock: trio.abc.Clock) -> None:
    tries = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal tries
        tries += 1
        return httpx.Response(503)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        api = VapiClient(client, "http://api.invalid", "key")
        with pytest.raises(NetworkError, match="gave up after 5 tries"):
            await api.get_call("x")
        assert tries == 5
