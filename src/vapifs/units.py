"""Sizes, durations and moments as people write them, and how vapifs writes them back."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, tzinfo

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$", re.IGNORECASE)
_SCALE = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?(Z|[+-]\d{2}:?\d{2})?$")


def parse_size(text: str) -> int:
    """'10G', '500M', '1.5g', '4096' -> bytes (binary units)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 10G, 500M)")
    power = " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * (1024**power))


def parse_duration(text: str) -> float:
    """'60', '60s', '5m', '1h', '1d' -> seconds (a bare number is seconds)."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {text!r} (try 30s, 5m, 1d)")
    return float(match.group(1)) * _SCALE[(match.group(2) or "s").lower()]


@dataclass(frozen=True)
class When:
    """A --since/--until value: either a duration back from now, or a fixed instant."""

    back: float | None = None  # seconds before now
    instant: float | None = None  # epoch seconds

    def at(self, now: float) -> float:
        """The moment it names, taking `now` for a duration."""
        return now - self.back if self.back is not None else float(self.instant or 0.0)


def parse_when(text: str, zone: tzinfo) -> When:
    """'14d', '36h' (that long before now) or a date/time ('2026-11-01', '2026-11-01T08:00').

    A duration needs its unit: a bare number (2025) could be a year or seconds, so it is
    refused. A date without a time is the start of that day; a date or time without an
    offset is in `zone`.
    """
    text = text.strip()
    if _DAY.match(text):
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError as exc:
            raise ValueError(f"not a date: {text!r} ({exc})") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=zone)
        return When(instant=moment.timestamp())
    match = _DURATION.match(text)
    if not match or not match.group(2):
        raise ValueError(f"not a duration or a date: {text!r} (try 14d, 36h, 2026-11-01)")
    return When(back=parse_duration(text))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    if minutes:
        return f"{minutes}m {s}s"
    return f"{seconds:.1f}s"
