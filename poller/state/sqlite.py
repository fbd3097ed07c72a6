"""Durable state in one SQLite file: the cursor, the per-webhook outbox, the dead letters.

The cursor (highest event id taken in, plus the ids below it not seen yet: "gaps") moves
only in the transaction that writes what each webhook still owes, so a crash at any
instant either keeps both or neither. Delivery marks are small group commits; losing the
last ones to a crash or a power cut means a duplicate, never a loss.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from pathlib import Path

from poller.faults import crash_point
from poller.schedule import Pause
from poller.state.base import (
    AttemptRecord,
    DeadLetter,
    EventRow,
    Gap,
    Leadership,
    Pending,
    StateDump,
    StateError,
    StateLockedError,
    storable,
)

SCHEMA_VERSION = 2
_APP_ID = 0x554E4C50  # "UNLP": marks the file as ours, so a stranger's database is refused

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE events (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE outbox (
    webhook TEXT NOT NULL,
    event_id INTEGER NOT NULL REFERENCES events(id),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    enqueued_at REAL NOT NULL,
    rate_limited INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (webhook, event_id)
) WITHOUT ROWID;
CREATE TABLE gaps (id INTEGER PRIMARY KEY, missing_since REAL NOT NULL,
                   next_check_at REAL NOT NULL, checks INTEGER NOT NULL DEFAULT 0);
CREATE TABLE dead_letters (
    webhook TEXT NOT NULL,
    event_id INTEGER NOT NULL REFERENCES events(id),
    attempts INTEGER NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL,
    PRIMARY KEY (webhook, event_id)
) WITHOUT ROWID;
CREATE TABLE staging (id INTEGER PRIMARY KEY, body TEXT NOT NULL);
"""
# Added in schema version 2 (delivery controls): made by a fresh file and by the upgrade.
_V2_TABLES = """
CREATE TABLE pauses (
    webhook TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    since REAL NOT NULL,
    awaits_resume INTEGER NOT NULL,
    probe_at REAL NOT NULL,
    probes INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE TABLE attempt_log (
    webhook TEXT NOT NULL,
    seq INTEGER NOT NULL,
    event_id INTEGER NOT NULL,
    at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    status INTEGER,
    error TEXT,
    latency_ms REAL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (webhook, seq)
) WITHOUT ROWID;
"""
# Each step takes a file from the version before it to its own, in place, in one
# transaction with the version bump.
_MIGRATIONS = {
    2: "ALTER TABLE outbox ADD COLUMN rate_limited INTEGER NOT NULL DEFAULT 0;\n" + _V2_TABLES,
}

# Indexes and triggers: derived from the tables, so they are (re)made with IF NOT EXISTS
# on every open by the daemon. A state file written before one of them was added gets it
# then, with no schema version bump (they change no data).
_DERIVED = """
-- "is this event still owed to anyone?" runs after every delivery: without these it
-- scans the whole outbox, and delivery slows down as the backlog grows.
CREATE INDEX IF NOT EXISTS outbox_event ON outbox (event_id);
CREATE INDEX IF NOT EXISTS dead_letters_event ON dead_letters (event_id);
-- An event's body is kept while any webhook still owes it or holds it as a dead letter.
CREATE TRIGGER IF NOT EXISTS outbox_done AFTER DELETE ON outbox BEGIN
    DELETE FROM events WHERE id = OLD.event_id
        AND NOT EXISTS (SELECT 1 FROM outbox WHERE event_id = OLD.event_id)
        AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE event_id = OLD.event_id);
END;
CREATE TRIGGER IF NOT EXISTS dead_letter_done AFTER DELETE ON dead_letters BEGIN
    DELETE FROM events WHERE id = OLD.event_id
        AND NOT EXISTS (SELECT 1 FROM outbox WHERE event_id = OLD.event_id)
        AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE event_id = OLD.event_id);
END;
-- The requests of an event (one per Slack channel) that were answered 2xx, so a retry or a
-- replay sends only the others. Kept while the webhook owes the event or holds it as a dead
-- letter; an older build that ignores this table just re-sends the whole event.
CREATE TABLE IF NOT EXISTS parts_sent (
    webhook TEXT NOT NULL,
    event_id INTEGER NOT NULL,
    part TEXT NOT NULL,
    PRIMARY KEY (webhook, event_id, part)
) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS parts_done_outbox AFTER DELETE ON outbox BEGIN
    DELETE FROM parts_sent WHERE webhook = OLD.webhook AND event_id = OLD.event_id
        AND NOT EXISTS (SELECT 1 FROM dead_letters
                        WHERE webhook = OLD.webhook AND event_id = OLD.event_id);
END;
CREATE TRIGGER IF NOT EXISTS parts_done_dead_letter AFTER DELETE ON dead_letters BEGIN
    DELETE FROM parts_sent WHERE webhook = OLD.webhook AND event_id = OLD.event_id
        AND NOT EXISTS (SELECT 1 FROM outbox
                        WHERE webhook = OLD.webhook AND event_id = OLD.event_id);
END;
"""
# What `state copy` moves (staging never: it is discarded at every open).
_COPIED_TABLES = (
    "meta",
    "events",
    "outbox",
    "gaps",
    "dead_letters",
    "parts_sent",
    "pauses",
    "attempt_log",
)
_DERIVED_NAMES = frozenset(
    {
        "outbox_event",
        "dead_letters_event",
        "outbox_done",
        "dead_letter_done",
        "parts_sent",
        "parts_done_outbox",
        "parts_done_dead_letter",
    }
)


def _create(path: Path) -> None:
    """Build a new state file beside the target, then rename it in: a crash mid-way
    leaves no half-made file that could later pass for an empty state."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".new")
    tmp.unlink(missing_ok=True)
    os.close(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600))
    conn = sqlite3.connect(tmp, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA application_id={_APP_ID}")
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.executescript(f"BEGIN; {_SCHEMA} {_V2_TABLES} {_DERIVED} COMMIT;")
    finally:
        conn.close()
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    # A state file deleted while open leaves its write-ahead log behind; SQLite would
    # replay that dead file's pages into the new one (a mix of two databases).
    for suffix in ("-wal", "-shm", "-journal"):
        path.with_name(path.name + suffix).unlink(missing_ok=True)
    tmp.rename(path)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


class SqliteState:
    """One open state file. Its coroutines run their statements at once, on the event-loop
    thread (each is short); call them from that thread only."""

    def __init__(self, path: Path, conn: sqlite3.Connection, lock_fd: int | None) -> None:
        self.path = path
        self._conn = conn
        self._lock_fd = lock_fd
        self._data_version: int | None = None
        self._identity = _identity(path)
        self._attempt_seq: dict[str, int] = {}  # last attempt-log number per webhook

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, create: bool = True, lock: bool = True) -> SqliteState:
        """Open (or create) the state file. `lock` takes the single-daemon lock."""
        if not create and not path.exists():
            raise StateError(f"{path}: no state file (has the daemon run yet?)")
        lock_fd = _take_lock(path) if lock else None
        try:
            if not path.exists():
                _create(path)
            conn = _connect(path)
        except BaseException:
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        state = cls(path, conn, lock_fd)
        if state._schema_version() < SCHEMA_VERSION:
            state._migrate_holding_lock()
        if lock:
            # Only the lock holder writes the schema or stages; a read-only tool beside the
            # daemon must neither change the schema under it nor drop its pages.
            state._upgrade()
            state._discard_staging()
        return state

    def _schema_version(self) -> int:
        return int(self._conn.execute("PRAGMA user_version").fetchone()[0])

    def _migrate_holding_lock(self) -> None:
        """Bring a file from an earlier version up to SCHEMA_VERSION, in place. Only with
        the daemon's lock (a running daemon has migrated already): a tool opened without
        it takes the lock for the migration when it is free."""
        lock_fd = self._lock_fd
        if lock_fd is None:
            try:
                lock_fd = _take_lock(self.path)
            except StateLockedError:
                version = self._schema_version()
                self._close()
                raise StateError(
                    f"{self.path}: state file has schema version {version} "
                    f"and the daemon holding it has not upgraded it to {SCHEMA_VERSION}; "
                    "restart the daemon with this version"
                ) from None
        try:
            with self._transaction() as conn:
                for version in range(self._schema_version() + 1, SCHEMA_VERSION + 1):
                    for statement in _statements(_MIGRATIONS[version]):
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={version}")
        finally:
            if self._lock_fd is None:
                os.close(lock_fd)

    def _upgrade(self) -> None:
        """Add the indexes and triggers a state file from an earlier build lacks. Without
        the triggers no body was ever dropped, so drop the ones nobody owes now."""
        names = {
            row[0]
            for row in self._conn.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('index', 'trigger', 'table')"
            )
        }
        if names >= _DERIVED_NAMES:
            return
        with self._transaction() as conn:
            for statement in _statements(_DERIVED):
                conn.execute(statement)
            if "outbox_done" not in names:
                conn.execute(
                    "DELETE FROM events WHERE id NOT IN (SELECT event_id FROM outbox) "
                    "AND id NOT IN (SELECT event_id FROM dead_letters)"
                )

    async def check_in_place(self) -> None:
        """Raise StateError when the file at `path` is no longer the one this connection
        writes (deleted, or replaced by another file): writing on would lose everything
        at the next start, which would find a different state."""
        now = _identity(self.path)
        if now == self._identity:
            return
        what = "deleted" if now is None else "replaced by another file"
        raise StateError(
            f"{self.path}: the state file was {what} while the daemon ran; stopped. "
            "Restore it from a backup, or start again on a fresh state file: with "
            'start_from = "latest" that does not re-send old events'
        )

    async def written_elsewhere(self) -> bool:
        """Whether another connection (a `dead-letters replay` beside the daemon) committed
        since the last call: SQLite bumps `data_version` only for other connections' writes."""
        version = self._conn.execute("PRAGMA data_version").fetchone()[0]
        changed = self._data_version is not None and version != self._data_version
        self._data_version = version
        return bool(changed)

    def release_memory(self) -> None:
        """Drop SQLite's page cache (refilled from the file as needed): after a catch-up
        it holds a burst's pages, up to 2 MB, for nothing."""
        self._conn.execute("PRAGMA shrink_memory")

    @property
    def where(self) -> str:
        return str(self.path)

    @property
    def answers_at_once(self) -> bool:
        return True

    @property
    def leadership(self) -> Leadership | None:
        return None  # one host: the file lock is the whole of it

    async def close(self) -> None:
        self._close()

    def _close(self) -> None:
        self._conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        crash_point("state.before_commit")
        self._conn.execute("COMMIT")

    # -- cursor ------------------------------------------------------------------------

    async def high_water(self) -> int | None:
        """Highest event id taken in; None before the first successful poll."""
        row = self._conn.execute("SELECT value FROM meta WHERE key='high_water'").fetchone()
        return None if row is None else int(row[0])

    async def gaps(self) -> list[Gap]:
        rows = self._conn.execute(
            "SELECT id, missing_since, next_check_at, checks FROM gaps ORDER BY id"
        )
        return [Gap(*row) for row in rows]

    async def ingest(
        self,
        events: Sequence[tuple[int, str]],
        owed: Iterable[tuple[str, int]],
        high_water: int,
        new_gaps: Iterable[int] = (),
        settled_gaps: Iterable[int] = (),
        *,
        now: float | None = None,
    ) -> None:
        """Take in the events some webhook wants, what each webhook owes, and move the
        cursor, atomically. Events no webhook wants are simply passed by the cursor."""
        async with self.ingesting(now=now) as batch:
            await batch.add(events, owed)
            await batch.finish(high_water, new_gaps, settled_gaps)

    @contextlib.asynccontextmanager
    async def ingesting(self, *, now: float | None = None) -> AsyncIterator[IngestBatch]:
        """One transaction for a catch-up too long to hold in memory."""
        with self._transaction() as conn:
            batch = IngestBatch(conn, time.time() if now is None else now)
            yield batch
            if not batch.finished:
                raise RuntimeError("ingest transaction ended without moving the cursor")

    async def set_cursor(self, high_water: int) -> None:
        """Move the cursor by hand (an operator's decision): forget gaps; keep the outbox."""
        with self._transaction() as conn:
            conn.execute("DELETE FROM gaps")
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('high_water', ?)", (high_water,)
            )

    async def saved_text(self, key: str) -> str | None:
        """A note the daemon keeps between runs (e.g. the server profile), or None."""
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (f"note:{key}",))
        found = row.fetchone()
        return found[0] if found is not None and isinstance(found[0], str) else None

    async def save_text(self, key: str, value: str) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (f"note:{key}", value)
            )

    async def reschedule_gaps(self, gap_ids: Iterable[int], next_check_at: float) -> None:
        with self._transaction() as conn:
            conn.executemany(
                "UPDATE gaps SET next_check_at = ?, checks = checks + 1 WHERE id = ?",
                ((next_check_at, g) for g in gap_ids),
            )

    async def give_up_gaps(self, gap_ids: Iterable[int]) -> None:
        with self._transaction() as conn:
            conn.executemany("DELETE FROM gaps WHERE id = ?", ((g,) for g in gap_ids))

    # -- staging: a long catch-up is written here page by page, then taken in at once --

    async def stage(self, events: Sequence[tuple[int, str]]) -> None:
        with self._transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO staging (id, body) VALUES (?, ?)", events)

    async def staged(self, batch: int = 1000) -> AsyncIterator[list[EventRow]]:
        """Staged events in id order, a batch at a time (memory stays flat)."""
        last = -1
        while True:
            rows = self._conn.execute(
                "SELECT id, body FROM staging WHERE id > ? ORDER BY id LIMIT ?", (last, batch)
            ).fetchall()
            if not rows:
                return
            yield rows
            last = rows[-1][0]

    def _discard_staging(self) -> None:
        with self._transaction() as conn:
            conn.execute("DELETE FROM staging")

    async def clear_staging(self) -> None:
        self._discard_staging()

    # -- outbox ------------------------------------------------------------------------

    async def next_pending(self, webhook: str, limit: int, after: int = -1) -> list[Pending]:
        """The webhook's oldest pending events (by id) above `after`."""
        rows = self._conn.execute(
            "SELECT o.webhook, o.event_id, e.body, o.attempts, o.next_attempt_at, o.enqueued_at, "
            "o.rate_limited FROM outbox o JOIN events e ON e.id = o.event_id "
            "WHERE o.webhook = ? AND o.event_id > ? ORDER BY o.event_id LIMIT ?",
            (webhook, after, limit),
        )
        return [Pending(*row) for row in rows]

    async def delivered(self, webhook: str, *event_ids: int) -> None:
        """Mark events delivered, all in one transaction (the trigger drops a body once
        nobody owes it). This runs for every delivery, so one mark is a single statement."""
        if len(event_ids) == 1:
            crash_point("state.before_commit")
            self._conn.execute(
                "DELETE FROM outbox WHERE webhook = ? AND event_id = ?", (webhook, event_ids[0])
            )
            return
        with self._transaction() as conn:
            conn.executemany(
                "DELETE FROM outbox WHERE webhook = ? AND event_id = ?",
                [(webhook, event_id) for event_id in event_ids],
            )

    async def retry_later(
        self,
        webhook: str,
        event_id: int,
        attempts: int,
        next_attempt_at: float,
        error: str,
        rate_limited: int = 0,
    ) -> None:
        with self._transaction() as conn:
            conn.execute(
                "UPDATE outbox SET attempts = ?, next_attempt_at = ?, last_error = ?, "
                "rate_limited = ? WHERE webhook = ? AND event_id = ?",
                (attempts, next_attempt_at, storable(error), rate_limited, webhook, event_id),
            )

    async def dead_letter(
        self, webhook: str, event_id: int, attempts: int, reason: str, now: float | None = None
    ) -> None:
        now = time.time() if now is None else now
        with self._transaction() as conn:
            # The letter first, so the outbox trigger sees the body is still needed.
            conn.execute(
                "INSERT OR REPLACE INTO dead_letters "
                "(webhook, event_id, attempts, reason, failed_at) VALUES (?, ?, ?, ?, ?)",
                (webhook, event_id, attempts, storable(reason), now),
            )
            conn.execute(
                "DELETE FROM outbox WHERE webhook = ? AND event_id = ?", (webhook, event_id)
            )

    async def parts_sent(self, webhook: str, event_id: int) -> frozenset[str]:
        """The requests of a multi-request event already answered 2xx."""
        rows = self._conn.execute(
            "SELECT part FROM parts_sent WHERE webhook = ? AND event_id = ?", (webhook, event_id)
        )
        return frozenset(row[0] for row in rows)

    async def part_sent(self, webhook: str, event_id: int, part: str) -> None:
        """Record one request of an event as answered 2xx (committed at once: its sibling
        requests may be retried for hours, and this one must not be sent again)."""
        crash_point("state.before_commit")
        self._conn.execute(
            "INSERT OR IGNORE INTO parts_sent (webhook, event_id, part) VALUES (?, ?, ?)",
            (webhook, event_id, part),
        )

    async def pending_counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT webhook, count(*) FROM outbox GROUP BY webhook")
        return dict(rows.fetchall())

    async def oldest_pending(self) -> dict[str, float]:
        rows = self._conn.execute("SELECT webhook, min(enqueued_at) FROM outbox GROUP BY webhook")
        return dict(rows.fetchall())

    async def queue(
        self, webhook: str, events: Sequence[tuple[int, str]], now: float | None = None
    ) -> int:
        """Queue events for one webhook again (`redeliver`), whatever the cursor says; an
        event already pending stays as it is. Returns how many were newly queued."""
        now = time.time() if now is None else now
        with self._transaction() as conn:
            conn.executemany("INSERT OR IGNORE INTO events (id, body) VALUES (?, ?)", events)
            before = conn.total_changes
            conn.executemany(
                "INSERT OR IGNORE INTO outbox (webhook, event_id, enqueued_at) VALUES (?, ?, ?)",
                ((webhook, event_id, now) for event_id, _ in events),
            )
            return conn.total_changes - before

    # -- pauses ------------------------------------------------------------------------

    async def pause(self, webhook: str) -> Pause | None:
        row = self._conn.execute(
            "SELECT reason, since, awaits_resume, probe_at, probes FROM pauses WHERE webhook = ?",
            (webhook,),
        ).fetchone()
        return None if row is None else _pause(row)

    async def pauses(self) -> dict[str, Pause]:
        rows = self._conn.execute(
            "SELECT webhook, reason, since, awaits_resume, probe_at, probes FROM pauses"
        )
        return {row[0]: _pause(row[1:]) for row in rows}

    async def set_pause(self, webhook: str, pause: Pause) -> None:
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO pauses "
                "(webhook, reason, since, awaits_resume, probe_at, probes) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    webhook,
                    storable(pause.reason),
                    pause.since,
                    int(pause.awaits_resume),
                    pause.probe_at,  # inf (awaits a resume) is stored as a REAL too
                    pause.probes,
                ),
            )

    async def probe_failed(self, webhook: str, probe_at: float, probes: int) -> bool:
        """Move a pause's next probe; False when there is no pause any more (lifted by
        hand meanwhile, which a probe must not undo)."""
        with self._transaction() as conn:
            cursor = conn.execute(
                "UPDATE pauses SET probe_at = ?, probes = ? WHERE webhook = ?",
                (probe_at, probes, webhook),
            )
            return bool(cursor.rowcount)

    async def resume(self, webhook: str, *, retry_now: bool = False) -> bool:
        """Lift a pause; returns whether there was one. `retry_now` (a resume by hand) makes
        every pending event due at once with its retries afresh."""
        with self._transaction() as conn:
            lifted = conn.execute("DELETE FROM pauses WHERE webhook = ?", (webhook,)).rowcount
            if retry_now:
                conn.execute(
                    "UPDATE outbox SET attempts = 0, rate_limited = 0, next_attempt_at = 0 "
                    "WHERE webhook = ?",
                    (webhook,),
                )
            return bool(lifted)

    # -- attempt log -------------------------------------------------------------------

    async def record_attempts(
        self, records: Sequence[AttemptRecord], keep: Mapping[str, int]
    ) -> None:
        """Append to the attempt log and trim each webhook's part to its last `keep[name]`
        attempts (all in one transaction)."""
        if not records:
            return
        with self._transaction() as conn:
            self._append_attempts(conn, records, keep)

    def _append_attempts(
        self, conn: sqlite3.Connection, records: Sequence[AttemptRecord], keep: Mapping[str, int]
    ) -> None:
        for webhook in dict.fromkeys(r.webhook for r in records):
            # The last number is read once per webhook and then kept: after every few
            # deliveries a read more would cost more than the insert itself.
            seq = self._attempt_seq.get(webhook)
            if seq is None:
                last = conn.execute(
                    "SELECT max(seq) FROM attempt_log WHERE webhook = ?", (webhook,)
                ).fetchone()[0]
                seq = 0 if last is None else int(last)
            rows = []
            for r in records:
                if r.webhook == webhook:
                    seq += 1
                    rows.append(
                        (
                            webhook,
                            seq,
                            r.event_id,
                            r.at,
                            r.attempt,
                            r.status,
                            None if r.error is None else storable(r.error),
                            r.latency_ms,
                            r.outcome,
                        )
                    )
            conn.executemany(
                "INSERT INTO attempt_log (webhook, seq, event_id, at, attempt, status, "
                "error, latency_ms, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            conn.execute(
                "DELETE FROM attempt_log WHERE webhook = ? AND seq <= ?",
                (webhook, seq - keep.get(webhook, 1000)),
            )
            self._attempt_seq[webhook] = seq

    async def attempt_log(
        self, webhook: str | None = None, event_id: int | None = None, last: int | None = None
    ) -> list[AttemptRecord]:
        """Logged attempts, oldest first: the last `last` of those that match."""
        rows = self._conn.execute(
            "SELECT webhook, event_id, at, attempt, status, error, latency_ms, outcome "
            "FROM attempt_log WHERE (?1 IS NULL OR webhook = ?1) AND (?2 IS NULL OR event_id = ?2) "
            "ORDER BY at DESC, webhook DESC, seq DESC LIMIT ?3",
            (webhook, event_id, -1 if last is None else last),
        ).fetchall()
        return [AttemptRecord(*row) for row in reversed(rows)]

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(
        self, webhook: str | None = None, after: int = -1, limit: int = 1000
    ) -> list[DeadLetter]:
        rows = self._conn.execute(
            "SELECT d.webhook, d.event_id, e.body, d.attempts, d.reason, d.failed_at "
            "FROM dead_letters d JOIN events e ON e.id = d.event_id "
            "WHERE (?1 IS NULL OR d.webhook = ?1) AND d.event_id > ?2 "
            "ORDER BY d.event_id, d.webhook LIMIT ?3",
            (webhook, after, limit),
        )
        return [DeadLetter(*row) for row in rows]

    async def dead_letter_counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT webhook, count(*) FROM dead_letters GROUP BY webhook")
        return dict(rows.fetchall())

    async def remove_dead_letter(self, webhook: str, event_id: int) -> None:
        crash_point("state.before_commit")
        self._conn.execute(
            "DELETE FROM dead_letters WHERE webhook = ? AND event_id = ?", (webhook, event_id)
        )

    async def requeue_dead_letters(self, webhook: str | None = None) -> int:
        """Move dead letters back into the outbox for a running daemon to deliver."""
        now = time.time()
        with self._transaction() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO outbox (webhook, event_id, enqueued_at) "
                "SELECT webhook, event_id, ? FROM dead_letters WHERE ?2 IS NULL OR webhook = ?2",
                (now, webhook),
            )
            cursor = conn.execute(
                "DELETE FROM dead_letters WHERE ?1 IS NULL OR webhook = ?1", (webhook,)
            )
            return cursor.rowcount

    # -- moving a state (`state copy`) -------------------------------------------------

    async def is_empty(self) -> bool:
        """No cursor, note, event, outbox row, dead letter, gap, pause, sent part or logged
        attempt: a store nothing can be lost from by copying into it. Staging does not
        count (it is discarded whenever the daemon opens the file)."""
        return not any(
            self._conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone()
            for table in _COPIED_TABLES
        )

    async def export_rows(self) -> StateDump:
        """The whole state, read in one transaction (one consistent snapshot)."""
        conn = self._conn
        conn.execute("BEGIN")
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            dump = StateDump(
                high_water=None if meta.get("high_water") is None else int(meta["high_water"]),
                notes={
                    key.removeprefix("note:"): str(value)
                    for key, value in sorted(meta.items())
                    if key.startswith("note:")
                },
                events=conn.execute("SELECT id, body FROM events ORDER BY id").fetchall(),
                outbox=conn.execute(
                    "SELECT webhook, event_id, attempts, next_attempt_at, last_error, "
                    "enqueued_at, rate_limited FROM outbox ORDER BY webhook, event_id"
                ).fetchall(),
                gaps=[
                    Gap(*row)
                    for row in conn.execute(
                        "SELECT id, missing_since, next_check_at, checks FROM gaps ORDER BY id"
                    )
                ],
                dead_letters=conn.execute(
                    "SELECT webhook, event_id, attempts, reason, failed_at FROM dead_letters "
                    "ORDER BY webhook, event_id"
                ).fetchall(),
                parts_sent=conn.execute(
                    "SELECT webhook, event_id, part FROM parts_sent "
                    "ORDER BY webhook, event_id, part"
                ).fetchall(),
                pauses={
                    row[0]: _pause(row[1:])
                    for row in conn.execute(
                        "SELECT webhook, reason, since, awaits_resume, probe_at, probes "
                        "FROM pauses ORDER BY webhook"
                    )
                },
                attempt_log=[
                    AttemptRecord(*row)
                    for row in conn.execute(
                        "SELECT webhook, event_id, at, attempt, status, error, latency_ms, "
                        "outcome FROM attempt_log ORDER BY webhook, seq"
                    )
                ],
            )
        finally:
            conn.execute("COMMIT")
        return dump

    async def import_rows(self, dump: StateDump) -> None:
        """Write a whole state into this empty store, in one transaction: a failure
        leaves it empty. The attempt log is numbered afresh, in the order it comes."""
        with self._transaction() as conn:
            if dump.high_water is not None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('high_water', ?)", (dump.high_water,)
                )
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                ((f"note:{key}", value) for key, value in dump.notes.items()),
            )
            # Events first: the outbox and the dead letters reference them.
            conn.executemany("INSERT INTO events (id, body) VALUES (?, ?)", dump.events)
            conn.executemany(
                "INSERT INTO outbox (webhook, event_id, attempts, next_attempt_at, last_error, "
                "enqueued_at, rate_limited) VALUES (?, ?, ?, ?, ?, ?, ?)",
                dump.outbox,
            )
            conn.executemany(
                "INSERT INTO gaps (id, missing_since, next_check_at, checks) VALUES (?, ?, ?, ?)",
                ((g.id, g.missing_since, g.next_check_at, g.checks) for g in dump.gaps),
            )
            conn.executemany(
                "INSERT INTO dead_letters (webhook, event_id, attempts, reason, failed_at) "
                "VALUES (?, ?, ?, ?, ?)",
                dump.dead_letters,
            )
            conn.executemany(
                "INSERT INTO parts_sent (webhook, event_id, part) VALUES (?, ?, ?)",
                dump.parts_sent,
            )
            conn.executemany(
                "INSERT INTO pauses (webhook, reason, since, awaits_resume, probe_at, probes) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (
                    (hook, p.reason, p.since, int(p.awaits_resume), p.probe_at, p.probes)
                    for hook, p in dump.pauses.items()
                ),
            )
            seq: dict[str, int] = {}
            rows = []
            for r in dump.attempt_log:
                seq[r.webhook] = seq.get(r.webhook, 0) + 1
                rows.append(
                    (
                        r.webhook,
                        seq[r.webhook],
                        r.event_id,
                        r.at,
                        r.attempt,
                        r.status,
                        r.error,
                        r.latency_ms,
                        r.outcome,
                    )
                )
            conn.executemany(
                "INSERT INTO attempt_log (webhook, seq, event_id, at, attempt, status, "
                "error, latency_ms, outcome) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
        self._attempt_seq.clear()


class IngestBatch:
    """Writes inside an open ingest transaction; `finish` moves the cursor."""

    def __init__(self, conn: sqlite3.Connection, now: float) -> None:
        self._conn = conn
        self._now = now
        self.finished = False

    async def add(self, events: Sequence[tuple[int, str]], owed: Iterable[tuple[str, int]]) -> None:
        self._conn.executemany("INSERT OR IGNORE INTO events (id, body) VALUES (?, ?)", events)
        self._conn.executemany(
            "INSERT OR IGNORE INTO outbox (webhook, event_id, enqueued_at) VALUES (?, ?, ?)",
            ((hook, event_id, self._now) for hook, event_id in owed),
        )

    async def finish(
        self, high_water: int, new_gaps: Iterable[int] = (), settled_gaps: Iterable[int] = ()
    ) -> None:
        conn = self._conn
        conn.executemany("DELETE FROM gaps WHERE id = ?", ((g,) for g in settled_gaps))
        conn.executemany(
            "INSERT OR IGNORE INTO gaps (id, missing_since, next_check_at) VALUES (?, ?, ?)",
            ((g, self._now, self._now) for g in new_gaps),
        )
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('high_water', ?)", (high_water,)
        )
        self.finished = True


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        info = path.stat()
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def _pause(row: Sequence[object]) -> Pause:
    reason, since, awaits_resume, probe_at, probes = row
    return Pause(
        str(reason),
        float(since),  # type: ignore[arg-type]
        bool(awaits_resume),
        float(probe_at),  # type: ignore[arg-type]
        int(probes),  # type: ignore[call-overload]
    )


def _statements(script: str) -> list[str]:
    """Split a script of complete statements (triggers included) for `execute`, which
    unlike `executescript` runs inside the caller's transaction."""
    statements: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            statements.append(current.strip())
            current = ""
    return statements


def _take_lock(path: Path) -> int:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    lock_path = path.with_name(path.name + ".lock")
    try:
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError as exc:
        raise StateError(f"{lock_path}: cannot open lock file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StateLockedError(
            f"{path}: another unleash-poller is running on this state file "
            "(its lock is held); refusing to start a second one"
        ) from None
    return fd


def _connect(path: Path) -> sqlite3.Connection:
    if path.stat().st_size == 0:
        raise StateError(
            f"{path}: state file is empty (truncated?); refusing to start "
            "over. Restore it from a backup, or move it away to start afresh "
            "from start_from"
        )
    try:
        conn = sqlite3.connect(path, isolation_level=None, timeout=5.0, check_same_thread=False)
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise StateError(
            f"{path}: state file is corrupt or not a state file ({exc}); "
            "refusing to start over. Restore it from a backup, or move it "
            "away to start afresh from start_from"
        ) from None
    if app_id != _APP_ID:
        conn.close()
        raise StateError(f"{path}: not an unleash-poller state file; refusing to use it")
    if check != "ok":
        conn.close()
        raise StateError(
            f"{path}: state file failed its integrity check ({check}); "
            "refusing to start over. Restore it from a backup"
        )
    if version != SCHEMA_VERSION and not (0 < version < SCHEMA_VERSION):
        conn.close()
        raise StateError(
            f"{path}: state file has schema version {version}, this "
            f"unleash-poller understands {SCHEMA_VERSION}"
        )
    conn.execute("PRAGMA journal_mode=WAL")
    # WAL + NORMAL survives a process crash with every commit; a power cut may undo the
    # last commits, and since cursor and outbox move together that only causes re-fetching.
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn
