"""Pacing of API requests: one budget per process, slowed by 429s, recovering slowly."""

from __future__ import annotations

from collections.abc import Callable

import trio

from .defaults import DEFAULT_API_RATE

# A 429 halves the pace, never below this; then it climbs back to the configured rate over
# RECOVER_SECONDS of requests answered without one.
MIN_RATE = 0.5
RECOVER_SECONDS = 30.0
# Without Retry-After, a 429 pauses every request of the process this long.
DEFAULT_PAUSE = 1.0
MAX_PAUSE = 30.0


class Governor:
    """A token bucket shared by every API request of a process.

    `acquire` waits for a slot; `refused` (a 429) pauses everyone for the server's
    Retry-After and halves the pace; requests answered without a 429 bring the pace back
    to `limit`, slowly. A burst of `burst` requests may go at once after a quiet spell.
    """

    def __init__(
        self,
        limit: float = DEFAULT_API_RATE,
        *,
        burst: float | None = None,
        clock: Callable[[], float] = trio.current_time,
    ) -> None:
        if limit <= 0:
            raise ValueError("the API rate must be more than 0")
        self.limit = limit
        self.rate = limit
        self.burst = max(1.0, burst if burst is not None else limit)
        self._clock = clock
        self._tat = -1e18
        self._paused_until = -1e18
        self._adjusted = 0.0
        self.granted = 0
        self.refusals = 0  # 429s seen
        self.waited = 0.0  # seconds requests spent waiting for a slot, in total

    def _slack(self) -> float:
        return (self.burst - 1.0) / self.rate

    def _recover(self, now: float) -> None:
        if self.rate < self.limit and now > self._paused_until:
            step = (now - max(self._adjusted, self._paused_until)) * self.limit / RECOVER_SECONDS
            if step > 0:
                self.rate = min(self.limit, self.rate + step)
                self._adjusted = now

    async def acquire(self) -> None:
        """Wait until this request may go."""
        started = self._clock()
        while True:
            now = self._clock()
            self._recover(now)
            # GCRA: `_tat` is when the bucket would be empty again; a request may go up to
            # `burst - 1` intervals before it.
            tat = max(self._tat, now)
            wait = max(tat - self._slack() - now, self._paused_until - now)
            self._tat = tat + 1.0 / self.rate
            if wait > 0:
                await trio.sleep(wait)
            # A 429 that came in while this one waited pauses it too.
            if self._clock() >= self._paused_until:
                break
        self.granted += 1
        self.waited += self._clock() - started

    def refused(self, retry_after: float | None) -> None:
        """The API answered 429: pause everyone, then go on at half the pace."""
        now = self._clock()
        self.refusals += 1
        pause = DEFAULT_PAUSE if retry_after is None else retry_after
        pause = min(max(pause, 1.0 / self.limit), MAX_PAUSE)
        until = now + pause
        if until > self._paused_until:
            self._paused_until = until
            self.rate = max(MIN_RATE, min(self.rate, self.limit) / 2)
            self._adjusted = until
            # No burst when the pause ends: the bucket starts empty.
            self._tat = max(self._tat, until + self._slack())
