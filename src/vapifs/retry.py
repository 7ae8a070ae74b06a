"""Bounded retries with full-jitter backoff that honour Retry-After."""

from __future__ import annotations

import email.utils
import logging
import random
import time
from dataclasses import dataclass

import trio

from .errors import NetworkError

log = logging.getLogger("vapifs.retry")

# Statuses that say "not now" rather than "no": tried again after a backoff.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a failed request is tried again."""

    attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 4.0
    max_retry_after: float = 10.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before try number `attempt + 1` (attempt counts from 0)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        return random.uniform(0.0, min(self.max_delay, self.base_delay * (2**attempt)))


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class Attempts:
    """The tries of one request: each failure waits its backoff before the next try, and
    the last one raises NetworkError naming the request, how many tries and why."""

    def __init__(self, policy: RetryPolicy, what: str) -> None:
        self.policy = policy
        self.what = what
        self.tries = 0  # every try, those that do not count against the policy included
        self.failures = 0  # failed tries since the last progress
        self.last = "no attempt"

    def again(self) -> None:
        """A try that does not count against the policy (the API asked us to slow down)."""
        self.tries += 1

    def stop(self, reason: str) -> NetworkError:
        """A failed try after which there is no point in another: the error to raise."""
        self.tries += 1
        self.last = reason
        tries = "1 try" if self.tries == 1 else f"{self.tries} tries"
        return NetworkError(f"{self.what}: gave up after {tries} ({self.last})")

    def progressed(self) -> None:
        """The last try got somewhere (bytes arrived): the next failures count afresh."""
        self.failures = 0

    async def failed(self, reason: str, retry_after: float | None = None) -> None:
        """Count a failed try: wait before the next one, or raise when none is left."""
        self.failures += 1
        if self.failures >= self.policy.attempts:
            raise self.stop(reason)
        self.tries += 1
        self.last = reason
        delay = self.policy.delay(self.failures - 1, retry_after)
        log.debug("%s: %s; retrying in %.2fs", self.what, reason, delay)
        await trio.sleep(delay)
