"""One event through a provider: its requests, each sent until answered 2xx, once.

The seam the worker calls for a webhook with a `provider` (the poller's own webhook goes
through `worker.attempt_once`). An event may make several requests (Slack: one per
channel). The outbox row stays one per (webhook, event), so order, retries and dead
letters work as for any webhook; what it adds is a record of which of the event's
requests were answered 2xx (`State.part_sent`), written as each one succeeds, so a retry
or a replay sends only the requests still owed. A crash between a 2xx and that record
re-sends that one request: at least once, as everywhere else.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable

import aiohttp

from poller.config import WebhookConfig
from poller.deliver import YIELD_S, Outcome, decide, send
from poller.faults import crash_point
from poller.log import get as get_logger
from poller.providers.base import BuildError, Request
from poller.render import UNREADABLE
from poller.state import FencedError, StateStore

log = get_logger()


def requests_for(hook: WebhookConfig, body_json: str) -> list[Request] | Outcome:
    """The requests a stored event makes, or the give-up outcome when it makes none
    that can be sent."""
    assert hook.provider is not None
    event = json.loads(body_json)
    if unreadable := event.get(UNREADABLE):
        return Outcome("give_up", f"event could not be read from Unleash: {unreadable}")
    try:
        return hook.provider.requests(event)
    except BuildError as exc:
        return Outcome("give_up", str(exc))


def combine(outcomes: list[tuple[str, Outcome]]) -> Outcome:
    """One outcome for the event from its requests' outcomes, meaning what it would for
    one webhook request: delivered when all were; paused when any request was answered
    410; retried (after the longest wait asked for) while any may still succeed, holding
    the whole webhook and marked rate limited if any retried request was, and counted
    toward `retries` only if some retried request counts; else given up, naming each
    request that failed."""
    failed = [(part, o) for part, o in outcomes if o.kind != "delivered"]
    if not failed:
        return outcomes[0][1] if outcomes else Outcome("delivered", "nothing to send")
    reason = "; ".join(f"{part}: {o.reason}" if part else o.reason for part, o in failed)
    if any(o.kind == "pause" for _, o in failed):
        return Outcome("pause", reason)
    retries = [o for _, o in failed if o.kind == "retry"]
    if retries:
        return Outcome(
            "retry",
            reason,
            max(o.delay_s for o in retries),
            rate_limited=any(o.rate_limited for o in retries),
            webhook_wait=any(o.webhook_wait for o in retries),
            counted=any(o.counted for o in retries),
        )
    return Outcome("give_up", reason, rate_limited=any(o.rate_limited for _, o in failed))


async def deliver_event(
    session: aiohttp.ClientSession,
    hook: WebhookConfig,
    state: StateStore,
    event_id: int,
    body_json: str,
    attempts_before: int,
    rate_limited_before: int = 0,
    may_send: Callable[[], bool] | None = None,
) -> tuple[Outcome, int, float | None]:
    """Send the event's requests still owed, once each; return what it means for the
    event, the attempt count and the HTTP time (None when nothing was sent).
    `rate_limited_before`: this webhook's 429s in a row (see deliver.decide). A request
    answered 429 (which holds the whole webhook) or 410 (which pauses it) stops the
    event there: the requests after it are still owed and wait with the webhook.
    `may_send` (under a lease) is asked before each request after the first (the caller
    asks before the first): once it says no, FencedError, and the new leader sends the
    requests still owed."""
    assert hook.provider is not None
    attempts = attempts_before + 1
    built = requests_for(hook, body_json)
    if isinstance(built, Outcome):
        await asyncio.sleep(YIELD_S)  # as attempt_once: a give-up never runs back to back
        return built, attempts, None
    several = len(built) > 1
    done = await state.parts_sent(hook.name, event_id) if several else frozenset()
    judge = hook.provider.provider.judge
    outcomes: list[tuple[str, Outcome]] = []
    took: float | None = None
    for request in built:
        if request.part in done:
            continue
        if outcomes and may_send is not None and not may_send():
            raise FencedError("the lease was not renewed in time; no new request starts")
        crash_point("delivery.before_post")
        attempt = await send(session, hook, request, judge)
        crash_point("delivery.after_post")
        took = (took or 0.0) + attempt.duration_s
        outcome = decide(
            attempt,
            attempts,
            hook.retry_delays,
            jitter=random.random(),  # noqa: S311
            now=time.time(),
            rate_limited_before=rate_limited_before,
            max_rate_limit_wait_s=hook.max_rate_limit_wait_s,
        )
        if outcome.kind == "delivered" and several:
            await state.part_sent(hook.name, event_id, request.part)
        elif outcome.kind != "delivered":
            log.warning(
                "delivery.request_failed",
                webhook=hook.name,
                event_id=event_id,
                part=request.part,
                attempt=attempts,
                status=attempt.status,
                reason=outcome.reason,
            )
        outcomes.append((request.part, outcome))
        if outcome.webhook_wait or outcome.kind == "pause":
            break
    outcome = combine(outcomes)
    if outcome.kind == "retry":
        log.warning(
            "delivery.retry_scheduled",
            webhook=hook.name,
            event_id=event_id,
            attempt=attempts,
            reason=outcome.reason,
            retry_in_s=round(outcome.delay_s, 2),
        )
    return outcome, attempts, took
