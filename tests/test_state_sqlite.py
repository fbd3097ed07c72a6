"""The SQLite state file: its lock, permissions, refusal of bad files, upgrades and WAL.

What every backend does the same way is in test_state_contract.py; these are what only a
file on one host has. SqliteState's coroutines run at once on the calling thread, so a
test awaits them in `asyncio.run`.
"""

from __future__ import annotations

import asyncio
import fcntl
import math
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from poller.schedule import Pause
from poller.state import AttemptRecord, SqliteState, StateError, StateLockedError
from poller.state.sqlite import SCHEMA_VERSION


def _open(tmp_path: Path, **kwargs: bool) -> SqliteState:
    return SqliteState.open(tmp_path / "state" / "s.sqlite3", **kwargs)


def _close(state: SqliteState) -> None:
    asyncio.run(state.close())


def test_fresh_state_has_no_cursor_and_private_permissions(tmp_path: Path) -> None:
    """A new state file has no cursor yet, is 0600 in a 0700 directory."""
    state = _open(tmp_path)
    try:
        assert asyncio.run(state.high_water()) is None
        assert stat.S_IMODE(state.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(state.path.parent.stat().st_mode) == 0o700
    finally:
        _close(state)


def test_state_file_from_an_earlier_build_gets_indexes_and_triggers(tmp_path: Path) -> None:
    """A state file written before the indexes and body-dropping triggers existed is brought
    up to date when the daemon opens it: bodies nobody owes go, owed ones stay, and from
    then on a delivery drops its body. A read-only tool leaves the file as it is."""
    state = _open(tmp_path)

    async def write_as_an_earlier_build() -> None:
        await state.ingest(
            [(1, '{"id":1}'), (2, '{"id":2}'), (3, '{"id":3}')], [("a", 1), ("a", 2), ("a", 3)], 3
        )
        await state.dead_letter("a", 3, 2, "HTTP 500")
        conn = state._conn
        for name in (
            "outbox_done",
            "dead_letter_done",
            "parts_done_outbox",
            "parts_done_dead_letter",
        ):
            conn.execute(f"DROP TRIGGER {name}")
        for name in ("outbox_event", "dead_letters_event"):
            conn.execute(f"DROP INDEX {name}")
        conn.execute("DROP TABLE parts_sent")
        await state.delivered("a", 1)  # as an earlier build did: the body of 1 stays behind
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == 3
        await state.close()

    asyncio.run(write_as_an_earlier_build())

    def derived(s: SqliteState) -> set[str]:
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
        _close(reader)
    state = _open(tmp_path)

    async def check() -> None:
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
        await state.delivered("a", 2)
        await state.remove_dead_letter("a", 3)
        assert state._conn.execute("SELECT count(*) FROM events").fetchone()[0] == 0
        plan = " ".join(
            str(r)
            for r in state._conn.execute(
                "EXPLAIN QUERY PLAN SELECT 1 FROM outbox WHERE event_id = 2"
            )
        )
        assert "outbox_event" in plan

    try:
        asyncio.run(check())
    finally:
        _close(state)


def test_second_daemon_is_refused(tmp_path: Path) -> None:
    """A second process-level open with the lock fails while the first holds it."""
    first = _open(tmp_path)
    try:
        with pytest.raises(StateLockedError, match="another unleash-poller is running"):
            _open(tmp_path)
        _close(_open(tmp_path, lock=False))  # read-only tools still work
    finally:
        _close(first)
    _close(_open(tmp_path))


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
    asyncio.run(
        state.ingest(
            [(i, "x" * 500) for i in range(1, 200)], [("a", i) for i in range(1, 200)], 199
        )
    )
    _close(state)
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
    asyncio.run(state.stage([(1, "{}"), (2, "{}")]))
    # A crash: the lock and the connection go without a close.
    os.close(state._lock_fd or -1)
    state._lock_fd = None
    state._conn.close()
    state = _open(tmp_path)

    async def staged() -> list[list[tuple[int, str]]]:
        return [rows async for rows in state.staged()]

    try:
        assert asyncio.run(staged()) == []
    finally:
        _close(state)


@pytest.mark.parametrize("how", ["deleted", "replaced"])
def test_a_state_file_deleted_or_replaced_under_the_daemon_is_noticed(
    tmp_path: Path, how: str
) -> None:
    """check_in_place raises one clear StateError once the path is no longer this file."""
    state = _open(tmp_path)
    try:
        asyncio.run(state.check_in_place())  # untouched: fine
        if how == "deleted":
            state.path.unlink()
        else:
            other = _open(tmp_path / "other", lock=False)
            _close(other)
            os.replace(other.path, state.path)
        with pytest.raises(StateError) as info:
            asyncio.run(state.check_in_place())
    finally:
        _close(state)
    message = str(info.value)
    assert message.startswith(f"{state.path}: the state file was {how}")
    assert 'start_from = "latest" that does not re-send old events' in message
    assert "\n" not in message


def test_a_fresh_state_file_does_not_take_in_a_deleted_files_leftover_wal(
    tmp_path: Path,
) -> None:
    """A state file deleted while open leaves its -wal and -shm behind; a fresh state made
    at that path starts empty instead of replaying the dead file's log into itself."""
    state = _open(tmp_path)
    asyncio.run(state.ingest([(5, '{"id":5}')], [("a", 5)], 5))
    state.path.unlink()
    _close(state)
    assert state.path.with_name(state.path.name + "-wal").exists()
    fresh = _open(tmp_path)

    async def check_fresh() -> None:
        assert await fresh.high_water() is None
        assert await fresh.pending_counts() == {}
        await fresh.ingest([(7, '{"id":7}')], [("a", 7)], 7)

    try:
        asyncio.run(check_fresh())
    finally:
        _close(fresh)
    reopened = _open(tmp_path)
    try:
        assert asyncio.run(reopened.high_water()) == 7
    finally:
        _close(reopened)


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
    state = SqliteState.open(path, create=False, lock=lock)

    async def check() -> None:
        assert state._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        assert await state.high_water() == 7
        assert [
            (p.event_id, p.attempts, p.rate_limited) for p in await state.next_pending("a", 9)
        ] == [
            (5, 1, 0),
            (7, 0, 0),
        ]
        await state.set_pause("a", Pause("by hand", 1.0, awaits_resume=True, probe_at=math.inf))
        assert await state.pause("a") == Pause(
            "by hand", 1.0, awaits_resume=True, probe_at=math.inf
        )
        await state.record_attempts(
            [AttemptRecord("a", 5, 2.0, 1, 500, None, 3.0, "retry")], {"a": 9}
        )
        assert len(await state.attempt_log("a")) == 1

    try:
        asyncio.run(check())
    finally:
        _close(state)


def test_schema_1_file_beside_a_running_old_daemon_is_refused(tmp_path: Path) -> None:
    """A tool cannot upgrade a file an (old) daemon holds: one clear error instead."""
    path = tmp_path / "state" / "s.sqlite3"
    _v1_file(path)
    holder = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        with pytest.raises(StateError, match="schema version 1"):
            SqliteState.open(path, create=False, lock=False)
    finally:
        os.close(holder)
