"""Delivery controls end to end: the real daemon (`python -m poller run`) and CLI against a
real Unleash and a real receiver: `redeliver` beside a running daemon and with it
stopped, `410 Gone` and pauses by hand picked up by a running daemon."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import PollerCli, PollerConfigFactory
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.unleash import AdminClient, UnleashServer
from tests.test_e2e_service import Daemon

pytestmark = pytest.mark.e2e


def _ids(requests: list[RecordedRequest]) -> list[int]:
    return [json.loads(r.body)["id"] for r in requests]


def _flags(admin: AdminClient, run: str, count: int) -> list[int]:
    """Create `count` flags, each also enabled in development (so the log holds events a
    feature-created filter leaves out); return the feature-created ids."""
    start = admin.latest_event_id()
    for n in range(count):
        admin.create_feature(f"ctl-{run}-{n}")
        admin.set_environment_enabled(f"ctl-{run}-{n}", "development", True)
    return [e["id"] for e in admin.all_events(after_id=start) if e["type"] == "feature-created"]


def _wait(condition: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} within {timeout_s} s")
        time.sleep(0.1)


def test_redeliver_with_the_daemon_stopped_then_running(
    tmp_path: Path,
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """A range of ids is re-read from Unleash and queued again through the webhook's
    filters (`N queued, M filtered out`), delivered in id order: by the next run when
    the daemon is stopped, by the running daemon itself when it is up. On 5.x/6.x the
    id range is read by paging through the log, and the command says so."""
    run = uuid.uuid4().hex[:8]
    path = f"/redeliver-{run}"
    start = admin.latest_event_id()
    config = poller_config(
        webhooks=[{"name": "a", "url": receiver.url(path), "events": ["feature-created"]}],
        start_from=start,
        poll_interval_s=0.2,
    )
    created = _flags(admin, run, 4)
    poller_cli("run", "-c", config, "--once")
    assert _ids(receiver.requests(path)) == created

    # Stopped: from the second flag's creation to just before the fourth's.
    log = admin.all_events(after_id=start)
    in_range = [e for e in log if created[1] <= e["id"] < created[3]]
    again = poller_cli(
        "redeliver",
        "-c",
        config,
        "--webhook",
        "a",
        "--from-id",
        created[1],
        "--to-id",
        created[3] - 1,
    )
    assert again.stdout.strip() == f"2 queued, {len(in_range) - 2} filtered out", again.stdout
    assert len(in_range) > 2
    # 7.x and later look ids up; 5.x and 6.x have no lookup by id, so the log is paged.
    by_id = int(unleash.version.split(".")[0]) >= 7
    expected = "looked up by id" if by_id else "(this Unleash has no lookup by id)"
    assert expected in again.stderr, again.stderr
    poller_cli("run", "-c", config, "--once")
    assert _ids(receiver.requests(path)) == [*created, created[1], created[2]]

    # Running: by time, from the first flag's creation on.
    first = next(e for e in admin.all_events(after_id=start) if e["id"] == created[0])
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for_log("unleash.api_detected")
        again = poller_cli(
            "redeliver", "-c", config, "--webhook", "a", "--since", first["createdAt"]
        )
        since = [e for e in log if e["createdAt"] >= first["createdAt"]]
        assert again.stdout.strip() == f"4 queued, {len(since) - 4} filtered out", again.stdout
        assert "paged through the log" in again.stderr
        receiver.wait_for(len(created) + 2 + 4, path, timeout_s=30)
    finally:
        assert daemon.stop() == 0
    assert _ids(receiver.requests(path))[len(created) + 2 :] == created

    beyond = poller_cli(
        "redeliver", "-c", config, "--webhook", "a", "--from-id", 10**9, expect_exit=65
    )
    assert (
        beyond.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "unleash-poller: redeliver: --from-id 1000000000 is beyond the log (newest event is "
        )
    )


def test_410_pauses_the_daemon_and_a_resume_by_hand_delivers_everything(
    tmp_path: Path,
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """A 410 pauses the webhook at once (one `webhook.paused` log line, `status` and the
    metrics say paused); events keep arriving and stay pending; `webhooks resume` beside
    the running daemon delivers all of them, in order, without a dead letter."""
    run = uuid.uuid4().hex[:8]
    path = f"/gone-{run}"
    receiver.respond(path, status=410)
    config = poller_config(
        webhooks=[{"name": "a", "url": receiver.url(path), "events": ["feature-created"]}],
        start_from=admin.latest_event_id(),
        poll_interval_s=0.2,
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for_log("unleash.api_detected")
        created = _flags(admin, run, 5)
        daemon.wait_for_log("webhook.paused")
        (line,) = [e for e in daemon.events() if e.get("event") == "webhook.paused"]
        assert "410" in str(line["reason"])
        assert line["webhook"] == "a"

        def all_pending() -> bool:
            status = json.loads(poller_cli("status", "-c", config, "--json").stdout)
            return bool(status["webhooks"]["a"]["pending"] == 5)

        _wait(all_pending, 30, "all five events pending")
        status = poller_cli("status", "-c", config).stdout
        assert "a: paused since " in status
        assert "HTTP 410 Gone" in status
        assert len(receiver.requests(path)) == 1  # no probes after a 410

        receiver.respond(path, status=200)
        resumed = poller_cli("webhooks", "resume", "a", "-c", config)
        assert "a: resumed; 5 pending event(s) are delivered now" in resumed.stdout
        receiver.wait_for(6, path, timeout_s=30)
        daemon.wait_for_log("webhook.resumed")
    finally:
        assert daemon.stop() == 0
    assert _ids(receiver.requests(path)) == [created[0], *created]
    status = json.loads(poller_cli("status", "-c", config, "--json").stdout)
    assert status["webhooks"]["a"]["dead_letters"] == 0
    assert status["webhooks"]["a"]["paused"] is None


def test_pause_by_hand_is_picked_up_by_the_running_daemon(
    tmp_path: Path,
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """`webhooks pause` beside a running daemon: it logs the pause within a poll interval
    and sends nothing while events arrive; `resume` sends them all, in order."""
    run = uuid.uuid4().hex[:8]
    path = f"/manual-{run}"
    config = poller_config(
        webhooks=[{"name": "a", "url": receiver.url(path), "events": ["feature-created"]}],
        start_from=admin.latest_event_id(),
        poll_interval_s=0.2,
    )
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for_log("unleash.api_detected")
        asked = time.monotonic()
        poller_cli("webhooks", "pause", "a", "-c", config)
        daemon.wait_for_log("webhook.paused", timeout_s=10)
        print(
            f"FIGURES: pause by hand picked up {time.monotonic() - asked:.2f} s after the CLI "
            "started (its own start-up included; poll_interval_s 0.2)"
        )
        created = _flags(admin, run, 3)
        _wait(
            lambda: (
                json.loads(poller_cli("status", "-c", config, "--json").stdout)["webhooks"]["a"][
                    "pending"
                ]
                == 3
            ),
            30,
            "three events pending",
        )
        assert receiver.requests(path) == []
        poller_cli("webhooks", "resume", "a", "-c", config)
        receiver.wait_for(3, path, timeout_s=30)
    finally:
        assert daemon.stop() == 0
    assert _ids(receiver.requests(path)) == created
