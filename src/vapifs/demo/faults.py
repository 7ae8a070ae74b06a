"""The fake's fault knobs, and the dice and the rate bucket its faults are decided with."""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class Knobs:
    """Fault injection settings; all off by default, changeable at runtime."""

    url_ttl: float = 600.0
    cut_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 30.0
    api_500_rate: float = 0.0
    api_429_rate: float = 0.0
    retry_after: float | None = None
    ignore_range: bool = False
    wrong_content_range: bool = False
    gzip_ranged: bool = False
    malformed_json_rate: float = 0.0
    odd_calls: bool = False
    artifact_200: bool = False
    storage_down: bool = False
    api_down: bool = False
    api_stall: bool = False  # the API accepts requests and stays silent for stall_seconds
    storage_stall: bool = False  # so does storage, before it answers anything
    # An org's rate limit: requests per second (0: none) beyond a burst of as many; the
    # ones over it answer 429 with a Retry-After of the seconds until one would pass.
    api_rate_limit: float = 0.0


KNOB_NAMES = frozenset(f.name for f in dataclasses.fields(Knobs))


class Faults:
    """The knobs in effect, a seeded die for the faults that happen at a rate, the bucket
    of the API's rate limit, and the stalls under way (which a stop ends at once)."""

    def __init__(self, knobs: Knobs | None, seed: int) -> None:
        self.knobs = knobs if knobs is not None else Knobs()
        self._lock = threading.Lock()
        self._random = random.Random(seed)
        self._rate_bucket = (float("inf"), time.monotonic())  # (tokens, when)
        # Set on pause/stop so that stalled responses give up at once.
        self._halt = threading.Event()

    def snapshot(self) -> Knobs:
        with self._lock:
            return dataclasses.replace(self.knobs)

    def set(self, **changes: Any) -> None:
        unknown = set(changes) - KNOB_NAMES
        if unknown:
            raise TypeError(f"unknown knobs: {sorted(unknown)}")
        with self._lock:
            for name, value in changes.items():
                setattr(self.knobs, name, value)

    def roll(self) -> float:
        with self._lock:
            return self._random.random()

    def rate_wait(self, rate: float) -> float:
        """0 when a request may pass the rate limit now (and takes its token), else the wait."""
        with self._lock:
            now = time.monotonic()
            tokens, at = self._rate_bucket
            tokens = min(rate, tokens + (now - at) * rate)
            if tokens >= 1.0:
                self._rate_bucket = (tokens - 1.0, now)
                return 0.0
            self._rate_bucket = (tokens, now)
            return (1.0 - tokens) / rate

    def stall(self, seconds: float) -> bool:
        """Stay silent for `seconds`; True when the fake stopped meanwhile (drop the answer)."""
        return self._halt.wait(seconds)

    def halt(self) -> None:
        """End every stall under way, and any later one at once, until `resume`."""
        self._halt.set()

    def halted(self) -> bool:
        return self._halt.is_set()

    def resume(self) -> None:
        self._halt = threading.Event()
