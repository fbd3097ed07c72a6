"""The state file: atomic cursor + outbox, dead letters, refusal of bad files and second daemons."""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from poller.schedule import Pause
from poller.state import SCHEMA_VERSION, AttemptRecord, State, StateError, StateLockedError


def _open(tmp_path: Path, **kwargs: bool) -> State:
    return State.open(tmp_path / "state" / "s.sqlite3", **kwargs)


def test_fresh_state_has_no_cursor_and_private_permissions(tmp_path: Path) -> None:
    """A new state file has no cursor yet, is 0600 in a 0700 directory."""
    state = _open(tmp_path)
    try:
        assert state.high_water() is None
        assert stat.S_IMODE(state.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.path.parent.stat().st_mode) == 0o700
    finally:
        state.close()


def test_ingest_moves_cursor_with_outbox_and_survives_reopen(tmp_path: Path) -> None:
    """Cursor, outbox and gaps written by one ingest are all there after reopening."""
    state = _open(tmp_path)
    state.ingest([(5, '{"id":5}'), (7, '{"id":7}')], [("a", 5), ("a", 7), ("b", 7)], 7, [6])
    state.close()
    state = _open(tmp_path)
    try:
        assert state.high_water() == 7
        assert [g.id for g in state.gaps()] == [6]
        assert [p.event_id for p in state.next_pending("a", 10)] == [5, 7]
        assert state.pending_counts() == {"a": 2, "b": 1}
    finally:
        state.close()


def test_failed_ingest_leaves_nothing(tmp_path: Path) -> None:
    """An ingest that fails mid-way writes neither outbox rows nor the cursor."""
    state = _open(tmp_path)
    try:
        with pytest.raises(sqlite3.IntegrityError):
            # The outbox row references an event that is not there: the whole batch fails.
            state.ingest([(1, "{}")], [("a", 1), ("a", 2)], 2)
        assert state.high_water() is None
        assert state.pending_counts() == {}
    finally:
        state.close()


def test_delivered_removes_row_and_unowed_event(tmp_path: Path) -> None:
    """Once every webhook has an event, its body is gone from the file."""
    state = _open(tmp_path)
    try:
        state.ingest([(1, '{"id":1}')], [("a", 1), ("b", 1)], 1)
        state.delivered("a", 1)
        assert state.next_pending("b", 5)[0].body == '{"id":1}'
        state.delivered("b", 1)
        assert state.pending_counts() == {}
        assert state._conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
    finally:
        state.close()


def test_state_file_from_an_earlier_build_gets_indexes_and_triggers(tmp_path: Path) -> None:
    """A state file written before the indexes and body-dropping triggers existed is brought
    up to date when the daemon opens it: bodies nobody owes go, owed ones stay, and from
    then on a delivery drops its body. A read-only tool leaves the file as it is."""
    state = _open(tmp_path)
    state.ingest(
        [(1, '{"id":1}'), (2, '{"id":2}'), (3, '{"id":3}')], [("a", 1), ("a", 2), ("a", 3)], 3
    )
    state.dead_letter("a", 3, 2, "HTTP 500")
    conn = state._conn
    for name in ("outbox_done", "dead_letter_done", "parts_done_outbox", "parts_done_dead_letter"):
        conn.execute(f"DROP TRIGGER {name}")
    for name in ("outbox_event", "dead_letters_event"):
        conn.execute(f"DROP INDEX {name}")
    conn.execute("DROP TABLE parts_sent")
    state.delivered("a", 1)  # as an earlier build did: the body of 1 stays behind
    assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    state.close()

    def derived(s: State) -> set[str]:
        return {
            r[0]
            for r in s._conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger') "
                "AND name NOT LIKE 'sqlite_%'"
            )
        }

    reader = _open(tmp_path, create=False, lock=False)
    try:
        assert derived(reader) == set()
    finally:
        reader.close()
    state = _open(tmp_path)
    try:
        assert derived(state) == {
            "outbox_event",
            "dead_letters_event",
            "outbox_done",
            "dead_letter_done",
            "parts_done_outbox",
            "parts_done_dead_letter",
        }
        ids = [r[0] for r in state._conn.execute("SELECT id FROM events ORDER BY id")]
        assert ids == [2, 3]  # 1 was owed to nobody; 2 is pending, 3 a dead letter
        state.delivered("a", 2)
        state.remove_dead_letter("a", 3)
        assert state._conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        plan = " ".join(
            str(r)
            for r in state._conn.execute(
                "EXPLAIN QUERY PLAN SELECT 1 FROM outbox WHERE event_id = 2"
            )
        )
        assert "outbox_event" in plan
    finally:
        state.close()


def test_dead_letter_keeps_body_and_requeue_returns_it(tmp_path: Path) -> None:
    """A dead letter keeps the event and reason; requeue puts it back in the outbox."""
    state = _open(tmp_path)
    try:
        state.ingest([(3, '{"id":3}')], [("a", 3)], 3)
        state.dead_letter("a", 3, 2, "HTTP 500 after 2 attempts")
        assert state.pending_counts() == {}
        [letter] = state.dead_letters("a")
        assert (letter.event_id, letter.attempts, letter.reason, letter.body) == (
            3,
            2,
            "HTTP 500 after 2 attempts",
            '{"id":3}',
        )
        assert state.requeue_dead_letters("a") == 1
        assert [p.event_id for p in state.next_pending("a", 5)] == [3]
        assert state.dead_letters() == []
    finally:
        state.close()


def test_second_daemon_is_refused(tmp_path: Path) -> None:
    """A second process-level open with the lock fails while the first holds it."""
    first = _open(tmp_path)
    try:
        with pytest.raises(StateLockedError, match="another unleash-poller is running"):
            _open(tmp_path)
        _open(tmp_path, lock=False).close()  # read-only tools still work
    finally:
        first.close()
    _open(tmp_path).close()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda p: p.write_bytes(b""), "state file is empty"),
        (lambda p: p.write_bytes(p.read_bytes()[:1000]), "refusing to start over"),
        (lambda p: p.write_bytes(b"x" * 4096), "corrupt or not a state file"),
    ],
)
def test_damaged_state_file_is_refused(tmp_path: Path, damage, message: str) -> None:  # type: ignore[no-untyped-def]
    """A truncated or corrupt state file stops start-up with a clear message."""
    state = _open(tmp_path)
    state.ingest([(i, "x" * 500) for i in range(1, 200)], [("a", i) for i in range(1, 200)], 199)
    state.close()
    path = tmp_path / "state" / "s.sqlite3"
    for suffix in ("-wal", "-shm"):
        Path(str(path) + suffix).unlink(missing_ok=True)
    damage(path)
    with pytest.raises(StateError, match=message):
        _open(tmp_path)


def test_foreign_sqlite_file_is_refused(tmp_path: Path) -> None:
    """Another program's SQLite database is not taken for ours."""
    path = tmp_path / "state" / "s.sqlite3"
    path.parent.mkdir()
    sqlite3.connect(path).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(StateError, match="not an unleash-poller state file"):
        _open(tmp_path)


def test_status_tools_do_not_create_a_state_file(tmp_path: Path) -> None:
    """Opening without create on a missing file fails and creates nothing."""
    with pytest.raises(StateError, match="no state file"):
        _open(tmp_path, create=False, lock=False)
    assert not (tmp_path / "state").exists()


def test_staging_is_discarded_on_open(tmp_path: Path) -> None:
    """Pages staged by a crashed catch-up are dropped at the next start (the cursor did not
    move, so they are fetched again)."""
    state = _open(tmp_path)
    state.stage([(1, "{}"), (2, "{}")])
    os.close(state._lock_fd or -1)
    state._lock_fd = None
    state._conn.close()
    state = _open(tmp_path)
    try:
        assert list(state.staged()) == []
    finally:
        state.close()


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_state_file_deleted_or_replaced_under_the_daemon_is_noticed(
    tmp_path: Path, how: str
) -> None:
    """check_in_place raises one clear StateError once the path is no longer this file."""
    state = _open(tmp_path)
    try:
        state.check_in_place()  # untouched: fine
        if how == "deleted":
            state.path.unlink()
        else:
            other = _open(tmp_path / "other", lock=False)
            other.close()
            os.replace(other.path, state.path)
        with pytest.raises(StateError) as info:
            state.check_in_place()
    finally:
        state.close()
    message = str(info.value)
    assert message.startswith(f"{state.path}: the state file was {how}")
    assert 'start_from = "latest" that does not re-send old events' in message
    assert "\n" not in message


def test_error_texts_with_lone_surrogates_are_stored(tmp_path: Path) -> None:
    """A retry or dead-letter reason holding undecodable bytes (lone surrogates) is stored
    escaped instead of failing the transaction."""
    state = _open(tmp_path)
    try:
        state.ingest([(1, '{"id":1}'), (2, '{"id":2}')], [("a", 1), ("a", 2)], 2)
        state.retry_later("a", 1, 1, 0.0, "bad header \udcff")
        state.dead_letter("a", 2, 3, "HTTP 400 \ud800 ü")
        letter = state.dead_letters("a")[0]
    finally:
        state.close()
    assert letter.reason == "HTTP 400 \\ud800 ü"


def test_a_fresh_state_file_does_not_take_in_a_deleted_files_leftover_wal(
    tmp_path: Path,
) -> None:
    """A state file deleted while open leaves its -wal and -shm behind; a fresh state made
    at that path starts empty instead of replaying the dead file's log into itself."""
    state = _open(tmp_path)
    state.ingest([(5, '{"id":5}')], [("a", 5)], 5)
    state.path.unlink()
    state.close()
    assert state.path.with_name(state.path.name + "-wal").exists()
    fresh = _open(tmp_path)
    try:
        assert fresh.high_water() is None
        assert fresh.pending_counts() == {}
        fresh.ingest([(7, '{"id":7}')], [("a", 7)], 7)
    finally:
        fresh.close()
    reopened = _open(tmp_path)
    try:
        assert reopened.high_water() == 7
    finally:
        reopened.close()


# The layout of schema version 1, as the build before the delivery controls wrote it.
_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE outbox (
    webhook TEXT NOT NULL, event_id INTEGER NOT NULL REFERENCES events(id),
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT, enqueued_at REAL NOT NULL, PRIMARY KEY (webhook, event_id)
) WITHOUT ROWID;
CREATE TABLE gaps (id INTEGER PRIMARY KEY, missing_since REAL NOT NULL,
                   next_check_at REAL NOT NULL, checks INTEGER NOT NULL DEFAULT 0);
CREATE TABLE dead_letters (
    webhook TEXT NOT NULL, event_id INTEGER NOT NULL REFERENCES events(id),
    attempts INTEGER NOT NULL, reason TEXT NOT NULL, failed_at REAL NOT NULL,
    PRIMARY KEY (webhook, event_id)
) WITHOUT ROWID;
CREATE TABLE staging (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
INSERT INTO meta VALUES ('high_water', 7);
INSERT INTO events VALUES (5, '{"id":5}'), (7, '{"id":7}');
INSERT INTO outbox (webhook, event_id, attempts, enqueued_at)
    VALUES ('a', 5, 1, 1.0), ('a', 7, 0, 1.0);
"""


def _v1_file(path: Path) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA application_id=1431194704")
    conn.execute("PRAGMA user_version=1")
    conn.executescript(_V1)
    conn.close()


@pytest.mark.parametrize("lock", [True, False])
def test_schema_1_file_is_upgraded_in_place(tmp_path: Path, lock: bool) -> None:
    """A version-1 file opens as version 2 (by the daemon, or by a tool when no daemon
    holds it): cursor and outbox kept, pauses and the attempt log usable."""
    path = tmp_path / "state" / "s.sqlite3"
    _v1_file(path)
    state = State.open(path, create=False, lock=lock)
    try:
        assert state._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert state.high_water() == 7
        assert [(p.event_id, p.attempts, p.rate_limited) for p in state.next_pending("a", 9)] == [
            (5, 1, 0),
            (7, 0, 0),
        ]
        state.set_pause("a", Pause("by hand", 1.0, awaits_resume=True, probe_at=math.inf))
        assert state.pause("a") == Pause("by hand", 1.0, awaits_resume=True, probe_at=math.inf)
        state.record_attempts([AttemptRecord("a", 5, 2.0, 1, 500, None, 3.0, "retry")], {"a": 9})
        assert len(state.attempt_log("a")) == 1
    finally:
        state.close()


def test_schema_1_file_beside_a_running_old_daemon_is_refused(tmp_path: Path) -> None:
    """A tool cannot upgrade a file an (old) daemon holds: one clear error instead."""
    path = tmp_path / "state" / "s.sqlite3"
    _v1_file(path)
    holder = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(StateError, match="schema version 1"):
            State.open(path, create=False, lock=False)
    finally:
        os.close(holder)


def test_pause_survives_reopen_and_resume_by_hand_makes_everything_due(tmp_path: Path) -> None:
    """A pause (with its probe time) is kept across a reopen; resume(retry_now) clears it
    and gives every pending event its retries afresh."""
    state = _open(tmp_path)
    state.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("a", 2)], 2)
    state.retry_later("a", 1, 3, 9e9, "HTTP 500", rate_limited=2)
    state.set_pause(
        "a", Pause("5 events in a row", 10.0, awaits_resume=False, probe_at=70.0, probes=1)
    )
    state.close()
    state = _open(tmp_path)
    try:
        assert state.pauses() == {"a": Pause("5 events in a row", 10.0, False, 70.0, 1)}
        assert state.resume("a", retry_now=True)
        assert not state.resume("a")
        assert [
            (p.attempts, p.next_attempt_at, p.rate_limited) for p in state.next_pending("a", 9)
        ] == [
            (0, 0.0, 0),
            (0, 0.0, 0),
        ]
    finally:
        state.close()


def test_attempt_log_keeps_the_last_n_per_webhook(tmp_path: Path) -> None:
    """Each webhook keeps its own last N attempts; reading takes the last ones, oldest first."""
    state = _open(tmp_path)
    try:
        for batch in range(5):
            state.record_attempts(
                [
                    AttemptRecord(
                        hook, batch * 10 + i, batch * 10 + i, 1, 200, None, 1.0, "delivered"
                    )
                    for i in range(10)
                    for hook in ("a", "b")
                ],
                {"a": 15, "b": 3},
            )
        assert [r.event_id for r in state.attempt_log("a")] == list(range(35, 50))
        assert [r.event_id for r in state.attempt_log("b")] == [47, 48, 49]
        assert [r.event_id for r in state.attempt_log("a", last=2)] == [48, 49]
        assert [r.webhook for r in state.attempt_log(event_id=49)] == ["a", "b"]
    finally:
        state.close()


def test_queue_adds_events_for_one_webhook_once(tmp_path: Path) -> None:
    """Queueing (redeliver) adds what is not pending already, for that webhook only."""
    state = _open(tmp_path)
    try:
        state.ingest([(3, "{}")], [("a", 3)], 10)
        assert state.queue("a", [(1, '{"id":1}'), (2, '{"id":2}'), (3, "{}")]) == 2
        assert state.queue("a", [(1, '{"id":1}')]) == 0
        assert [p.event_id for p in state.next_pending("a", 9)] == [1, 2, 3]
        assert state.pending_counts() == {"a": 3}
        assert state.high_water() == 10
    finally:
        state.close()


def test_a_failed_probe_does_not_undo_a_resume_by_hand(tmp_path: Path) -> None:
    """A probe that fails after `webhooks resume` (from another process) lifted the pause
    moves nothing: the webhook stays resumed."""
    state = _open(tmp_path)
    try:
        state.set_pause("a", Pause("5 events in a row", 1.0, False, 61.0))
        assert state.probe_failed("a", 181.0, 1)
        assert state.pause("a") == Pause("5 events in a row", 1.0, False, 181.0, 1)
        state.resume("a", retry_now=True)
        assert not state.probe_failed("a", 421.0, 2)
        assert state.pause("a") is None
    finally:
        state.close()
