"""Metrics as Prometheus scrapes them (a real HTTP server, the library's own parser) and
the health check."""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from poller import __version__
from poller.metrics import Metrics, parse_listen, poll_health, start_http
from poller.sink import MetricsSink, NullMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _healthy() -> tuple[bool, dict[str, object]]:
    return True, {"cursor": 7}


async def _scrape(
    metrics: Metrics,
    path: str = "/metrics",
    health: Callable[[], tuple[bool, dict[str, object]]] = _healthy,
    headers: dict[str, str] | None = None,
    listen: str = "127.0.0.1:0",
) -> tuple[int, str, str]:
    runner = await start_http(listen, metrics, health)
    try:
        host, port = runner.addresses[0][:2]
        url_host = f"[{host}]" if ":" in host else host
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://{url_host}:{port}{path}", headers=headers) as resp,
        ):
            return resp.status, resp.headers["Content-Type"], await resp.text()
    finally:
        await runner.cleanup()


def scrape(metrics: Metrics, path: str = "/metrics", **kwargs: Any) -> tuple[int, str, str]:
    return asyncio.run(_scrape(metrics, path, **kwargs))


def samples(metrics: Metrics) -> Samples:
    """Every sample of a real scrape, keyed by (name, labels)."""
    status, _, text = scrape(metrics)
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


@pytest.mark.parametrize("sink", [Metrics, NullMetrics])
def test_sinks_take_what_the_protocol_declares(sink: type) -> None:
    """Metrics and NullMetrics have every MetricsSink method, with its exact signature
    (names, annotations, defaults), so they cannot drift apart again."""
    methods = [name for name in vars(MetricsSink) if name.startswith("on_")]
    assert len(methods) == 6
    for name in methods:
        expected = inspect.signature(getattr(MetricsSink, name))
        assert inspect.signature(getattr(sink, name)) == expected, name


def test_configured_webhooks_export_zeros_before_any_delivery() -> None:
    """Every outcome series of a configured webhook exists at 0, so rate() works at once."""
    got = samples(Metrics(["ops"]))
    for outcome in ("delivered", "retried", "dead_lettered"):
        assert got[key("unleash_poller_deliveries_total", webhook="ops", outcome=outcome)] == 0
    assert got[key("unleash_poller_delivery_duration_seconds_count", webhook="ops")] == 0
    assert got[key("unleash_poller_delivery_lag_seconds_count", webhook="ops")] == 0
    assert got[key("unleash_poller_outbox_pending", webhook="ops")] == 0
    for kind in ("auth", "server", "timeout", "connection", "bad_response"):
        assert got[key("unleash_poller_poll_errors_total", kind=kind)] == 0
    assert got[key("unleash_poller_build_info", version=__version__)] == 1


@pytest.mark.parametrize(
    ("kind", "outcome", "duration_s", "lag_counted"),
    [
        ("delivered", "delivered", 0.2, True),
        ("retry", "retried", 0.2, False),
        ("give_up", "dead_lettered", 0.2, False),
        ("give_up", "dead_lettered", None, False),  # the body could not be rendered: no request
    ],
)
def test_on_delivery(kind: Any, outcome: str, duration_s: float | None, lag_counted: bool) -> None:
    """Each outcome kind counts under its label; HTTP time is observed when a request was
    made; lag only when the event was delivered."""
    metrics = Metrics(["ops"])
    metrics.on_delivery("ops", kind, duration_s, 42.0)
    got = samples(metrics)
    assert got[key("unleash_poller_deliveries_total", webhook="ops", outcome=outcome)] == 1
    assert sum(v for (name, _), v in got.items() if name == "unleash_poller_deliveries_total") == 1
    duration = key("unleash_poller_delivery_duration_seconds_bucket", webhook="ops", le="0.25")
    assert got[duration] == (0 if duration_s is None else 1)
    assert got[key("unleash_poller_delivery_lag_seconds_sum", webhook="ops")] == (
        42.0 if lag_counted else 0
    )
    assert got[key("unleash_poller_delivery_lag_seconds_bucket", webhook="ops", le="30.0")] == 0
    assert got[key("unleash_poller_delivery_lag_seconds_bucket", webhook="ops", le="60.0")] == (
        1 if lag_counted else 0
    )


def test_unconfigured_webhook_gets_series_on_first_use() -> None:
    """A webhook not named at start-up (e.g. added by a reload) is counted all the same."""
    metrics = Metrics()
    metrics.on_delivery("new", "delivered", 0.01, 0.5)
    got = samples(metrics)
    assert got[key("unleash_poller_deliveries_total", webhook="new", outcome="delivered")] == 1
    assert got[key("unleash_poller_deliveries_total", webhook="new", outcome="retried")] == 0


def test_poll_metrics() -> None:
    """Polls move the event counter, cursor, gaps and last-success time; errors count by
    kind; expired gaps and burst overflows add up."""
    metrics = Metrics()
    before = time.time()
    metrics.on_poll_ok(3, 120, 2)
    metrics.on_poll_ok(0, None, 1)  # a fresh state's first poll may have no cursor yet
    metrics.on_poll_error("timeout")
    metrics.on_poll_error("timeout")
    metrics.on_poll_error("something_new")
    metrics.on_gaps_expired(4)
    metrics.on_gaps_expired(0)
    metrics.on_burst_overflow()
    got = samples(metrics)
    assert got[key("unleash_poller_events_polled_total")] == 3
    assert got[key("unleash_poller_cursor")] == 120
    assert got[key("unleash_poller_gaps_pending")] == 1
    assert (
        before <= got[key("unleash_poller_last_successful_poll_timestamp_seconds")] <= (time.time())
    )
    assert got[key("unleash_poller_poll_errors_total", kind="timeout")] == 2
    assert got[key("unleash_poller_poll_errors_total", kind="something_new")] == 1
    assert got[key("unleash_poller_gaps_expired_total")] == 4
    assert got[key("unleash_poller_burst_overflows_total")] == 1


def test_set_pending_zeroes_webhooks_it_does_not_mention() -> None:
    """The outbox gauge follows the latest counts: a webhook left out has drained to 0,
    one never seen before (an orphaned outbox) appears."""
    metrics = Metrics(["a", "b"])
    metrics.set_pending({"a": 5, "b": 2})
    metrics.set_pending({"a": 1, "orphan": 9})
    got = samples(metrics)
    assert got[key("unleash_poller_outbox_pending", webhook="a")] == 1
    assert got[key("unleash_poller_outbox_pending", webhook="b")] == 0
    assert got[key("unleash_poller_outbox_pending", webhook="orphan")] == 9


def test_pending_source_is_read_at_each_scrape() -> None:
    """With a pending source, each scrape shows the outbox as it is at that moment."""
    outbox = {"ops": 3}
    calls = []

    async def pending() -> dict[str, int]:
        calls.append(1)
        return dict(outbox)

    metrics = Metrics(["ops"], pending=pending)
    assert calls == []
    assert samples(metrics)[key("unleash_poller_outbox_pending", webhook="ops")] == 3
    outbox["ops"] = 0
    assert samples(metrics)[key("unleash_poller_outbox_pending", webhook="ops")] == 0
    assert len(calls) == 2


def test_leader_and_lease_epoch_follow_on_role() -> None:
    """unleash_poller_leader is 1 while leading and 0 while standing by; the epoch gauge
    shows the lease epoch last held or seen."""
    metrics = Metrics(["ops"])
    metrics.on_role(True, 3)
    got = samples(metrics)
    assert (got[key("unleash_poller_leader")], got[key("unleash_poller_lease_epoch")]) == (1, 3)
    metrics.on_role(False, 4)
    got = samples(metrics)
    assert (got[key("unleash_poller_leader")], got[key("unleash_poller_lease_epoch")]) == (0, 4)


def test_each_metrics_object_has_its_own_registry() -> None:
    """Two daemons in one process (as in tests) do not add to each other's counters."""
    first, second = Metrics(["ops"]), Metrics(["ops"])
    first.on_poll_ok(5, 5, 0)
    assert samples(second)[key("unleash_poller_events_polled_total")] == 0


def test_on_delivery_is_cheap() -> None:
    """Ten thousand deliveries are counted in well under a second."""
    metrics = Metrics(["ops"])
    started = time.perf_counter()
    for i in range(10_000):
        metrics.on_delivery("ops", "delivered", 0.05, float(i % 100))
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"{elapsed:.3f}s"
    assert (
        samples(metrics)[key("unleash_poller_deliveries_total", webhook="ops", outcome="delivered")]
        == 10_000
    )


def test_metrics_content_type_is_prometheus_text() -> None:
    """A plain scrape gets the Prometheus text format."""
    status, content_type, _ = scrape(Metrics())
    assert status == 200
    assert content_type.startswith("text/plain; version=")


def test_openmetrics_is_negotiated() -> None:
    """A scraper asking for OpenMetrics gets it, and it parses as OpenMetrics."""
    metrics = Metrics(["ops"])
    metrics.on_delivery("ops", "delivered", 0.05, 1.0)
    status, content_type, text = scrape(
        metrics, headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in openmetrics_families(text)}
    [delivered] = [
        s
        for s in families["unleash_poller_deliveries"].samples
        if s.labels == {"webhook": "ops", "outcome": "delivered"} and s.name.endswith("_total")
    ]
    assert delivered.value == 1


def test_healthz_ok() -> None:
    """Healthy: 200 with status ok and the details the daemon gives."""
    status, content_type, text = scrape(Metrics(), "/healthz")
    assert status == 200
    assert content_type.startswith("application/json")
    assert text == '{"status": "ok", "cursor": 7}'


def test_healthz_unhealthy() -> None:
    """Unhealthy: 503 with the reason as JSON."""

    def health() -> tuple[bool, dict[str, object]]:
        return False, {"reason": "no successful poll of Unleash for 95s (limit 30s)"}

    status, _, text = scrape(Metrics(), "/healthz", health=health)
    assert status == 503
    assert text == (
        '{"status": "unhealthy", "reason": "no successful poll of Unleash for 95s (limit 30s)"}'
    )


def test_unknown_path_is_404() -> None:
    """Only /metrics and /healthz are served."""
    assert scrape(Metrics(), "/")[0] == 404


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
def test_serves_on_ipv6() -> None:
    """A bracketed IPv6 listen address binds and serves."""
    status, _, text = scrape(Metrics(), listen="[::1]:0")
    assert status == 200
    assert "unleash_poller_cursor" in text


def test_port_in_use_raises() -> None:
    """A taken port is an OSError at start-up, not a server that silently is not there."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        async def main() -> None:
            await start_http(f"127.0.0.1:{port}", Metrics(), _healthy)

        with pytest.raises(OSError, match="address already in use"):
            asyncio.run(main())


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("[::]:80", ("::", 80)),
        ("localhost:0", ("localhost", 0)),
        (":9464", ("", 9464)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    """host:port, [v6]:port and :port are understood."""
    assert parse_listen(listen) == expected


@pytest.mark.parametrize(
    "listen",
    [
        "9464",
        "127.0.0.1",
        "::1:9464",
        "[::1]",
        "127.0.0.1:65536",
        "127.0.0.1:http",
        "host:-1",
        "",
    ],
)
def test_parse_listen_rejects(listen: str) -> None:
    """Anything else is refused with a message that shows the expected form."""
    with pytest.raises(ValueError, match=r"host:port"):
        parse_listen(listen)


NOW = 1_000_000.0


@pytest.mark.parametrize(
    ("last_ok_ago", "started_ago", "interval", "healthy", "reason"),
    [
        (1, 3600, 1.0, True, None),
        (29, 3600, 1.0, True, None),
        (31, 3600, 1.0, False, "no successful poll of Unleash for 31s (limit 30s)"),
        (50, 3600, 20.0, True, None),  # three 20 s intervals are the limit
        (61, 3600, 20.0, False, "no successful poll of Unleash for 61s (limit 60s)"),
        (None, 10, 1.0, True, None),  # still starting: Unleash not answered yet
        (None, 45, 1.0, False, "no successful poll of Unleash for 45s (limit 30s)"),
    ],
)
def test_poll_health(
    tmp_path: Path,
    last_ok_ago: float | None,
    started_ago: float,
    interval: float,
    healthy: bool,
    reason: str | None,
) -> None:
    """Healthy while the last successful poll (or start-up) is within max(3 polls, 30 s)."""
    last_ok = 0.0 if last_ok_ago is None else NOW - last_ok_ago
    ok, details = poll_health(
        last_ok, NOW - started_ago, interval, tmp_path / "state.sqlite3", now=NOW
    )
    assert ok is healthy
    assert details.get("reason") == reason
    assert details["last_successful_poll_age_s"] == last_ok_ago
    assert details["state_writable"] is True


def test_poll_health_state_not_writable(tmp_path: Path) -> None:
    """A state file whose directory cannot be written is unhealthy, with the path named."""
    state = tmp_path / "gone" / "state.sqlite3"
    ok, details = poll_health(NOW, NOW, 1.0, state, now=NOW)
    assert not ok
    assert details["state_writable"] is False
    assert details["reason"] == f"state file {state} is not writable"


def test_paused_gauge_follows_the_state_store_at_each_scrape() -> None:
    """unleash_poller_webhook_paused is 1 for the webhooks paused at scrape time, 0 else."""
    paused: set[str] = set()

    async def now_paused() -> set[str]:
        return set(paused)

    metrics = Metrics(["a", "b"], paused=now_paused)
    assert samples(metrics)[key("unleash_poller_webhook_paused", webhook="a")] == 0
    paused.add("a")
    got = samples(metrics)
    assert got[key("unleash_poller_webhook_paused", webhook="a")] == 1
    assert got[key("unleash_poller_webhook_paused", webhook="b")] == 0
    paused.clear()
    assert samples(metrics)[key("unleash_poller_webhook_paused", webhook="a")] == 0
