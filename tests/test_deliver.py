"""What a delivery attempt means (a table), and the headers a webhook receives."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from poller.config import parse_config
from poller.deliver import RETRY_AFTER_MAX_S, Attempt, decide, request_headers

ONE_RETRY = (1.0,)

CASES = [
    # attempt, attempts made, delays -> kind, delay, reason prefix
    (Attempt(200), 1, ONE_RETRY, "delivered", 0.0, "HTTP 200"),
    (Attempt(204), 2, ONE_RETRY, "delivered", 0.0, "HTTP 204"),
    (Attempt(500), 1, ONE_RETRY, "retry", 1.0, "HTTP 500"),
    (Attempt(500), 2, ONE_RETRY, "give_up", 0.0, "HTTP 500 after 2 attempts"),
    (Attempt(502), 1, (), "give_up", 0.0, "HTTP 502 after 1 attempt"),
    (Attempt(None, "connection failed: refused"), 1, ONE_RETRY, "retry", 1.0, "connection failed"),
    (
        Attempt(None, "timed out after 10s"),
        2,
        ONE_RETRY,
        "give_up",
        0.0,
        "timed out after 10s after 2 attempts",
    ),
    (Attempt(408), 1, ONE_RETRY, "retry", 1.0, "HTTP 408"),
    (Attempt(429), 1, ONE_RETRY, "retry", 1.0, "HTTP 429"),
    (Attempt(400), 1, ONE_RETRY, "give_up", 0.0, "HTTP 400 (not retried) after 1 attempt"),
    (Attempt(404), 1, ONE_RETRY, "give_up", 0.0, "HTTP 404 (not retried)"),
    (Attempt(401), 1, ONE_RETRY, "give_up", 0.0, "HTTP 401 (not retried)"),
    (Attempt(301), 1, ONE_RETRY, "give_up", 0.0, "HTTP 301 (redirects are not followed)"),
    (Attempt(429, retry_after="7"), 1, ONE_RETRY, "retry", 7.0, "HTTP 429"),
    (Attempt(503, retry_after="120"), 1, ONE_RETRY, "retry", 120.0, "HTTP 503"),
    (Attempt(503, retry_after="999999"), 1, ONE_RETRY, "retry", RETRY_AFTER_MAX_S, "HTTP 503"),
    (Attempt(503, retry_after="soon"), 1, ONE_RETRY, "retry", 1.0, "HTTP 503"),
    (Attempt(500, retry_after="60"), 1, ONE_RETRY, "retry", 1.0, "HTTP 500"),
    (Attempt(500), 3, (5.0, 30.0, 300.0), "retry", 300.0, "HTTP 500"),
    (Attempt(500), 4, (5.0, 30.0, 300.0), "give_up", 0.0, "HTTP 500 after 4 attempts"),
]


@pytest.mark.parametrize(("attempt", "made", "delays", "kind", "delay", "reason"), CASES)
def test_decide(
    attempt: Attempt, made: int, delays: tuple[float, ...], kind: str, delay: float, reason: str
) -> None:
    """Each result maps to delivered / retry after N seconds / give up, with its reason."""
    outcome = decide(attempt, made, delays, jitter=0.0, now=1_000_000.0)
    assert outcome.kind == kind
    assert outcome.delay_s == pytest.approx(delay)
    assert outcome.reason.startswith(reason), outcome.reason


def test_retry_after_http_date_is_honoured() -> None:
    """Retry-After given as an HTTP date waits until that moment."""
    outcome = decide(
        Attempt(429, retry_after="Thu, 01 Jan 1970 00:01:40 GMT"), 1, ONE_RETRY, now=40.0
    )
    assert outcome.delay_s == pytest.approx(60.0)


def test_jitter_spreads_retries_by_at_most_a_fifth() -> None:
    """Jitter lengthens a retry delay by at most 20%, never shortens it."""
    low = decide(Attempt(500), 1, (10.0,), jitter=0.0).delay_s
    high = decide(Attempt(500), 1, (10.0,), jitter=0.999).delay_s
    assert low == 10.0
    assert 11.9 < high < 12.0


def _hook(extra: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    text = f"""
[unleash]
url = "http://u"
token = "t"
[[webhooks]]
name = "a"
url = "http://h"
{extra}
"""
    return parse_config(tomllib.loads(text), tmp_path).webhooks[0]


def test_headers_match_unleash(tmp_path: Path) -> None:
    """Content-Type, Authorization when set, then extra headers merged over them."""
    hook = _hook(
        'content_type="text/plain"\nauthorization="Bearer x"\n'
        'headers={"X-Team"="platform", "Content-Type"="application/cloudevents+json"}',
        tmp_path,
    )
    headers = request_headers(hook)
    assert headers["Content-Type"] == "application/cloudevents+json"
    assert headers["Authorization"] == "Bearer x"
    assert headers["X-Team"] == "platform"


def test_no_authorization_header_unless_configured(tmp_path: Path) -> None:
    """Without `authorization` no Authorization header is sent (an empty one counts as none)."""
    assert "Authorization" not in request_headers(_hook("", tmp_path))
    assert "Authorization" not in request_headers(_hook('authorization=""', tmp_path))


def test_header_differing_only_in_case_is_joined_as_fetch_does(tmp_path: Path) -> None:
    """`content-type` in extra headers joins the default with ', ' as Unleash's fetch does."""
    headers = request_headers(_hook('headers={"content-type"="text/x"}', tmp_path))
    assert headers.getall("Content-Type") == ["application/json, text/x"]


# attempt, attempts made (counted), delays, 429s in a row before, max_rate_limit_wait_s
#   -> kind, delay, counted, holds the whole webhook, reason prefix
RATE_CASES = [
    (Attempt(429, retry_after="2"), 1, (), 0, 3600.0, "retry", 2.0, False, True, "HTTP 429"),
    (Attempt(429, retry_after="2"), 9, ONE_RETRY, 0, 3600.0, "retry", 2.0, False, True, "HTTP 429"),
    (Attempt(429), 1, (), 0, 3600.0, "retry", 1.0, False, True, "HTTP 429 (no Retry-After)"),
    (Attempt(429), 1, (), 3, 3600.0, "retry", 8.0, False, True, "HTTP 429 (no Retry-After)"),
    (Attempt(429), 1, (), 11, 3600.0, "retry", 2048.0, False, True, "HTTP 429"),
    # The back-off passes the bound: counted now, and given up once retries are used up.
    (Attempt(429), 1, ONE_RETRY, 12, 3600.0, "retry", 3600.0, True, True, "HTTP 429"),
    (Attempt(429), 2, ONE_RETRY, 12, 3600.0, "give_up", 0.0, True, False, "HTTP 429"),
    (Attempt(429, retry_after="7200"), 1, (), 0, 3600.0, "give_up", 0.0, True, False, "HTTP 429"),
    (Attempt(429, retry_after="90"), 1, (), 0, 60.0, "give_up", 0.0, True, False, "HTTP 429"),
    (Attempt(429, retry_after="90"), 1, ONE_RETRY, 0, 60.0, "retry", 60.0, True, True, "HTTP 429"),
    (Attempt(429, retry_after="soon"), 1, (), 1, 3600.0, "retry", 2.0, False, True, "HTTP 429"),
    (Attempt(410), 1, ONE_RETRY, 0, 3600.0, "pause", 0.0, True, False, "HTTP 410 Gone"),
    (Attempt(410), 5, (), 0, 3600.0, "pause", 0.0, True, False, "HTTP 410 Gone"),
    (Attempt(503, retry_after="5"), 1, ONE_RETRY, 0, 3600.0, "retry", 5.0, True, False, "HTTP 503"),
    (Attempt(500), 1, ONE_RETRY, 4, 3600.0, "retry", 1.0, True, False, "HTTP 500"),
]


@pytest.mark.parametrize(
    ("attempt", "made", "delays", "before", "bound", "kind", "delay", "counted", "hold", "reason"),
    RATE_CASES,
)
def test_decide_rate_limits_and_gone(
    attempt: Attempt,
    made: int,
    delays: tuple[float, ...],
    before: int,
    bound: float,
    kind: str,
    delay: float,
    counted: bool,
    hold: bool,
    reason: str,
) -> None:
    """A 429 holds the webhook without counting while the wait is within the bound; a 410
    pauses; other answers are as before and hold only their own event."""
    outcome = decide(
        attempt,
        made,
        delays,
        jitter=0.0,
        now=1_000_000.0,
        rate_limited_before=before,
        max_rate_limit_wait_s=bound,
    )
    assert (outcome.kind, outcome.counted, outcome.webhook_wait) == (kind, counted, hold)
    assert outcome.delay_s == pytest.approx(delay)
    assert outcome.rate_limited == (attempt.status == 429)
    assert outcome.reason.startswith(reason), outcome.reason
