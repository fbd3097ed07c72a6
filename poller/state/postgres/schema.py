"""The state's schema: its tables and the fence, made at the first start, and its version.

Everything lives in one schema (`[state] schema`). Two daemons starting at once make it
once, under an advisory lock. Every write's first step is `fence()`: it takes the lease row
FOR KEY SHARE and refuses (SQLSTATE UP001) unless the row still carries the writer's epoch.
"""

from __future__ import annotations

import re
import zlib
from typing import Any

import psycopg
from psycopg import errors, sql

from poller.state.base import StateError

SCHEMA_VERSION = 1
_LOCK_CLASS = 0x554E4C50  # "UNLP": advisory-lock class of the schema creation
IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")

_TABLES = """
CREATE TABLE {s}.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE {s}.lease (
    singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    holder text,
    epoch bigint NOT NULL DEFAULT 0,
    expires_at timestamptz
);
CREATE TABLE {s}.events (id bigint PRIMARY KEY, body text NOT NULL);
CREATE TABLE {s}.outbox (
    webhook text NOT NULL,
    event_id bigint NOT NULL REFERENCES {s}.events (id),
    attempts integer NOT NULL DEFAULT 0,
    next_attempt_at double precision NOT NULL DEFAULT 0,
    last_error text,
    enqueued_at double precision NOT NULL,
    rate_limited integer NOT NULL DEFAULT 0,
    PRIMARY KEY (webhook, event_id)
);
-- "is this event still owed to anyone?" runs after every delivery.
CREATE INDEX outbox_event ON {s}.outbox (event_id);
CREATE TABLE {s}.gaps (
    id bigint PRIMARY KEY,
    missing_since double precision NOT NULL,
    next_check_at double precision NOT NULL,
    checks integer NOT NULL DEFAULT 0
);
CREATE TABLE {s}.dead_letters (
    webhook text NOT NULL,
    event_id bigint NOT NULL REFERENCES {s}.events (id),
    attempts integer NOT NULL,
    reason text NOT NULL,
    failed_at double precision NOT NULL,
    PRIMARY KEY (webhook, event_id)
);
CREATE INDEX dead_letters_event ON {s}.dead_letters (event_id);
CREATE TABLE {s}.staging (id bigint PRIMARY KEY, body text NOT NULL);
CREATE TABLE {s}.pauses (
    webhook text PRIMARY KEY,
    reason text NOT NULL,
    since double precision NOT NULL,
    awaits_resume boolean NOT NULL,
    probe_at double precision NOT NULL,
    probes integer NOT NULL DEFAULT 0
);
CREATE TABLE {s}.attempt_log (
    webhook text NOT NULL,
    seq bigint NOT NULL,
    event_id bigint NOT NULL,
    at double precision NOT NULL,
    attempt integer NOT NULL,
    status integer,
    error text,
    latency_ms double precision,
    outcome text NOT NULL,
    PRIMARY KEY (webhook, seq)
);
CREATE TABLE {s}.parts_sent (
    webhook text NOT NULL,
    event_id bigint NOT NULL,
    part text NOT NULL,
    PRIMARY KEY (webhook, event_id, part)
);
-- Every write's first statement. `held` NULL: a tool beside the daemon, unfenced.
CREATE FUNCTION {s}.fence(held bigint, durable boolean) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    current_epoch bigint;
BEGIN
    IF NOT durable THEN
        PERFORM set_config('synchronous_commit', 'off', true);
    END IF;
    IF held IS NULL THEN
        UPDATE {s}.meta SET value = (value::bigint + 1)::text WHERE key = 'tool_writes';
        RETURN true;
    END IF;
    SELECT epoch INTO current_epoch FROM {s}.lease FOR KEY SHARE;
    IF current_epoch IS DISTINCT FROM held THEN
        RAISE EXCEPTION 'the lease has epoch %, this daemon''s is %', current_epoch, held
            USING ERRCODE = 'UP001';
    END IF;
    RETURN true;
END $$;
INSERT INTO {s}.lease DEFAULT VALUES;
INSERT INTO {s}.meta (key, value) VALUES
    ('schema_version', {version}), ('state_id', gen_random_uuid()::text), ('tool_writes', '0');
"""


async def prepare(
    conn: psycopg.AsyncConnection[Any], schema: str, where: str, *, create: bool
) -> str | None:
    """Check the database and the state in `schema` (making it, with `create`, when it is
    not there yet); returns the state's id."""
    # Bodies are any Unicode; another encoding fails on the first character outside it, as
    # a driver error in the middle of an ingest.
    encoding = await (await conn.execute("SHOW server_encoding")).fetchone()
    if encoding is None or encoding[0] != "UTF8":
        name = "unknown" if encoding is None else encoding[0]
        raise StateError(
            f"{where}: the database has encoding {name}; the state needs a "
            "UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')"
        )
    if not await _has_tables(conn, schema, where):
        if not create:
            raise StateError(f"{where}: no unleash-poller state here (has the daemon run yet?)")
        await _create(conn, schema, where)
    rows = await (
        await conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('schema_version', 'state_id')"
        )
    ).fetchall()
    meta = dict(rows)
    version = int(meta.get("schema_version", 0))
    if version != SCHEMA_VERSION:
        raise StateError(
            f"{where}: state has schema version {version}, this unleash-poller "
            f"understands {SCHEMA_VERSION}; run the version that wrote it"
        )
    return meta.get("state_id")


async def _has_tables(conn: psycopg.AsyncConnection[Any], schema: str, where: str) -> bool:
    # A catalog query, not to_regclass: the name cache of a session that looked before
    # another daemon made the tables would still answer "not there".
    row = await (
        await conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = %(s)s "
            "AND tablename = 'meta'), (SELECT has_schema_privilege(oid, 'USAGE') "
            "FROM pg_namespace WHERE nspname = %(s)s)",
            {"s": schema},
        )
    ).fetchone()
    if row is not None and row[0] and not row[1]:
        # Without USAGE the schema is silently left out of the search path.
        raise StateError(
            f"{where}: permission denied for schema {schema}; grant the "
            f"role USAGE and CREATE on schema {schema}"
        )
    return bool(row and row[0])


async def _create(conn: psycopg.AsyncConnection[Any], schema: str, where: str) -> None:
    """Make the schema (unless it is there) and the tables, under an advisory lock so that
    two daemons starting at once do not both try."""
    name = sql.Identifier(schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(%s, %s)",
            (_LOCK_CLASS, _signed32(zlib.crc32(schema.encode()))),
        )
        if await _has_tables(conn, schema, where):
            return  # the other daemon made them while this one waited
        exists = await (
            await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,))
        ).fetchone()
        if exists is None:
            try:
                await conn.execute(sql.SQL("CREATE SCHEMA {}").format(name))
            except errors.InsufficientPrivilege:
                raise StateError(
                    f"{where}: cannot create schema {schema}: permission "
                    f"denied; grant the role CREATE on database {conn.info.dbname}, or "
                    "create the schema for it (owned by the role)"
                ) from None
        try:
            await conn.execute(
                sql.SQL(_TABLES).format(s=name, version=sql.Literal(str(SCHEMA_VERSION)))
            )
        except errors.InsufficientPrivilege:
            raise StateError(
                f"{where}: cannot create the state's tables: permission denied; "
                f"grant the role USAGE and CREATE on schema {schema}"
            ) from None


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value
