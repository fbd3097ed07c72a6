"""One HTTP POST to a webhook, and the one pure function that decides what its result means."""

from __future__ import annotations

import functools
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aiohttp
from multidict import CIMultiDict

from poller import __version__
from poller.config import WebhookConfig
from poller.providers.base import Answer, Judge, Request
from poller.urls import redact_url, scrub_urls

RETRY_AFTER_MAX_S = 3600.0  # a receiver may ask us to wait, but not for a day
_RESPONSE_READ_LIMIT = 64 * 1024
_SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding")

OutcomeKind = Literal["delivered", "retry", "give_up"]


@dataclass(frozen=True)
class Attempt:
    """What one POST did: an HTTP status, or an error that kept us from getting one."""

    status: int | None = None
    error: str | None = None
    retry_after: str | None = None
    duration_s: float = 0.0
    # A provider's reading of an answer its HTTP status does not tell (Slack's 200 with
    # `ok: false`): the reason, and whether it is worth asking again.
    failure: str | None = None
    failure_retryable: bool = False
    failure_rate_limited: bool = False  # the provider's "too fast": decided as a 429


@dataclass(frozen=True)
class Outcome:
    """`pause`: the receiver said the endpoint is gone (410); the webhook pauses.
    `rate_limited`: a 429. `webhook_wait`: the delay holds the whole webhook, not just
    this event. `counted`: whether this attempt counts toward `retries` (a 429 the
    webhook can wait out does not)."""

    kind: OutcomeKind | Literal["pause"]
    reason: str
    delay_s: float = 0.0
    rate_limited: bool = False
    webhook_wait: bool = False
    counted: bool = True


_DELAY_SECONDS = re.compile(r"[0-9]+", re.ASCII)
_DAYS = "(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun)"
_LONG_DAYS = "(?:Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_MONTH = "(?P<month>" + "|".join(_MONTHS) + ")"
_TIME = "(?P<hour>[0-9]{2}):(?P<minute>[0-9]{2}):(?P<second>[0-9]{2})"
# RFC 9110 section 5.6.7: IMF-fixdate, and the two obsolete forms a recipient must accept.
_HTTP_DATES = (
    re.compile(rf"{_DAYS}, (?P<day>[0-9]{{2}}) {_MONTH} (?P<year>[0-9]{{4}}) {_TIME} GMT", re.A),
    re.compile(rf"{_LONG_DAYS}, (?P<day>[0-9]{{2}})-{_MONTH}-(?P<yy>[0-9]{{2}}) {_TIME} GMT", re.A),
    re.compile(rf"{_DAYS} {_MONTH} (?P<day>[ 0-9][0-9]) {_TIME} (?P<year>[0-9]{{4}})", re.A),
)


# How long a worker pauses after an event that sent nothing (its render gave up, maybe
# after holding the event loop for its whole time budget): long enough that the loop runs
# everything else that is ready first. sleep(0) leaves the worker ready, and a timer or an
# I/O wake-up elsewhere then gets one step per render or less.
YIELD_S = 0.001


def retry_after_s(value: str | None, now: float) -> float | None:
    """The wait a `Retry-After` header asks for, capped at RETRY_AFTER_MAX_S, or None when
    it is neither delay-seconds (ASCII digits only) nor an HTTP date. A receiver's header
    is untrusted: anything else is ignored, never an error."""
    if not value:
        return None
    value = value.strip(" \t")
    if _DELAY_SECONDS.fullmatch(value):
        # More significant digits than a float holds exactly (or than int() takes) is
        # "very long"; leading zeros are not significant ("0000000005" is 5 s).
        digits = value.lstrip("0") or "0"
        return RETRY_AFTER_MAX_S if len(digits) > 9 else min(float(digits), RETRY_AFTER_MAX_S)
    when = _http_date(value)
    if when is None:
        return None
    return min(max(0.0, when - now), RETRY_AFTER_MAX_S)


def _http_date(value: str) -> float | None:
    for form in _HTTP_DATES:
        match = form.fullmatch(value)
        if match is None:
            continue
        fields = match.groupdict()
        # A two-digit year (RFC 850): RFC 9110 reads it within 50 years of now; this
        # century's 1970-2069 window is that for as long as this code will run.
        year = int(fields["year"]) if fields.get("year") else 1900 + int(fields["yy"])
        if not fields.get("year") and year < 1970:
            year += 100
        try:
            moment = datetime(
                year,
                _MONTHS.index(fields["month"]) + 1,
                int(fields["day"]),
                int(fields["hour"]),
                int(fields["minute"]),
                int(fields["second"]),
                tzinfo=UTC,
            )
        except ValueError:  # 31 February, hour 25, year 0
            return None
        return moment.timestamp()
    return None


@functools.cache
def _delivered(status: int) -> Outcome:
    """One shared (frozen) outcome per 2xx status: made after every delivery."""
    return Outcome("delivered", f"HTTP {status}")


def decide(
    attempt: Attempt,
    attempts_made: int,
    delays: Sequence[float],
    jitter: float = 0.0,
    now: float = 0.0,
    *,
    rate_limited_before: int = 0,
    max_rate_limit_wait_s: float = RETRY_AFTER_MAX_S,
) -> Outcome:
    """Classify a delivery attempt.

    `attempts_made` counts this one (the attempts that count toward `retries`);
    `delays[i]` is the wait before retry i+1, so `len(delays)` is the number of retries
    allowed. `jitter` in [0, 1) spreads retries by up to +20% so a recovering receiver
    is not hit by every sender at once. `rate_limited_before` is how many 429s in a row
    this webhook had before this attempt (see `_rate_limited`).
    """
    if attempt.failure is not None and attempt.failure_rate_limited:
        return _rate_limited(
            attempt, attempts_made, delays, jitter, now, rate_limited_before, max_rate_limit_wait_s
        )
    if attempt.failure is not None:
        reason, retryable = attempt.failure, attempt.failure_retryable
    elif attempt.status is not None and 200 <= attempt.status < 300:
        return _delivered(attempt.status)
    elif attempt.status == 410:
        return Outcome("pause", "HTTP 410 Gone (the receiver says this endpoint is gone)")
    elif attempt.status == 429:
        return _rate_limited(
            attempt, attempts_made, delays, jitter, now, rate_limited_before, max_rate_limit_wait_s
        )
    elif attempt.status is None:
        reason, retryable = attempt.error or "no response", True
    elif 300 <= attempt.status < 400:
        reason, retryable = f"HTTP {attempt.status} (redirects are not followed)", False
    elif attempt.status == 408 or attempt.status >= 500:
        reason, retryable = f"HTTP {attempt.status}", True
    else:
        reason, retryable = f"HTTP {attempt.status} (not retried)", False
    retries_done = attempts_made - 1
    if not retryable or retries_done >= len(delays):
        tries = "attempt" if attempts_made == 1 else "attempts"
        return Outcome("give_up", f"{reason} after {attempts_made} {tries}")
    delay = delays[retries_done] * (1.0 + 0.2 * jitter)
    if attempt.status == 503 or attempt.failure is not None:
        asked = retry_after_s(attempt.retry_after, now)
        if asked is not None:
            delay = min(max(delay, asked), RETRY_AFTER_MAX_S)
    return Outcome("retry", reason, delay)


def _rate_limited(
    attempt: Attempt,
    attempts_made: int,
    delays: Sequence[float],
    jitter: float,
    now: float,
    rate_limited_before: int,
    max_wait_s: float,
) -> Outcome:
    """A 429 holds the whole webhook: for its Retry-After, or else for a back-off that
    doubles with each 429 in a row (1 s, 2 s, 4 s, ...). A wait within `max_wait_s` does
    not count toward `retries`; a longer one (or one of RETRY_AFTER_MAX_S or more) does,
    waiting `max_wait_s`, and gives up only once the retries have run out."""
    asked = retry_after_s(attempt.retry_after, now)
    if asked is not None:
        wait, why = asked, f"Retry-After {attempt.retry_after}"
    else:
        wait = 2.0 ** min(rate_limited_before, 40) * (1.0 + 0.2 * jitter)
        why = "no Retry-After"
    said = attempt.failure if attempt.failure_rate_limited and attempt.failure else "HTTP 429"
    # retry_after_s caps what it reads at RETRY_AFTER_MAX_S, so a wait that long stands
    # for "that long or longer": over any bound (which config keeps within it).
    if wait <= max_wait_s and wait < RETRY_AFTER_MAX_S:
        return Outcome(
            "retry", f"{said} ({why})", wait, rate_limited=True, webhook_wait=True, counted=False
        )
    reason = f"{said} ({why}; a wait of {wait:g}s is over max_rate_limit_wait_s {max_wait_s:g})"
    if attempts_made - 1 >= len(delays):
        tries = "attempt" if attempts_made == 1 else "attempts"
        return Outcome("give_up", f"{reason} after {attempts_made} {tries}", rate_limited=True)
    return Outcome("retry", reason, max_wait_s, rate_limited=True, webhook_wait=True)


def request_headers(hook: WebhookConfig) -> CIMultiDict[str]:
    """Headers as Unleash sends them: Content-Type, Authorization when set, then the
    extra headers merged over them. A JavaScript object merge replaces a key spelled the
    same and keeps both when only the case differs; fetch then joins those with ', '."""
    merged: dict[str, str] = {"Content-Type": hook.content_type}
    if hook.authorization is not None:
        merged["Authorization"] = hook.authorization.reveal()
    merged.update(dict(hook.headers))
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in merged.items():
        if name in headers:
            headers[name] = f"{headers[name]}, {value}"
        else:
            headers[name] = value
    headers.setdefault("User-Agent", f"unleash-poller/{__version__}")
    return headers


@functools.cache
def _timeout(total_s: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total_s)


async def post(
    session: aiohttp.ClientSession,
    hook: WebhookConfig,
    headers: CIMultiDict[str],
    body: bytes,
    delivery_id: str,
) -> Attempt:
    """POST once. Never raises for network trouble: that is an Attempt with an error."""
    send = headers.copy()
    send.setdefault("webhook-id", delivery_id)
    if hook.signer is not None:
        # A fresh timestamp per attempt (receivers reject stale ones); the id stays stable.
        send.update(hook.signer.sign(delivery_id, int(time.time()), body))
    started = time.monotonic()
    try:
        # Unleash's integration sends no Accept/Accept-Encoding; neither do we. An answer
        # compressed all the same is not inflated: only its status counts (see _inflated).
        async with session.post(
            hook.url,
            data=body,
            headers=send,
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            ssl=hook.ssl_context or True,
            proxy=hook.proxy,
            timeout=_timeout(hook.timeout_s),
            auto_decompress=False,
        ) as resp:
            # Read (a bounded amount of) the answer so the connection can be reused.
            await resp.content.read(_RESPONSE_READ_LIMIT)
            status = resp.status
            retry_after = None if status < 300 else resp.headers.get("Retry-After")
            return Attempt(status, None, retry_after, time.monotonic() - started)
    except TimeoutError:
        error = f"timed out after {hook.timeout_s:g}s"
    except aiohttp.ClientHttpProxyError as exc:
        # Its text carries the proxy URL with any password in it.
        error = f"proxy {redact_url(str(exc.request_info.real_url))} answered HTTP {exc.status}"
    except aiohttp.ClientConnectionError as exc:
        error = f"connection failed: {type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        error = f"request failed: {type(exc).__name__}: {exc}"
    # aiohttp's texts carry the full URL (a malformed answer's error names it), and a
    # receiver's garbage may echo our request line: neither may reach a log or the state.
    return Attempt(None, scrub_urls(error, hook.url, hook.proxy), None, time.monotonic() - started)


def _inflated(body: bytes, encoding: str | None) -> bytes:
    """The start of an answer as a provider's judge reads it: a gzip or deflate body (sent
    although we ask for none) inflated here, to at most _RESPONSE_READ_LIMIT bytes; any
    other, or one that does not inflate, as it came. Not aiohttp's inflation: it inflates
    up to 32 MiB of each chunk read, and fails an answer that inflates to more (or not at
    all), which made a receiver's 200 a failed delivery."""
    if encoding is None or encoding.strip().lower() not in ("gzip", "x-gzip", "deflate"):
        return body
    for wbits in (zlib.MAX_WBITS | 32, -zlib.MAX_WBITS):  # gzip or zlib; raw deflate
        try:
            return zlib.decompressobj(wbits).decompress(body, _RESPONSE_READ_LIMIT)
        except zlib.error:
            continue
    return body


async def send(
    session: aiohttp.ClientSession, hook: WebhookConfig, request: Request, judge: Judge
) -> Attempt:
    """Send one request a provider built, once, exactly as built (no headers of ours but
    User-Agent), and let the provider judge the answer. Never raises for network trouble."""
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in request.headers:
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    headers.setdefault("User-Agent", f"unleash-poller/{__version__}")
    started = time.monotonic()
    try:
        async with session.request(
            request.method,
            request.url,
            data=request.body,
            headers=headers,
            allow_redirects=False,
            skip_auto_headers=_SKIP_AUTO_HEADERS,
            ssl=hook.ssl_context or True,
            proxy=hook.proxy,
            timeout=_timeout(hook.timeout_s),
            auto_decompress=False,
        ) as resp:
            body = await resp.content.read(_RESPONSE_READ_LIMIT)
            body = _inflated(body, resp.headers.get("Content-Encoding"))
            status = resp.status
            retry_after = resp.headers.get("Retry-After")
    except TimeoutError:
        error = f"timed out after {hook.timeout_s:g}s"
    except aiohttp.ClientHttpProxyError as exc:
        error = f"proxy {redact_url(str(exc.request_info.real_url))} answered HTTP {exc.status}"
    except aiohttp.ClientConnectionError as exc:
        error = f"connection failed: {type(exc).__name__}: {exc}"
    except aiohttp.ClientError as exc:
        error = f"request failed: {type(exc).__name__}: {exc}"
    else:
        duration = time.monotonic() - started
        failure = judge(Answer(status, body))
        if failure is None:
            return Attempt(status, None, None if status < 300 else retry_after, duration)
        return Attempt(
            status,
            None,
            retry_after,
            duration,
            failure.reason,
            failure.retryable,
            failure.rate_limited,
        )
    # As for a webhook: no URL (a Slack or Teams URL is a credential) in an error text.
    return Attempt(
        None, scrub_urls(error, request.url, hook.proxy), None, time.monotonic() - started
    )
