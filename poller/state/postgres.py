"""Durable state in PostgreSQL, shared by several daemons of which one leads under a lease.

Everything lives in one schema (`[state] schema`), made with its tables at the first start.
The same guarantees as the SQLite file hold (see `base`), and one more: a daemon that lost
the lease commits nothing. Every write of a leading store runs in one transaction with
`fence()`, which takes the lease row FOR KEY SHARE and refuses (SQLSTATE UP001 →
FencedError) unless the row still carries the store's epoch. A takeover first locks that
row FOR UPDATE, which waits for every write already holding it; so a write that began
before the takeover commits before the epoch moves, and any later one is refused. A
renewal changes no key column, so it takes a weaker lock and never waits behind a long
ingest. A store opened with `lock=False` (a tool beside the daemon) writes unfenced and
bumps a counter the daemon reads in `written_elsewhere`.

Durability: the cursor, an ingest, staging, dead letters, pauses, notes and the lease
commit with the server's synchronous_commit (raised to `on` when the server's default is
`off`). Delivery marks, retry marks and the attempt log commit with synchronous_commit=off:
PostgreSQL may lose the last few hundred milliseconds of them in a crash of the server
(never of this process), which re-sends those events: the duplicate SQLite's
synchronous=NORMAL allows too, and it spares a WAL flush on every delivery.

Connections: three, each behind an asyncio.Lock so that concurrent callers never put
statements into one another's transaction: the lease's (a renewal never queues behind
anything), the ingest's (held for a whole catch-up transaction), and one for everything
else (the workers). Each write is one round trip: the hot ones (delivery and retry marks,
the attempt log) are one statement that carries its fence, the others one pipeline, which
PostgreSQL runs as one implicit transaction committed at its sync; only a catch-up
(`ingesting`) is an explicit transaction across awaits. A lost connection raises
StateUnavailableError and is dropped; the next call connects again.

The lease's holder is the daemon's `node:pid`: a store that asks under the holder already
in the row but does not know its epoch (the same daemon, reopened) takes it over at once
with the epoch raised, which fences whatever that earlier store might still write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import zlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any, LiteralString
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg import errors, sql
from psycopg.pq import TransactionStatus

from poller.config import StateConfig
from poller.faults import crash_point
from poller.schedule import Pause
from poller.state.base import (
    AttemptRecord,
    DeadLetter,
    EventRow,
    FencedError,
    Gap,
    Leadership,
    LeaseView,
    Pending,
    StateDump,
    StateError,
    StateUnavailableError,
    storable,
)

SCHEMA_VERSION = 1
_FENCED = "UP001"  # the SQLSTATE fence() raises
_LOCK_CLASS = 0x554E4C50  # "UNLP": advisory-lock class of the schema creation
_CONNECT_TIMEOUT_S = 10
# No statement waits longer (a lock held behind the daemon's back, a server too slow to
# answer): it fails as transient and the daemon retries, rather than hanging a worker or
# the lease keeper. A dead peer is noticed sooner by the keepalives and tcp_user_timeout.
# `state copy` lifts it for its own long statements.
_STATEMENT_TIMEOUT_S = 30.0
# SQLSTATEs that mean "try again later", beyond the connection errors (class 08, 57P0x,
# which psycopg raises as OperationalError): a deadlock or serialization failure, a lock
# wait that timed out, a server that became a read-only standby (failover).
_TRANSIENT = frozenset({"40001", "40P01", "55P03", "25006", "57014"})
# Connection failures that waiting will not cure: say so and exit, not retry forever.
_PERMANENT_CONNECT = (
    "password authentication failed",
    "authentication failed",
    "does not exist",
    "permission denied",
    "no pg_hba.conf entry",
    "invalid",
    "certificate",
)
# psycopg warns through the standard logging module (which the daemon does not set up, so
# it would print a bare line to stderr) when ending a pipeline on a connection that just
# died; the same failure is raised as StateUnavailableError, logged by the daemon.
logging.getLogger("psycopg").setLevel(logging.ERROR)
# Query parameters of the URL that hold a secret: the server password, and the passphrase
# of the client's TLS key.
_PASSWORD_KEYS = frozenset({"password", "sslpassword"})
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_BODY_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")

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

_LEASE_COLUMNS = (
    "holder, epoch, coalesce(extract(epoch FROM expires_at - clock_timestamp()), 0)::float8"
)
_NEXT_PENDING = (
    "SELECT o.webhook, o.event_id, e.body, o.attempts, o.next_attempt_at, o.enqueued_at, "
    "o.rate_limited FROM outbox o JOIN events e ON e.id = o.event_id "
    "WHERE o.webhook = %s AND o.event_id > %s ORDER BY o.event_id LIMIT %s"
)
# Arrays go in binary (%b): the text form escapes every quote of every JSON body with a
# regular expression, which cost ~50 µs of CPU per event taken in.
_INSERT_EVENTS = (
    "INSERT INTO events (id, body) SELECT * FROM unnest(%b::bigint[], %b::text[]) "
    "ON CONFLICT DO NOTHING"
)
_INSERT_OWED = (
    "INSERT INTO outbox (webhook, event_id, enqueued_at) "
    "SELECT w, e, %s FROM unnest(%b::text[], %b::bigint[]) AS o (w, e) ON CONFLICT DO NOTHING"
)
_SET_HIGH_WATER = (
    "INSERT INTO meta (key, value) VALUES ('high_water', %s) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

# Statements that carry their own fence: a scalar sub-select without references to the
# rows becomes a one-time filter, run once before anything is touched (so even when no row
# matches). One statement is one round trip with no pipeline to set up, which matters on
# the paths run for every few deliveries.
_FENCE: LiteralString = "(SELECT fence(%(epoch)s, %(durable)s))"
# An event's body is kept while any webhook owes it or holds it as a dead letter, the parts
# of an event sent already while its webhook does. The statement's snapshot still shows the
# rows its first part deletes, hence "another webhook's" in the checks.
_DELIVERED: LiteralString = (
    "WITH gone AS (DELETE FROM outbox WHERE " + _FENCE + " AND webhook = %(w)s "
    "              AND event_id = ANY(%(ids)b::bigint[]) RETURNING event_id), "
    "parts AS (DELETE FROM parts_sent p USING gone g "
    "          WHERE p.webhook = %(w)s AND p.event_id = g.event_id AND NOT EXISTS "
    "          (SELECT 1 FROM dead_letters d WHERE d.webhook = %(w)s AND d.event_id = g.event_id)) "
    "DELETE FROM events e USING gone g WHERE e.id = g.event_id "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id AND o.webhook <> %(w)s) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id)"
)
_REMOVE_DEAD_LETTER: LiteralString = (
    "WITH gone AS (DELETE FROM dead_letters WHERE " + _FENCE + " AND webhook = %(w)s "
    "              AND event_id = %(e)s RETURNING event_id), "
    "parts AS (DELETE FROM parts_sent p USING gone g "
    "          WHERE p.webhook = %(w)s AND p.event_id = g.event_id AND NOT EXISTS "
    "          (SELECT 1 FROM outbox o WHERE o.webhook = %(w)s AND o.event_id = g.event_id)) "
    "DELETE FROM events e USING gone g WHERE e.id = g.event_id "
    "AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.event_id = e.id) "
    "AND NOT EXISTS (SELECT 1 FROM dead_letters d WHERE d.event_id = e.id AND d.webhook <> %(w)s)"
)
# Appends a webhook's attempts numbered on from its highest (so a new leader continues the
# old one's log) and trims its part to the last %(keep)s: of the new ones only that many
# are written, and the old ones below the new highest minus %(keep)s go.
_RECORD_ATTEMPTS: LiteralString = (
    "WITH base AS (SELECT coalesce(max(seq), 0) AS seq FROM attempt_log "
    "              WHERE " + _FENCE + " AND webhook = %(w)s), "
    "ins AS (INSERT INTO attempt_log (webhook, seq, event_id, at, attempt, status, error, "
    "                                 latency_ms, outcome) "
    "        SELECT %(w)s, base.seq + r.n, r.event_id, r.at, r.attempt, r.status, r.error, "
    "               r.latency_ms, r.outcome "
    "        FROM base, unnest(%(event_id)b::bigint[], %(at)b::float8[], %(attempt)b::int[], "
    "                          %(status)b::int[], %(error)b::text[], %(latency_ms)b::float8[], "
    "                          %(outcome)b::text[]) "
    "        WITH ORDINALITY AS r (event_id, at, attempt, status, error, latency_ms, outcome, n) "
    "        WHERE r.n > %(count)s - %(keep)s "
    "        RETURNING seq) "
    "DELETE FROM attempt_log WHERE webhook = %(w)s "
    "AND seq <= (SELECT base.seq FROM base) + %(count)s - %(keep)s"
)
_RETRY_LATER: LiteralString = (
    "UPDATE outbox SET attempts = %(a)s, next_attempt_at = %(at)s, last_error = %(error)s, "
    "rate_limited = %(rl)s WHERE " + _FENCE + " AND webhook = %(w)s AND event_id = %(e)s"
)

Params = Sequence[Any] | Mapping[str, Any]
Step = tuple[LiteralString, Params]


def where_of(config: StateConfig) -> str:
    """The store as messages name it: the URL with its password masked, and the schema."""
    assert config.url is not None
    return f"{_redacted(config.url.reveal())} (schema {config.schema})"


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc
    if "@" in netloc:
        user_info, _, host = netloc.rpartition("@")
        user = user_info.partition(":")[0]
        netloc = f"{user}:***@{host}" if ":" in user_info else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = [
            (key, "***" if key in _PASSWORD_KEYS else value)
            for key, value in parse_qsl(query, keep_blank_values=True)
        ]
        query = urlencode(pairs, safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def _secrets_of(url: str) -> list[str]:
    """The password as it may appear in a driver's message: raw, encoded or decoded."""
    parts = urlsplit(url)
    found = [parts.password or ""]
    found += [value for key, value in parse_qsl(parts.query) if key in _PASSWORD_KEYS]
    spelled = {v for s in found if s for v in (s, unquote(s), quote(s, safe=""))}
    return sorted(spelled, key=len, reverse=True)


def _storable_body(body: str) -> str:
    """An event's JSON text as PostgreSQL can hold it. Text there cannot carry NUL or a
    lone surrogate; both can only stand inside a JSON string, where the `\\uXXXX` escape
    ingest writes for them means the same value (as JSON.stringify writes it)."""
    if body.isascii() and "\x00" not in body:
        return body
    return _BODY_UNSTORABLE.sub(lambda m: f"\\u{ord(m.group()):04x}", body)


class _Link:
    """One connection, made on first use and dropped when it fails, behind a lock."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection[Any] | None = None

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()


class PostgresState:
    """One open PostgreSQL state. Call its coroutines from one event loop."""

    def __init__(self, config: StateConfig, *, lock: bool) -> None:
        assert config.url is not None
        self._url = config.url.reveal()
        self._schema = config.schema
        self._where = where_of(config)
        self._secrets = _secrets_of(self._url)
        self._fenced = lock
        self._epoch: int | None = None  # the lease epoch this store leads under
        self._lease = _Link("lease")
        self._ingest = _Link("ingest")
        self._main = _Link("main")
        self._tool_writes: int | None = None
        self._state_id: str | None = None

    # -- opening -----------------------------------------------------------------------

    @classmethod
    async def open(
        cls, config: StateConfig, *, create: bool = True, lock: bool = True
    ) -> PostgresState:
        """Connect, and make the schema and its tables when they are not there yet (with
        `create`). `lock`: a daemon, whose writes wait for the lease (`try_lead`)."""
        if config.url is None:
            raise StateError("state: no PostgreSQL url configured")
        if not _IDENTIFIER.fullmatch(config.schema):
            raise StateError(f"{where_of(config)}: schema must be a lower-case SQL identifier")
        store = cls(config, lock=lock)
        try:
            await store._prepare(create)
        except BaseException:
            await store.close()
            raise
        return store

    async def _prepare(self, create: bool) -> None:
        async with self._using(self._main) as conn:
            # Bodies are any Unicode; another encoding fails on the first character outside
            # it, as a driver error in the middle of an ingest.
            encoding = await (await conn.execute("SHOW server_encoding")).fetchone()
            if encoding is None or encoding[0] != "UTF8":
                name = "unknown" if encoding is None else encoding[0]
                raise StateError(
                    f"{self._where}: the database has encoding {name}; the state needs a "
                    "UTF8 database (CREATE DATABASE ... ENCODING 'UTF8')"
                )
            if not await self._has_tables(conn):
                if not create:
                    raise StateError(
                        f"{self._where}: no unleash-poller state here (has the daemon run yet?)"
                    )
                await self._create(conn)
            rows = await (
                await conn.execute(
                    "SELECT key, value FROM meta WHERE key IN ('schema_version', 'state_id')"
                )
            ).fetchall()
        meta = dict(rows)
        version = int(meta.get("schema_version", 0))
        if version != SCHEMA_VERSION:
            raise StateError(
                f"{self._where}: state has schema version {version}, this unleash-poller "
                f"understands {SCHEMA_VERSION}; run the version that wrote it"
            )
        self._state_id = meta.get("state_id")

    async def _has_tables(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        # A catalog query, not to_regclass: the name cache of a session that looked before
        # another daemon made the tables would still answer "not there".
        row = await (
            await conn.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_tables WHERE schemaname = %(s)s "
                "AND tablename = 'meta'), (SELECT has_schema_privilege(oid, 'USAGE') "
                "FROM pg_namespace WHERE nspname = %(s)s)",
                {"s": self._schema},
            )
        ).fetchone()
        if row is not None and row[0] and not row[1]:
            # Without USAGE the schema is silently left out of the search path.
            raise StateError(
                f"{self._where}: permission denied for schema {self._schema}; grant the "
                f"role USAGE and CREATE on schema {self._schema}"
            )
        return bool(row and row[0])

    async def _create(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Make the schema (unless it is there) and the tables, under an advisory lock so
        that two daemons starting at once do not both try."""
        schema = sql.Identifier(self._schema)
        async with conn.transaction():
            await conn.execute(
                "SELECT pg_advisory_xact_lock(%s, %s)",
                (_LOCK_CLASS, _signed32(zlib.crc32(self._schema.encode()))),
            )
            if await self._has_tables(conn):
                return  # the other daemon made them while this one waited
            exists = await (
                await conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (self._schema,))
            ).fetchone()
            if exists is None:
                try:
                    await conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
                except errors.InsufficientPrivilege:
                    raise StateError(
                        f"{self._where}: cannot create schema {self._schema}: permission "
                        f"denied; grant the role CREATE on database {conn.info.dbname}, or "
                        "create the schema for it (owned by the role)"
                    ) from None
            try:
                await conn.execute(
                    sql.SQL(_TABLES).format(s=schema, version=sql.Literal(str(SCHEMA_VERSION)))
                )
            except errors.InsufficientPrivilege:
                raise StateError(
                    f"{self._where}: cannot create the state's tables: permission denied; "
                    f"grant the role USAGE and CREATE on schema {self._schema}"
                ) from None

    async def _connect(self, link: _Link) -> psycopg.AsyncConnection[Any]:
        if link.conn is not None and not link.conn.closed and not link.conn.broken:
            return link.conn
        await link.drop()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=_CONNECT_TIMEOUT_S,
                application_name=f"unleash-poller ({link.name})",
                # Not PGCLIENTENCODING's or the URL's: text goes over the wire as UTF-8.
                client_encoding="UTF8",
                # A dead peer is noticed in seconds, not after the kernel's two hours.
                keepalives=1,
                keepalives_idle=5,
                keepalives_interval=2,
                keepalives_count=3,
                tcp_user_timeout=15000,
            )
        except psycopg.Error as exc:
            raise self._connect_error(exc) from None
        try:
            row = await (
                await conn.execute(
                    "SELECT set_config('search_path', %s, false), "
                    "current_setting('synchronous_commit'), "
                    "set_config('statement_timeout', %s, false)",
                    (self._schema, str(int(_STATEMENT_TIMEOUT_S * 1000))),
                )
            ).fetchone()
            if row is not None and row[1] == "off":
                await conn.execute("SET synchronous_commit = on")
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
            raise self._translate(exc) from None
        link.conn = conn
        return conn

    def _connect_error(self, exc: psycopg.Error) -> StateError:
        text = self._first_line(exc)
        lowered = text.lower()
        if "connect privilege" in str(exc).lower() or "permission denied for database" in lowered:
            return StateError(
                f"{self._where}: cannot connect: {text}; grant the role CONNECT on the database"
            )
        if isinstance(exc, psycopg.ProgrammingError) or any(
            marker in lowered for marker in _PERMANENT_CONNECT
        ):
            return StateError(f"{self._where}: cannot connect: {text}")
        return StateUnavailableError(f"{self._where}: cannot connect: {text}")

    def _first_line(self, exc: BaseException) -> str:
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else type(exc).__name__
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def _translate(self, exc: psycopg.Error) -> BaseException:
        """What a driver error means to the daemon; errors it cannot mean anything for
        (an integrity error: a bug) are raised as they are."""
        text = self._first_line(exc)
        if exc.sqlstate == _FENCED:
            return FencedError(
                f"{self._where}: another daemon took the lease over ({text}); "
                "this one writes nothing more and stands by"
            )
        if isinstance(exc, errors.InsufficientPrivilege):
            return StateError(
                f"{self._where}: {text}; the role needs USAGE on schema {self._schema} "
                "and to own its tables"
            )
        if isinstance(exc, errors.UndefinedTable | errors.UndefinedFunction):
            return StateError(
                f"{self._where}: the state's tables are gone ({text}); was the schema "
                "dropped while the daemon ran?"
            )
        if isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError) or (
            exc.sqlstate in _TRANSIENT
        ):
            return StateUnavailableError(f"{self._where}: PostgreSQL unavailable: {text}")
        return exc

    @contextlib.asynccontextmanager
    async def _using(self, link: _Link) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The link's connection, for one caller at a time. After an error the connection
        is kept only when it is idle and sound; a call cancelled mid-statement drops it
        (the server rolls back whatever it had not committed)."""
        async with link.lock:
            conn = await self._connect(link)
            try:
                yield conn
            except psycopg.Error as exc:
                if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                    await link.drop()
                raise self._translate(exc) from None
            except BaseException:
                if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                    await link.drop()
                raise

    def _held_epoch(self) -> int | None:
        """The epoch to fence a write with (None: a tool's unfenced write)."""
        if not self._fenced:
            return None
        if self._epoch is None:
            raise FencedError(
                f"{self._where}: this daemon does not hold the lease; it writes nothing "
                "until it leads"
            )
        return self._epoch

    async def _write(
        self, link: _Link, steps: Sequence[Step], *, durable: bool = True
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Run `steps` as one transaction in one round trip, fenced by the lease; returns
        each step's cursor (rowcount, rows)."""
        epoch = self._held_epoch()
        async with self._using(link) as conn:
            cursors = [conn.cursor() for _ in steps]
            async with conn.pipeline():
                await conn.execute("SELECT fence(%s, %s)", (epoch, durable))
                for cursor, (query, params) in zip(cursors, steps, strict=True):
                    await cursor.execute(query, params)
                crash_point("state.before_commit")
            return cursors

    async def _write_inline(
        self, link: _Link, steps: Sequence[tuple[LiteralString, dict[str, Any]]], *, durable: bool
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Run statements that carry their own `_FENCE`: one alone as one statement, several
        as one pipeline (one transaction)."""
        fence = {"epoch": self._held_epoch(), "durable": durable}
        async with self._using(link) as conn:
            cursors = [conn.cursor() for _ in steps]
            if len(steps) == 1:
                crash_point("state.before_commit")
                await cursors[0].execute(steps[0][0], {**steps[0][1], **fence})
                return cursors
            async with conn.pipeline():
                for cursor, (query, params) in zip(cursors, steps, strict=True):
                    await cursor.execute(query, {**params, **fence})
                crash_point("state.before_commit")
            return cursors

    async def _rows(self, query: LiteralString, params: Params = ()) -> list[tuple[Any, ...]]:
        async with self._using(self._main) as conn:
            return await (await conn.execute(query, params)).fetchall()

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
        for link in (self._lease, self._ingest, self._main):
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

    def release_memory(self) -> None:
        """Nothing to drop: the page cache is the server's."""

    # -- the lease ---------------------------------------------------------------------

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        """Renew (one statement) or take over (after a lock-free look, so a standby never
        queues behind the leader's writes while the lease is live). Expiry is judged by
        the database's clock."""
        if not self._fenced:
            raise RuntimeError("try_lead on a store opened with lock=False")
        async with self._using(self._lease) as conn:
            if self._epoch is not None:
                row = await (
                    await conn.execute(
                        "UPDATE lease SET expires_at = clock_timestamp() "
                        "+ make_interval(secs => %s) WHERE holder = %s AND epoch = %s "
                        f"RETURNING {_LEASE_COLUMNS}",
                        (ttl_s, holder, self._epoch),
                    )
                ).fetchone()
                if row is not None:
                    return True, LeaseView(*row)
                self._epoch = None
            view = await _read_lease(conn)
            if view.holder not in (None, holder) and view.expires_in_s > 0:
                return False, view
            taken = await self._take_over(conn, holder, ttl_s)
            if taken is None:
                return False, await _read_lease(conn)
            self._epoch = taken.epoch
            return True, taken

    async def _take_over(
        self, conn: psycopg.AsyncConnection[Any], holder: str, ttl_s: float
    ) -> LeaseView | None:
        """Raise the epoch if the lease is free, expired or already `holder`'s. The FOR
        UPDATE waits for the old leader's writes in flight (bounded, so a standby is not
        stuck behind a long one: it tries again at its next turn). A new leader starts
        with no staged page: one left by the old leader is not its catch-up."""
        wait_ms = int(min(max(ttl_s / 3, 0.5), 5.0) * 1000)
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                await conn.execute("SELECT 1 FROM lease FOR UPDATE")
                row = await (
                    await conn.execute(
                        "UPDATE lease SET holder = %s, epoch = epoch + 1, "
                        "expires_at = clock_timestamp() + make_interval(secs => %s) "
                        "WHERE holder IS NULL OR expires_at IS NULL "
                        "OR expires_at <= clock_timestamp() OR holder = %s "
                        f"RETURNING {_LEASE_COLUMNS}",
                        (holder, ttl_s, holder),
                    )
                ).fetchone()
                if row is not None:
                    await conn.execute("DELETE FROM staging")
        except errors.LockNotAvailable:
            return None
        return None if row is None else LeaseView(*row)

    async def resign(self, holder: str) -> None:
        """Free the lease at once, if this store holds it."""
        epoch, self._epoch = self._epoch, None
        if epoch is None:
            return
        async with self._using(self._lease) as conn:
            await conn.execute(
                "UPDATE lease SET holder = NULL, expires_at = NULL "
                "WHERE holder = %s AND epoch = %s",
                (holder, epoch),
            )

    async def lease(self) -> LeaseView:
        async with self._using(self._lease) as conn:
            return await _read_lease(conn)

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
        now = _now() if now is None else now
        await self._write(
            self._ingest,
            [
                *_add_steps(events, owed, now),
                *_finish_steps(high_water, new_gaps, settled_gaps, now),
            ],
        )

    @contextlib.asynccontextmanager
    async def ingesting(self, *, now: float | None = None) -> AsyncIterator[PostgresIngestBatch]:
        """One transaction for a catch-up too long to hold in memory; the lease row stays
        locked FOR KEY SHARE until it commits, so a takeover waits for it."""
        epoch = self._held_epoch()
        async with self._using(self._ingest) as conn, conn.transaction():
            await conn.execute("SELECT fence(%s, true)", (epoch,))
            batch = PostgresIngestBatch(conn, _now() if now is None else now)
            yield batch
            if not batch.finished:
                raise RuntimeError("ingest transaction ended without moving the cursor")
            crash_point("state.before_commit")

    async def set_cursor(self, high_water: int) -> None:
        await self._write(
            self._ingest, [("DELETE FROM gaps", ()), (_SET_HIGH_WATER, (str(high_water),))]
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
        if _BODY_UNSTORABLE.search(value):
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
                    _event_columns(events),
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
        rows = await self._rows(_NEXT_PENDING, (webhook, after, limit))
        return [Pending(*row) for row in rows]

    async def delivered(self, webhook: str, *event_ids: int) -> None:
        """Mark events delivered, dropping the bodies nobody owes any more: one statement."""
        if not event_ids:
            return
        await self._write_inline(
            self._main, [(_DELIVERED, {"w": webhook, "ids": list(event_ids)})], durable=False
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
        await self._write_inline(self._main, [(_RETRY_LATER, params)], durable=False)

    async def dead_letter(
        self, webhook: str, event_id: int, attempts: int, reason: str, now: float | None = None
    ) -> None:
        now = _now() if now is None else now
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
        now = _now() if now is None else now
        owed = [(webhook, event_id) for event_id, _ in events]
        cursors = await self._write(self._main, list(_add_steps(events, owed, now)))
        return max(cursors[1].rowcount, 0)

    # -- pauses ------------------------------------------------------------------------

    async def pause(self, webhook: str) -> Pause | None:
        rows = await self._rows(
            "SELECT reason, since, awaits_resume, probe_at, probes FROM pauses WHERE webhook = %s",
            (webhook,),
        )
        return _pause(rows[0]) if rows else None

    async def pauses(self) -> dict[str, Pause]:
        rows = await self._rows(
            "SELECT webhook, reason, since, awaits_resume, probe_at, probes FROM pauses"
        )
        return {row[0]: _pause(row[1:]) for row in rows}

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
        attempts, all in one transaction (one statement per webhook)."""
        if not records:
            return
        steps: list[tuple[LiteralString, dict[str, Any]]] = []
        for webhook in dict.fromkeys(r.webhook for r in records):
            mine = [r for r in records if r.webhook == webhook]
            params: dict[str, Any] = {"w": webhook, "count": len(mine)}
            params["keep"] = keep.get(webhook, 1000)
            params["event_id"] = [r.event_id for r in mine]
            params["at"] = [r.at for r in mine]
            params["attempt"] = [r.attempt for r in mine]
            params["status"] = [r.status for r in mine]
            params["error"] = [None if r.error is None else storable(r.error) for r in mine]
            params["latency_ms"] = [r.latency_ms for r in mine]
            params["outcome"] = [r.outcome for r in mine]
            steps.append((_RECORD_ATTEMPTS, params))
        await self._write_inline(self._main, steps, durable=False)

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
            self._main, [(_REMOVE_DEAD_LETTER, {"w": webhook, "e": event_id})], durable=True
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
                    {"now": _now(), "w": webhook},
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
        async with self._using(self._main) as conn:
            return await _is_empty(conn)

    async def export_rows(self) -> StateDump:
        """The whole state as one snapshot saw it."""
        async with self._using(self._main) as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            await conn.execute("SET LOCAL statement_timeout = 0")  # a whole state, read once

            async def rows(query: LiteralString) -> list[tuple[Any, ...]]:
                return await (await conn.execute(query)).fetchall()

            meta = dict(await rows("SELECT key, value FROM meta"))
            high = meta.get("high_water")
            return StateDump(
                high_water=None if high is None else int(high),
                notes={k[len("note:") :]: v for k, v in meta.items() if k.startswith("note:")},
                events=[
                    (int(i), b) for i, b in await rows("SELECT id, body FROM events ORDER BY id")
                ],
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
                    r[0]: _pause(r[1:])
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

    async def import_rows(self, dump: StateDump) -> None:
        """Write a whole state into this empty store, in one transaction (COPY)."""
        epoch = self._held_epoch()
        async with self._using(self._main) as conn, conn.transaction():
            await conn.execute("SELECT fence(%s, true)", (epoch,))
            await conn.execute("SET LOCAL statement_timeout = 0")  # COPY of a whole state
            if not await _is_empty(conn):
                raise StateError(
                    f"{self._where}: not empty; a state is copied only into an empty one"
                )
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
                ("events (id, body)", ((i, _storable_body(b)) for i, b in dump.events)),
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


class PostgresIngestBatch:
    """Writes inside an open ingest transaction; `finish` moves the cursor."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], now: float) -> None:
        self._conn = conn
        self._now = now
        self.finished = False

    async def _run(self, steps: Iterable[Step]) -> None:
        async with self._conn.pipeline():
            for query, params in steps:
                await self._conn.execute(query, params)

    async def add(self, events: Sequence[EventRow], owed: Iterable[tuple[str, int]]) -> None:
        await self._run(_add_steps(events, owed, self._now))

    async def finish(
        self, high_water: int, new_gaps: Iterable[int] = (), settled_gaps: Iterable[int] = ()
    ) -> None:
        await self._run(_finish_steps(high_water, new_gaps, settled_gaps, self._now))
        self.finished = True


def _event_columns(events: Sequence[EventRow]) -> tuple[list[int], list[str]]:
    return [i for i, _ in events], [_storable_body(body) for _, body in events]


def _add_steps(
    events: Sequence[EventRow], owed: Iterable[tuple[str, int]], now: float
) -> list[Step]:
    hooks, ids = [], []
    for hook, event_id in owed:
        hooks.append(hook)
        ids.append(event_id)
    return [(_INSERT_EVENTS, _event_columns(events)), (_INSERT_OWED, (now, hooks, ids))]


def _finish_steps(
    high_water: int, new_gaps: Iterable[int], settled_gaps: Iterable[int], now: float
) -> list[Step]:
    return [
        ("DELETE FROM gaps WHERE id = ANY(%b::bigint[])", (list(settled_gaps),)),
        (
            "INSERT INTO gaps (id, missing_since, next_check_at) "
            "SELECT g, %s, %s FROM unnest(%b::bigint[]) AS g ON CONFLICT DO NOTHING",
            (now, now, list(new_gaps)),
        ),
        (_SET_HIGH_WATER, (str(high_water),)),
    ]


async def _read_lease(conn: psycopg.AsyncConnection[Any]) -> LeaseView:
    row = await (await conn.execute(f"SELECT {_LEASE_COLUMNS} FROM lease")).fetchone()
    if row is None:
        raise StateError("the lease row is missing")
    return LeaseView(*row)


async def _is_empty(conn: psycopg.AsyncConnection[Any]) -> bool:
    row = await (
        await conn.execute(
            "SELECT NOT EXISTS (SELECT 1 FROM meta WHERE key = 'high_water' OR key LIKE 'note:%') "
            "AND NOT EXISTS (SELECT 1 FROM outbox) AND NOT EXISTS (SELECT 1 FROM dead_letters) "
            "AND NOT EXISTS (SELECT 1 FROM gaps)"
        )
    ).fetchone()
    return bool(row and row[0])


def _pause(row: Sequence[Any]) -> Pause:
    reason, since, awaits_resume, probe_at, probes = row
    return Pause(str(reason), float(since), bool(awaits_resume), float(probe_at), int(probes))


def _signed32(value: int) -> int:
    return value - (1 << 32) if value >= 1 << 31 else value


def _now() -> float:
    return time.time()
