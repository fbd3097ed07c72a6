"""When one webhook may send next: its rate limit, the receiver's own holds (429), and
pauses with their probes. Pure (no I/O, no clock of its own), so it is tested without
asyncio; the worker asks it before every request and tells it every outcome.

A webhook pauses after `pause_after_failures` events in a row failed for good, or at once
on `410 Gone`. While paused nothing becomes a dead letter: only the head event is tried,
as a probe, every `probe_interval_s` doubling up to PROBE_MAX_S; the first probe that is
delivered resumes the webhook. A pause made by hand (or by a 410) is not probed: it lasts
until `unleash-poller webhooks resume`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from poller.deliver import Outcome

PROBE_MAX_S = 900.0


@dataclass(frozen=True)
class Pause:
    """Why and since when a webhook is paused. `awaits_resume`: no probes, only a resume by
    hand lifts it (a pause by hand, or a 410); `probe_at` is then inf. This is what the
    state store keeps."""

    reason: str
    since: float
    awaits_resume: bool
    probe_at: float
    probes: int = 0


@dataclass(frozen=True)
class Action:
    """What the worker does with the row it just sent: mark it delivered, retry it at `at`,
    dead-letter it, or keep it pending (paused) until `at`."""

    kind: Literal["delivered", "retry", "dead_letter", "keep"]
    at: float = 0.0


class Schedule:
    def __init__(
        self,
        max_per_second: float | None = None,
        pause_after_failures: int = 5,
        probe_interval_s: float = 60.0,
    ) -> None:
        self.configure(max_per_second, pause_after_failures, probe_interval_s)
        self.paused: Pause | None = None
        self._next_slot = -math.inf  # earliest start of the next request (the rate limit)
        self._hold_until = -math.inf  # the receiver asked the whole webhook to wait (429)
        self.rate_limited = 0  # 429s in a row, for the back-off when no Retry-After came
        self._failed_in_a_row = 0  # events given up in a row

    def configure(
        self, max_per_second: float | None, pause_after_failures: int, probe_interval_s: float
    ) -> None:
        self._spacing = 1.0 / max_per_second if max_per_second else 0.0
        self._pause_after = pause_after_failures
        self._probe_interval = probe_interval_s

    def gate(self, now: float, *, head: bool = True) -> float:
        """The earliest time a request may start (`now` when it may start now). inf means
        not until something changes (a resume): paused by hand, or paused and this row is
        not the head, which is the only one probed."""
        if self.paused is not None:
            if self.paused.awaits_resume or not head:
                return math.inf
            return max(now, self.paused.probe_at, self._hold_until)
        return max(now, self._next_slot, self._hold_until)

    def took(self, now: float) -> None:
        """A request starts now: the next may start one spacing later. Counted from the
        later of now and the slot, so a late start never lets a burst catch up."""
        self._next_slot = max(now, self._next_slot) + self._spacing

    def settle(self, outcome: Outcome, now: float) -> Action:
        """What `outcome` (from deliver.decide) means for this webhook, and for the row."""
        if outcome.webhook_wait:
            self._hold_until = max(self._hold_until, now + outcome.delay_s)
        self.rate_limited = self.rate_limited + 1 if outcome.rate_limited else 0
        if outcome.kind == "delivered":
            self._failed_in_a_row = 0
            self.paused = None
            return Action("delivered")
        if outcome.kind == "pause":
            self.paused = Pause(outcome.reason, now, awaits_resume=True, probe_at=math.inf)
            return Action("keep", math.inf)
        if self.paused is not None:
            return self._probe_failed(now)
        if outcome.kind == "retry":
            return Action("retry", now + outcome.delay_s)
        self._failed_in_a_row += 1
        if self._pause_after and self._failed_in_a_row >= self._pause_after:
            self.paused = Pause(
                f"{self._failed_in_a_row} events in a row failed for good (last: {outcome.reason})",
                now,
                awaits_resume=False,
                probe_at=now + self._probe_interval,
            )
        return Action("dead_letter")

    def _probe_failed(self, now: float) -> Action:
        pause = self.paused
        assert pause is not None  # only called while paused
        if pause.awaits_resume:
            return Action("keep", math.inf)
        if now < pause.probe_at:
            # Not the probe: a request already out when the pause began (unordered lanes).
            return Action("keep", pause.probe_at)
        probes = pause.probes + 1
        wait = min(max(PROBE_MAX_S, self._probe_interval), self._probe_interval * 2.0**probes)
        self.paused = Pause(pause.reason, pause.since, False, now + wait, probes)
        return Action("keep", now + wait)

    def restore(self, pause: Pause | None) -> None:
        """Take the pause the state store holds (set or cleared by hand, or from before a
        restart). A pause lifted by hand starts the failure count afresh."""
        if pause is None and self.paused is not None:
            self._failed_in_a_row = 0
        self.paused = pause
