"""Unordered delivery (`max_in_flight > 1`): that many requests out at once, in no order.

`max_in_flight` lanes take rows from one queue, each delivering one at a time, the way a
client with N connections would: no task per delivery. While the webhook is paused, one
lane probes the head event and the others wait for its outcome.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable

from poller.state import Pending
from poller.worker import MARKS_PER_COMMIT, AttemptResult, Worker, attempt_once


class UnorderedWorker(Worker):
    """Delivers one webhook's outbox through `max_in_flight` lanes. Marks are committed
    once MARKS_PER_COMMIT are held (no request of its own covers the commit's time), so a
    kill -9 re-sends at most that many delivered events plus those in flight."""

    # Set at each run: rows read from the outbox, due, not taken by a lane yet; the ids the
    # lanes are delivering; when the first row read but not yet due falls due; held by
    # the lane reading the outbox; whether a lane, paused, is reading the head to probe.
    _queue: deque[Pending]
    _taken: set[int]
    _later_at: float
    _reading: asyncio.Lock
    _probing: bool
    # No request of this worker's own covers a commit's time: a delivery commits them.
    _commit_at = MARKS_PER_COMMIT

    async def _run(self) -> None:
        self._queue = deque()
        self._taken = set()
        self._later_at = math.inf
        self._reading = asyncio.Lock()
        self._probing = False
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
        """Paused: one lane probes the head event, the others wait for the outcome. False
        when a --once run has nothing left it may do."""
        await self._refresh()
        if self.schedule.paused is None:
            self._queue.clear()
            return True
        if self._taken or self._probing:  # another lane is out with the probe (or was
            await self._wait(None)  # before the pause), or finding out when the next is due
            return True
        # Claimed before the read: on a store whose reads yield (PostgreSQL) the other
        # lanes would otherwise each read the head meanwhile and probe it too.
        self._probing = True
        try:
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
        finally:
            self._probing = False
            self.wake.set()  # the other lanes look again: resumed, or still paused
        return True

    async def _next_row(self) -> Pending | None:
        """The next due row for a lane. The outbox is read once per batch, not once per
        delivery: again when the batch is used up or when woken (new rows)."""
        # One lane reads at a time; the others wait for its rows rather than reading the
        # same batch again (a read yields to them on a store whose reads yield: PostgreSQL).
        async with self._reading:
            if self.wake.is_set() or not self._queue:
                rows = await self._read_outbox(self._taken)
                now = time.time()
                self._queue = deque(r for r in rows if r.next_attempt_at <= now)
                self._later_at = min(
                    (r.next_attempt_at for r in rows if r.next_attempt_at > now),
                    default=math.inf,
                )
        return self._queue.popleft() if self._queue else None

    def _post(self, row: Pending, following: Pending | None) -> Awaitable[AttemptResult]:
        return attempt_once(
            self.session,
            self.hook,
            self._headers,
            row.event_id,
            row.body,
            row.attempts,
            rate_limited_before=self.schedule.rate_limited,
        )
