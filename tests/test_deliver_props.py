"""Whatever a receiver answers, reading it never raises: Retry-After and decide() as properties."""

from __future__ import annotations

import datetime as dt
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from poller.deliver import RETRY_AFTER_MAX_S, Attempt, Outcome, decide, retry_after_s

PROPS = settings(max_examples=200, deadline=None)
NOW = 1_000_000_000.0  # 2001-09-09T01:46:40Z


@pytest.mark.parametrize(
    ("header", "seconds"),
    [
        ("0", 0.0),
        ("7", 7.0),
        (" 120 ", 120.0),
        ("007", 7.0),
        ("0000000005", 5.0),  # leading zeros do not make a wait long
        ("0" * 5000 + "5", 5.0),
        ("999999999999999999999999999999", RETRY_AFTER_MAX_S),
        ("9" * 5000, RETRY_AFTER_MAX_S),  # more digits than int() takes
        ("Sun, 09 Sep 2001 01:47:40 GMT", 60.0),  # IMF-fixdate
        ("Sunday, 09-Sep-01 01:47:40 GMT", 60.0),  # obsolete RFC 850 form
        ("Sun Sep  9 01:47:40 2001", 60.0),  # obsolete asctime form
        ("Sun, 09 Sep 2001 01:40:00 GMT", 0.0),  # in the past: no wait
        ("Sat, 01 Jan 2101 00:00:00 GMT", RETRY_AFTER_MAX_S),
    ],
)
def test_retry_after_accepts_seconds_and_http_dates(header: str, seconds: float) -> None:
    """Delay-seconds in ASCII digits and the three HTTP-date forms give the wait they ask for."""
    assert retry_after_s(header, NOW) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "\u00b2",  # superscript two: str.isdigit() says yes, float() raises
        "\u0663",  # Arabic-Indic three: int() would take it
        "\uff17",  # fullwidth seven
        "1.5",
        "-5",
        "+5",
        "1e3",
        "soon",
        "Sun, 31 Feb 2001 01:47:40 GMT",  # no such day
        "Sun, 09 Sep 2001 25:47:40 GMT",  # no such hour
        "Sun, 09 Sep 2001 01:47:40 +0000",  # HTTP dates are GMT
        "Sun, 09 Sep \u0662001 01:47:40 GMT",
        "Sun, 09 Sep 2001 01:47:40 GMT trailing",
        "Mon, 01 Jan 0000 00:00:00 GMT",  # year 0 does not exist
    ],
)
def test_retry_after_ignores_anything_else(header: str | None) -> None:
    """A Retry-After that is neither ASCII delay-seconds nor an HTTP date is ignored."""
    assert retry_after_s(header, NOW) is None


def test_superscript_retry_after_falls_back_to_the_configured_delay() -> None:
    """The issue's repro: `Retry-After: ²` on a 503 is a plain retry, not a crash."""
    outcome = decide(Attempt(503, None, "\u00b2"), 1, (1.0,))
    assert outcome == Outcome("retry", "HTTP 503", 1.0)


@PROPS
@given(st.one_of(st.none(), st.text()), st.floats(min_value=0, max_value=4e9))
def test_retry_after_never_raises(header: str | None, now: float) -> None:
    """Any header text gives None or a finite wait between 0 and the cap."""
    seconds = retry_after_s(header, now)
    assert seconds is None or (math.isfinite(seconds) and 0.0 <= seconds <= RETRY_AFTER_MAX_S)


@PROPS
@given(st.integers(min_value=0, max_value=10**40).map(str))
def test_retry_after_reads_any_ascii_number(header: str) -> None:
    """Every run of ASCII digits is a wait of that many seconds, capped."""
    assert retry_after_s(header, NOW) == min(float(int(header)), RETRY_AFTER_MAX_S)


@PROPS
@given(st.integers(min_value=0, max_value=int(RETRY_AFTER_MAX_S)), st.integers(0, 40))
def test_retry_after_reads_zero_padded_numbers_as_their_value(seconds: int, zeros: int) -> None:
    """Any ASCII digit string whose value is at most the cap, however zero-padded, is that wait."""
    assert retry_after_s("0" * zeros + str(seconds), NOW) == float(seconds)


@PROPS
@given(st.datetimes(timezones=st.none()), st.sampled_from(["imf", "rfc850", "asctime"]))
def test_retry_after_reads_every_date_it_could_be_sent(when: dt.datetime, form: str) -> None:
    """Any date written in any of the three HTTP-date forms is read back to the second."""
    when = when.replace(microsecond=0, tzinfo=dt.UTC)
    if form == "rfc850":
        if not 1970 <= when.year <= 2069:
            return  # a two-digit year names only this century's window
        text = when.strftime("%A, %d-%b-%y %H:%M:%S GMT")
    elif form == "asctime":
        text = f"{when:%a %b} {when.day:2d} {when:%H:%M:%S} {when.year:04d}"
    else:
        text = f"{when:%a, %d %b} {when.year:04d} {when:%H:%M:%S} GMT"
    now = when.timestamp() - 30.0
    assert retry_after_s(text, now) == pytest.approx(30.0)


@PROPS
@given(
    status=st.one_of(st.none(), st.integers()),
    error=st.one_of(st.none(), st.text()),
    retry_after=st.one_of(st.none(), st.text(), st.integers(min_value=0).map(str)),
    attempts_made=st.integers(min_value=1, max_value=1000),
    delays=st.lists(st.floats(min_value=0, max_value=86400), max_size=10),
    jitter=st.floats(min_value=0, max_value=1, exclude_max=True),
    now=st.floats(min_value=0, max_value=4e9),
)
def test_decide_never_raises_and_gives_a_sane_outcome(
    status: int | None,
    error: str | None,
    retry_after: str | None,
    attempts_made: int,
    delays: list[float],
    jitter: float,
    now: float,
) -> None:
    """Any answer gives delivered (2xx only), a pause (410 only), a finite bounded retry, or
    a give-up with a reason; only a 429 within its bound may retry past `retries`."""
    outcome = decide(Attempt(status, error, retry_after), attempts_made, delays, jitter, now)
    assert outcome.reason
    if status is not None and 200 <= status < 300:
        assert outcome.kind == "delivered"
        return
    if status == 410:
        assert outcome.kind == "pause"
        return
    assert outcome.kind in ("retry", "give_up")
    assert math.isfinite(outcome.delay_s)
    assert outcome.delay_s >= 0.0
    if outcome.kind == "retry":
        assert outcome.delay_s <= max(max(delays, default=0.0) * 1.2, RETRY_AFTER_MAX_S)
        if status == 429:
            assert outcome.rate_limited
            assert outcome.webhook_wait
        if outcome.counted:
            assert attempts_made <= len(delays)
