"""The daemon as a whole stays responsive while one webhook's Jinja2 template runs away
(issue 11, defect 4): other webhooks deliver, /healthz answers, SIGTERM stops it promptly."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from poller.state import SqliteState
from tests.support.receiver import Receiver
from tests.support.unleash import free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
SILENT_LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


def _event(i: int) -> str:
    return json.dumps({"id": i, "type": "feature-created", "createdBy": "me", "data": {}})


async def _seed(path: Path) -> None:
    """Twenty events owed to "ok", the first ten also to "runaway"."""
    state = SqliteState.open(path)
    ids = range(1, 21)
    try:
        await state.ingest(
            [(i, _event(i)) for i in ids],
            [("ok", i) for i in ids] + [("runaway", i) for i in range(1, 11)],
            20,
        )
    finally:
        await state.close()


def _healthz_answers(port: int) -> bool:
    """Whether /healthz gives any HTTP answer within a second (503 is an answer: Unleash
    is unreachable in this test)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1.0):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, TimeoutError):
        return False


def test_a_runaway_jinja_webhook_does_not_stop_the_daemon(tmp_path: Path) -> None:
    """With a runaway Jinja2 webhook holding ten events (20 s of renders), the healthy
    webhook delivers its 20, /healthz answers throughout, and SIGTERM ends the daemon within
    its drain timeout instead of being ignored."""
    metrics_port = free_port()
    with Receiver() as receiver:
        config = tmp_path / "config.toml"
        config.write_text(
            f"""
drain_timeout_s = 1
[unleash]
url = "http://127.0.0.1:{free_port()}"
token = "t"
start_from = 20
[state]
path = "state.sqlite3"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[[webhooks]]
name = "runaway"
url = "{receiver.url("/runaway")}"
template_engine = "jinja2"
body_template = '{SILENT_LOOP}'
retries = 0
[[webhooks]]
name = "ok"
url = "{receiver.url("/ok")}"
"""
        )
        config.chmod(0o600)
        asyncio.run(_seed(tmp_path / "state.sqlite3"))
        log = (tmp_path / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "-c", str(config)],
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
        try:
            receiver.wait_for(20, "/ok", timeout_s=30)
            answered = []
            for _ in range(5):
                answered.append(_healthz_answers(metrics_port))
                time.sleep(0.2)
            assert answered == [True] * 5
            daemon.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            code = daemon.wait(timeout=15)
            took = time.monotonic() - stopped_at
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            log.close()
    output = (tmp_path / "daemon.log").read_text()
    assert code == 0, output[-3000:]
    # Drain timeout (1 s) plus one render budget (2 s) at the very worst, plus start-up slack.
    assert took < 5, (took, output[-3000:])
    assert "delivery.dead_lettered" in output
    assert "template ran longer than 2s; stopped" in output
    assert receiver.requests("/runaway") == []
