"""One delivery worker per webhook: drains that webhook's outbox, in event-id order by default.

Workers share nothing but the state file and the HTTP session, so a slow or dead webhook
holds up only its own queue. In order mode the head of the queue blocks the rest while it
is retried (that is what "in order" means); `max_in_flight > 1` opts out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

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
# The next body is rendered while a request is out only while renders of this webhook take
# less than this. The work may run before a request on a new connection has been written,
# inside that request's timeout, so it must stay small against any timeout.
_AHEAD_MAX_S = 0.002
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


class Worker:
    """Drains one webhook's outbox.

    Delivery marks are group-committed: up to MARKS_PER_COMMIT delivered events are marked
    in one transaction, which costs little more than marking one. In order, that commit
    (and the rendering of the next body) runs while the next event is on the wire, so
    neither costs time between two deliveries. The marks held back are committed before
    the outbox is read again, before the worker waits, and on every stop but kill -9, so
    a kill -9 re-sends at most MARKS_PER_COMMIT delivered events per webhook plus those in
    flight (one in order).
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
        self._committing: asyncio.Task[None] | None = None  # marks committed while sending
        self._headers = request_headers(hook)
        self._unmarked: list[int] = []  # delivered, marks not yet committed
        self._ahead: tuple[int, bytes | Outcome] | None = None  # the next body, rendered
        self._render_s = math.inf  # how long this webhook's last render took
        self._side_error: Exception | None = None  # raised by the work done while sending
        # Unordered: rows read from the outbox, due, not taken by a lane yet; the ids the
        # lanes are delivering; when the first row read but not yet due falls due.
        self._queue: deque[Pending] = deque()
        self._taken: set[int] = set()
        self._later_at = math.inf
        # Delivery controls: when this webhook may send next (rate limit, 429 holds,
        # pause and probes) is decided by the schedule alone; the loops below ask it.
        self.schedule = Schedule(
            hook.max_per_second, hook.pause_after_failures, hook.probe_interval_s
        )
        self._attempts: list[AttemptRecord] = []  # logged with the next commit of marks

    def reconfigure(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self._headers = request_headers(hook)
        self._ahead = None
        self.schedule.configure(
            hook.max_per_second, hook.pause_after_failures, hook.probe_interval_s
        )
        self.wake.set()

    async def commit_marks(self, *, attempts: bool = True) -> None:
        """Commit the delivery marks held back, if any, and (unless `attempts` is False) the
        attempts not logged yet. Waits for a commit started while sending, and raises
        what it raised."""
        task, self._committing = self._committing, None
        if task is not None:
            await task
        await self._commit(attempts=attempts)

    async def _commit(self, *, attempts: bool) -> None:
        records: list[AttemptRecord] = []
        if attempts or len(self._attempts) >= _ATTEMPTS_PER_COMMIT:
            records, self._attempts = self._attempts, []
        if self._unmarked:
            # Taken out first: marks added meanwhile, or by another lane's commit while this
            # one waits on the store, are not dropped with these.
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

    async def _commit_marks_if_full(self) -> None:
        if len(self._unmarked) >= MARKS_PER_COMMIT:
            await self.commit_marks(attempts=False)

    def _commit_while_sending(self) -> None:
        """Start committing the held marks if enough are held; the request out now
        covers the commit's time. `commit_marks` waits for it and raises its error."""
        if len(self._unmarked) >= MARKS_PER_COMMIT and self._committing is None:
            self._committing = asyncio.get_running_loop().create_task(self._commit(attempts=False))

    def _reap_commit(self) -> None:
        """Before the next request: once the commit started while the last one was out is
        done, let the next start, and raise what it raised (no request goes out after a
        failed commit)."""
        task = self._committing
        if task is not None and task.done():
            self._committing = None
            task.result()

    async def run(self) -> None:
        try:
            await self._sync_pause()
            if self.hook.ordered:
                await self._run_ordered()
            else:
                await self._run_unordered()
        except BaseException:
            # Cancelled (a forced stop) or failed: the delivered event need not go out
            # again, but a second failure of the state file must not hide the first.
            # Bounded: a state that went away (PostgreSQL cut off) must not hold up the stop.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.commit_marks(), _LAST_COMMIT_S)
            raise
        await self.commit_marks()

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
            await self.commit_marks()  # before reading the outbox: it must not offer them again
            await self._sync_pause()
            rows = await self.state.next_pending(self.hook.name, _BATCH)
            if not rows:
                if self.once:
                    return
                await self._wait(None)
                continue
            for index, row in enumerate(rows):
                now = time.time()
                # In order, every row sent is the head of the queue.
                wait_s = max(row.next_attempt_at, self.schedule.gate(now)) - now
                if wait_s > 0:
                    if self.once and math.isinf(wait_s):
                        return  # paused: nothing is due until a resume
                    await self.commit_marks()
                    await self._wait(None if math.isinf(wait_s) else wait_s)
                    break
                following = rows[index + 1] if index + 1 < len(rows) else None
                outcome = await self._deliver(row, following)
                # A retry blocks the queue behind it (that is what in order means). New rows
                # may hold a lower id (an event that committed late): re-read.
                if outcome.kind == "retry" or self.stop.is_set() or self.wake.is_set():
                    break

    async def _run_unordered(self) -> None:
        """`max_in_flight` lanes take rows from one queue, each delivering one at a time,
        the way a client with N connections would: no task per delivery."""
        self._queue.clear()
        self._later_at = math.inf
        try:
            async with asyncio.TaskGroup() as lanes:
                for _ in range(self.hook.max_in_flight):
                    lanes.create_task(self._lane())
        except BaseExceptionGroup as failed:
            # One lane failed (the state file, say) and the others were stopped: raise what
            # it raised, so the daemon reports it as it would from an ordered worker.
            raise failed.exceptions[0] from None

    async def _lane(self) -> None:
        while not self.stop.is_set():
            if self.schedule.paused is not None:
                if not await self._probe_lane():
                    return
                continue
            row = await self._next_row()
            if row is not None:
                now = time.time()
                wait_s = self.schedule.gate(now, head=False) - now
                if wait_s > 0:  # the rate limit, a 429 hold or a pause: the row goes back
                    self._queue.appendleft(row)
                    await self.commit_marks()
                    if math.isinf(wait_s):
                        continue  # paused: the probe lane takes over
                    await self._wait(wait_s)
                    continue
            if row is None:
                if self.once and self._later_at == math.inf:
                    return  # nothing left but what other lanes are delivering
                await self.commit_marks()  # nothing more is coming soon
                timeout = self._later_at - time.time() if self._later_at < math.inf else None
                await self._wait(timeout if timeout is None else max(0.0, timeout))
                continue
            self._taken.add(row.event_id)
            try:
                await self._deliver(row)
            finally:
                self._taken.discard(row.event_id)

    async def _probe_lane(self) -> bool:
        """Paused, unordered: one lane probes the head event, the others wait for the
        outcome. False when a --once run has nothing left it may do."""
        self.wake.clear()
        await self.commit_marks()
        await self._sync_pause()
        if self.schedule.paused is None:
            self._queue.clear()
            return True
        if self._taken:  # another lane is out with the probe (or was before the pause)
            await self._wait(None)
            return True
        head = await self.state.next_pending(self.hook.name, 1)
        now = time.time()
        at = max(head[0].next_attempt_at, self.schedule.gate(now)) if head else math.inf
        if at > now:
            if self.once:
                return False
            await self._wait(None if math.isinf(at) else at - now)
            return True
        self._taken.add(head[0].event_id)
        try:
            await self._deliver(head[0])
        finally:
            self._taken.discard(head[0].event_id)
            self._queue.clear()
            self.wake.set()  # the other lanes look again: resumed, or still paused
        return True

    async def _next_row(self) -> Pending | None:
        """The next due row for an unordered lane. The outbox is read once per batch, not
        once per delivery: again when the batch is used up or when woken (new rows)."""
        if self.wake.is_set() or not self._queue:
            self.wake.clear()
            await self.commit_marks()  # the outbox must not offer a delivered event again
            await self._sync_pause()
            now = time.time()
            read = await self.state.next_pending(self.hook.name, _BATCH + len(self._taken))
            rows = [r for r in read if r.event_id not in self._taken]
            self._queue = deque(r for r in rows if r.next_attempt_at <= now)
            self._later_at = min(
                (r.next_attempt_at for r in rows if r.next_attempt_at > now), default=math.inf
            )
        return self._queue.popleft() if self._queue else None

    def _log_attempt(self, row: Pending, attempt: Attempt, action: Action, now: float) -> None:
        """Keep one record of the attempt for the attempt log (committed with the marks)."""
        if not self.hook.attempt_log_size:
            return
        number = row.attempts + row.rate_limited + 1
        self._attempts.append(
            attempt_record(self.hook.name, row.event_id, number, attempt, action.kind, now)
        )

    def _render(self, row: Pending) -> bytes | Outcome:
        started = time.perf_counter()
        body = render_body(self.hook, row.body)
        self._render_s = time.perf_counter() - started
        return body

    def _render_ahead(self, row: Pending | None) -> None:
        """While a request is out: commit the marks if enough are held, and render the
        next body if renders are quick."""
        try:
            self._commit_while_sending()
            quick = self._render_s < _AHEAD_MAX_S and not self.hook.renderer.off_loop
            if row is not None and quick:
                self._ahead = (row.event_id, self._render(row))
        except Exception as exc:  # noqa: BLE001 - raised in _deliver once the outcome is kept
            self._side_error = exc

    async def _attempt(self, row: Pending, following: Pending | None) -> AttemptResult:
        if self._may_send is not None and not self._may_send():
            # The lease may be gone by now: a new leader may send this event too.
            raise FencedError("the lease was not renewed in time; no new delivery starts")
        self._reap_commit()
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
                )
            )
        ahead, self._ahead = self._ahead, None
        ordered = self.hook.ordered
        body: bytes | Outcome | None = None
        if ahead is not None and ahead[0] == row.event_id:
            body = ahead[1]
        elif ordered and not self.hook.renderer.off_loop:
            body = self._render(row)  # timed: it decides whether to render ahead
        return await attempt_once(
            self.session,
            self.hook,
            self._headers,
            row.event_id,
            row.body,
            row.attempts,
            body=body,
            while_sending=(lambda: self._render_ahead(following)) if ordered else None,
            rate_limited_before=self.schedule.rate_limited,
        )

    async def _deliver(self, row: Pending, following: Pending | None = None) -> Outcome:
        result = await self._attempt(row, following)
        outcome, attempts, duration_s = result.outcome, result.attempts, result.duration_s
        ordered = self.hook.ordered
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
            if not ordered:
                await self._commit_marks_if_full()
        elif action.kind == "dead_letter":
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
            await self.state.retry_later(
                name, row.event_id, attempts, at, outcome.reason, rate_limited
            )
            if action.kind == "keep":
                outcome = Outcome("retry", outcome.reason, max(0.0, action.at - now))
        await self._save_pause(paused_before)
        if self._on_outcome is not None:
            self._on_outcome(name, outcome, now - row.enqueued_at, duration_s)
        if self._side_error is not None:
            # The state file failed while this request was out: its outcome is recorded
            # (a delivered event is held for marking), now stop as any state failure does.
            error, self._side_error = self._side_error, None
            raise error
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
