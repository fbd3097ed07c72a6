"""What the pipeline reports its counts to: the Prometheus `Metrics`, or `NullMetrics`.

Kept apart from poller.metrics so that a daemon without a [metrics] listener never
imports prometheus_client (see App.__init__).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from poller.deliver import OutcomeKind

if TYPE_CHECKING:
    from poller.source import UnleashErrorKind


class MetricsSink(Protocol):
    def on_delivery(
        self, webhook: str, outcome_kind: OutcomeKind, duration_s: float | None, lag_s: float
    ) -> None:
        """One attempt finished. `duration_s` is None when no request was made (the body
        could not be rendered); `lag_s` counts only when the event was delivered."""

    def on_poll_ok(self, new_events: int, cursor: int | None, gaps: int) -> None:
        """Unleash answered a poll: how many events were new, the cursor, the open gaps."""

    def on_poll_error(self, kind: UnleashErrorKind) -> None:
        """A poll of Unleash failed; `kind` is UnleashError.kind."""

    def on_gaps_expired(self, count: int) -> None:
        """`count` missing ids were given up."""

    def on_burst_overflow(self, count: int = 1) -> None:
        """A poll found more new events than the legacy events API could return."""

    def on_role(self, leader: bool, epoch: int) -> None:
        """This daemon began to lead, or to stand by, under the lease of that epoch."""


class NullMetrics:
    """What the daemon reports to when no [metrics] listener is configured: nothing."""

    def on_delivery(
        self, webhook: str, outcome_kind: OutcomeKind, duration_s: float | None, lag_s: float
    ) -> None:
        pass

    def on_poll_ok(self, new_events: int, cursor: int | None, gaps: int) -> None:
        pass

    def on_poll_error(self, kind: UnleashErrorKind) -> None:
        pass

    def on_gaps_expired(self, count: int) -> None:
        pass

    def on_burst_overflow(self, count: int = 1) -> None:
        pass

    def on_role(self, leader: bool, epoch: int) -> None:
        pass
