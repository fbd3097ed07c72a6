"""Shared by the end-to-end tests that run the real daemon: the daemon as a child process
whose JSON log lines can be waited for, and the checks on what a receiver got (every owed
event, in order per webhook, with a bounded re-sent tail after a fault).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from datetime import datetime
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import pytest

from poller.faults import ENV as CRASH_ENV
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.unleash import REPO_ROOT, UnleashServer


def unique(prefix: str) -> str:
    """A receiver path component / name no other test uses."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def wants(
    event: Mapping[str, Any],
    *,
    events: Sequence[str] | None = None,
    environments: Sequence[str] | None = None,
) -> bool:
    """Unleash's integration filter: type globs; an event with no environment passes."""
    if events is not None and not any(fnmatchcase(event["type"], glob) for glob in events):
        return False
    environment = event.get("environment")
    return environments is None or not environment or environment in environments


def ids_of(requests: Sequence[RecordedRequest]) -> list[int]:
    return [json.loads(r.body)["id"] for r in requests]


def assert_stable_webhook_ids(requests: Sequence[RecordedRequest]) -> None:
    """Every delivery (first try, retry, replay, re-delivery after a crash) of an event
    carries `webhook-id: unleash-event-<id>`, so all copies of one event share it."""
    for request in requests:
        event_id = json.loads(request.body)["id"]
        assert request.header("webhook-id") == f"unleash-event-{event_id}", request.headers


def replays_in_order(ids: Sequence[int], expected: Sequence[int], back: int) -> int:
    """Check what one ordered webhook received against what it was owed: every id, in
    order, where each step back (a restart after a kill) goes at most `back` events behind
    the furthest one sent and then runs forward again. Returns how many steps back."""
    position = {event_id: n for n, event_id in enumerate(expected)}
    frontier = 0  # how many of `expected` have arrived at least once
    previous = -1
    restarts = 0
    for n, event_id in enumerate(ids):
        index = position.get(event_id)
        assert index is not None, f"request {n}: id {event_id} was not owed"
        if index <= previous:
            restarts += 1
            assert frontier - index <= back, (
                f"request {n}: id {event_id} re-sent {frontier - index} events back "
                f"(at most {back})"
            )
        else:
            assert index == previous + 1, f"request {n}: id {event_id} skips ahead"
            assert index <= frontier, f"request {n}: id {event_id} skips ahead"
        frontier = max(frontier, index + 1)
        previous = index
    lost = list(expected[frontier:])
    assert not lost, f"{len(lost)} events lost, e.g. {lost[:10]}"
    return restarts


def wait_for_ids(
    receiver: Receiver, path: str, ids: Collection[int], *, timeout_s: float = 20.0
) -> list[RecordedRequest]:
    """Wait until requests carrying every id in `ids` reached `path`; return all of them."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = receiver.requests(path)
        missing = set(ids) - set(ids_of(got))
        if not missing:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{path}: {len(missing)} of {len(ids)} events not delivered within "
                f"{timeout_s} s (e.g. {sorted(missing)[:10]})"
            )
        time.sleep(0.05)


def timestamp(record: Mapping[str, Any]) -> float:
    return datetime.fromisoformat(record["timestamp"]).timestamp()


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    """Print a FIGURES line past pytest's capture, so a CI log shows it."""
    with capsys.disabled():
        sys.stdout.write(f"\nFIGURES: {line}\n")
        sys.stdout.flush()


class Daemon:
    """One `python -m poller run -c CONFIG` child process. Its output (JSON log lines on
    stderr, merged with stdout) is copied to a file and kept for `logs`/`wait_log`.

    `crash_at` sets UNLEASH_POLLER_CRASH_AT; `file_size_limit` sets RLIMIT_FSIZE in the
    child (CPython ignores SIGXFSZ, so a write past it fails with EFBIG). The output goes
    through a pipe, not a file, so that limit never applies to the log.
    """

    def __init__(
        self,
        config: Path,
        log_path: Path,
        *,
        crash_at: str | None = None,
        file_size_limit: int | None = None,
    ) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name in (CRASH_ENV, "NOTIFY_SOCKET", "WATCHDOG_USEC"):
            env.pop(name, None)
        if crash_at:
            env[CRASH_ENV] = crash_at
        preexec: Callable[[], None] | None = None
        if file_size_limit is not None:
            limit = file_size_limit

            def preexec() -> None:
                hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))

        self.log_path = log_path
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "poller", "run", "-c", str(config)],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec,  # noqa: PLW1509 - only setrlimit, which takes no lock
        )
        self._reader = threading.Thread(target=self._copy, name="daemon-log", daemon=True)
        self._reader.start()

    def _copy(self) -> None:
        assert self.process.stdout is not None
        with self.process.stdout as stream, self.log_path.open("a", encoding="utf-8") as log:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\n")
                log.write(line + "\n")
                log.flush()
                with self._changed:
                    self._lines.append(line)
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def output(self) -> str:
        with self._changed:
            return "\n".join(self._lines)

    def tail(self, lines: int = 40) -> str:
        with self._changed:
            return "\n".join(self._lines[-lines:])

    def logs(self, event: str | None = None) -> list[dict[str, Any]]:
        """Parsed JSON log records (of one event name, or all), in order."""
        with self._changed:
            lines = list(self._lines)
        records = []
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and (event is None or record.get("event") == event):
                records.append(record)
        return records

    def wait_log(
        self,
        event: str,
        *,
        count: int = 1,
        where: Callable[[dict[str, Any]], bool] | None = None,
        timeout_s: float = 30.0,
    ) -> list[dict[str, Any]]:
        """Block until `count` records of `event` (matching `where`) were logged."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = [r for r in self.logs(event) if where is None or where(r)]
            if len(found) >= count:
                return found
            if not self._reader.is_alive():
                raise AssertionError(
                    f"daemon exited {self.process.poll()} after {len(found)} of {count} "
                    f"{event} lines:\n{self.tail()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{len(found)} of {count} {event} lines within {timeout_s} s:\n{self.tail()}"
                )
            with self._changed:
                self._changed.wait(min(remaining, 0.2))

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, as systemd stops it; returns the exit code."""
        self.send(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> int:
        """kill -9, as a crash or an OOM kill would."""
        self.process.kill()
        return self.wait()

    def wait(self, timeout_s: float = 30.0) -> int:
        code = self.process.wait(timeout_s)
        self._reader.join(10)
        return code

    def close(self) -> None:
        if self.running:
            self.kill()
        self._reader.join(10)


DaemonFactory = Callable[..., Daemon]


@contextlib.contextmanager
def events_born_announced(unleash: UnleashServer) -> Iterator[None]:
    """While inside, the events inserted into Unleash's table are born `announced`.

    Unleash hands every unannounced row to its own webhook integrations once a second.
    Other tests create such integrations (and Unleash keeps using its cached list for up
    to 60 s after they are deleted): ~15,000 bulk events times every live integration
    swamps the shared server until it stops answering. The poller reads the event log,
    not announcements, so this changes nothing it sees; the default is restored after.
    """
    db = unleash.db
    [default] = db.psql(
        "SELECT column_default FROM information_schema.columns WHERE table_schema = "
        "current_schema() AND table_name = 'events' AND column_name = 'announced';"
    )
    assert default in ("false", "true"), default
    db.psql("ALTER TABLE events ALTER COLUMN announced SET DEFAULT true;")
    try:
        yield
    finally:
        db.psql(f"ALTER TABLE events ALTER COLUMN announced SET DEFAULT {default};")


def require_search_by_id(unleash: UnleashServer, what: str) -> None:
    """Skip below Unleash 7: bulk streams are read with `GET /api/admin/search/events`
    (1000 a page, ties broken by id) and gaps re-checked by id, which 7.x first offers;
    older servers are covered by test_e2e_daemon.py."""
    if int(unleash.version.split(".", 1)[0]) < 7:
        pytest.skip(f"{what} need Unleash 7+ (this is {unleash.version})")
