"""One delivery worker per webhook: drains that webhook's outbox, in event-id order by default.

Workers share nothing but the state file and the HTTP session, so a slow or dead webhook
holds up only its own queue. In order mode the head of the queue blocks the rest while it
is retried (that is what "in order" means); `max_in_flight > 1` opts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from multidict import CIMultiDict

from poller.config import WebhookConfig
from poller.deliver import Outcome, decide, post, request_headers
from poller.faults import crash_point
from poller.log import debug_enabled
from poller.log import get as get_logger
from poller.render import RenderError
from poller.state import Pending, State

log = get_logger()
_BATCH = 64


@dataclass
class HookCounters:
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    latency_s: list[float] = field(default_factory=list)


def delivery_id(event_id: int) -> str:
    """Stable across retries, replays and re-deliveries after a crash, so receivers can
    de-duplicate (sent as `webhook-id`)."""
    return f"unleash-event-{event_id}"


async def attempt_once(session: aiohttp.ClientSession, hook: WebhookConfig,
                       headers: CIMultiDict[str], event_id: int, body_json: str,
                       attempts_before: int) -> tuple[Outcome, int, float | None]:
    """Render and POST one event once; return what it means, the attempt count and the
    HTTP time (None when nothing was sent)."""
    attempts = attempts_before + 1
    try:
        body = hook.renderer.render(json.loads(body_json))
    except RenderError as exc:
        return Outcome("give_up", str(exc)), attempts, None
    crash_point("delivery.before_post")
    attempt = await post(session, hook, headers, body, delivery_id(event_id))
    crash_point("delivery.after_post")
    outcome = decide(attempt, attempts, hook.retry_delays(), jitter=random.random(),  # noqa: S311
                     now=time.time())
    if outcome.kind == "delivered" and not debug_enabled():
        return outcome, attempts, attempt.duration_s
    fields = {"webhook": hook.name, "event_id": event_id, "attempt": attempts,
              "status": attempt.status, "duration_ms": round(attempt.duration_s * 1000, 1)}
    if outcome.kind == "delivered":
        log.debug("delivery.succeeded", **fields)
    elif outcome.kind == "retry":
        log.warning("delivery.retry_scheduled", **fields, reason=outcome.reason,
                    retry_in_s=round(outcome.delay_s, 2))
    return outcome, attempts, attempt.duration_s


class Worker:
    def __init__(self, hook: WebhookConfig, state: State, session: aiohttp.ClientSession,
                 stop: asyncio.Event, *, once: bool = False,
                 on_outcome: Callable[[str, Outcome, float, float | None], None] | None = None
                 ) -> None:
        self.hook = hook
        self.state = state
        self.session = session
        self.stop = stop
        self.once = once
        self.wake = asyncio.Event()
        self._on_outcome = on_outcome
        self._headers = request_headers(hook)

    def reconfigure(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self._headers = request_headers(hook)
        self.wake.set()

    async def run(self) -> None:
        if self.hook.ordered:
            await self._run_ordered()
        else:
            await self._run_unordered()

    async def _wait(self, timeout_s: float | None) -> None:
        """Until woken (new work), stopped, or the timeout passes."""
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _run_ordered(self) -> None:
        while not self.stop.is_set():
            self.wake.clear()
            rows = self.state.next_pending(self.hook.name, _BATCH)
            if not rows:
                if self.once:
                    return
                await self._wait(None)
                continue
            for row in rows:
                wait_s = row.next_attempt_at - time.time()
                if wait_s > 0:
                    await self._wait(wait_s)
                    break
                outcome = await self._deliver(row)
                # A retry blocks the queue behind it (that is what in order means). New rows
                # may hold a lower id (an event that committed late): re-read.
                if outcome.kind == "retry" or self.stop.is_set() or self.wake.is_set():
                    break

    async def _run_unordered(self) -> None:
        in_flight: dict[int, asyncio.Task[Outcome]] = {}
        limit = self.hook.max_in_flight
        while not self.stop.is_set():
            self.wake.clear()
            for event_id in [i for i, task in in_flight.items() if task.done()]:
                in_flight.pop(event_id).result()
            rows = self.state.next_pending(self.hook.name, limit * 2 + len(in_flight))
            now = time.time()
            waiting = [r for r in rows if r.event_id not in in_flight]
            for row in [r for r in waiting if r.next_attempt_at <= now][:limit - len(in_flight)]:
                in_flight[row.event_id] = asyncio.create_task(self._deliver(row))
            if not in_flight and not rows and self.once:
                return
            later = [r.next_attempt_at - now for r in waiting if r.next_attempt_at > now]
            timeout = min(later) if later and len(in_flight) < limit else None
            await self._wait_any(list(in_flight.values()), timeout)
        if in_flight:
            await asyncio.gather(*in_flight.values(), return_exceptions=True)

    async def _wait_any(self, tasks: list[asyncio.Task[Outcome]],
                        timeout_s: float | None) -> None:
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait([*waiters, *tasks], timeout=timeout_s,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _deliver(self, row: Pending) -> Outcome:
        outcome, attempts, duration_s = await attempt_once(
            self.session, self.hook, self._headers, row.event_id, row.body, row.attempts)
        name = self.hook.name
        if outcome.kind == "delivered":
            self.state.delivered(name, row.event_id)
        elif outcome.kind == "retry":
            self.state.retry_later(name, row.event_id, attempts, time.time() + outcome.delay_s,
                                   outcome.reason)
        else:
            self.state.dead_letter(name, row.event_id, attempts, outcome.reason)
            log.error("delivery.dead_lettered", webhook=name, event_id=row.event_id,
                      attempt=attempts, reason=outcome.reason)
        if self._on_outcome is not None:
            self._on_outcome(name, outcome, time.time() - row.enqueued_at, duration_s)
        return outcome


async def drain(workers: list[Worker], tasks: list[asyncio.Task[None]], timeout_s: float) -> int:
    """Give in-flight deliveries `timeout_s` to finish; cancel the rest. Returns how many
    workers had to be cancelled (their current event is re-sent after restart)."""
    for worker in workers:
        worker.stop.set()
    if not tasks:
        return 0
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    return len(pending)
