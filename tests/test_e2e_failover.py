"""Failover end to end (issue 13): two or three real daemons (`python -m poller run`) on one
PostgreSQL state, against a real Unleash and a real HTTP receiver, with streams of
thousands of events. The nodes' configs differ in their `node_name` and in an `X-Node`
header on every webhook, so the receiver tells who sent what. They share one lease
(`lease_ttl_s` = TTL_S, polling every POLL_S): exactly one leads.

1. Only the leader delivers: every request carries its X-Node; each event once, in order.
2. kill -9 of the leader: a standby delivers within lease_ttl_s + one poll interval
   (+ TAKEOVER_SLACK_S for a loaded 2-core test machine); nothing is lost; order per
   webhook holds except for the re-sent tail.
3. SIGSTOP of the (new) leader for twice the TTL, then SIGCONT: once the other node has
   taken over, the paused one sends at most the request per webhook it had on the wire,
   commits nothing, and stands by (log, status, metrics), ready to take over again.
4. A restart of the PostgreSQL cluster mid-stream (the one Unleash uses too): the daemons
   keep running, log one line each, reconnect and resume; Unleash survives it.
5. Stopping a standby (SIGTERM or kill -9) changes nothing for delivery.

Duplicates: a worker sends one request at a time per (ordered) webhook and group-commits its
delivery marks, MARKS_PER_COMMIT to a transaction (poller/worker_ordered.py). A leader that stops
leading without a clean stop leaves its successor at most MARKS_PER_COMMIT delivered but
unmarked events plus the one request on the wire to send again: RESENT_PER_HANDOVER per
webhook per handover, re-sent in order. A clean stop (SIGTERM) drains and commits first,
so its successor re-sends nothing.

Figures (takeover times; owed, sent and duplicated events per fault) are printed on lines
starting with `FIGURES:`.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import statistics
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from poller.worker import MARKS_PER_COMMIT
from tests.conftest import PollerCli, render_poller_config
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
from tests.support.pgstate import state_url
from tests.support.receiver import Receiver, RecordedRequest
from tests.support.unleash import (
    TEST_ROLE_PASSWORD,
    AdminClient,
    PostgresDatabase,
    UnleashServer,
    drop_database,
    ensure_postgres,
    free_port,
    restart_cluster,
)

pytestmark = pytest.mark.e2e

TTL_S = 3
POLL_S = 0.2
TAKEOVER_SLACK_S = 1.5  # two cores, shared with other test runs and Unleash itself
TAKEOVER_BOUND_S = TTL_S + POLL_S + TAKEOVER_SLACK_S
RESENT_PER_HANDOVER = MARKS_PER_COMMIT + 1  # the uncommitted marks + the request on the wire
BATCH = 1000  # events inserted at once; a fault is injected once LEAD_IN of them arrived
LEAD_IN = 300
# Every node has these webhooks (same names: one outbox), each with the node's X-Node.
HOOKS: dict[str, dict[str, list[str]]] = {"all": {}, "features": {"events": ["feature-*"]}}


# --------------------------------------------------------------------------- set-up


@pytest.fixture(scope="module", autouse=True)
def _unleash_for_failover_tests(unleash: UnleashServer) -> Iterator[None]:
    """Unleash 7+ (bulk streams are paged by id), inserted events born `announced`."""
    require_search_by_id(unleash, "failover tests")
    with events_born_announced(unleash):
        yield


@pytest.fixture(scope="module")
def state_db(unleash: UnleashServer) -> Iterator[PostgresDatabase]:
    """A database of this run's own for the daemons' states, beside Unleash's on the same
    cluster; each test uses a fresh schema in it."""
    db = ensure_postgres(f"poller_failover_{os.getpid()}_{secrets.token_hex(3)}")
    yield db
    drop_database(db)


@dataclass
class Node:
    """One daemon: `name` is its node_name and X-Node header."""

    name: str
    config: Path
    metrics_port: int
    daemon: Daemon

    @property
    def holder(self) -> str:
        """How the lease names this process."""
        return f"{self.name}:{self.daemon.process.pid}"


@dataclass(frozen=True)
class Tally:
    """What one webhook was owed and got."""

    owed: int
    sent: int
    duplicates: int
    resends: int

    def __str__(self) -> str:
        return (
            f"{self.owed} owed, {self.sent} sent, lost 0, duplicates {self.duplicates} "
            f"after {self.resends} re-sends"
        )


class Site:
    """One test's nodes on one PostgreSQL state (a fresh schema), with their receiver
    paths; every event after `start` is owed."""

    def __init__(
        self,
        *,
        unleash: UnleashServer,
        admin: AdminClient,
        receiver: Receiver,
        spawn: DaemonFactory,
        poller_cli: PollerCli,
        tmp_path: Path,
        state_db: PostgresDatabase,
    ) -> None:
        self.unleash = unleash
        self.admin = admin
        self.receiver = receiver
        self._spawn = spawn
        self._poller_cli = poller_cli
        self._tmp_path = tmp_path
        self.state_db = state_db
        self.schema = f"failover_{uuid.uuid4().hex[:8]}"
        self.base = "/" + unique("failover")
        self.start = admin.latest_event_id()
        self.inserted: list[int] = []
        self.nodes: list[Node] = []

    # -- nodes

    def _write_config(self, name: str, metrics_port: int) -> Path:
        path = self._tmp_path / f"{name}.toml"
        path.touch(mode=0o600)  # it holds a token and a password
        path.write_text(
            render_poller_config(
                unleash_url=self.unleash.url,
                token=self.unleash.admin_token,
                start_from=self.start,
                poll_interval_s=POLL_S,
                state={
                    "url": state_url(self.state_db),
                    "schema": self.schema,
                    "lease_ttl_s": TTL_S,
                    "node_name": name,
                },
                webhooks=[
                    {"name": hook, "url": self.receiver.url(self.path(hook)), **selection}
                    | {"headers": {"X-Node": name}}
                    for hook, selection in HOOKS.items()
                ],
                tables={"metrics": {"listen": f"127.0.0.1:{metrics_port}"}},
            )
        )
        return path

    def start_node(self, name: str, *, leads: bool) -> Node:
        """Start node `name` (again: a new process, same config) and wait until it leads
        (`lease.acquired`: the first lease on this state) or stands by (`lease.standby`)."""
        port = free_port()  # a new one per process: the last may still be closing
        config = self._write_config(name, port)
        node = Node(name, config, port, self._spawn(config))
        self.nodes.append(node)
        if leads:
            node.daemon.wait_log("lease.acquired", where=lambda r: r.get("holder") == node.holder)
        else:
            node.daemon.wait_log("lease.standby")
        return node

    def wait_takeover(self, node: Node, old: Node) -> dict[str, Any]:
        """The one `lease.takeover` line of `node` taking the lease from `old`."""

        def matches(record: dict[str, Any]) -> bool:
            return (record.get("old_holder"), record.get("new_holder")) == (old.holder, node.holder)

        [record] = node.daemon.wait_log(
            "lease.takeover", where=matches, timeout_s=TAKEOVER_BOUND_S + 30
        )
        return record

    def status(self, node: Node) -> dict[str, Any]:
        """`status --json` with the node's config (its node_name decides `role`)."""
        result: dict[str, Any] = json.loads(
            self._poller_cli("status", "--json", "-c", node.config).stdout
        )
        return result

    def metric(self, node: Node, name: str, timeout_s: float = 10.0) -> float:
        """One unlabelled sample from the node's /metrics."""
        deadline = time.monotonic() + timeout_s
        url = f"http://127.0.0.1:{node.metrics_port}/metrics"
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)  # the metrics server is not listening yet
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == name:
                return float(value)
        raise AssertionError(f"{url} has no {name} sample:\n{text[:2000]}")

    def tails(self) -> str:
        return "\n".join(
            f"--- {n.name} (pid {n.daemon.process.pid}, exit {n.daemon.process.poll()}):\n"
            f"{n.daemon.tail(15)}"
            for n in self.nodes
        )

    # -- the stream

    def path(self, hook: str) -> str:
        return f"{self.base}/{hook}"

    def insert(self, count: int) -> list[int]:
        """`count` events, half that both webhooks want, half only `all` wants."""
        db = self.unleash.db
        half = count // 2
        ids = db.insert_events(half, type="feature-updated", environment="production")
        ids += db.insert_events(count - half, type="segment-updated")
        self.inserted += ids
        return ids

    def insert_and_wait(self, count: int = BATCH, lead_in: int = LEAD_IN) -> None:
        """Insert a batch and return once `lead_in` more requests reached `all`: the
        leader is then in the middle of delivering it."""
        sent = len(self.requests("all"))
        self.insert(count)
        try:
            self.receiver.wait_for(sent + lead_in, self.path("all"), timeout_s=60)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    def requests(self, hook: str) -> list[RecordedRequest]:
        return self.receiver.requests(self.path(hook))

    def sent_by(
        self, name: str, hook: str | None = None, *, after: float = float("-inf")
    ) -> list[RecordedRequest]:
        """Requests that carried X-Node `name` (to one webhook, or any) received after
        `after` (time.monotonic())."""
        return [
            r
            for h in ([hook] if hook else list(HOOKS))
            for r in self.requests(h)
            if r.header("X-Node") == name and r.received_at > after
        ]

    def senders(self, hook: str, *, leaving_out: Collection[RecordedRequest] = ()) -> list[str]:
        """Who delivered to `hook`, in arrival order, one entry per run of one node's
        requests: ["a", "b"] is a handover from a to b, never to be seen again from a."""
        left_out = {id(r) for r in leaving_out}
        return [
            node
            for node, _ in itertools.groupby(
                str(r.header("X-Node")) for r in self.requests(hook) if id(r) not in left_out
            )
        ]

    def first_delivery_by(self, node: Node, *, after: float) -> float:
        """When the first request from `node` after `after` arrived (time.monotonic())."""
        deadline = after + TAKEOVER_BOUND_S + 30
        while True:
            got = self.sent_by(node.name, after=after)
            if got:
                return min(r.received_at for r in got)
            if time.monotonic() > deadline:
                raise AssertionError(f"{node.name} delivered nothing:\n{self.tails()}")
            time.sleep(0.01)

    def wait_all(self, timeout_s: float = 90.0) -> list[dict[str, Any]]:
        """Wait until every owed event reached every webhook that wants it; the events."""
        events = self.admin.all_events(after_id=self.start)
        assert set(self.inserted) <= {e["id"] for e in events}
        for hook, selection in HOOKS.items():
            owed = [e["id"] for e in events if wants(e, **selection)]
            try:
                wait_for_ids(self.receiver, self.path(hook), owed, timeout_s=timeout_s)
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{self.tails()}") from None
        return events

    def check_deliveries(
        self, handovers: int, *, on_the_wire: Collection[RecordedRequest] = ()
    ) -> dict[str, Tally]:
        """Every owed event reached each webhook (0 lost), in order but for at most
        `handovers` re-sent tails of RESENT_PER_HANDOVER; `on_the_wire` (requests a paused
        node had sent before it stopped) are left out of the order and counted as
        duplicates, once each."""
        events = self.wait_all()
        left_out = {id(r) for r in on_the_wire}
        tallies = {}
        for hook, selection in HOOKS.items():
            owed = [e["id"] for e in events if wants(e, **selection)]
            got = self.requests(hook)
            assert_stable_webhook_ids(got)
            ids = ids_of([r for r in got if id(r) not in left_out])
            resends = replays_in_order(ids, owed, RESENT_PER_HANDOVER)
            duplicates = len(got) - len(owed)
            assert resends <= handovers, f"{hook}: {resends} re-sent tails, {handovers} handovers"
            assert duplicates <= handovers * RESENT_PER_HANDOVER, (
                f"{hook}: {duplicates} duplicates after {handovers} handovers "
                f"(at most {RESENT_PER_HANDOVER} each)"
            )
            tallies[hook] = Tally(len(owed), len(got), duplicates, resends)
        return tallies


@pytest.fixture
def site(
    unleash: UnleashServer,
    admin: AdminClient,
    receiver: Receiver,
    spawn: DaemonFactory,
    poller_cli: PollerCli,
    tmp_path: Path,
    state_db: PostgresDatabase,
) -> Site:
    """This test's nodes, state schema and receiver paths."""
    return Site(
        unleash=unleash,
        admin=admin,
        receiver=receiver,
        spawn=spawn,
        poller_cli=poller_cli,
        tmp_path=tmp_path,
        state_db=state_db,
    )


def tallies_line(tallies: dict[str, Tally]) -> str:
    return "; ".join(f"{hook}: {tally}" for hook, tally in tallies.items())


def seconds(values: Collection[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values) + " s"


# --------------------------------------------------------------------------- 1. one leader


def test_only_the_leader_delivers_each_event_once_in_order(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two daemons with their own configs on one state: 3,000 events arrive once each, in
    order, all from the leader; the other stands by, touches nothing, and says so."""
    a = site.start_node("a", leads=True)
    b = site.start_node("b", leads=False)
    for _ in range(5):
        site.insert_and_wait(600, lead_in=300)  # a stream: each batch lands mid-delivery
    site.insert(600)

    tallies = site.check_deliveries(handovers=0)
    assert [site.senders(hook) for hook in HOOKS] == [["a"], ["a"]]
    assert sum(t.owed for t in tallies.values()) >= 3000 + 1500
    assert b.daemon.logs("lease.takeover") == b.daemon.logs("lease.acquired") == []
    for quiet in ("cursor.initialised", "cursor.advanced", "poll.catching_up"):
        assert b.daemon.logs(quiet) == [], quiet  # a standby polls nothing, writes nothing

    leader, standby = site.status(a), site.status(b)
    assert (leader["backend"], leader["role"]) == ("postgresql", "leader")
    assert standby["role"] == "standby"
    for seen in (leader, standby):
        assert seen["lease"]["holder"] == a.holder
        assert seen["lease"]["epoch"] == leader["lease"]["epoch"] >= 1
        assert 0 < seen["lease"]["expires_in_s"] <= TTL_S
    assert site.metric(a, "unleash_poller_leader") == 1
    assert site.metric(b, "unleash_poller_leader") == 0
    assert site.metric(a, "unleash_poller_lease_epoch") == leader["lease"]["epoch"]
    assert b.daemon.stop() == 0
    assert a.daemon.stop() == 0
    report(capsys, f"failover one leader, two nodes: {tallies_line(tallies)}")


# --------------------------------------------------------------------------- 5. standbys


def test_stopping_or_killing_a_standby_changes_nothing_for_delivery(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """A standby stopped (SIGTERM) or killed (-9) mid-stream: the leader keeps its lease
    and epoch and delivers every event once, in order."""
    a = site.start_node("a", leads=True)
    b = site.start_node("b", leads=False)
    c = site.start_node("c", leads=False)
    before = site.status(a)["lease"]

    site.insert_and_wait()
    assert b.daemon.stop() == 0
    site.insert_and_wait()
    assert c.daemon.kill() == -signal.SIGKILL
    site.insert(500)

    tallies = site.check_deliveries(handovers=0)
    assert [site.senders(hook) for hook in HOOKS] == [["a"], ["a"]]
    after = site.status(a)
    assert after["role"] == "leader"
    assert (after["lease"]["holder"], after["lease"]["epoch"]) == (a.holder, before["epoch"])
    assert a.daemon.logs("lease.lost") == a.daemon.logs("lease.takeover") == []
    assert len(a.daemon.logs("lease.acquired")) == 1
    assert a.daemon.stop() == 0
    report(capsys, f"failover standby stopped and killed: {tallies_line(tallies)}")


# --------------------------------------------------------------------------- 2. kill -9


def test_kill_9_of_the_leader_hands_over_within_the_bound(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """kill -9 of the leader mid-delivery, three times over: the standby delivers within
    lease_ttl_s + poll_interval_s (+ slack), under a higher epoch; nothing is lost; each
    webhook is re-sent at most RESENT_PER_HANDOVER events, in order, per kill."""
    leader = site.start_node("a", leads=True)
    standby = site.start_node("b", leads=False)
    epoch = site.status(leader)["lease"]["epoch"]
    kills = 3
    takeovers = []
    for _ in range(kills):
        site.insert_and_wait()
        killed_at = time.monotonic()
        assert leader.daemon.kill() == -signal.SIGKILL
        site.insert(200)  # the stream goes on while nobody leads
        takeovers.append(site.first_delivery_by(standby, after=killed_at) - killed_at)
        takeover = site.wait_takeover(standby, old=leader)
        assert takeover["epoch"] > epoch
        epoch = takeover["epoch"]
        # The killed node comes back (a new process) as the standby.
        leader, standby = standby, site.start_node(leader.name, leads=False)

    tallies = site.check_deliveries(handovers=kills)
    for hook in HOOKS:  # one node at a time, each kill a handover to the other
        assert site.senders(hook) == ["a", "b", "a", "b"], hook
    lease = site.status(leader)
    assert (lease["role"], lease["lease"]["holder"], lease["lease"]["epoch"]) == (
        "leader",
        leader.holder,
        epoch,
    )
    report(
        capsys,
        f"failover kill -9 of the leader x{kills} (lease_ttl_s {TTL_S}, poll_interval_s "
        f"{POLL_S}): takeover (kill to the first delivery by the standby) "
        f"{seconds(takeovers)}; median {statistics.median(takeovers):.2f} s, worst "
        f"{max(takeovers):.2f} s, bound {TAKEOVER_BOUND_S:.1f} s; {tallies_line(tallies)}; "
        f"duplicate bound {kills * RESENT_PER_HANDOVER} per webhook "
        f"({MARKS_PER_COMMIT} uncommitted marks + 1 request on the wire per kill)",
    )
    assert max(takeovers) <= TAKEOVER_BOUND_S, takeovers


# --------------------------------------------------------------------------- 3. SIGSTOP


def test_a_paused_leader_sends_at_most_its_request_on_the_wire_commits_nothing_and_stands_by(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """The new leader (after a clean handover) is SIGSTOPped mid-delivery for twice the
    TTL: the other node takes over within the bound; resumed, the paused node sends at most
    one request per webhook it had on the wire, advances no cursor, reports itself a
    standby, and takes over again when the leader stops."""
    a = site.start_node("a", leads=True)
    b = site.start_node("b", leads=False)

    # A clean stop hands over: b becomes the new leader, with nothing to re-send.
    site.insert_and_wait()
    stopped_at = time.monotonic()
    assert a.daemon.stop() == 0
    handover = site.first_delivery_by(b, after=stopped_at) - stopped_at
    epoch = site.wait_takeover(b, old=a)["epoch"]
    a = site.start_node("a", leads=False)
    standing_by = len(b.daemon.logs("lease.standby"))

    site.insert_and_wait()
    paused_at, paused_wall = time.monotonic(), time.time()
    b.daemon.send(signal.SIGSTOP)
    site.insert(200)  # the stream goes on
    takeover_s = site.first_delivery_by(a, after=paused_at) - paused_at
    takeover = site.wait_takeover(a, old=b)
    assert takeover["epoch"] > epoch
    # The fault itself: b stays stopped for twice the TTL, whatever happens meanwhile.
    time.sleep(max(0.0, paused_at + 2 * TTL_S - time.monotonic()))
    b.daemon.send(signal.SIGCONT)
    [lost] = b.daemon.wait_log("lease.lost", where=lambda r: r.get("holder") == b.holder)
    assert lost["epoch"] == epoch
    assert lost["reason"]
    b.daemon.wait_log("lease.standby", count=standing_by + 1)
    site.insert(300)
    site.wait_all()

    on_the_wire = site.sent_by("b", after=paused_at)
    for hook in HOOKS:
        late = site.sent_by("b", hook, after=paused_at)
        assert len(late) <= 1, f"{hook}: b sent {ids_of(late)} after it was paused"
    # Fenced: b committed nothing after it was paused (no cursor moved, no lease kept).
    assert [r for r in b.daemon.logs("cursor.advanced") if timestamp(r) > paused_wall] == []
    assert b.daemon.running
    seen = site.status(b)
    assert seen["role"] == "standby"
    assert (seen["lease"]["holder"], seen["lease"]["epoch"]) == (a.holder, takeover["epoch"])
    assert site.metric(b, "unleash_poller_leader") == 0
    assert site.metric(a, "unleash_poller_leader") == 1

    # A standby again, b takes over when a stops (cleanly: nothing re-sent).
    stopped_at = time.monotonic()
    assert a.daemon.stop() == 0
    site.insert(200)
    back_s = site.first_delivery_by(b, after=stopped_at) - stopped_at
    site.wait_takeover(b, old=a)

    tallies = site.check_deliveries(handovers=1, on_the_wire=on_the_wire)
    for hook in HOOKS:
        assert site.senders(hook, leaving_out=on_the_wire) == ["a", "b", "a", "b"], hook
    assert b.daemon.stop() == 0
    report(
        capsys,
        f"failover SIGSTOP of the leader for {2 * TTL_S} s: takeover (SIGSTOP to the first "
        f"delivery by the standby) {takeover_s:.2f} s (bound {TAKEOVER_BOUND_S:.1f} s); "
        f"requests from the paused node after SIGSTOP: {len(on_the_wire)}; clean handovers "
        f"{handover:.2f} s and {back_s:.2f} s; {tallies_line(tallies)}",
    )
    assert takeover_s <= TAKEOVER_BOUND_S


# --------------------------------------------------------------------------- 4. PostgreSQL


def wait_healthy(unleash: UnleashServer, timeout_s: float = 30.0) -> float:
    """Seconds until Unleash's /health answers 200 (it holds no state of its own)."""
    started = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(f"{unleash.url}/health", timeout=5) as response:  # noqa: S310
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, ConnectionError):
            pass
        assert time.monotonic() - started < timeout_s, f"Unleash down:\n{unleash.log_tail()}"
        time.sleep(0.1)


def test_a_postgresql_restart_mid_stream_loses_nothing(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    """`pg_ctlcluster restart` of the cluster holding the state (and Unleash's database)
    mid-delivery: both daemons keep running and log one line each that names the state
    without its password; they reconnect and every event arrives, in order, re-sent at
    most twice a tail (the leader reconnecting, a standby if the lease ran out)."""
    a = site.start_node("a", leads=True)
    b = site.start_node("b", leads=False)

    site.insert_and_wait()
    restarted_wall = time.time()
    restart_s = restart_cluster(site.state_db)
    unleash_s = wait_healthy(site.unleash)
    site.insert(BATCH)  # after the restart: delivered only by a daemon that reconnected

    tallies = site.check_deliveries(handovers=2)
    for node in (a, b):
        assert node.daemon.running, site.tails()
    senders = [site.senders(hook) for hook in HOOKS]
    for runs in senders:  # a, or a then b if a's lease ran out during the outage
        assert runs in (["a"], ["a", "b"]), senders
    leads = [n for n in (a, b) if site.status(n)["role"] == "leader"]
    assert len(leads) == 1
    report(
        capsys,
        f"failover PostgreSQL restart: pg_ctlcluster restart took {restart_s:.1f} s, Unleash "
        f"healthy {unleash_s:.1f} s later; senders {senders}, leader after "
        f"{leads[0].name}; {tallies_line(tallies)}",
    )
    db = site.state_db
    for node in (a, b):
        # One line says the state is gone (Unleash's own outage is its own line).
        outage = [
            r
            for r in node.daemon.logs()
            if r.get("level") in ("warning", "error", "critical")
            and timestamp(r) >= restarted_wall
            and not str(r.get("event")).startswith("unleash.")
        ]
        assert len(outage) == 1, f"{node.name}: " + "\n".join(map(json.dumps, outage))
        assert f"{db.host}:{db.port}/{db.name}" in json.dumps(outage[0]), outage[0]
        assert TEST_ROLE_PASSWORD not in node.daemon.output()
        assert "Traceback" not in node.daemon.output()
    for node in (a, b):
        assert node.daemon.stop() == 0
