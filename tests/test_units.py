"""Sizes, durations and --since/--until moments: one reading for every command."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from vapifs.calls import format_time, parse_time
from vapifs.units import When, human_bytes, parse_duration, parse_size, parse_when

PARIS = ZoneInfo("Europe/Paris")


def test_sizes_and_durations() -> None:
    assert parse_size("10G") == 10 << 30
    assert parse_size("1.5m") == 3 << 19
    assert parse_size("4096") == 4096
    assert parse_duration("90") == 90.0
    assert parse_duration("250ms") == 0.25
    assert parse_duration("1d") == 86400.0
    for bad in ("", "ten", "5x", "-1"):
        with pytest.raises(ValueError):
            parse_size(bad)
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_a_duration_is_back_from_now_and_a_date_is_in_the_zone() -> None:
    assert parse_when("36h", PARIS) == When(back=36 * 3600.0)
    assert parse_when("14d", PARIS).at(1_000_000_000.0) == 1_000_000_000.0 - 14 * 86400
    midnight = datetime(2026, 11, 1, tzinfo=PARIS).timestamp()
    assert parse_when("2026-11-01", PARIS) == When(instant=midnight)
    assert (
        parse_when("2026-11-01T08:00", UTC).instant
        == datetime(2026, 11, 1, 8, tzinfo=UTC).timestamp()
    )
    # An explicit offset wins over the zone.
    assert (
        parse_when("2026-11-01T08:00Z", PARIS).instant
        == datetime(2026, 11, 1, 8, tzinfo=UTC).timestamp()
    )


@pytest.mark.parametrize("text", ["2025", "14", "soon", "2026-13-01", ""])
def test_a_bare_number_or_nonsense_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_when(text, UTC)


def test_api_times_round_trip_to_the_millisecond() -> None:
    for text in (
        "2026-11-20T09:15:42.123Z",
        "2026-11-20T09:15:42.999Z",
        "2026-11-20T09:15:42.000Z",
    ):
        parsed = parse_time(text)
        assert parsed is not None
        assert format_time(parsed) == text
    # Rounded, not truncated: 0.9995 s is the next second's .000 (or .999 read back exactly).
    assert format_time(1.9996) == "1970-01-01T00:00:02.000Z"


def test_human_bytes() -> None:
    assert human_bytes(512) == "512 B"
    assert human_bytes(1536) == "1.5 KiB"
    assert human_bytes(10 << 30) == "10.0 GiB"
