"""The pure parts of `redeliver`: reading a time from the command line, and which events a
range holds. (Against a real Unleash: tests/test_e2e_controls.py.)"""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.redeliver import Range, RangeError, created_at, parse_time

UTC = dt.UTC


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2026-11-28", dt.datetime(2026, 11, 28, tzinfo=UTC)),
        ("2026-11-28T10:05:00Z", dt.datetime(2026, 11, 28, 10, 5, tzinfo=UTC)),
        ("2026-11-28T10:05:00.250Z", dt.datetime(2026, 11, 28, 10, 5, 0, 250000, tzinfo=UTC)),
        ("2026-11-28T11:05:00+01:00", dt.datetime(2026, 11, 28, 10, 5, tzinfo=UTC)),
        ("2026-11-28 10:05", dt.datetime(2026, 11, 28, 10, 5, tzinfo=UTC)),
        (" 2026-11-28T10:05:00Z ", dt.datetime(2026, 11, 28, 10, 5, tzinfo=UTC)),
    ],
)
def test_parse_time_examples(text: str, expected: dt.datetime) -> None:
    """Dates and date-times, with Z, an offset or no zone (UTC), give the same instant."""
    assert parse_time(text, "--since") == expected


@pytest.mark.parametrize("text", ["", "yesterday", "28/11/2026", "2026-13-01", "2026-11-28T25:00"])
def test_parse_time_refuses_what_is_not_iso(text: str) -> None:
    """Anything else is a RangeError naming the option and the text."""
    with pytest.raises(RangeError, match=r"^--until '.*': not an ISO 8601 time"):
        parse_time(text, "--until")


@settings(max_examples=50)
@given(st.datetimes(timezones=st.timezones()))
def test_parse_time_round_trips_any_aware_time(when: dt.datetime) -> None:
    """Whatever aware time is written in ISO 8601, the same instant is read back."""
    # As instants: Python never calls two zones equal at an ambiguous local time.
    assert parse_time(when.isoformat(), "--since").timestamp() == when.timestamp()


@settings(max_examples=50)
@given(st.text(max_size=30))
def test_parse_time_never_raises_anything_but_range_error(text: str) -> None:
    """Any text either parses to an aware time or is a RangeError (one line for the user)."""
    try:
        when = parse_time(text, "--since")
    except RangeError as exc:
        problem: str | None = str(exc)
    else:
        problem = None
        assert when.tzinfo is not None
    assert problem is None or "\n" not in problem


@settings(max_examples=50)
@given(
    low=st.integers(min_value=0, max_value=500),
    span=st.integers(min_value=0, max_value=500),
    event_id=st.integers(min_value=0, max_value=1200),
)
def test_id_range_holds_exactly_its_inclusive_bounds(low: int, span: int, event_id: int) -> None:
    """An id range holds an event iff from_id <= id <= to_id."""
    wanted = Range(from_id=low, to_id=low + span)
    assert wanted.holds({"id": event_id, "type": "x"}) == (low <= event_id <= low + span)


def test_time_range_uses_created_at() -> None:
    """A time range holds events created within it (inclusive); none without createdAt."""
    wanted = Range(
        since=parse_time("2026-11-28T10:00Z", "s"), until=parse_time("2026-11-28T11:00Z", "u")
    )
    assert wanted.holds({"id": 1, "createdAt": "2026-11-28T10:00:00.000Z"})
    assert wanted.holds({"id": 2, "createdAt": "2026-11-28T11:00:00.000Z"})
    assert not wanted.holds({"id": 3, "createdAt": "2026-11-28T11:00:00.001Z"})
    assert not wanted.holds({"id": 4})
    assert created_at({"createdAt": "not a time"}) is None
    open_ended = Range(since=parse_time("2026-11-28", "s"))
    assert open_ended.holds({"id": 5, "createdAt": "2030-01-01T00:00:00Z"})
