"""Leadership under a lease, for a state several daemons share (PostgreSQL).

One row in the store holds the holder, an epoch raised at every takeover and an expiry by
the database's clock. The leader renews it several times per TTL; a standby looks again
just after the expiry it last saw. Every write the leader makes is fenced by its epoch in
the store itself (`FencedError`), so a paused or cut-off old leader commits nothing after
a takeover. Fencing guards the state, not the receivers: by its own monotonic clock, a
leader that could not renew stops starting deliveries (`may_send`) before its lease can
have run out, so after a takeover it sends at most the request already on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable

from poller.aio import wait_set
from poller.log import get as get_logger
from poller.state import Leadership, LeaseView, StateUnavailableError

log = get_logger()


class LeaseLostError(Exception):
    """This daemon no longer leads (taken over, or not renewed in time). `unreachable`:
    because the state could not be reached to renew it."""

    def __init__(self, reason: str, *, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.unreachable = unreachable


def holder_name(node_name: str | None) -> str:
    """`<node>:<pid>`: which host holds the lease, and which process on it."""
    return f"{node_name or socket.gethostname()}:{os.getpid()}"


def _retrieve(task: asyncio.Future[bool]) -> None:
    if not task.cancelled():
        task.exception()


class LeaseKeeper:
    def __init__(
        self,
        leadership: Leadership,
        holder: str,
        ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_look: Callable[[bool, int], None] | None = None,
    ) -> None:
        self.leadership = leadership
        # After every look at the lease (standing by, taking it, renewing it): whether this
        # daemon leads and the epoch it saw, for the metrics.
        self._on_look = on_look
        self.holder = holder
        self.ttl_s = ttl_s
        self.clock = clock
        self.epoch = 0
        self.leading = False
        self.seen: LeaseView | None = None  # the lease as the last read saw it
        self.valid_until = 0.0  # by our monotonic clock: no delivery starts after this
        # Ahead of the lease's end by a fifth of it (at least half a second), for the
        # difference between the two clocks' rates and the time a request takes to start.
        self.margin_s = max(0.5, ttl_s / 5)

    def may_send(self) -> bool:
        return self.leading and self.clock() < self.valid_until

    async def _try(self) -> bool:
        started = self.clock()
        leading, view = await self.leadership.try_lead(self.holder, self.ttl_s)
        self.seen = view
        if self._on_look is not None:
            self._on_look(leading, view.epoch)
        if leading:
            # The database set the expiry at its `now` + TTL, no earlier than `started`.
            self.valid_until = started + self.ttl_s - self.margin_s
            self.epoch = view.epoch
        return leading

    async def try_once(self) -> bool:
        """One look: lead now if the lease is free (a --once run)."""
        self.leading = await self._try()
        return self.leading

    async def acquire(self, stop: asyncio.Event, *, outage_logged: bool = False) -> bool:
        """Stand by until this daemon leads (True) or `stop` is set (False). Looks again
        just after the expiry it saw, so a dead leader is replaced within about a TTL.
        `outage_logged`: the state is known to be away and that was logged already, so a
        failure to reach it is not logged again."""
        announced = False
        failures = 1 if outage_logged else 0
        while not stop.is_set():
            try:
                before = self.seen
                leading = await self._try_until(stop)
                if leading is None:
                    return False
                if leading:
                    self.leading = True
                    self._log_acquired(before)
                    return True
                failures = 0
                if not announced and self.seen is not None:
                    announced = True
                    log.info(
                        "lease.standby",
                        holder=self.holder,
                        leader=self.seen.holder,
                        epoch=self.seen.epoch,
                        detail="another daemon leads; this one stands by and touches nothing",
                    )
                expires_in = self.seen.expires_in_s if self.seen else self.ttl_s
                delay = min(max(expires_in + 0.05, 0.05), self.ttl_s / 3)
            except StateUnavailableError as exc:
                failures += 1
                delay = min(self.ttl_s / 3, 0.5 * 2 ** min(failures, 6))
                if failures == 1:
                    log.error(
                        "state.unreachable",
                        error=str(exc),
                        holder=self.holder,
                        detail="standing by; the state is asked again with back-off",
                    )
            await wait_set(stop, delay)
        return False

    async def _try_until(self, stop: asyncio.Event) -> bool | None:
        """`_try`, given up (None) once `stop` is set: a look at a state that does not
        answer (a connect or a statement waiting out its timeout, 10 and 30 s) must not
        hold up a standby's stop. A lease it may have taken meanwhile runs out as a killed
        daemon's would."""
        attempt = asyncio.ensure_future(self._try())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait((attempt, stopped), return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not attempt.done():
                # Not awaited (that could swallow a cancel of this task); whatever it ends
                # with is taken, so that nothing is reported as never retrieved.
                attempt.add_done_callback(_retrieve)
                attempt.cancel()
        if not attempt.done():
            return None
        return attempt.result()

    def _log_acquired(self, before: LeaseView | None) -> None:
        old = before.holder if before is not None else None
        if old and old != self.holder:
            log.warning(
                "lease.takeover",
                old_holder=old,
                new_holder=self.holder,
                epoch=self.epoch,
                detail="the previous leader's lease ran out; this daemon delivers now",
            )
        else:
            log.info("lease.acquired", holder=self.holder, epoch=self.epoch)

    async def keep(self) -> None:
        """Renew while leading, several times per TTL; raise LeaseLostError when the lease
        is lost (taken over, or not renewable before it runs out)."""
        every = self.ttl_s / 3
        while True:
            await asyncio.sleep(every)
            try:
                epoch = self.epoch
                if not await self._try():
                    self._lost(f"taken over by {self.seen.holder if self.seen else '?'}")
                if self.epoch != epoch:
                    # Taken and freed meanwhile (this daemon was paused past a takeover),
                    # then taken again: what it holds in memory predates that other term.
                    self._lost(f"led by another daemon meanwhile (epoch {epoch} → {self.epoch})")
            except StateUnavailableError as exc:
                if self.clock() >= self.valid_until:
                    self._lost(f"not renewed in time: {exc}", unreachable=True)
                # Not a warning of its own: if the state stays away, the term ends with one.
                log.info("lease.renew_failed", holder=self.holder, error=str(exc))
                every = min(self.ttl_s / 6, 1.0)
                continue
            every = self.ttl_s / 3

    def _lost(self, reason: str, *, unreachable: bool = False) -> None:
        self.stand_down()
        raise LeaseLostError(reason, unreachable=unreachable)

    def stand_down(self) -> None:
        """Lead no more (the term ended: fenced, taken over, or the state went away); the
        App logs why, in one line."""
        self.leading = False
        self.valid_until = 0.0

    async def resign(self) -> None:
        if not self.leading:
            return
        self.leading = False
        with contextlib.suppress(Exception):
            await self.leadership.resign(self.holder)
