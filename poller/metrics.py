"""Prometheus metrics and the small HTTP server that exposes them with a health check.

`Metrics` owns its own registry, so two daemons in one test process do not share
counters. Every `on_*` method is a few dictionary look-ups and lock-guarded additions:
cheap enough to call for each delivery.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.aiohttp import make_aiohttp_handler

from poller import __version__
from poller.config import parse_listen
from poller.deliver import OutcomeKind
from poller.source import UnleashErrorKind
from poller.state.base import StateError

# Outcome kind → the label operators read on a dashboard.
OUTCOMES: dict[OutcomeKind, str] = {
    "delivered": "delivered",
    "retry": "retried",
    "give_up": "dead_lettered",
}
POLL_ERROR_KINDS: tuple[UnleashErrorKind, ...] = get_args(UnleashErrorKind)
# A webhook answers in milliseconds to its timeout (10 s by default, at most minutes).
DURATION_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Lag spans one poll interval (a healthy webhook) to hours of retries (a broken one).
LAG_BUCKETS_S = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
    24 * 3600.0,
)
HEALTH_MIN_AGE_S = 30.0


@dataclass(frozen=True)
class _HookSeries:
    """One webhook's labelled children, bound once: `labels()` is the slow part."""

    outcomes: dict[OutcomeKind, Counter]
    duration: Histogram
    lag: Histogram


class Metrics:
    def __init__(
        self,
        webhooks: Iterable[str] = (),
        pending: Callable[[], Awaitable[Mapping[str, int]]] | None = None,
        paused: Callable[[], Awaitable[Iterable[str]]] | None = None,
    ) -> None:
        """`webhooks` get their series at 0 from the start. `pending` and `paused`, if
        given, are asked for the outbox sizes and the paused webhooks at each scrape (see
        `refresh`)."""
        self._pending_source = pending
        self._paused_source = paused
        self.registry = CollectorRegistry()
        r = self.registry
        Info("unleash_poller_build", "Version of the running daemon.", registry=r).info(
            {"version": __version__}
        )
        self._events_polled = Counter(
            "unleash_poller_events_polled",
            "Events newer than the cursor taken in from "
            "Unleash (whether or not a webhook wanted them).",
            registry=r,
        )
        self._deliveries = Counter(
            "unleash_poller_deliveries",
            "Delivery attempts by outcome: delivered, retried "
            "(a retry is scheduled) or dead_lettered (given up).",
            ["webhook", "outcome"],
            registry=r,
        )
        self._duration = Histogram(
            "unleash_poller_delivery_duration_seconds",
            "Time of one HTTP POST to a webhook, whatever its outcome.",
            ["webhook"],
            buckets=DURATION_BUCKETS_S,
            registry=r,
        )
        self._lag = Histogram(
            "unleash_poller_delivery_lag_seconds",
            "From an event being taken in from Unleash "
            "to its successful delivery, retries included.",
            ["webhook"],
            buckets=LAG_BUCKETS_S,
            registry=r,
        )
        self._cursor = Gauge(
            "unleash_poller_cursor", "Highest Unleash event id taken in.", registry=r
        )
        self._pending = Gauge(
            "unleash_poller_outbox_pending",
            "Deliveries waiting in the outbox (retries included).",
            ["webhook"],
            registry=r,
        )
        self._paused = Gauge(
            "unleash_poller_webhook_paused",
            "1 while a webhook is paused (receiver failing or gone, or paused by hand): "
            "its events wait in the outbox.",
            ["webhook"],
            registry=r,
        )
        self._gaps = Gauge(
            "unleash_poller_gaps_pending",
            "Event ids below the cursor not seen yet, still being asked for.",
            registry=r,
        )
        self._poll_errors = Counter(
            "unleash_poller_poll_errors", "Failed polls of Unleash by kind.", ["kind"], registry=r
        )
        self._last_poll = Gauge(
            "unleash_poller_last_successful_poll_timestamp_seconds",
            "Unix time of the last poll Unleash answered.",
            registry=r,
        )
        self._leader = Gauge(
            "unleash_poller_leader",
            "1 while this daemon leads (polls and delivers); 0 while it stands by. "
            "Always 1 on a SQLite state.",
            registry=r,
        )
        self._lease_epoch = Gauge(
            "unleash_poller_lease_epoch",
            "Epoch of the lease this daemon last held or saw (raised at every takeover); "
            "0 on a SQLite state.",
            registry=r,
        )
        self._gaps_expired = Counter(
            "unleash_poller_gaps_expired",
            "Missing event ids given up after the grace "
            "period (almost always rolled-back transactions).",
            registry=r,
        )
        self._burst_overflows = Counter(
            "unleash_poller_burst_overflows",
            "Polls that found more new events than the "
            "legacy events API returns, so some could not be read.",
            registry=r,
        )
        self._hooks: dict[str, _HookSeries] = {}
        for kind in POLL_ERROR_KINDS:
            self._poll_errors.labels(kind=kind)
        for name in webhooks:
            self._hook(name)

    def _hook(self, webhook: str) -> _HookSeries:
        series = self._hooks.get(webhook)
        if series is None:
            # Creating every child up front exports zeros, so rate() and absent-series
            # alerts work before the first delivery.
            series = _HookSeries(
                outcomes={
                    kind: self._deliveries.labels(webhook=webhook, outcome=label)
                    for kind, label in OUTCOMES.items()
                },
                duration=self._duration.labels(webhook=webhook),
                lag=self._lag.labels(webhook=webhook),
            )
            self._pending.labels(webhook=webhook).set(0)
            self._paused.labels(webhook=webhook).set(0)
            self._hooks[webhook] = series
        return series

    def on_delivery(
        self, webhook: str, outcome_kind: OutcomeKind, duration_s: float | None, lag_s: float
    ) -> None:
        """One attempt finished. `outcome_kind` is deliver.Outcome.kind; `duration_s` is
        None when no request was made (the body could not be rendered); `lag_s` counts
        only when the event was delivered."""
        series = self._hook(webhook)
        series.outcomes[outcome_kind].inc()
        if duration_s is not None:
            series.duration.observe(duration_s)
        if outcome_kind == "delivered":
            series.lag.observe(lag_s)

    def on_poll_ok(self, new_events: int, cursor: int | None, gaps: int) -> None:
        self._events_polled.inc(new_events)
        if cursor is not None:
            self._cursor.set(cursor)
        self._gaps.set(gaps)
        self._last_poll.set(time.time())

    def on_poll_error(self, kind: UnleashErrorKind) -> None:
        self._poll_errors.labels(kind=kind).inc()

    def on_gaps_expired(self, count: int) -> None:
        if count > 0:
            self._gaps_expired.inc(count)

    def on_burst_overflow(self, count: int = 1) -> None:
        if count > 0:
            self._burst_overflows.inc(count)

    def on_role(self, leader: bool, epoch: int) -> None:
        self._leader.set(1 if leader else 0)
        self._lease_epoch.set(epoch)

    async def refresh(self) -> None:
        """Called before each scrape: outbox sizes are a COUNT over the outbox, too dear
        to run on every poll during a backlog of millions, cheap once per scrape."""
        if self._pending_source is not None:
            self.set_pending(await self._pending_source())
        if self._paused_source is not None:
            self.set_paused(await self._paused_source())

    def set_paused(self, paused: Iterable[str]) -> None:
        """The webhooks paused now; every other known webhook is not."""
        names = set(paused)
        for name in names - self._hooks.keys():
            self._hook(name)
        for name in self._hooks:
            self._paused.labels(webhook=name).set(1 if name in names else 0)

    def set_pending(self, pending: Mapping[str, int]) -> None:
        """Outbox sizes per webhook; a known webhook missing from `pending` has none."""
        for name in pending.keys() - self._hooks.keys():
            self._hook(name)
        for name in self._hooks:
            self._pending.labels(webhook=name).set(pending.get(name, 0))


def poll_health(
    last_poll_ok_at: float,
    started_at: float,
    poll_interval_s: float,
    state_path: Path | None,
    now: float | None = None,
) -> tuple[bool, dict[str, object]]:
    """Healthy while Unleash answered within max(3 polls, 30 s) and the state file can be
    written. Before the first successful poll, the age counts from start-up, so a daemon
    that is still starting is not reported dead."""
    now = time.time() if now is None else now
    max_age_s = max(3 * poll_interval_s, HEALTH_MIN_AGE_S)
    age_s = now - max(last_poll_ok_at, started_at)
    writable = state_path is None or _writable(state_path)  # None: not a file (PostgreSQL)
    details: dict[str, object] = {
        "last_successful_poll_age_s": round(age_s, 1) if last_poll_ok_at else None,
        "max_poll_age_s": max_age_s,
        "state_writable": writable,
    }
    problems = []
    if age_s > max_age_s:
        problems.append(f"no successful poll of Unleash for {age_s:.0f}s (limit {max_age_s:g}s)")
    if not writable:
        problems.append(f"state file {state_path} is not writable")
    if problems:
        details["reason"] = "; ".join(problems)
    return not problems, details


def _writable(path: Path) -> bool:
    # SQLite writes its -journal/-wal files next to the database, so the directory counts.
    return os.access(path.parent, os.W_OK) and (not path.exists() or os.access(path, os.W_OK))


async def start_http(
    listen: str, metrics: Metrics, health: Callable[[], tuple[bool, dict[str, object]]]
) -> web.AppRunner:
    """Serve GET /metrics and GET /healthz on `listen`; stop it with `await runner.cleanup()`.
    The bound address (useful with port 0) is `runner.addresses[0]`."""
    host, port = parse_listen(listen)

    async def healthz(_request: web.Request) -> web.Response:
        ok, details = health()
        return web.json_response(
            {"status": "ok" if ok else "unhealthy", **details},
            status=200 if ok else 503,
            headers={"Cache-Control": "no-store"},
        )

    expose = make_aiohttp_handler(metrics.registry)

    async def metrics_page(request: web.Request) -> web.StreamResponse:
        # The state unreachable: the last sizes stay; the daemon's log says why.
        with contextlib.suppress(StateError):
            await metrics.refresh()
        return await expose(request)

    app = web.Application()
    app.router.add_get("/metrics", metrics_page)
    app.router.add_get("/healthz", healthz)
    # No access log: a scrape every few seconds would drown the daemon's own events. A
    # scrape still running at shutdown gets a second, not aiohttp's default minute,
    # which would eat the drain budget systemd's TimeoutStopSec= allows.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    # An empty host binds every address, as "0.0.0.0" does for IPv4 alone.
    site = web.TCPSite(runner, host or None, port)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    return runner
