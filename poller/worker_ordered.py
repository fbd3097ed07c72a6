"""In order delivery (`max_in_flight = 1`): one request out at a time, in event-id order.

The head of the queue blocks the rest while it is retried (that is what "in order"
means). Between two deliveries nothing but the next request should run: the group commit
of marks and the rendering of the next body are done while the current request is out.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Coroutine, Generator
from typing import Any

from poller.config import WebhookConfig
from poller.deliver import Outcome
from poller.state import Pending
from poller.worker import MARKS_PER_COMMIT, AttemptResult, Worker, attempt_once, render_body

# The next body is rendered while a request is out only while renders of this webhook take
# less than this. The work may run before a request on a new connection has been written,
# inside that request's timeout, so it must stay small against any timeout.
_AHEAD_MAX_S = 0.002


class OrderedWorker(Worker):
    """Delivers one webhook's outbox in event-id order. The commit of held marks (and the
    rendering of the next body) runs while the next event is on the wire, so neither costs
    time between two deliveries; a kill -9 re-sends at most MARKS_PER_COMMIT delivered
    events plus the one in flight."""

    # Starting values, immutable: each is set on the worker itself when it changes.
    _committing: asyncio.Task[None] | None = None  # marks committed while sending
    _ahead: tuple[int, bytes | Outcome] | None = None  # the next body, rendered
    _render_s = math.inf  # how long this webhook's last render took
    _side_error: Exception | None = None  # raised by the work done while sending
    # The held marks are committed while the next request is out (_commit_while_sending).
    _commit_at = math.inf

    def reconfigure(self, hook: WebhookConfig) -> None:
        self._ahead = None  # rendered with the old settings
        super().reconfigure(hook)

    async def commit_marks(self, *, attempts: bool = True) -> None:
        """As Worker.commit_marks, after waiting for a commit started while sending (and
        raising what it raised)."""
        task, self._committing = self._committing, None
        if task is not None:
            await task
        await self._commit(attempts=attempts)

    async def _run(self) -> None:
        while not self.stop.is_set():
            rows = await self._read_outbox()
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

    def _commit_while_sending(self) -> None:
        """Start committing the held marks if enough are held; the request out now
        covers the commit's time. A commit that must wait on the store (PostgreSQL) goes
        on as a task, which `commit_marks` and `_before_request` wait for and raise from;
        one that does not (SQLite) is done, or has raised, on return."""
        if len(self._unmarked) >= MARKS_PER_COMMIT and self._committing is None:
            commit = self._commit(attempts=False)
            if self.state.answers_at_once:
                self._committing = start_eagerly(commit)
            else:  # it waits on the server: a task of its own from the start
                self._committing = asyncio.get_running_loop().create_task(commit)

    async def _before_request(self) -> None:
        """The commit started while the last request was out must be done before the next
        request starts (so at most MARKS_PER_COMMIT delivered events are ever unmarked,
        however slow the state), and raises what it raised (no request goes out after a
        failed commit). On SQLite it never is a task; on PostgreSQL it is most often done."""
        task = self._committing
        if task is not None:
            self._committing = None
            await task

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
        except Exception as exc:  # noqa: BLE001 - raised by _after_outcome, once the outcome is kept
            self._side_error = exc

    def _post(self, row: Pending, following: Pending | None) -> Awaitable[AttemptResult]:
        ahead, self._ahead = self._ahead, None
        body: bytes | Outcome | None = None
        if ahead is not None and ahead[0] == row.event_id:
            body = ahead[1]
        elif not self.hook.renderer.off_loop:
            body = self._render(row)  # timed: it decides whether to render ahead
        return attempt_once(
            self.session,
            self.hook,
            self._headers,
            row.event_id,
            row.body,
            row.attempts,
            body=body,
            while_sending=lambda: self._render_ahead(following),
            rate_limited_before=self.schedule.rate_limited,
        )

    def _after_outcome(self) -> None:
        if self._side_error is not None:
            # The state file failed while this request was out: its outcome is recorded
            # (a delivered event is held for marking), now stop as any state failure does.
            error, self._side_error = self._side_error, None
            raise error


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run `coro` now up to its first real wait: None when it finished without one (its
    error, if any, raised here), else a task that carries on from that wait. A task per
    group commit cost SQLite, whose calls never wait, a loop turn and ~2 us per event."""
    try:
        waiting_on = coro.send(None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_carry_on(coro, waiting_on))


async def _carry_on(coro: Coroutine[Any, Any, None], waiting_on: object) -> None:
    await _Resumed(coro, waiting_on)


class _Resumed:
    """Awaiting this goes on with a coroutine already started: it hands the task what the
    coroutine waits on, then passes the task's values and exceptions (a cancel) to it."""

    def __init__(self, coro: Coroutine[Any, Any, None], waiting_on: object) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, None]:
        coro, waiting_on = self._coro, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as exc:  # noqa: BLE001 - handed to the coroutine, as await does
                try:
                    waiting_on = coro.throw(exc)
                except StopIteration:
                    return
            else:
                try:
                    waiting_on = coro.send(sent)
                except StopIteration:
                    return
