"""Moving a whole state (`state copy`): is it empty, everything as one snapshot saw it,
and everything written into an empty store in one transaction.

These are the state's only statements that may run for long, so they lift the statement
timeout for their own transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, LiteralString

import psycopg

from poller.faults import crash_point
from poller.state.base import AttemptRecord, Gap, StateDump, StateError, storable
from poller.state.postgres.statements import pause_of, storable_body


async def is_empty(conn: psycopg.AsyncConnection[Any]) -> bool:
    row = await (
        await conn.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM meta WHERE key = 'high_water' OR key LIKE 'note:%') "
            "AND NOT EXISTS (SELECT 1 FROM outbox) AND NOT EXISTS (SELECT 1 FROM dead_letters) "
            "AND NOT EXISTS (SELECT 1 FROM gaps)"
        )
    ).fetchone()
    return bool(row and row[0])


async def export_rows(conn: psycopg.AsyncConnection[Any]) -> StateDump:
    """The whole state as one snapshot saw it."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        await conn.execute("SET LOCAL statement_timeout = 0")  # a whole state, read once

        async def rows(query: LiteralString) -> list[tuple[Any, ...]]:
            return await (await conn.execute(query)).fetchall()

        meta = dict(await rows("SELECT key, value FROM meta"))
        high = meta.get("high_water")
        return StateDump(
            high_water=None if high is None else int(high),
            notes={k[len("note:") :]: v for k, v in meta.items() if k.startswith("note:")},
            events=[(int(i), b) for i, b in await rows("SELECT id, body FROM events ORDER BY id")],
            outbox=[
                tuple(r)
                for r in await rows(
                    "SELECT webhook, event_id, attempts, next_attempt_at, last_error, "
                    "enqueued_at, rate_limited FROM outbox ORDER BY webhook, event_id"
                )
            ],
            gaps=[
                Gap(*r)
                for r in await rows(
                    "SELECT id, missing_since, next_check_at, checks FROM gaps ORDER BY id"
                )
            ],
            dead_letters=[
                tuple(r)
                for r in await rows(
                    "SELECT webhook, event_id, attempts, reason, failed_at FROM dead_letters "
                    "ORDER BY webhook, event_id"
                )
            ],
            parts_sent=[
                tuple(r)
                for r in await rows(
                    "SELECT webhook, event_id, part FROM parts_sent "
                    "ORDER BY webhook, event_id, part"
                )
            ],
            pauses={
                r[0]: pause_of(r[1:])
                for r in await rows(
                    "SELECT webhook, reason, since, awaits_resume, probe_at, probes "
                    "FROM pauses ORDER BY webhook"
                )
            },
            attempt_log=[
                AttemptRecord(*r)
                for r in await rows(
                    "SELECT webhook, event_id, at, attempt, status, error, latency_ms, "
                    "outcome FROM attempt_log ORDER BY webhook, seq"
                )
            ],
        )


async def import_rows(
    conn: psycopg.AsyncConnection[Any], dump: StateDump, epoch: int | None, where: str
) -> None:
    """Write a whole state into this empty store, in one transaction (COPY), fenced by
    `epoch`."""
    async with conn.transaction():
        await conn.execute("SELECT fence(%s, true)", (epoch,))
        await conn.execute("SET LOCAL statement_timeout = 0")  # COPY of a whole state
        if not await is_empty(conn):
            raise StateError(f"{where}: not empty; a state is copied only into an empty one")
        seqs: dict[str, int] = {}
        attempts = []
        for r in dump.attempt_log:
            seqs[r.webhook] = seqs.get(r.webhook, 0) + 1
            error = None if r.error is None else storable(r.error)
            attempts.append(
                (r.webhook, seqs[r.webhook], r.event_id, r.at, r.attempt, r.status, error,
                 r.latency_ms, r.outcome)
            )  # fmt: skip
        meta = [(f"note:{k}", v) for k, v in dump.notes.items()]
        if dump.high_water is not None:
            meta.append(("high_water", str(dump.high_water)))
        tables: list[tuple[LiteralString, Iterable[Sequence[Any]]]] = [
            ("meta (key, value)", meta),
            ("events (id, body)", ((i, storable_body(b)) for i, b in dump.events)),
            (
                "outbox (webhook, event_id, attempts, next_attempt_at, last_error, "
                "enqueued_at, rate_limited)",
                (
                    (w, e, a, n, None if err is None else storable(err), q, rl)
                    for w, e, a, n, err, q, rl in dump.outbox
                ),
            ),
            (
                "gaps (id, missing_since, next_check_at, checks)",
                ((g.id, g.missing_since, g.next_check_at, g.checks) for g in dump.gaps),
            ),
            (
                "dead_letters (webhook, event_id, attempts, reason, failed_at)",
                ((w, e, a, storable(r), f) for w, e, a, r, f in dump.dead_letters),
            ),
            ("parts_sent (webhook, event_id, part)", dump.parts_sent),
            (
                "pauses (webhook, reason, since, awaits_resume, probe_at, probes)",
                (
                    (name, storable(p.reason), p.since, p.awaits_resume, p.probe_at, p.probes)
                    for name, p in dump.pauses.items()
                ),
            ),
            (
                "attempt_log (webhook, seq, event_id, at, attempt, status, error, "
                "latency_ms, outcome)",
                attempts,
            ),
        ]
        cursor = conn.cursor()
        for table, table_rows in tables:
            async with cursor.copy("COPY " + table + " FROM STDIN") as copy:
                for row in table_rows:
                    await copy.write_row(row)
        crash_point("state.before_commit")
