"""Faults end to end (issue 4): the real daemon (`python -m poller run`) against a real
Unleash and a real HTTP receiver, killed with SIGKILL, starved of disk, cut off from
Unleash and lied to, to prove the delivery guarantee: every matching event reaches every
webhook at least once, in event-id order per webhook, with a bounded number of
duplicates, each carrying the same `webhook-id`.

Figures worth quoting are printed on lines starting with `FIGURES:`. Set FAULT_SEED to
replay another sequence of random kills.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.cookiejar
import itertools
import json
import os
import random
import re
import secrets
import signal
import sqlite3
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import aiohttp
import pytest
from aiohttp import web

from poller.ingest import BURST_PAGE
from poller.worker import MARKS_PER_COMMIT
from tests.support.daemon import (
    Daemon,
    DaemonFactory,
    assert_stable_webhook_ids,
    events_born_announced,
    ids_of,
    replays_in_order,
    report,
    require_search_by_id,
    timestamp,
    unique,
    wait_for_ids,
    wants,
)
from tests.support.pgstate import fresh_schema, state_url
from tests.support.receiver import Receiver
from tests.support.unleash import AdminClient, PostgresDatabase, UnleashServer, free_port

pytestmark = pytest.mark.e2e

PollerConfigFactory = Callable[..., Path]  # the `poller_config` fixture
PollerCli = Callable[..., "subprocess.CompletedProcess[str]"]  # the `poller_cli` fixture

SEED = int(os.environ.get("FAULT_SEED", "20261128"))
EX_IOERR = 74

# (type, environment) of inserted batches, chosen so that the two webhooks of the crash
# test want different, overlapping subsets (and some events nobody wants).
STYLES = (
    ("feature-updated", "production"),  # both
    ("feature-updated", "development"),  # features only
    ("segment-updated", None),  # production only: an event with no environment passes
    ("segment-updated", "development"),  # neither
)


# --------------------------------------------------------------------------- helpers


def make_config(
    poller_config: PollerConfigFactory,
    *,
    url: str | None = None,
    top: Mapping[str, object] | None = None,
    **options: Any,
) -> Path:
    """`poller_config(**options)`, optionally pointed at another Unleash URL (the fault
    proxy) and with top-level keys (drain_timeout_s, log_level); made private (0600),
    since a config holding a token must not be readable by others."""
    path = poller_config(**options)
    text = path.read_text()
    if url is not None:
        unleash_url = next(line for line in text.splitlines() if line.startswith("url = "))
        text = text.replace(unleash_url, f"url = {json.dumps(url)}", 1)
    if top:
        text = "".join(f"{key} = {json.dumps(value)}\n" for key, value in top.items()) + text
    path.write_text(text)
    path.chmod(0o600)
    return path


def status(poller_cli: PollerCli, config: Path) -> dict[str, Any]:
    """`status --json`, which must exit 0 (the state file opens)."""
    result: dict[str, Any] = json.loads(poller_cli("status", "-c", config, "--json").stdout)
    return result


def initialise(poller_cli: PollerCli, config: Path) -> int:
    """A first `run --once` (start_from = latest); returns the cursor it saved."""
    poller_cli("run", "-c", config, "--once")
    cursor: int = status(poller_cli, config)["cursor"]
    return cursor


def run_once_when_no_daemon_leads(poller_cli: PollerCli, config: Path) -> None:
    """`run --once`, which must exit 0. On PostgreSQL it exits 75 while the lease of a
    daemon killed with -9 has not run out: tried again until it has (within a minute)."""
    deadline = time.monotonic() + 60
    while True:
        result = poller_cli("run", "-c", config, "--once", expect_exit=None)
        held = result.returncode == 75 and '"lease.held"' in result.stderr
        if not held or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert result.returncode == 0, (
        f"run --once exited {result.returncode}:\n{result.stderr[-4000:]}"
    )


Initialised = Callable[..., tuple[Path, int]]  # the `initialised` fixture


@pytest.fixture
def initialised(poller_config: PollerConfigFactory, poller_cli: PollerCli) -> Initialised:
    """The set-up of every test here: `make_config(**options)`, then a first `run --once`
    (start_from = latest). Returns the config's path and the cursor that run saved: every
    event after it is owed."""

    def make(**options: Any) -> tuple[Path, int]:
        config = make_config(poller_config, **options)
        return config, initialise(poller_cli, config)

    return make


# --------------------------------------------------------------------------- state

# The lease's shortest TTL: a daemon started after a kill -9 waits this long at most for
# the dead one's lease to run out.
PG_LEASE_TTL_S = 3


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon_state(request: pytest.FixtureRequest) -> Mapping[str, object] | None:
    """The daemon's [state] for a test that runs on both backends: None (the SQLite file
    tmp_path/state.sqlite3) or PostgreSQL, in a fresh schema of the session's database."""
    if request.param == "sqlite":
        return None
    db: PostgresDatabase = request.getfixturevalue("pg_database")
    return {"url": state_url(db), "schema": fresh_schema("faults"), "lease_ttl_s": PG_LEASE_TTL_S}


def staged(state: Mapping[str, object] | None, state_path: Path) -> int:
    """How many events the state holds staged (a catch-up not yet taken in)."""
    if state is None:
        with contextlib.closing(sqlite3.connect(f"file:{state_path}?mode=ro", uri=True)) as conn:
            count: int = conn.execute("SELECT count(*) FROM staging").fetchone()[0]
        return count
    import psycopg
    from psycopg import sql

    query = sql.SQL("SELECT count(*) FROM {}.staging").format(sql.Identifier(str(state["schema"])))
    with psycopg.connect(str(state["url"])) as conn:
        row = conn.execute(query).fetchone()
    assert row is not None
    pg_count: int = row[0]
    return pg_count


# --------------------------------------------------------------------------- Unleash


@pytest.fixture(scope="module", autouse=True)
def _unleash_for_fault_tests(unleash: UnleashServer) -> Iterator[None]:
    """Unleash 7+, with the events this module inserts born `announced` (see
    events_born_announced). Running the fault suite once keeps CI within its budget."""
    require_search_by_id(unleash, "fault tests")
    with events_born_announced(unleash):
        yield


# --------------------------------------------------------------------------- the proxy


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of the real Unleash that can be told to fail.

    Modes: "pass" (forward), "refuse" (stop listening: connection refused), "500",
    "hang" (no answer until the mode changes), "not_json" (200 with an HTML page),
    "no_events" (Unleash's real answer without its `events` list), "401" (Unleash's
    error body). `hold()` parks requests until `release()`; `on_forward(path_qs)` runs
    (in a thread) before a request is forwarded. Every answer closes its connection, so
    "refuse" refuses the very next request. `cap_limit` lowers the `limit` of every
    forwarded query to at most that (a proxy capping pages); `ignore_offset` drops its
    `offset` (a cache keyed without it); `stale_probe` answers 304 to every conditional
    request without asking Unleash (a cache that never revalidates).
    """

    MODES = ("pass", "refuse", "500", "hang", "not_json", "no_events", "401")
    _FORWARDED = ("authorization", "accept", "content-type", "if-none-match", "user-agent")

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.on_forward: Callable[[str], None] | None = None
        self.cap_limit: int | None = None
        self.ignore_offset = False
        self.stale_probe = False
        self.held = 0
        self.seen: list[tuple[str, str]] = []  # (mode, path with query)
        self._mode = "pass"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._site: web.TCPSite | None = None

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._call(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
        self._gate = asyncio.Event()
        self._gate.set()
        self._mode_changed = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown: requests still hanging or forwarding are cut off at exit.
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()

    async def _stop(self) -> None:
        self._gate.set()
        self._mode_changed.set()
        await self._runner.cleanup()
        await self._session.close()

    def set_mode(self, mode: str) -> None:
        assert mode in self.MODES, mode
        self._call(self._set_mode(mode))

    async def _set_mode(self, mode: str) -> None:
        if mode == "refuse" and self._site is not None:
            await self._site.stop()
            self._site = None
        elif mode != "refuse" and self._site is None:
            await self._listen()
        self._mode = mode
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()

    def hold(self) -> None:
        self._loop.call_soon_threadsafe(self._gate.clear)

    def release(self) -> None:
        self._loop.call_soon_threadsafe(self._gate.set)

    def wait_held(self, count: int, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.held < count:
            assert time.monotonic() < deadline, f"{self.held} of {count} requests held"
            time.sleep(0.02)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not self._gate.is_set():
            self.held += 1
            await self._gate.wait()
        mode = self._mode
        self.seen.append((mode, request.path_qs))
        response: web.StreamResponse
        if mode == "hang":
            # The daemon times out long before this; answer only once the mode changes.
            await self._mode_changed.wait()
            response = web.Response(status=504)
        elif mode == "500":
            response = web.json_response({"name": "InternalError", "message": "boom"}, status=500)
        elif mode == "401":
            response = web.json_response(
                {"name": "UnauthorizedError", "message": "You must log in to use Unleash."},
                status=401,
            )
        elif self.stale_probe and "If-None-Match" in request.headers:
            response = web.Response(status=304, headers={"ETag": request.headers["If-None-Match"]})
        elif mode == "not_json":
            response = web.Response(
                text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                content_type="text/html",
            )
        else:
            # "pass", "no_events", and "refuse" for a connection accepted just before the
            # socket closed (it is served: the refusal starts with the next connection).
            response = await self._forward(request, body, strip_events=mode == "no_events")
        response.force_close()
        return response

    async def _forward(
        self, request: web.Request, body: bytes, *, strip_events: bool
    ) -> web.Response:
        if self.on_forward is not None:
            await asyncio.to_thread(self.on_forward, request.path_qs)
        headers = {k: v for k, v in request.headers.items() if k.lower() in self._FORWARDED}
        query = dict(request.query)
        if self.cap_limit is not None and "limit" in query:
            query["limit"] = str(min(int(query["limit"]), self.cap_limit))
        if self.ignore_offset:
            query.pop("offset", None)
        async with self._session.request(
            request.method,
            self.upstream + request.path + (f"?{urlencode(query)}" if query else ""),
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as upstream:
            raw = await upstream.read()
            status = upstream.status
            # Unleash spells it "Etag": compare names without case, as HTTP does.
            kept = {
                k: v for k, v in upstream.headers.items() if k.lower() in ("content-type", "etag")
            }
        if strip_events and status == 200:
            data = json.loads(raw)
            data.pop("events", None)
            raw = json.dumps(data).encode()
        return web.Response(status=status, body=raw, headers=kept)


# --------------------------------------------------------------------------- PATs


class PersonalTokens:
    """Personal access tokens of a fresh admin user. Unleash looks a PAT up on every
    request, so deleting one takes effect at once (a deleted admin API token stays in
    Unleash's token cache for up to a minute, and 8.x no longer creates admin tokens)."""

    def __init__(self, admin: AdminClient) -> None:
        self._url = admin.url
        email = f"{unique('rotation')}@example.com"
        password = f"Rot-{secrets.token_hex(12)}-A1!"
        while re.search(r"(.)\1\1", password):  # Unleash's OWASP check refuses "aaa"
            password = f"Rot-{secrets.token_hex(12)}-A1!"
        roles = admin.request("GET", "/api/admin/user-admin")["rootRoles"]
        admin_role = next(r["id"] for r in roles if r["name"] == "Admin")
        user = admin.request(
            "POST",
            "/api/admin/user-admin",
            {"email": email, "name": "token rotation", "rootRole": admin_role, "sendEmail": False},
        )
        admin.request(
            "POST", f"/api/admin/user-admin/{user['id']}/change-password", {"password": password}
        )
        cookies = urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar())
        self._opener = urllib.request.build_opener(cookies)
        self._call("POST", "/auth/simple/login", {"username": email, "password": password})

    def _call(self, method: str, path: str, body: object = None) -> Any:
        request = urllib.request.Request(  # noqa: S310 - our own loopback Unleash
            self._url + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Content-Type": "application/json", "Accept": "application/json"},
        )
        with self._opener.open(request, timeout=30) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def create(self) -> tuple[int, str]:
        """A new PAT: (id, secret)."""
        token = self._call(
            "POST",
            "/api/admin/user/tokens",
            {"description": unique("poller"), "expiresAt": "2099-01-01T00:00:00.000Z"},
        )
        return int(token["id"]), str(token["secret"])

    def delete(self, token_id: int) -> None:
        self._call("DELETE", f"/api/admin/user/tokens/{token_id}")


# --------------------------------------------------------------------------- 1. crashes


def test_kill_9_at_any_instant_loses_no_event(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    daemon_state: Mapping[str, object] | None,
) -> None:
    """kill -9 anywhere loses nothing: every owed event, in id order; after a kill at most
    the uncommitted marks and the POST in flight are re-sent, in order. On SQLite and on
    PostgreSQL (where each new daemon first waits for the dead one's lease to run out)."""
    rng = random.Random(SEED)
    started = time.monotonic()
    base = "/" + unique("crash")
    hooks: dict[str, dict[str, list[str]]] = {
        "features": {"events": ["feature-*"]},
        "production": {"environments": ["production"]},
    }
    config, start = initialised(
        webhooks=[{"name": n, "url": receiver.url(f"{base}/{n}"), **f} for n, f in hooks.items()],
        poll_interval_s=0.2,
        state=daemon_state,
    )
    state_path = tmp_path / "state.sqlite3"
    db = unleash.db

    def insert(count: int) -> None:
        kind, environment = STYLES[rng.randrange(len(STYLES))]
        db.insert_events(count, type=kind, environment=environment)

    def delivered() -> int:
        return sum(len(receiver.requests(f"{base}/{name}")) for name in hooks)

    kills = 0

    # A crash between two pages of a catch-up of more than 1000 events: nothing moves.
    for kind, environment in STYLES:
        db.insert_events(400, type=kind, environment=environment)
    daemon = spawn(config, crash_at="poll.page_fetched:2")
    assert daemon.wait(60) == -signal.SIGKILL, daemon.tail()
    kills += 1
    assert status(poller_cli, config)["cursor"] == start
    assert delivered() == 0

    # A crash after a POST succeeded, before the state knew.
    daemon = spawn(config, crash_at="delivery.after_post:500")
    assert daemon.wait(60) == -signal.SIGKILL, daemon.tail()
    kills += 1
    cursor = status(poller_cli, config)["cursor"]
    assert cursor >= start + 1600

    # A catch-up staged 1,000 events at a time (STAGE_AT), killed after 5,000 were staged.
    db.insert_events(5200, type="feature-updated", environment="production")
    daemon = spawn(config, crash_at="poll.page_fetched:7")
    assert daemon.wait(60) == -signal.SIGKILL, daemon.tail()
    kills += 1
    # Read before `status`, which discards leftovers: proof the kill came after staging.
    assert staged(daemon_state, state_path) >= 5000
    assert status(poller_cli, config)["cursor"] == cursor

    # Inside a state transaction before COMMIT (ingest or delivery mark), and before a POST.
    for point in ("state.before_commit", "delivery.before_post"):
        daemon = spawn(config, crash_at=f"{point}:{rng.randint(2, 400)}")
        assert daemon.wait(60) == -signal.SIGKILL, daemon.tail()
        kills += 1
    crash_point_kills = kills

    # kill -9 at random instants: during start-up, catch-up, delivery, idle polling.
    random_kills = 12
    for _ in range(random_kills):
        if rng.random() < 0.5:
            insert(rng.randint(50, 1500))
        daemon = spawn(config)
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0.0, 0.6))
        else:
            daemon.wait_log("unleash.api_detected")
            time.sleep(rng.uniform(0.0, 0.8))
            if rng.random() < 0.5:
                insert(rng.randint(50, 800))
            time.sleep(rng.uniform(0.0, 0.8))
        assert daemon.running, f"daemon died on its own:\n{daemon.tail()}"
        assert daemon.kill() == -signal.SIGKILL
        kills += 1
        status(poller_cli, config)  # the state file always opens

    run_once_when_no_daemon_leads(poller_cli, config)

    events = admin.all_events(after_id=start)
    figures = []
    for name, selection in hooks.items():
        expected = [e["id"] for e in events if wants(e, **selection)]
        got = receiver.requests(f"{base}/{name}")
        assert_stable_webhook_ids(got)
        ids = ids_of(got)
        # After a kill the webhook is sent again what the state did not know was delivered:
        # the marks not yet committed (a group commit holds up to MARKS_PER_COMMIT) and the
        # one POST in flight, in order, before it goes on.
        back = MARKS_PER_COMMIT + 1
        restarts = replays_in_order(ids, expected, back)
        assert restarts <= kills, f"{name}: {restarts} steps back for {kills} kills"
        duplicates = len(ids) - len(expected)
        assert duplicates <= kills * back, f"{name}: {duplicates} duplicates for {kills} kills"
        figures.append(
            f"{name}: {len(expected)} owed, {len(ids)} sent, lost 0, "
            f"duplicates {duplicates} after {restarts} re-sends"
        )
    report(
        capsys,
        f"crash test ({'sqlite' if daemon_state is None else 'postgresql'}, seed {SEED}): "
        f"{len(events)} events after the start, {kills} kills "
        f"({crash_point_kills} at crash points, {random_kills} random kill -9); "
        + "; ".join(figures)
        + f"; duplicate bound {kills * (MARKS_PER_COMMIT + 1)} per webhook "
        f"({MARKS_PER_COMMIT} uncommitted marks + 1 POST in flight per kill); "
        f"{time.monotonic() - started:.0f} s",
    )


# --------------------------------------------------------------------------- 2. late commits


def test_late_commit_is_delivered_and_rolled_back_id_expires_after_grace(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
) -> None:
    """A late-committing event is delivered; a rolled-back id expires after gap_grace_s; no loss."""
    path = "/" + unique("late")
    grace_s = 3
    config, start = initialised(
        webhooks=[{"name": "all", "url": receiver.url(path)}],
        poll_interval_s=0.2,
        extra_unleash={"gap_grace_s": grace_s},
    )
    daemon = spawn(config, ready=True)
    db = unleash.db
    with (
        db.open_transaction_inserting_event(feature_name=unique("late")) as late,
        db.open_transaction_inserting_event(feature_name=unique("rolled-back")) as rolled_back,
    ):
        early = db.insert_events(5, feature_name=unique("early"))
        assert late.id < rolled_back.id < early[0]
        wait_for_ids(receiver, path, early)
        assert status(poller_cli, config)["gaps"] == [late.id, rolled_back.id]
        assert late.id not in ids_of(receiver.requests(path))
        rolled_back.rollback()
        late.commit()
    later = db.insert_events(5, feature_name=unique("later"))

    got = wait_for_ids(receiver, path, [late.id, *later])
    [expired] = daemon.wait_log("gap.expired", timeout_s=20)
    assert expired["ids"] == [rolled_back.id]
    [opened] = [r for r in daemon.logs("gap.opened") if rolled_back.id in r["ids"]]
    assert timestamp(expired) - timestamp(opened) >= grace_s - 0.05
    assert any(late.id in r["ids"] for r in daemon.logs("gap.filled"))
    assert status(poller_cli, config)["gaps"] == []

    expected = [e["id"] for e in admin.all_events(after_id=start)]
    assert ids_of(got) == [*early, late.id, *later]
    assert sorted(ids_of(got)) == expected
    assert_stable_webhook_ids(got)
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- 3. bursts


def test_burst_larger_than_a_page_and_inserts_while_paging_leave_no_gap_or_duplicate(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
) -> None:
    """A 2500-event burst plus inserts while paging arrive exactly once, in order, with no
    gap: read newest first (the daemon's first read, which has no size of the log to go
    by) and oldest page first (a running daemon's)."""
    path = "/" + unique("burst")
    db = unleash.db
    with FaultProxy(unleash.url) as proxy:
        config, start = initialised(
            url=proxy.url,
            webhooks=[{"name": "all", "url": receiver.url(path)}],
            poll_interval_s=0.5,
        )
        daemon = spawn(config, ready=True)

        # While the daemon asks for the page at these offsets, insert this many events.
        shifts = {50: 120, 1050: 300}
        inserted_while_paging: list[int] = []

        def insert_while_paging(path_qs: str) -> None:
            query = parse_qs(urlsplit(path_qs).query)
            offset = int(query.get("offset", ["0"])[0])
            if offset in shifts:
                inserted_while_paging.extend(db.insert_events(shifts.pop(offset)))

        proxy.hold()
        proxy.wait_held(1)  # the daemon's first poll is parked: the burst lands before it
        burst = db.insert_events(2500)
        proxy.on_forward = insert_while_paging
        proxy.release()

        got = wait_for_ids(receiver, path, burst, timeout_s=30)
        assert not shifts, f"the daemon never asked for offsets {sorted(shifts)}"
        got = wait_for_ids(receiver, path, inserted_while_paging, timeout_s=30)
        assert any(r["events"] >= 2500 for r in daemon.logs("cursor.advanced"))

        # Now the daemon knows the log's size: a burst is read oldest page first. Insert
        # 120 events as it asks for its first page, 300 as it asks for its third.
        reads = itertools.count(1)
        inserts = {1: 120, 3: 300}

        def insert_while_reading(path_qs: str) -> None:
            if "offset=" in path_qs and (count := inserts.pop(next(reads), 0)):
                inserted_while_paging.extend(db.insert_events(count))

        proxy.on_forward = None
        advanced = len(daemon.logs("cursor.advanced"))
        proxy.hold()
        proxy.wait_held(1)
        seen_before = len(proxy.seen)
        second = db.insert_events(2500)
        proxy.on_forward = insert_while_reading
        proxy.release()
        wait_for_ids(receiver, path, second, timeout_s=30)
        assert not inserts, f"the daemon made fewer reads than {sorted(inserts)}"
        got = wait_for_ids(receiver, path, inserted_while_paging, timeout_s=30)
        steps = [r["to"] for r in daemon.logs("cursor.advanced")[advanced:]]
        assert len(steps) >= 3, (steps, [q for _, q in proxy.seen[seen_before:]])
        # The first page missed (120 came in), the next was put right by the size it
        # reported: the first run spans both, well short of the burst's end.
        assert steps[0] < second[1500], f"not oldest first: {steps}"
        assert daemon.stop() == 0

    expected = [e["id"] for e in admin.all_events(after_id=start)]
    assert len(expected) == 2 * (2500 + 120 + 300)
    assert ids_of(receiver.requests(path)) == expected
    assert daemon.logs("gap.opened") == []
    assert status(poller_cli, config)["gaps"] == []
    assert_stable_webhook_ids(got)


def _measured(proxy: FaultProxy, timeout_s: float = 10.0) -> None:
    """Wait until the daemon has read the log once (a page at offset 0) and probed again
    after it: it knows the log's size, so its next burst is read oldest page first."""
    deadline = time.monotonic() + timeout_s
    while True:
        queries = [q for _, q in proxy.seen]
        first = next((n for n, q in enumerate(queries) if "offset=0" in q), None)
        if first is not None and any(
            "limit=1&" in q or q.endswith("limit=1") for q in queries[first:]
        ):
            return
        assert time.monotonic() < deadline, f"the daemon never read the log: {queries}"
        time.sleep(0.05)


def _held_before_a_burst(
    proxy: FaultProxy,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
    *,
    path: str,
    state: Mapping[str, object] | None,
    **spawn_options: Any,
) -> tuple[Path, int, Daemon]:
    """A daemon through `proxy` that has read the log and probed after it (`_measured`),
    so it reads its next burst oldest page first; its next poll is held by the proxy, so a
    burst inserted now lands between two polls. Its config, its start cursor and itself."""
    config, start = initialised(
        url=proxy.url, webhooks=[{"name": "all", "url": receiver.url(path)}], state=state
    )
    daemon = spawn(config, ready=True, **spawn_options)
    _measured(proxy)
    proxy.hold()
    proxy.wait_held(1)
    return config, start, daemon


def test_a_running_daemon_delivers_a_burst_from_its_oldest_page_while_reading_the_rest(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
    daemon_state: Mapping[str, object] | None,
) -> None:
    """A 3,000-event burst, to a daemon that has read the log: its oldest page is read
    first and its events are on the wire before the newest page has been read; each
    page moves the cursor durably. Every event arrives once, in id order, no gap."""
    path = "/" + unique("oldest-first")
    with FaultProxy(unleash.url) as proxy:
        config, start, daemon = _held_before_a_burst(
            proxy, receiver, initialised, spawn, path=path, state=daemon_state
        )
        first_request = len(proxy.seen)
        burst = unleash.db.insert_events(3000)
        newest_read_at: list[float] = []

        def note_newest_page(path_qs: str) -> None:
            if "offset=0" in path_qs and "limit=50" in path_qs:
                newest_read_at.append(time.monotonic())

        proxy.on_forward = note_newest_page
        proxy.release()
        got = wait_for_ids(receiver, path, burst, timeout_s=30)
        assert daemon.stop() == 0
    reads = [q for _, q in proxy.seen[first_request:] if "offset=" in q]
    assert "offset=0" not in reads[0], f"read newest first: {reads}"
    assert newest_read_at, f"the newest page was never read: {reads}"
    first_receipt = min(r.received_at for r in got)
    assert first_receipt < newest_read_at[0], "nothing was delivered before the newest page"
    steps = [r for r in daemon.logs("cursor.advanced") if r["to"] > start]
    assert [r["to"] for r in steps] == sorted(r["to"] for r in steps)
    assert len(steps) >= 3, steps
    assert steps[0]["from"] == start
    assert steps[-1]["to"] == burst[-1]
    assert ids_of(got) == burst == [e["id"] for e in admin.all_events(after_id=start)]
    assert daemon.logs("gap.opened") == []
    assert status(poller_cli, config)["gaps"] == []


def test_a_kill_between_the_pages_of_an_oldest_first_read_loses_nothing(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
    daemon_state: Mapping[str, object] | None,
) -> None:
    """kill -9 after the second page of a burst read oldest first was taken in: what was
    taken stays taken (the cursor is past it), and the next daemon delivers the rest in
    order, re-sending only what was not yet marked delivered."""
    path = "/" + unique("oldest-first-kill")
    with FaultProxy(unleash.url) as proxy:
        config, start, daemon = _held_before_a_burst(
            proxy,
            receiver,
            initialised,
            spawn,
            path=path,
            state=daemon_state,
            crash_at="poll.run_taken:2",
        )
        burst = unleash.db.insert_events(3000)
        proxy.release()
        assert daemon.wait(60) == -signal.SIGKILL, daemon.tail()
        cursor = status(poller_cli, config)["cursor"]
        taken = cursor - burst[0] + 1
        assert BURST_PAGE < taken <= 2 * BURST_PAGE  # two burst pages (of about 238) taken
        again = spawn(config)
        got = wait_for_ids(receiver, path, burst, timeout_s=30)
        assert again.stop() == 0
    received = ids_of(got)
    firsts = list(dict.fromkeys(received))
    assert firsts == burst == [e["id"] for e in admin.all_events(after_id=start)]
    assert len(received) - len(firsts) <= MARKS_PER_COMMIT + 1
    assert status(poller_cli, config)["gaps"] == []


def test_pages_capped_by_a_proxy_are_read_whole_and_in_order(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
) -> None:
    """Through a proxy that caps every page at 20 events, a 300-event burst is read by
    paging on to `total`: every event arrives once, in order, with no gap opened (before,
    the first short page ended the read and 280 ids became gaps, delivered late or lost)."""
    path = "/" + unique("capped")
    with FaultProxy(unleash.url) as proxy:
        proxy.cap_limit = 20
        config, start = initialised(
            url=proxy.url,
            webhooks=[{"name": "all", "url": receiver.url(path)}],
            poll_interval_s=0.2,
        )
        daemon = spawn(config)
        daemon.wait_log("unleash.api_detected")
        proxy.hold()
        proxy.wait_held(1)  # the burst lands between two polls
        burst = unleash.db.insert_events(300)
        proxy.release()
        wait_for_ids(receiver, path, burst, timeout_s=30)
        daemon.send(signal.SIGTERM)
        assert daemon.wait() == 0
    expected = [e["id"] for e in admin.all_events(after_id=start)]
    assert expected == burst
    assert ids_of(receiver.requests(path)) == expected
    assert daemon.logs("gap.opened") == []
    capped = [q for _, q in proxy.seen if "offset=" in q and "limit=1000" in q]
    assert len(capped) >= 300 // 20 - 1


def test_a_proxy_that_ignores_offset_is_an_error_with_back_off_not_a_loop(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A proxy that drops `offset` (and caps pages): the repeated page is one clear
    bad_response error, retried with back-off instead of paging forever (~160 requests a
    second before); once the proxy is fixed every event arrives, in order."""
    path = "/" + unique("no-offset")
    with FaultProxy(unleash.url) as proxy:
        proxy.cap_limit = 20
        config, start = initialised(
            url=proxy.url,
            webhooks=[{"name": "all", "url": receiver.url(path)}],
            poll_interval_s=0.1,
            extra_unleash={"backoff_max_s": 1},
        )
        proxy.ignore_offset = True
        daemon = spawn(config)
        daemon.wait_log("unleash.api_detected")
        burst = unleash.db.insert_events(100)
        errors = daemon.wait_log("unleash.unreachable", count=3, timeout_s=30)
        assert {e["kind"] for e in errors} == {"bad_response"}
        assert all("repeats the previous page" in e["error"] for e in errors)
        seen = len(proxy.seen)
        first = timestamp(errors[0])
        later = daemon.wait_log("unleash.unreachable", count=5, timeout_s=30)
        rate = (len(proxy.seen) - seen) / max(0.1, timestamp(later[-1]) - first)
        assert rate < 20, f"{rate:.0f} requests a second"
        report(capsys, f"offset ignored: {rate:.1f} requests/s while refused (backoff_max_s 1)")
        assert receiver.requests(path) == []
        proxy.ignore_offset = False
        daemon.wait_log("unleash.recovered", timeout_s=30)
        wait_for_ids(receiver, path, burst, timeout_s=30)
        daemon.send(signal.SIGTERM)
        assert daemon.wait() == 0
    assert ids_of(receiver.requests(path)) == [e["id"] for e in admin.all_events(after_id=start)]


def test_a_proxy_answering_304_to_every_probe_delays_events_by_at_most_the_full_read_interval(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
) -> None:
    """A proxy that answers 304 to every probe would hide new events forever: the read
    made every full_read_interval_s finds them, and a warning names the cause."""
    path = "/" + unique("stale-probe")
    with FaultProxy(unleash.url) as proxy:
        config, start = initialised(
            url=proxy.url,
            webhooks=[{"name": "all", "url": receiver.url(path)}],
            poll_interval_s=0.1,
            extra_unleash={"full_read_interval_s": 2},
        )
        proxy.stale_probe = True
        daemon = spawn(config)
        daemon.wait_log("unleash.api_detected")
        # The first probe has no ETag to send; wait until conditional ones are answered 304.
        deadline = time.monotonic() + 10
        while sum(q.endswith("?limit=1") for _, q in proxy.seen) < 3:
            assert time.monotonic() < deadline, "the daemon does not probe"
            time.sleep(0.02)
        events = unleash.db.insert_events(3)
        inserted = time.monotonic()
        wait_for_ids(receiver, path, events, timeout_s=20)
        waited = time.monotonic() - inserted
        [warning] = daemon.wait_log("poll.probe_missed_events")
        assert warning["new_events"] == 3
        daemon.send(signal.SIGTERM)
        assert daemon.wait() == 0
    assert waited < 2 + 3  # the interval, plus delivery on a loaded machine
    assert ids_of(receiver.requests(path)) == [e["id"] for e in admin.all_events(after_id=start)]


def test_a_state_file_deleted_under_the_daemon_stops_it_and_a_fresh_start_does_not_flood(
    unleash: UnleashServer,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
    tmp_path: Path,
) -> None:
    """Deleting the state file of a running daemon stops it with exit 74 and one line;
    started again on a fresh file (start_from = "latest") it sends nothing old."""
    path = "/" + unique("state-deleted")
    config = make_config(
        poller_config, webhooks=[{"name": "all", "url": receiver.url(path)}], poll_interval_s=0.1
    )
    initialise(poller_cli, config)
    daemon = spawn(config)
    daemon.wait_log("unleash.api_detected")
    before = unleash.db.insert_events(5)
    wait_for_ids(receiver, path, before)
    (tmp_path / "state.sqlite3").unlink()
    assert daemon.wait() == 74
    assert "the state file was deleted while the daemon ran" in daemon.output()
    assert 'start_from = "latest" that does not re-send old events' in daemon.output()
    assert "Traceback" not in daemon.output()
    again = spawn(config)
    again.wait_log("cursor.initialised")
    after = unleash.db.insert_events(2)
    wait_for_ids(receiver, path, after)
    again.send(signal.SIGTERM)
    assert again.wait() == 0
    assert ids_of(receiver.requests(path)) == before + after


# --------------------------------------------------------------------------- 4. Unleash faults


def test_unleash_down_or_broken_backs_off_keeps_the_cursor_and_recovers(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each Unleash fault logs its kind, backs off to a cap, keeps the cursor, then recovers."""
    path = "/" + unique("unleash-down")
    interval_s, cap_s = 0.2, 1.6
    faults = [  # mode, expected kind, failures to wait for
        ("refuse", "connection", 2),
        ("500", "server", 6),
        ("hang", "timeout", 2),
        ("not_json", "bad_response", 2),
        ("no_events", "bad_response", 2),
        ("401", "auth", 2),
    ]
    db = unleash.db
    with FaultProxy(unleash.url) as proxy:
        config, start = initialised(
            url=proxy.url,
            webhooks=[{"name": "all", "url": receiver.url(path)}],
            poll_interval_s=interval_s,
            extra_unleash={"timeout_s": 1, "backoff_max_s": cap_s},
        )
        daemon = spawn(config, ready=True)
        wait_for_ids(receiver, path, db.insert_events(3))

        backoffs: list[dict[str, Any]] = []
        for number, (mode, kind, failures) in enumerate(faults, start=1):
            cursor = status(poller_cli, config)["cursor"]
            seen = len(daemon.logs("unleash.unreachable"))
            proxy.set_mode(mode)
            during = db.insert_events(3)
            unreachable = daemon.wait_log(
                "unleash.unreachable", count=seen + failures, timeout_s=30
            )[seen:]
            assert {r["kind"] for r in unreachable} == {kind}, (mode, unreachable)
            assert all(r["error"] for r in unreachable)
            assert status(poller_cli, config)["cursor"] == cursor, mode
            assert not set(during) & set(ids_of(receiver.requests(path))), mode
            if mode == "500":
                backoffs = unreachable
            proxy.set_mode("pass")
            daemon.wait_log("unleash.recovered", count=number, timeout_s=30)
            wait_for_ids(receiver, path, during)

        got = receiver.requests(path)
        expected = [e["id"] for e in admin.all_events(after_id=start)]
        assert ids_of(got) == expected
        assert_stable_webhook_ids(got)
        recovered = daemon.logs("unleash.recovered")
        assert all(r["after_failures"] >= f for r, (_, _, f) in zip(recovered, faults, strict=True))
        assert daemon.stop() == 0

    # Back-off: "equal jitter" on min(cap, interval * 2^failures), and the daemon really
    # waits what it logs before the next try.
    delays = [r["retry_in_s"] for r in backoffs]
    for failures, delay in enumerate(delays, start=1):
        ceiling = min(cap_s, interval_s * 2**failures)
        assert ceiling / 2 - 0.01 <= delay <= ceiling + 0.01, (failures, delays)
    assert max(delays) <= cap_s
    assert min(delays[2:]) > max(delays[:1])  # grew past the first, then stayed capped
    waited = [timestamp(b) - timestamp(a) for a, b in itertools.pairwise(backoffs)]
    for delay, actual in zip(delays, waited, strict=False):
        assert delay - 0.05 <= actual <= delay + 0.5, (delays, waited)
    report(
        capsys,
        "unleash 500 back-off: logged retry_in_s "
        + ", ".join(f"{d:.2f}" for d in delays)
        + " s; waited "
        + ", ".join(f"{w:.2f}" for w in waited)
        + f" s (poll_interval_s {interval_s}, backoff_max_s {cap_s})",
    )


def test_deleted_token_fails_with_auth_until_a_new_one_is_reloaded_with_sighup(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    poller_config: PollerConfigFactory,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
) -> None:
    """A deleted token gives auth errors, cursor kept; a new token + SIGHUP recovers; no leak."""
    path = "/" + unique("rotation")
    tokens = PersonalTokens(admin)
    old_id, old_secret = tokens.create()
    options: dict[str, Any] = {
        "webhooks": [{"name": "all", "url": receiver.url(path)}],
        "poll_interval_s": 0.2,
        "extra_unleash": {"backoff_max_s": 1},
    }
    config, start = initialised(token=old_secret, **options)
    daemon = spawn(config, ready=True)
    db = unleash.db
    wait_for_ids(receiver, path, db.insert_events(2))

    cursor = status(poller_cli, config)["cursor"]
    tokens.delete(old_id)
    during = db.insert_events(3)
    daemon.wait_log("unleash.unreachable", count=2, where=lambda r: r["kind"] == "auth")
    assert status(poller_cli, config)["cursor"] == cursor
    assert not set(during) & set(ids_of(receiver.requests(path)))

    _, new_secret = tokens.create()
    make_config(poller_config, token=new_secret, **options)
    daemon.send(signal.SIGHUP)
    daemon.wait_log("config.reloaded")
    daemon.wait_log("unleash.recovered")
    wait_for_ids(receiver, path, during)
    wait_for_ids(receiver, path, db.insert_events(2))

    got = receiver.requests(path)
    assert ids_of(got) == [e["id"] for e in admin.all_events(after_id=start)]
    assert_stable_webhook_ids(got)
    assert daemon.stop() == 0
    for secret in (old_secret, new_secret):
        assert secret not in daemon.output()
        assert secret.split(":", 1)[-1] not in daemon.output()


# --------------------------------------------------------------------------- 5. webhook faults


def test_failing_webhook_is_retried_once_dead_lettered_and_replayed_in_order(
    unleash: UnleashServer,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
) -> None:
    """500s: one retry, a listed dead letter; replay redelivers in order, daemon stopped or not."""
    path = "/" + unique("dead")
    receiver.respond(path, status=500)
    config, _ = initialised(
        webhooks=[{"name": "down", "url": receiver.url(path)}], poll_interval_s=0.2
    )
    daemon = spawn(config, ready=True)
    ids = unleash.db.insert_events(3)

    dead = daemon.wait_log("delivery.dead_lettered", count=3, timeout_s=30)
    assert [r["event_id"] for r in dead] == ids
    assert {r["reason"] for r in dead} == {"HTTP 500 after 2 attempts"}
    got = receiver.requests(path)
    assert ids_of(got) == [i for i in ids for _ in range(2)]
    for first, retry in zip(got[::2], got[1::2], strict=True):
        assert retry.received_at - first.received_at >= 0.95  # the default first retry: 1 s

    def listed() -> list[list[str]]:
        out = poller_cli("dead-letters", "list", "-c", config).stdout
        return [line.split("\t") for line in out.splitlines() if line]

    letters = listed()  # the daemon is running: list reads without the lock
    assert [(row[0], int(row[1]), row[4], row[5]) for row in letters] == [
        ("down", i, "attempts=2", "HTTP 500 after 2 attempts") for i in ids
    ]
    assert status(poller_cli, config)["webhooks"]["down"]["dead_letters"] == 3

    assert daemon.stop() == 0
    receiver.reset(path)
    receiver.respond(path, statuses=[200, 404], status=200)
    replay = poller_cli("dead-letters", "replay", "-c", config, expect_exit=1)
    assert "2 delivered, 1 still failing" in replay.stderr
    assert ids_of(receiver.requests(path)) == ids
    [(webhook, event_id, *_, reason)] = listed()
    assert (webhook, int(event_id)) == ("down", ids[1])
    assert reason.startswith("HTTP 404")

    receiver.respond(path, status=200)
    daemon = spawn(config, ready=True)
    handed_back = poller_cli("dead-letters", "replay", "-c", config)
    assert "1 dead letter(s) moved back" in handed_back.stdout
    # No new event arrives to wake the daemon: the handed-back letter must go out anyway.
    got = receiver.wait_for(4, path, timeout_s=10)
    assert ids_of(got) == [ids[0], ids[1], ids[2], ids[1]]
    assert listed() == []
    assert_stable_webhook_ids(got)
    assert daemon.stop() == 0


def test_retry_after_on_429_and_503_is_honoured(
    unleash: UnleashServer,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
) -> None:
    """Retry-After (seconds on 429, HTTP date on 503) sets the retry delay, not the schedule."""
    base = "/" + unique("retry-after")
    config, _ = initialised(
        webhooks=[
            {"name": n, "url": receiver.url(f"{base}/{n}"), "retry_schedule_s": [0.2]}
            for n in ("r429", "r503")
        ],
        poll_interval_s=0.2,
    )
    daemon = spawn(config, ready=True)
    receiver.respond(f"{base}/r429", statuses=[429], retry_after=2)
    # An HTTP date has whole seconds: 4 s from now is 3 to 4 s after the first attempt.
    in_4_s = email.utils.formatdate(time.time() + 4, usegmt=True)
    receiver.respond(f"{base}/r503", statuses=[503], retry_after=in_4_s)
    [event_id] = unleash.db.insert_events(1)

    got429 = receiver.wait_for(2, f"{base}/r429", timeout_s=10)
    got503 = receiver.wait_for(2, f"{base}/r503", timeout_s=10)
    waited429 = got429[1].received_at - got429[0].received_at
    waited503 = got503[1].received_at - got503[0].received_at
    assert 1.95 <= waited429 < 3.0, waited429
    assert 2.0 <= waited503 < 4.5, waited503
    for got in (got429, got503):
        assert ids_of(got) == [event_id, event_id]
        assert_stable_webhook_ids(got)
    scheduled = daemon.wait_log("delivery.retry_scheduled", count=2)
    assert all(r["retry_in_s"] >= 1.95 for r in scheduled)
    assert daemon.stop() == 0


def test_a_hung_webhook_never_delays_another(
    unleash: UnleashServer,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A never-answering sibling adds no delivery latency to another webhook (< 0.5 s extra)."""
    base = "/" + unique("hung")
    fast, sibling = f"{base}/fast", f"{base}/sibling"
    config, _ = initialised(
        webhooks=[
            {"name": "fast", "url": receiver.url(fast)},
            {"name": "sibling", "url": receiver.url(sibling), "timeout_s": 120},
        ],
        poll_interval_s=0.1,
        top={"drain_timeout_s": 1},
    )
    rng = random.Random(SEED)
    samples = 12

    def latencies() -> list[float]:
        daemon = spawn(config, ready=True)
        measured = []
        for _ in range(samples):
            [event_id] = unleash.db.insert_events(1)
            committed = time.monotonic()
            got = wait_for_ids(receiver, fast, [event_id], timeout_s=10)
            [request] = [r for r in got if json.loads(r.body)["id"] == event_id]
            measured.append(request.received_at - committed)
            time.sleep(rng.uniform(0.0, 0.2))  # sample every phase of the poll interval
        assert daemon.stop() == 0, daemon.tail()
        return measured

    healthy = latencies()
    receiver.respond(sibling, hang=True)
    before = len(receiver.requests(sibling))
    hung = latencies()
    assert len(receiver.requests(sibling)) == before + 1  # stuck on its first event
    extra = max(hung) - max(healthy)
    report(
        capsys,
        f"hung-sibling max extra delay {extra:+.3f} s (max latency {max(healthy):.3f} s "
        f"with a healthy sibling, {max(hung):.3f} s with a hung one; medians "
        f"{sorted(healthy)[samples // 2]:.3f} / {sorted(hung)[samples // 2]:.3f} s; "
        f"{samples} events each, poll_interval_s 0.1)",
    )
    assert extra < 0.5
    assert_stable_webhook_ids(receiver.requests(fast))


# --------------------------------------------------------------------------- 6. state file


def test_state_file_that_cannot_grow_stops_the_daemon_and_a_restart_loses_nothing(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
    tmp_path: Path,
) -> None:
    """EFBIG on the state file: exit 74 naming it; a restart without the limit loses nothing."""
    path = "/" + unique("efbig")
    state_path = tmp_path / "state.sqlite3"
    config, start = initialised(
        webhooks=[{"name": "all", "url": receiver.url(path)}], poll_interval_s=0.2
    )
    db = unleash.db
    db.insert_events(20)
    poller_cli("run", "-c", config, "--once")

    # Room for SQLite's 32 KiB shared-memory file and a few WAL frames, not for a burst.
    limit = max(state_path.stat().st_size, 32768) + 64 * 1024
    daemon = spawn(config, file_size_limit=limit)
    daemon.wait_log("unleash.api_detected")
    db.insert_events(3000, data={"padding": "x" * 200})
    assert daemon.wait(60) == EX_IOERR, daemon.tail()
    plain = [line for line in daemon.output().splitlines() if not line.startswith("{")]
    assert any(line.startswith(f"unleash-poller: {state_path}: ") for line in plain), plain
    [failed] = daemon.logs("state.write_failed")
    assert failed["path"] == str(state_path)

    daemon = spawn(config)
    expected = [e["id"] for e in admin.all_events(after_id=start)]
    got = wait_for_ids(receiver, path, expected, timeout_s=60)
    assert ids_of(got) == expected
    assert_stable_webhook_ids(got)
    assert daemon.stop() == 0


def test_corrupt_or_truncated_state_file_is_refused_and_never_started_over(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    tmp_path: Path,
) -> None:
    """An empty, truncated or corrupt state file: exit 74 naming it, untouched, nothing sent."""
    path = "/" + unique("corrupt")
    state_path = tmp_path / "state.sqlite3"
    config, start = initialised(
        webhooks=[{"name": "all", "url": receiver.url(path)}], poll_interval_s=0.2
    )
    db = unleash.db
    first = db.insert_events(300, data={"padding": "x" * 500})
    poller_cli("run", "-c", config, "--once")
    assert ids_of(receiver.requests(path)) == first
    assert not state_path.with_name(state_path.name + "-wal").exists()
    good = state_path.read_bytes()
    assert len(good) >= 4 * 4096, len(good)
    pending = db.insert_events(3)

    noise = random.Random(SEED).randbytes(4096)
    broken = {
        "empty": b"",
        "truncated to half": good[: len(good) // 2],
        "garbage header": noise[:100] + good[100:],
        "garbage page 2": good[:4096] + noise + good[8192:],
    }
    for case, content in broken.items():
        state_path.write_bytes(content)
        result = poller_cli("run", "-c", config, expect_exit=None, timeout_s=60)
        assert result.returncode == EX_IOERR, (case, result.stderr[-2000:])
        assert f"unleash-poller: {state_path}: " in result.stderr, (case, result.stderr[-2000:])
        assert "state file" in result.stderr, (case, result.stderr[-2000:])
        assert state_path.read_bytes() == content, f"{case}: the state file was changed"
        assert not state_path.with_name(state_path.name + ".new").exists(), case
        assert ids_of(receiver.requests(path)) == first, case

    state_path.write_bytes(good)
    poller_cli("run", "-c", config, "--once")
    got = receiver.requests(path)
    assert ids_of(got) == [*first, *pending]
    assert ids_of(got) == [e["id"] for e in admin.all_events(after_id=start)]
    assert_stable_webhook_ids(got)


# --------------------------------------------------------------------------- 7. two daemons


def test_second_daemon_on_the_same_state_file_exits_74_while_the_first_delivers(
    unleash: UnleashServer,
    receiver: Receiver,
    initialised: Initialised,
    poller_cli: PollerCli,
    spawn: DaemonFactory,
) -> None:
    """A second daemon on a state file in use exits 74 clearly; the first keeps delivering."""
    path = "/" + unique("two")
    config, _ = initialised(
        webhooks=[{"name": "all", "url": receiver.url(path)}], poll_interval_s=0.2
    )
    first = spawn(config, ready=True)
    wait_for_ids(receiver, path, unleash.db.insert_events(2))

    second = spawn(config)
    assert second.wait(30) == EX_IOERR
    assert "another unleash-poller is running on this state file" in second.output()
    once = poller_cli("run", "-c", config, "--once", expect_exit=EX_IOERR)
    assert "another unleash-poller is running" in once.stderr

    assert first.running
    later = unleash.db.insert_events(2)
    got = wait_for_ids(receiver, path, later)
    assert len(got) == len(set(ids_of(got))) == 4
    assert first.stop() == 0


# --------------------------------------------------------------------------- 8. shutdown


def test_sigterm_drains_the_in_flight_delivery_and_the_rest_goes_out_after_restart(
    unleash: UnleashServer,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
    daemon_state: Mapping[str, object] | None,
) -> None:
    """SIGTERM lets the slow in-flight delivery finish, exits 0; the rest goes out after
    restart. On SQLite and on PostgreSQL."""
    path = "/" + unique("drain")
    receiver.respond(path, delay_s=1.5)
    config, _ = initialised(
        webhooks=[{"name": "slow", "url": receiver.url(path)}],
        poll_interval_s=0.2,
        top={"drain_timeout_s": 5},
        state=daemon_state,
    )
    daemon = spawn(config, ready=True)
    ids = unleash.db.insert_events(4)
    receiver.wait_for(1, path, timeout_s=10)

    asked = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert daemon.wait(10) == 0, daemon.tail()
    took = time.monotonic() - asked
    assert 1.0 <= took < 5.0, took  # waited for the 1.5 s answer, not for the drain limit
    [stopped] = daemon.logs("app.stopped")
    assert (stopped["delivered"], stopped["pending"]) == (1, 3)
    assert daemon.logs("app.drain_timeout") == []
    assert ids_of(receiver.requests(path)) == ids[:1]

    receiver.respond(path)
    daemon = spawn(config)
    got = wait_for_ids(receiver, path, ids)
    assert ids_of(got) == ids  # the drained one was marked: not sent again
    assert_stable_webhook_ids(got)
    assert daemon.stop() == 0


def test_a_second_sigterm_exits_at_once_and_the_event_is_redelivered(
    unleash: UnleashServer,
    receiver: Receiver,
    initialised: Initialised,
    spawn: DaemonFactory,
) -> None:
    """A second SIGTERM exits at once; the interrupted event is redelivered, same webhook-id."""
    path = "/" + unique("forced")
    receiver.respond(path, delay_s=60)
    config, _ = initialised(
        webhooks=[{"name": "stuck", "url": receiver.url(path), "timeout_s": 120}],
        poll_interval_s=0.2,
        top={"drain_timeout_s": 30},
    )
    daemon = spawn(config, ready=True)
    [event_id] = unleash.db.insert_events(1)
    receiver.wait_for(1, path, timeout_s=10)

    daemon.send(signal.SIGTERM)
    daemon.wait_log("app.stopping")
    time.sleep(0.3)
    assert daemon.running  # draining: waiting for the hung delivery
    asked = time.monotonic()
    daemon.send(signal.SIGTERM)
    assert daemon.wait(5) == 1
    assert time.monotonic() - asked < 1.0
    assert daemon.logs("app.forced_exit")

    receiver.respond(path)
    daemon = spawn(config)
    got = receiver.wait_for(2, path, timeout_s=10)
    assert ids_of(got) == [event_id, event_id]
    assert_stable_webhook_ids(got)
    assert daemon.stop() == 0
