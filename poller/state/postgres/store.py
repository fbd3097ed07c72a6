"""The store: the StateStore interface on PostgreSQL, each write fenced by the lease.

Each write is one round trip: the hot ones (delivery and retry marks, the attempt log) are
one statement that carries its fence, the others one pipeline, which PostgreSQL runs as one
implicit transaction committed at its sync; only a catch-up (`ingesting`) is an explicit
transaction across awaits. The ingest's writes go on the ingest's connection (held for a
whole catch-up), everything else on the workers'.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, LiteralString

import psycopg

from poller.config import StateConfig
from poller.faults import crash_point
from poller.schedule import Pause
from poller.state.base import (
    AttemptRecord,
    DeadLetter,
    EventRow,
    Gap,
    Leadership,
    LeaseView,
    Pending,
    StateDump,
    StateError,
    storable,
)
from poller.state.postgres.lease import PostgresLease
from poller.state.postgres.link import Link, Outages, Params, Step
from poller.state.postgres.messages import Diagnosis, where_of
from poller.state.postgres.schema import IDENTIFIER, prepare
from poller.state.postgres.state_copy import export_rows, import_rows, is_empty
from poller.state.postgres.statements import (
    BODY_UNSTORABLE,
    DELIVERED,
    NEXT_PENDING,
    RECORD_ATTEMPTS,
    REMOVE_DEAD_LETTER,
    RETRY_LATER,
    SET_HIGH_WATER,
    add_steps,
    event_columns,
    finish_steps,
    pause_of,
)


class PostgresState:
    """One open PostgreSQL state. Call its coroutines from one event loop."""

    def __init__(self, config: StateConfig, *, lock: bool) -> None:
        assert config.url is not None
        url = config.url.reveal()
        self._schema = config.schema
        self._diagnosis = Diagnosis(config)
        self._where = self._diagnosis.where
        outages = Outages()  # one connection finding the server gone resets them all
        self._lease = PostgresLease(
            Link("lease", url, config.schema, self._diagnosis, outages), self._where, fenced=lock
        )
        self._ingest = Link("ingest", url, config.schema, self._diagnosis, outages)
        self._main = Link("main", url, config.schema, self._diagnosis, outages)
        self._tool_writes: int | None = None
        # Per webhook: the last attempt-log number this store wrote, and the bound of its
        # last trim (nothing at or below it is left).
        self._attempt_seq: dict[str, tuple[int, int]] = {}
        self._state_id: str | None = None

    @classmethod
    async def open(
        cls, config: StateConfig, *, create: bool = True, lock: bool = True
    ) -> PostgresState:
        """Connect, and make the schema and its tables when they are not there yet (with
        `create`). `lock`: a daemon, whose writes wait for the lease (`try_lead`)."""
        if config.url is None:
            raise StateError("state: no PostgreSQL url configured")
        if not IDENTIFIER.fullmatch(config.schema):
            raise StateError(f"{where_of(config)}: schema must be a lower-case SQL identifier")
        store = cls(config, lock=lock)
        try:
            async with store._main.using() as conn:
                store._state_id = await prepare(conn, store._schema, store._where, create=create)
        except BaseException:
            await store.close()
            raise
        return store

    async def _write(
        self, link: Link, steps: Sequence[Step], *, durable: bool = True
    ) -> list[psycopg.AsyncCursor[Any]]:
        return await link.write(steps, self._lease.held_epoch(), durable=durable)

    async def _write_inline(
        self, link: Link, steps: Sequence[tuple[LiteralString, dict[str, Any]]], *, durable: bool
    ) -> list[psycopg.AsyncCursor[Any]]:
        return await link.write_inline(steps, self._lease.held_epoch(), durable=durable)

    async def _rows(self, query: LiteralString, params: Params = ()) -> list[tuple[Any, ...]]:
        return await self._main.rows(query, params)

    async def _value(self, query: LiteralString, params: Params = ()) -> Any:
        rows = await self._rows(query, params)
        return rows[0][0] if rows else None

    # -- the store as a whole ----------------------------------------------------------

    @property
    def where(self) -> str:
        return self._where

    @property
    def leadership(self) -> Leadership | None:
        return self

    async def close(self) -> None:
        for link in (self._lease.link, self._ingest, self._main):
            await link.drop()

    async def check_in_place(self) -> None:
        """Raise StateError when the schema was dropped or made again under the daemon."""
        state_id = await self._value("SELECT value FROM meta WHERE key = 'state_id'")
        if state_id != self._state_id:
            raise StateError(
                f"{self._where}: the state was replaced by another while the daemon ran; stopped"
            )

    async def written_elsewhere(self) -> bool:
        """Whether a tool (a store opened with lock=False) committed since the last call."""
        count = int(await self._value("SELECT value FROM meta WHERE key = 'tool_writes'") or 0)
        changed = self._tool_writes is not None and count != self._tool_writes
        self._tool_writes = count
        return changed

    @property
    def answers_at_once(self) -> bool:
        return False  # every call goes to the server

    def release_memory(self) -> None:
        """Nothing to drop: the page cache is the server's."""

    # -- the lease (the store is its own Leadership) ------------------------------------

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        return await self._lease.try_lead(holder, ttl_s)

    async def resign(self, holder: str) -> None:
        await self._lease.resign(holder)

    async def lease(self) -> LeaseView:
        return await self._lease.view()

    # -- cursor ------------------------------------------------------------------------

    async def high_water(self) -> int | None:
        value = await self._value("SELECT value FROM meta WHERE key = 'high_water'")
        return None if value is None else int(value)

    async def gaps(self) -> list[Gap]:
        rows = await self._rows(
            "SELECT id, missing_since, next_check_at, checks FROM gaps ORDER BY id"
        )
        return [Gap(*row) for row in rows]

    async def ingest(
        self,
        events: Sequence[EventRow],
        owed: Iterable[tuple[str, int]],
        high_water: int,
        new_gaps: Iterable[int] = (),
        settled_gaps: Iterable[int] = (),
        *,
        now: float | None = None,
    ) -> None:
        """Take in events, what each webhook owes, and move the cursor: one transaction,
        one round trip."""
        now = time.time() if now is None else now
        await self._write(
            self._ingest,
            [
                *add_steps(events, owed, now),
                *finish_steps(high_water, new_gaps, settled_gaps, now),
            ],
        )

    @contextlib.asynccontextmanager
    async def ingesting(self, *, now: float | None = None) -> AsyncIterator[PostgresIngestBatch]:
        """One transaction for a catch-up too long to hold in memory; the lease row stays
        locked FOR KEY SHARE until it commits, so a takeover waits for it."""
        epoch = self._lease.held_epoch()
        async with self._ingest.using() as conn, conn.transaction():
            await conn.execute("SELECT fence(%s, true)", (epoch,))
            batch = PostgresIngestBatch(conn, time.time() if now is None else now)
            yield batch
            if not batch.finished:
                raise RuntimeError("ingest transaction ended without moving the cursor")
            crash_point("state.before_commit")

    async def set_cursor(self, high_water: int) -> None:
        await self._write(
            self._ingest, [("DELETE FROM gaps", ()), (SET_HIGH_WATER, (str(high_water),))]
        )

    async def reschedule_gaps(self, gap_ids: Iterable[int], next_check_at: float) -> None:
        await self._write(
            self._ingest,
            [
                (
                    "UPDATE gaps SET next_check_at = %s, checks = checks + 1 "
                    "WHERE id = ANY(%b::bigint[])",
                    (next_check_at, list(gap_ids)),
                )
            ],
        )

    async def give_up_gaps(self, gap_ids: Iterable[int]) -> None:
        await self._write(
            self._ingest, [("DELETE FROM gaps WHERE id = ANY(%b::bigint[])", (list(gap_ids),))]
        )

    async def saved_text(self, key: str) -> str | None:
        value = await self._value("SELECT value FROM meta WHERE key = %s", (f"note:{key}",))
        return value if isinstance(value, str) else None

    async def save_text(self, key: str, value: str) -> None:
        if BODY_UNSTORABLE.search(value):
            raise ValueError(f"note {key!r}: PostgreSQL text cannot hold NUL or a lone surrogate")
        await self._write(
            self._ingest,
            [
                (
                    "INSERT INTO meta (key, value) VALUES (%s, %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (f"note:{key}", value),
                )
            ],
        )

    # -- staging -----------------------------------------------------------------------

    async def stage(self, events: Sequence[EventRow]) -> None:
        await self._write(
            self._ingest,
            [
                (
                    "INSERT INTO staging (id, body) SELECT * FROM unnest(%b::bigint[], %b::text[]) "
                    "ON CONFLICT DO NOTHING",
                    event_columns(events),
                )
            ],
        )

    async def staged(self, batch: int = 1000) -> AsyncIterator[list[EventRow]]:
        """Staged events in id order, a batch at a time. Read on the workers' connection:
        the ingest's is busy with the transaction that takes them in."""
        last = -1
        while True:
            rows = await self._rows(
                "SELECT id, body FROM staging WHERE id > %s ORDER BY id LIMIT %s", (last, batch)
            )
            if not rows:
                return
            yield [(int(i), str(body)) for i, body in rows]
            last = rows[-1][0]

    async def clear_staging(self) -> None:
        await self._write(self._ingest, [("DELETE FROM staging", ())])

    # -- outbox ------------------------------------------------------------------------

    async def next_pending(self, webhook: str, limit: int, after: int = -1) -> list[Pending]:
        rows = await self._rows(NEXT_PENDING, {"w": webhook, "after": after, "n": limit})
        return [Pending(*row) for row in rows]

    async def delivered(self, webhook: str, *event_ids: int) -> None:
        """Mark events delivered, dropping the bodies nobody owes any more: one statement."""
        if not event_ids:
            return
        await self._write_inline(
            self._main, [(DELIVERED, {"w": webhook, "ids": list(event_ids)})], durable=False
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
        params = {"a": attempts, "at": next_attempt_at, "error": storable(error)}
        params |= {"rl": rate_limited, "w": webhook, "e": event_id}
        await self._write_inline(self._main, [(RETRY_LATER, params)], durable=False)

    async def dead_letter(
        self, webhook: str, event_id: int, attempts: int, reason: str, now: float | None = None
    ) -> None:
        now = time.time() if now is None else now
        await self._write(
            self._main,
            [
                # The letter keeps the body and the parts sent, so only the row goes.
                (
                    "INSERT INTO dead_letters (webhook, event_id, attempts, reason, failed_at) "
                    "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (webhook, event_id) DO UPDATE "
                    "SET attempts = excluded.attempts, reason = excluded.reason, "
                    "failed_at = excluded.failed_at",
                    (webhook, event_id, attempts, storable(reason), now),
                ),
                (
                    "DELETE FROM outbox WHERE webhook = %s AND event_id = %s",
                    (webhook, event_id),
                ),
            ],
        )

    async def parts_sent(self, webhook: str, event_id: int) -> frozenset[str]:
        rows = await self._rows(
            "SELECT part FROM parts_sent WHERE webhook = %s AND event_id = %s",
            (webhook, event_id),
        )
        return frozenset(row[0] for row in rows)

    async def part_sent(self, webhook: str, event_id: int, part: str) -> None:
        await self._write(
            self._main,
            [
                (
                    "INSERT INTO parts_sent (webhook, event_id, part) VALUES (%s, %s, %s) "
                    "ON CONFLICT DO NOTHING",
                    (webhook, event_id, part),
                )
            ],
        )

    async def pending_counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT webhook, count(*) FROM outbox GROUP BY webhook")
        return {name: int(count) for name, count in rows}

    async def oldest_pending(self) -> dict[str, float]:
        rows = await self._rows("SELECT webhook, min(enqueued_at) FROM outbox GROUP BY webhook")
        return {name: float(oldest) for name, oldest in rows}

    async def queue(
        self, webhook: str, events: Sequence[EventRow], now: float | None = None
    ) -> int:
        """Queue events for one webhook again (`redeliver`); returns how many were newly
        queued (one already pending stays as it is)."""
        now = time.time() if now is None else now
        owed = [(webhook, event_id) for event_id, _ in events]
        cursors = await self._write(self._main, list(add_steps(events, owed, now)))
        return max(cursors[1].rowcount, 0)

    # -- pauses ------------------------------------------------------------------------

    async def pause(self, webhook: str) -> Pause | None:
        rows = await self._rows(
            "SELECT reason, since, awaits_resume, probe_at, probes FROM pauses WHERE webhook = %s",
            (webhook,),
        )
        return pause_of(rows[0]) if rows else None

    async def pauses(self) -> dict[str, Pause]:
        rows = await self._rows(
            "SELECT webhook, reason, since, awaits_resume, probe_at, probes FROM pauses"
        )
        return {row[0]: pause_of(row[1:]) for row in rows}

    async def set_pause(self, webhook: str, pause: Pause) -> None:
        await self._write(
            self._main,
            [
                (
                    "INSERT INTO pauses (webhook, reason, since, awaits_resume, probe_at, probes) "
                    "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (webhook) DO UPDATE SET "
                    "reason = excluded.reason, since = excluded.since, "
                    "awaits_resume = excluded.awaits_resume, probe_at = excluded.probe_at, "
                    "probes = excluded.probes",
                    (
                        webhook,
                        storable(pause.reason),
                        pause.since,
                        pause.awaits_resume,
                        pause.probe_at,  # inf (awaits a resume) is a double precision too
                        pause.probes,
                    ),
                )
            ],
        )

    async def probe_failed(self, webhook: str, probe_at: float, probes: int) -> bool:
        """Move a pause's next probe; False when the pause was lifted meanwhile."""
        [cursor] = await self._write(
            self._main,
            [
                (
                    "UPDATE pauses SET probe_at = %s, probes = %s WHERE webhook = %s",
                    (probe_at, probes, webhook),
                )
            ],
        )
        return cursor.rowcount > 0

    async def resume(self, webhook: str, *, retry_now: bool = False) -> bool:
        """Lift a pause; `retry_now` makes every pending event due with its retries afresh."""
        steps: list[Step] = [("DELETE FROM pauses WHERE webhook = %s", (webhook,))]
        if retry_now:
            steps.append(
                (
                    "UPDATE outbox SET attempts = 0, rate_limited = 0, next_attempt_at = 0 "
                    "WHERE webhook = %s",
                    (webhook,),
                )
            )
        cursors = await self._write(self._main, steps)
        return cursors[0].rowcount > 0

    # -- attempt log -------------------------------------------------------------------

    async def record_attempts(
        self, records: Sequence[AttemptRecord], keep: Mapping[str, int]
    ) -> None:
        """Append to the attempt log and trim each webhook's part to its last `keep[name]`
        attempts, all in one transaction (one statement per webhook). The number each
        webhook's log reached is kept from one call to the next, as the SQLite store does;
        a webhook another writer logged to meanwhile is written again after reading it."""
        if not records:
            return
        hooks = list(dict.fromkeys(r.webhook for r in records))
        while hooks:
            steps = [self._attempt_step(records, hook, keep) for hook in hooks]
            cursors = await self._write_inline(self._main, steps, durable=False)
            stale = []
            for hook, (_, params), cursor in zip(hooks, steps, cursors, strict=True):
                row = await cursor.fetchone()
                assert row is not None
                base, written = int(row[0]), bool(row[1])
                if not written:
                    stale.append(hook)
                    self._attempt_seq.pop(hook, None)
                    continue
                top = base + params["count"]
                self._attempt_seq[hook] = (top, max(top - params["keep"], 0))
            hooks = stale

    def _attempt_step(
        self, records: Sequence[AttemptRecord], webhook: str, keep: Mapping[str, int]
    ) -> tuple[LiteralString, dict[str, Any]]:
        mine = [r for r in records if r.webhook == webhook]
        known = self._attempt_seq.get(webhook)
        params: dict[str, Any] = {"w": webhook, "count": len(mine)}
        params["base"], params["floor"] = known if known is not None else (None, 0)
        params["keep"] = keep.get(webhook, 1000)
        params["event_id"] = [r.event_id for r in mine]
        params["at"] = [r.at for r in mine]
        params["attempt"] = [r.attempt for r in mine]
        params["status"] = [r.status for r in mine]
        params["error"] = [None if r.error is None else storable(r.error) for r in mine]
        params["latency_ms"] = [r.latency_ms for r in mine]
        params["outcome"] = [r.outcome for r in mine]
        return RECORD_ATTEMPTS, params

    async def attempt_log(
        self, webhook: str | None = None, event_id: int | None = None, last: int | None = None
    ) -> list[AttemptRecord]:
        """Logged attempts, oldest first: the last `last` of those that match."""
        rows = await self._rows(
            "SELECT webhook, event_id, at, attempt, status, error, latency_ms, outcome "
            "FROM attempt_log WHERE (%(w)s::text IS NULL OR webhook = %(w)s) "
            "AND (%(e)s::bigint IS NULL OR event_id = %(e)s) "
            "ORDER BY at DESC, webhook DESC, seq DESC LIMIT %(n)s",
            {"w": webhook, "e": event_id, "n": last},
        )
        return [AttemptRecord(*row) for row in reversed(rows)]

    # -- dead letters ------------------------------------------------------------------

    async def dead_letters(
        self, webhook: str | None = None, after: int = -1, limit: int = 1000
    ) -> list[DeadLetter]:
        rows = await self._rows(
            "SELECT d.webhook, d.event_id, e.body, d.attempts, d.reason, d.failed_at "
            "FROM dead_letters d JOIN events e ON e.id = d.event_id "
            "WHERE (%(w)s::text IS NULL OR d.webhook = %(w)s) AND d.event_id > %(a)s "
            "ORDER BY d.event_id, d.webhook LIMIT %(n)s",
            {"w": webhook, "a": after, "n": limit},
        )
        return [DeadLetter(*row) for row in rows]

    async def dead_letter_counts(self) -> dict[str, int]:
        rows = await self._rows("SELECT webhook, count(*) FROM dead_letters GROUP BY webhook")
        return {name: int(count) for name, count in rows}

    async def remove_dead_letter(self, webhook: str, event_id: int) -> None:
        await self._write_inline(
            self._main, [(REMOVE_DEAD_LETTER, {"w": webhook, "e": event_id})], durable=True
        )

    async def requeue_dead_letters(self, webhook: str | None = None) -> int:
        """Move dead letters back into the outbox (bodies and parts sent stay); returns how
        many."""
        cursors = await self._write(
            self._main,
            [
                (
                    "INSERT INTO outbox (webhook, event_id, enqueued_at) "
                    "SELECT webhook, event_id, %(now)s FROM dead_letters "
                    "WHERE %(w)s::text IS NULL OR webhook = %(w)s ON CONFLICT DO NOTHING",
                    {"now": time.time(), "w": webhook},
                ),
                (
                    "DELETE FROM dead_letters WHERE %(w)s::text IS NULL OR webhook = %(w)s",
                    {"w": webhook},
                ),
            ],
        )
        return max(cursors[1].rowcount, 0)

    # -- moving a state (`state copy`) -------------------------------------------------

    async def is_empty(self) -> bool:
        async with self._main.using() as conn:
            return await is_empty(conn)

    async def export_rows(self) -> StateDump:
        async with self._main.using() as conn:
            return await export_rows(conn)

    async def import_rows(self, dump: StateDump) -> None:
        epoch = self._lease.held_epoch()
        self._attempt_seq.clear()  # the log is the dump's now
        async with self._main.using() as conn:
            await import_rows(conn, dump, epoch, self._where)


class PostgresIngestBatch:
    """Writes inside an open ingest transaction; `finish` moves the cursor."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], now: float) -> None:
        self._conn = conn
        self._now = now
        self.finished = False

    async def _run(self, steps: Iterable[Step]) -> None:
        # One statement at a time, not a pipeline: after a psycopg pipeline PostgreSQL 15
        # does not arm idle_in_transaction_session_timeout (seen: the session outlives
        # it; after a plain statement it is ended), so a leader gone silent mid-catch-up
        # would hold the lease row until the server's keepalives noticed. A round trip
        # or two per batch of events costs nothing that matters.
        for query, params in steps:
            await self._conn.execute(query, params)

    async def add(self, events: Sequence[EventRow], owed: Iterable[tuple[str, int]]) -> None:
        await self._run(add_steps(events, owed, self._now))

    async def finish(
        self, high_water: int, new_gaps: Iterable[int] = (), settled_gaps: Iterable[int] = ()
    ) -> None:
        await self._run(finish_steps(high_water, new_gaps, settled_gaps, self._now))
        self.finished = True
