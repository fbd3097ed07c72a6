"""The daemon as a service, end to end against a real Unleash: systemd notifications, metrics
and health, SIGHUP reload, SIGTERM, and secrets that never leak into anything it writes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import PollerCli, PollerConfigFactory
from tests.support.receiver import Receiver
from tests.support.unleash import REPO_ROOT, AdminClient, UnleashServer

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Daemon:
    """`python -m poller run` as a real process, its JSON log lines in a file."""

    def __init__(self, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "-c", str(config)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            env={**os.environ, **(env or {})},
        )

    def events(self) -> list[dict[str, object]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

    def wait_for_log(self, event: str, *, count: int = 1, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if sum(1 for e in self.events() if e.get("event") == event) >= count:
                return
            assert self.process.poll() is None, self.log_path.read_text()[-3000:]
            time.sleep(0.1)
        raise AssertionError(f"no {event!r} in the log:\n{self.log_path.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_s)
        self._log.close()
        return code


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(30)
    yield sock
    sock.close()


def _datagrams_until(sock: socket.socket, wanted: str) -> list[str]:
    got: list[str] = []
    while wanted not in "\n".join(got):
        got.append(sock.recv(4096).decode())
    return got


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:  # noqa: S310 - loopback only
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_service_lifecycle_notify_metrics_reload_and_stop(
    tmp_path: Path,
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    notify_socket: socket.socket,
) -> None:
    """READY=1 once running, deliveries counted in /metrics, /healthz 200, SIGHUP adds a
    webhook and rejects a broken config without stopping, SIGTERM exits 0 with STOPPING=1."""
    run = uuid.uuid4().hex[:8]
    first, second = f"/svc-a-{run}", f"/svc-b-{run}"
    port = _free_port()
    hook_a = {"name": "a", "url": receiver.url(first)}
    # An explicit start: with "latest", a flag created before the first poll would count as
    # history (READY=1 means config and state are good, not that Unleash was read yet).
    config = poller_config(
        webhooks=[hook_a], poll_interval_s=0.2, start_from=admin.latest_event_id()
    )
    metrics = f'\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    config.write_text(config.read_text() + metrics)
    daemon = Daemon(
        config, tmp_path / "daemon.log", env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    )
    try:
        assert "READY=1" in "\n".join(_datagrams_until(notify_socket, "READY=1"))
        admin.create_feature(f"svc-{run}-1")
        receiver.wait_for(1, first, timeout_s=30)
        status, text = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200
        assert 'unleash_poller_deliveries_total{outcome="delivered",webhook="a"}' in text
        status, text = _get(f"http://127.0.0.1:{port}/healthz")
        assert (status, json.loads(text)["status"]) == (200, "ok")

        # A reload that adds a webhook: the next event reaches both, nothing is re-sent.
        config.write_text(
            config.read_text().replace(
                "\n[metrics]",
                f'\n[[webhooks]]\nname = "b"\nurl = "{receiver.url(second)}"\n\n[metrics]',
            )
        )
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_log("config.reloaded")
        admin.create_feature(f"svc-{run}-2")
        receiver.wait_for(2, first, timeout_s=30)
        receiver.wait_for(1, second, timeout_s=30)

        # A broken config is rejected; the running one keeps delivering.
        good = config.read_text()
        config.write_text(good + "\nbogus_key = 1\n")
        daemon.process.send_signal(signal.SIGHUP)
        daemon.wait_for_log("config.reload_failed")
        config.write_text(good)
        admin.create_feature(f"svc-{run}-3")
        receiver.wait_for(3, first, timeout_s=30)
        receiver.wait_for(2, second, timeout_s=30)
        assert len(receiver.requests(first)) == 3
        assert len(receiver.requests(second)) == 2
    finally:
        code = daemon.stop()
    assert code == 0
    assert "STOPPING=1" in "\n".join(_datagrams_until(notify_socket, "STOPPING=1"))
    stopped = [e for e in daemon.events() if e.get("event") == "app.stopped"]
    assert len(stopped) == 1
    assert stopped[0]["delivered"] == 5


def test_secrets_never_reach_logs_state_or_output(
    tmp_path: Path,
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """Canary secrets (token, authorization, signing secret, a secret-looking header, a
    secret in a webhook URL path) appear in no log line, state file, status, dead-letter
    list or render output, even when deliveries fail and are retried."""
    canaries = {
        "authorization": f"Bearer canary-auth-{uuid.uuid4().hex}",
        "signing": f"canary-sign-{uuid.uuid4().hex}",
        "header": f"canary-header-{uuid.uuid4().hex}",
        "path": f"canary-path-{uuid.uuid4().hex}",
    }
    path = f"/hooks/{canaries['path']}"
    receiver.respond(path, status=500)
    dead_port = _free_port()
    config = poller_config(
        webhooks=[
            {
                "name": "failing",
                "url": receiver.url(path),
                "authorization": canaries["authorization"],
                "signing_secret": canaries["signing"],
                "headers": {"X-Api-Key": canaries["header"]},
            },
            {
                "name": "unreachable",
                "url": f"http://127.0.0.1:{dead_port}/{canaries['path']}",
                "authorization": canaries["authorization"],
            },
        ],
        start_from=admin.latest_event_id(),
    )
    admin.create_feature(f"canary-{uuid.uuid4().hex[:8]}")
    runs = [
        poller_cli("run", "-c", config, "--once"),
        poller_cli("status", "-c", config),
        poller_cli("status", "-c", config, "--json"),
        poller_cli("dead-letters", "list", "-c", config),
    ]
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(admin.search_events(limit=1)[0]))
    runs.append(poller_cli("render", "-c", config, "--webhook", "failing", "--event", event_file))
    assert len(receiver.requests(path)) == 2  # the canary header was really sent...
    sent = receiver.requests(path)[0]
    assert sent.header("X-Api-Key") == canaries["header"]
    assert "dead letters 1" in runs[1].stdout  # ...and the failure was really recorded
    produced = "".join(r.stdout + r.stderr for r in runs).encode()
    for file in tmp_path.rglob("*"):
        if file.is_file() and file not in (event_file, config):  # the inputs hold them
            produced += file.read_bytes()
    secrets = [*canaries.values(), unleash.admin_token]
    for secret in secrets:
        assert secret.encode() not in produced, secret
        assert secret.split("-", 1)[-1].encode() not in produced, secret


def test_provider_secrets_never_reach_logs_state_or_output(
    tmp_path: Path,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
) -> None:
    """Canary provider secrets (Slack App access token, Datadog api_key, New Relic
    license_key, the path of a Slack, Teams and Teams Workflow webhook URL) are really sent
    to a local receiver, yet appear in no log line, state file, status, dead-letter list
    or render output, while every delivery fails and is retried."""
    canaries = {
        name: f"canary-{name}-{uuid.uuid4().hex}"
        for name in ("token", "apikey", "license", "slackpath", "teamspath", "workflowpath")
    }
    # One receiver serves the whole session (every Unleash version): paths of this run only.
    run = f"/canary-{uuid.uuid4().hex[:8]}"
    paths = {
        "slack-app": f"{run}/slack-app/chat.postMessage",
        "slack": f"{run}/slack/{canaries['slackpath']}",
        "teams": f"{run}/teams/{canaries['teamspath']}",
        "teamsworkflow": f"{run}/workflow/{canaries['workflowpath']}",
        "datadog": f"{run}/datadog/events",
        "new-relic": f"{run}/new-relic/events",
    }
    for path in paths.values():
        receiver.respond(path, status=500)
    webhooks: list[dict[str, object]] = [
        {
            "name": "slack-app",
            "provider": "slack-app",
            "url": receiver.url(paths["slack-app"]),
            "access_token": canaries["token"],
            "default_channels": ["general"],
        },
        {
            "name": "slack",
            "provider": "slack",
            "url": receiver.url(paths["slack"]),
            "default_channel": "general",
        },
        {"name": "teams", "provider": "teams", "url": receiver.url(paths["teams"])},
        {
            "name": "teamsworkflow",
            "provider": "teamsworkflow",
            "url": receiver.url(paths["teamsworkflow"]),
        },
        {
            "name": "datadog",
            "provider": "datadog",
            "url": receiver.url(paths["datadog"]),
            "api_key": canaries["apikey"],
        },
        {
            "name": "new-relic",
            "provider": "new-relic",
            "url": receiver.url(paths["new-relic"]),
            "license_key": canaries["license"],
        },
    ]
    config = poller_config(webhooks=webhooks, start_from=admin.latest_event_id())
    admin.create_feature(f"canary-{uuid.uuid4().hex[:8]}")
    runs = [
        poller_cli("run", "-c", config, "--once"),
        poller_cli("status", "-c", config),
        poller_cli("status", "-c", config, "--json"),
        poller_cli("dead-letters", "list", "-c", config),
    ]
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(admin.search_events(limit=1)[0]))
    for hook in webhooks:
        rendered = poller_cli(
            "render", "-c", config, "--webhook", hook["name"], "--event", event_file
        )
        assert rendered.returncode == 0, rendered.stderr
        runs.append(rendered)
    # The secrets were really sent (so a leak had something to leak)...
    sent = {name: receiver.requests(path) for name, path in paths.items()}
    assert all(len(requests) == 2 for requests in sent.values()), {
        name: len(requests) for name, requests in sent.items()
    }
    assert sent["slack-app"][0].header("Authorization") == f"Bearer {canaries['token']}"
    assert sent["datadog"][0].header("DD-API-KEY") == canaries["apikey"]
    assert sent["new-relic"][0].header("Api-Key") == canaries["license"]
    # ...and the failures were really recorded.
    for hook in webhooks:
        assert f"{hook['name']}: pending 0, dead letters 1" in runs[1].stdout, runs[1].stdout
    produced = "".join(r.stdout + r.stderr for r in runs).encode()
    for file in tmp_path.rglob("*"):
        if file.is_file() and file not in (event_file, config):  # the inputs hold them
            produced += file.read_bytes()
    for secret in canaries.values():
        assert secret.encode() not in produced, secret
        assert secret.split("-", 2)[-1].encode() not in produced, secret


def test_reloads_while_a_worker_is_replaced_never_run_two_at_once(
    tmp_path: Path,
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
) -> None:
    """A reload that changes max_in_flight replaces the webhook's worker after its request
    in flight; a second reload meanwhile must wait for that too, or a second worker would
    send the in-flight event again. Every event arrives exactly once."""
    path = f"/replace-{uuid.uuid4().hex[:8]}"
    receiver.respond(path, delay_s=1.5)

    def write(max_in_flight: int) -> Path:
        return poller_config(
            webhooks=[{"name": "a", "url": receiver.url(path), "max_in_flight": max_in_flight}],
            poll_interval_s=0.2,
            start_from=admin.latest_event_id(),
        )

    config = write(1)
    daemon = Daemon(config, tmp_path / "daemon.log")
    try:
        daemon.wait_for_log("unleash.api_detected")
        ids = unleash.db.insert_events(3)
        receiver.wait_for(1, path, timeout_s=30)  # the first one is in flight for 1.5 s
        for reloads, max_in_flight in enumerate((2, 4), start=1):
            write(max_in_flight)
            daemon.process.send_signal(signal.SIGHUP)
            daemon.wait_for_log("config.reloaded", count=reloads)
        receiver.respond(path)
        receiver.wait_for(3, path, timeout_s=30)
        time.sleep(1.0)  # a second worker would have re-sent by now
        got = receiver.requests(path)
        assert sorted(json.loads(r.body)["id"] for r in got) == ids
    finally:
        code = daemon.stop()
    assert code == 0
