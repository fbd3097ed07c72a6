"""One delivery worker per webhook: drains that webhook's outbox, in event-id order by default.

Workers share nothing but the state file and the HTTP session, so a slow or dead webhook
holds up only its own queue. In order mode the head of the queue blocks the rest while it
is retried (that is what "in order" means); `max_in_flight > 1` opts out.

This module holds one attempt at one event (`attempt_once`, also used by replay) and what
both kinds of worker share (`Worker`); `make_worker` picks the kind, which lives in
worker_ordered.py or worker_unordered.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import ClassVar

import aiohttp
from multidict import CIMultiDict

from poller.config import WebhookConfig
from poller.deliver import YIELD_S, Attempt, Outcome, decide, post, request_headers
from poller.dispatch import deliver_event
from poller.faults import crash_point
from poller.log import debug_enabled
from poller.log import get as get_logger
from poller.render import RenderError, RenderStoppedError
from poller.schedule import Action, Pause, Schedule
from poller.state import AttemptRecord, FencedError, Pending, StateStore

log = get_logger()
_BATCH = 64
# Delivered events marked per transaction; a kill -9 re-sends at most this many per webhook
# (plus those in flight). A mark alone costs ~30 us here, eight together ~9 us each.
MARKS_PER_COMMIT = 8
# The attempt log is written once this many attempts are held (and at every outbox read,
# wait and stop): a transaction of its own with each commit of marks made half again as
# many SQLite statements per delivery. A kill -9 loses at most this many lines of it.
_ATTEMPTS_PER_COMMIT = 64
# A worker stopped by an error or a cancel commits its held marks within this, or leaves
# them (a duplicate each, never a loss).
_LAST_COMMIT_S = 2.0


def delivery_id(event_id: int) -> str:
    """Stable across retries, replays and re-deliveries after a crash, so receivers can
    de-duplicate (sent as `webhook-id`)."""
    return f"unleash-event-{event_id}"


def render_body(hook: WebhookConfig, body_json: str) -> bytes | Outcome:
    """The bytes to POST for a stored event, or the give-up outcome when it cannot be
    rendered (a retry, to be scheduled, when the render was stopped for time or memory)."""
    try:
        return hook.renderer.render(json.loads(body_json))
    except RenderStoppedError as exc:
        return Outcome("retry", str(exc))  # scheduled by attempt_once
    except RenderError as exc:
        return Outcome("give_up", str(exc))


async def render_body_async(hook: WebhookConfig, body_json: str) -> bytes | Outcome:
    """render_body for a renderer that must not run on the event loop (Jinja2): it runs
    on a render thread, stopped at its deadline, while the loop serves the others."""
    try:
        return await hook.renderer.render_async(json.loads(body_json))
    except RenderStoppedError as exc:
        return Outcome("retry", str(exc))  # scheduled by attempt_once
    except RenderError as exc:
        return Outcome("give_up", str(exc))


class _WhileSending:
    """Runs `work` once a request has been sent, while the receiver handles it, so that the
    work costs no time between two in-order deliveries. `work` must not raise: it runs as
    a loop callback, where an exception would only be logged by asyncio.

    Two loop turns after the request coroutine first yields: the first lets aiohttp's body
    writer (a task of its own before Python 3.12) be scheduled, the second runs after it
    has written. Were the request not out by then, the work would merely not overlap it.
    """

    def __init__(self, work: Callable[[], None]) -> None:
        self._work = work
        self._ran = False
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_soon(self._hop)

    def _hop(self) -> None:
        self._handle = self._loop.call_soon(self._run)

    def _run(self) -> None:
        self._ran = True
        self._work()

    def cancel(self) -> None:
        self._handle.cancel()

    def finish(self) -> None:
        """After the response: run the work now if it has not run yet."""
        self._handle.cancel()
        if not self._ran:
            self._run()


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """What `attempt_once` did: what it means, the attempt count including this one, and
    the HTTP time (None when nothing was sent)."""

    outcome: Outcome
    attempts: int
    duration_s: float | None
    # What the POST did (for the attempt log); for a body that could not be rendered, an
    # Attempt with that error and no status. None from a provider's several requests.
    attempt: Attempt | None = None


async def attempt_once(
    session: aiohttp.ClientSession,
    hook: WebhookConfig,
    headers: CIMultiDict[str],
    event_id: int,
    body_json: str,
    attempts_before: int,
    *,
    body: bytes | Outcome | None = None,
    while_sending: Callable[[], None] | None = None,
    rate_limited_before: int = 0,
) -> AttemptResult:
    """Render (unless `body` is given) and POST one event once. `while_sending` runs once
    the request is out (not at all when nothing is sent). `rate_limited_before`: this
    webhook's 429s in a row (see deliver.decide)."""
    attempts = attempts_before + 1
    if body is None:
        if hook.renderer.off_loop:
            body = await render_body_async(hook, body_json)
        else:
            body = render_body(hook, body_json)
    if isinstance(body, Outcome):
        if body.kind == "retry":  # stopped for time or memory: retried like a lost request
            body = decide(
                Attempt(error=body.reason),
                attempts,
                hook.retry_delays,
                jitter=random.random(),  # noqa: S311
                now=time.time(),
            )
        # Nothing to send (the render gave up, maybe after holding the event loop for its
        # whole time budget): let the rest of the process run before the next event, so
        # such renders never run back to back. Not sleep(0): that leaves this task ready,
        # and a timer or an I/O wake-up elsewhere then gets one step per render or less.
        await asyncio.sleep(YIELD_S)
        return AttemptResult(body, attempts, None, Attempt(None, body.reason))
    crash_point("delivery.before_post")
    if while_sending is None:
        attempt = await post(session, hook, headers, body, delivery_id(event_id))
    else:
        side = _WhileSending(while_sending)
        try:
            attempt = await post(session, hook, headers, body, delivery_id(event_id))
        except BaseException:
            side.cancel()
            raise
        side.finish()
    crash_point("delivery.after_post")
    outcome = decide(
        attempt,
        attempts,
        hook.retry_delays,
        jitter=random.random(),  # noqa: S311
        now=time.time(),
        rate_limited_before=rate_limited_before,
        max_rate_limit_wait_s=hook.max_rate_limit_wait_s,
    )
    if outcome.kind == "delivered" and not debug_enabled():
        return AttemptResult(outcome, attempts, attempt.duration_s, attempt)
    fields = {
        "webhook": hook.name,
        "event_id": event_id,
        "attempt": attempts,
        "status": attempt.status,
        "duration_ms": round(attempt.duration_s * 1000, 1),
    }
    if outcome.kind == "delivered":
        log.debug("delivery.succeeded", **fields)
    elif outcome.kind == "retry":
        log.warning(
            "delivery.retry_scheduled",
            **fields,
            reason=outcome.reason,
            retry_in_s=round(outcome.delay_s, 2),
        )
    return AttemptResult(outcome, attempts, attempt.duration_s, attempt)


def attempt_record(
    webhook: str,
    event_id: int,
    number: int,
    attempt: Attempt,
    outcome: str,
    now: float | None = None,
) -> AttemptRecord:
    """What the attempt log keeps of one attempt: never the body, a header or a secret."""
    now = time.time() if now is None else now
    sent_anything = attempt.status is not None or attempt.duration_s > 0
    return AttemptRecord(
        webhook=webhook,
        event_id=event_id,
        at=now - attempt.duration_s,
        attempt=number,
        status=attempt.status,
        error=attempt.error,
        latency_ms=round(attempt.duration_s * 1000, 2) if sent_anything else None,
        outcome=outcome,
    )


class Worker(ABC):
    """Drains one webhook's outbox: what in order (`OrderedWorker`) and unordered
    (`UnorderedWorker`) delivery share. `make_worker` picks one by `max_in_flight`; a
    running worker takes new settings (`reconfigure`) but not a change of that, which needs
    a new worker (see reload.plan_reload).

    Delivery marks are group-committed: up to MARKS_PER_COMMIT delivered events are marked
    in one transaction, which costs little more than marking one. The marks held back are
    committed before the outbox is read again, before the worker waits, and on every stop
    but kill -9, so a kill -9 re-sends at most MARKS_PER_COMMIT delivered events per
    webhook plus those in flight.
    """

    def __init__(
        self,
        hook: WebhookConfig,
        state: StateStore,
        session: aiohttp.ClientSession,
        stop: asyncio.Event,
        *,
        once: bool = False,
        on_outcome: Callable[[str, Outcome, float, float | None], None] | None = None,
        may_send: Callable[[], bool] | None = None,
    ) -> None:
        self.hook = hook
        self.state = state
        self.session = session
        self.stop = stop
        self.once = once
        self.wake = asyncio.Event()
        self._on_outcome = on_outcome
        # Under a lease: False once this daemon's lease may have run out (by its own
        # monotonic clock), so no delivery starts that a new leader may also make.
        self._may_send = may_send
        self._headers = request_headers(hook)
        self._unmarked: list[int] = []  # delivered, marks not yet committed
        # Delivery controls: when this webhook may send next (rate limit, 429 holds,
        # pause and probes) is decided by the schedule alone; the loops ask it.
        self.schedule = Schedule(
            hook.max_per_second, hook.pause_after_failures, hook.probe_interval_s
        )
        self._attempts: list[AttemptRecord] = []  # logged with the next commit of marks
        # Held by a read of the outbox and by every write that takes a row out of it or
        # moves it (a commit of marks, a dead letter, a retry): while a read is out, each
        # row this worker has delivered or is settling is in `_unmarked` or being
        # delivered, so the read can leave it out. Without it, lanes of an unordered worker
        # on a store whose writes yield (PostgreSQL) read a row whose mark was in flight and
        # delivered it twice.
        self._outbox = asyncio.Lock()

    # A delivery commits the held marks itself once this many are held (inf: it leaves them
    # to another commit).
    _commit_at: ClassVar[float]

    def reconfigure(self, hook: WebhookConfig) -> None:
        """Take new settings of the same webhook, `max_in_flight` aside."""
        self.hook = hook
        self._headers = request_headers(hook)
        self.schedule.configure(
            hook.max_per_second, hook.pause_after_failures, hook.probe_interval_s
        )
        self.wake.set()

    async def commit_marks(self, *, attempts: bool = True) -> None:
        """Commit the delivery marks held back, if any, and (unless `attempts` is False) the
        attempts not logged yet."""
        await self._commit(attempts=attempts)

    async def _commit(self, *, attempts: bool) -> None:
        records: list[AttemptRecord] = []
        if attempts or len(self._attempts) >= _ATTEMPTS_PER_COMMIT:
            records, self._attempts = self._attempts, []
        async with self._outbox:
            if self._unmarked:
                # Taken out first: marks added meanwhile, while this commit waits on the
                # store, are not dropped with these.
                marks, self._unmarked = self._unmarked, []
                try:
                    await self.state.delivered(self.hook.name, *marks)
                except BaseException:
                    self._unmarked[:0] = marks  # still held: tried again at the stop
                    raise
        if records:  # none are kept when attempt_log_size is 0
            await self.state.record_attempts(records, {self.hook.name: self.hook.attempt_log_size})

    # -- pauses: kept in the state store, so a pause survives a restart and can be set and
    # lifted by `unleash-poller webhooks pause|resume` beside the running daemon.

    async def _sync_pause(self) -> None:
        """Take the pause the store holds (it may have been changed by hand)."""
        stored = await self.state.pause(self.hook.name)
        before = self.schedule.paused
        if stored != before:
            self.schedule.restore(stored)
            await self._log_pause(before, stored)

    async def _save_pause(self, before: Pause | None) -> None:
        after = self.schedule.paused
        if after == before:
            return
        if after is None:
            await self.state.resume(self.hook.name)
        elif before is None:
            await self.state.set_pause(self.hook.name, after)
        else:  # a probe failed: only the next probe time moves
            await self.state.probe_failed(self.hook.name, after.probe_at, after.probes)
            return
        await self._log_pause(before, after)

    async def _log_pause(self, before: Pause | None, after: Pause | None) -> None:
        name = self.hook.name
        pending = (await self.state.pending_counts()).get(name, 0)
        if after is not None:
            log.error(
                "webhook.paused",
                webhook=name,
                reason=after.reason,
                since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(after.since)),
                probing=not after.awaits_resume,
                pending=pending,
                detail="nothing is dead-lettered while paused; "
                + (
                    "the head event is probed until the receiver takes it"
                    if not after.awaits_resume
                    else f"resume with `unleash-poller webhooks resume {name}`"
                ),
            )
        elif before is not None:
            log.warning(
                "webhook.resumed",
                webhook=name,
                paused_for_s=round(time.time() - before.since, 1),
                pending=pending,
            )

    # -- running

    async def run(self) -> None:
        try:
            await self._sync_pause()
            await self._run()
        except BaseException:
            # Cancelled (a forced stop) or failed: the delivered event need not go out
            # again, but a second failure of the state file must not hide the first.
            # Bounded: a state that went away (PostgreSQL cut off) must not hold up the stop.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.commit_marks(), _LAST_COMMIT_S)
            raise
        await self.commit_marks()

    @abstractmethod
    async def _run(self) -> None:
        """Deliver until stopped (or, `once`, until nothing is due)."""

    async def _wait(self, timeout_s: float | None) -> None:
        """Until woken (new work), stopped, or the timeout passes."""
        waiters = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(self.stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _refresh(self) -> None:
        """Before the outbox is read: take the wake-up, commit the marks held (the outbox
        must not offer a delivered event again) and take the stored pause."""
        self.wake.clear()
        await self.commit_marks()
        await self._sync_pause()

    async def _read_outbox(self, taken: Collection[int] = ()) -> list[Pending]:
        """The next batch of this webhook's outbox, less the rows being delivered."""
        await self._refresh()
        async with self._outbox:
            rows = await self.state.next_pending(self.hook.name, _BATCH + len(taken))
            # Delivered while reading (by another lane): owed until its mark is committed.
            busy = {*taken, *self._unmarked}
        return [r for r in rows if r.event_id not in busy] if busy else rows

    def _log_attempt(self, row: Pending, attempt: Attempt, action: Action, now: float) -> None:
        """Keep one record of the attempt for the attempt log (committed with the marks)."""
        if not self.hook.attempt_log_size:
            return
        number = row.attempts + row.rate_limited + 1
        self._attempts.append(
            attempt_record(self.hook.name, row.event_id, number, attempt, action.kind, now)
        )

    # Hooks for the work in order delivery does while a request is out (none here).
    async def _before_request(self) -> None:  # noqa: B027 - a hook, see above
        """Before a request goes out: finish (and raise what raised) the work done during
        the last one."""

    def _after_outcome(self) -> None:  # noqa: B027 - a hook, see above
        """Once an outcome is recorded: raise what the work done while sending raised."""

    @abstractmethod
    def _post(self, row: Pending, following: Pending | None) -> Awaitable[AttemptResult]:
        """Render and POST `row` once (`following`: the row after it, in order). Not a
        coroutine of its own but attempt_once's: one frame less on the hot path."""

    async def _attempt(self, row: Pending, following: Pending | None) -> AttemptResult:
        await self._before_request()
        if self._may_send is not None and not self._may_send():
            # The lease may be gone by now: a new leader may send this event too.
            raise FencedError("the lease was not renewed in time; no new delivery starts")
        self.schedule.took(time.time())  # the rate limit counts from here
        if self.hook.provider is not None:
            # A provider builds its own requests (maybe several); the rest is shared.
            return AttemptResult(
                *await deliver_event(
                    self.session,
                    self.hook,
                    self.state,
                    row.event_id,
                    row.body,
                    row.attempts,
                    rate_limited_before=self.schedule.rate_limited,
                    may_send=self._may_send,
                )
            )
        return await self._post(row, following)

    async def _deliver(self, row: Pending, following: Pending | None = None) -> Outcome:
        """Attempt `row` once and record what that means: marked delivered, dead-lettered,
        or kept pending (a retry, or held by a pause)."""
        result = await self._attempt(row, following)
        outcome, attempts, duration_s = result.outcome, result.attempts, result.duration_s
        name = self.hook.name
        now = time.time()
        paused_before = self.schedule.paused
        # A body that cannot be rendered says nothing about the receiver: it neither counts
        # toward a pause nor waits in one.
        sent_it = duration_s is not None
        if sent_it:
            action = self.schedule.settle(outcome, now)
        elif outcome.kind == "retry":  # a render stopped for time or memory
            action = Action("retry", now + outcome.delay_s)
        else:
            action = Action("dead_letter")
        rate_limited = row.rate_limited + outcome.rate_limited
        if not outcome.counted:
            attempts -= 1
        attempt = result.attempt or Attempt(
            None,
            None if action.kind == "delivered" else outcome.reason,
            duration_s=duration_s or 0.0,
        )
        self._log_attempt(row, attempt, action, now)
        if action.kind == "delivered":
            self._unmarked.append(row.event_id)
            if len(self._unmarked) >= self._commit_at:
                await self.commit_marks(attempts=False)
        elif action.kind == "dead_letter":
            async with self._outbox:
                await self.state.dead_letter(name, row.event_id, attempts, outcome.reason)
            log.error(
                "delivery.dead_lettered",
                webhook=name,
                event_id=row.event_id,
                attempt=attempts,
                reason=outcome.reason,
            )
        else:  # retry, or kept pending while paused (until the next probe or a resume)
            at = now if math.isinf(action.at) else action.at  # inf: held by the pause itself
            async with self._outbox:
                await self.state.retry_later(
                    name, row.event_id, attempts, at, outcome.reason, rate_limited
                )
            if action.kind == "keep":
                outcome = Outcome("retry", outcome.reason, max(0.0, action.at - now))
        await self._save_pause(paused_before)
        if self._on_outcome is not None:
            self._on_outcome(name, outcome, now - row.enqueued_at, duration_s)
        self._after_outcome()
        return outcome


def make_worker(
    hook: WebhookConfig,
    state: StateStore,
    session: aiohttp.ClientSession,
    stop: asyncio.Event,
    *,
    once: bool = False,
    on_outcome: Callable[[str, Outcome, float, float | None], None] | None = None,
    may_send: Callable[[], bool] | None = None,
) -> Worker:
    """The worker for `hook`: in order when `max_in_flight` is 1, else unordered."""
    # Imported here: the strategies subclass Worker, so they import this module.
    from poller.worker_ordered import OrderedWorker  # noqa: PLC0415
    from poller.worker_unordered import UnorderedWorker  # noqa: PLC0415

    kind: type[Worker] = OrderedWorker if hook.ordered else UnorderedWorker
    return kind(hook, state, session, stop, once=once, on_outcome=on_outcome, may_send=may_send)


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
    # What a cancelled worker raised instead (a fenced write on its way out, say) is not
    # raised here: the task's done callback (App._worker_done) has seen it already.
    await asyncio.gather(*pending, return_exceptions=True)
    return len(pending)
