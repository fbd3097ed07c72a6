"""One connection to the server, made on first use and dropped when it fails, behind a lock.

A store has three (the lease's, the ingest's, the workers'), so that concurrent callers
never put statements into one another's transaction. Every call is bounded: the connect
by `connect_timeout`, each statement by `statement_timeout`, a dead peer by the TCP
keepalives and `tcp_user_timeout`. A lost connection raises StateUnavailableError and is
dropped; the next call connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, LiteralString

import psycopg
from psycopg.pq import TransactionStatus

from poller.faults import crash_point
from poller.state.base import StateUnavailableError
from poller.state.postgres.messages import Diagnosis

_CONNECT_TIMEOUT_S = 10
# No statement waits longer (a lock held behind the daemon's back, a server too slow to
# answer): it fails as transient and the daemon retries, rather than hanging a worker or
# the lease keeper. A dead peer is noticed sooner by the keepalives and tcp_user_timeout.
# `state copy` lifts it for its own long statements.
_STATEMENT_TIMEOUT_S = 30.0
# A transaction left open by a client that stopped answering (its host gone, frozen, cut
# off) holds the lease row FOR KEY SHARE, so no standby can take over; the server ends it
# after this long instead of when its own keepalives notice (two hours by default). A
# catch-up is idle only between its batches, each read and written in well under this.
_IDLE_IN_TRANSACTION_S = 60.0
# psycopg warns through the standard logging module (which the daemon does not set up, so
# it would print a bare line to stderr) when ending a pipeline on a connection that just
# died; the same failure is raised as StateUnavailableError, logged by the daemon.
logging.getLogger("psycopg").setLevel(logging.ERROR)

Params = Sequence[Any] | Mapping[str, Any]
Step = tuple[LiteralString, Params]


class Outages:
    """Shared by a store's connections: how many times one of them found the server gone.
    When one does (a restart, a failover), the others are presumed gone too and connect
    afresh at their next use, rather than each failing once more in turn (which would
    end the leader's next term as well)."""

    def __init__(self) -> None:
        self.count = 0


class Link:
    """One named connection of a store, for one caller at a time."""

    def __init__(
        self,
        name: str,
        url: str,
        schema: str,
        diagnosis: Diagnosis,
        outages: Outages | None = None,
    ) -> None:
        self.name = name
        self.lock = asyncio.Lock()
        self.conn: psycopg.AsyncConnection[Any] | None = None
        self._url = url
        self._schema = schema
        self._diagnosis = diagnosis
        self._outages = outages or Outages()
        self._made_at = 0  # the outage count when the connection was made

    async def drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()

    async def _connect(self) -> psycopg.AsyncConnection[Any]:
        sound = self.conn is not None and not self.conn.closed and not self.conn.broken
        if sound and self._made_at == self._outages.count:
            return self.conn  # type: ignore[return-value]
        await self.drop()
        made_at = self._outages.count
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._url,
                autocommit=True,
                connect_timeout=_CONNECT_TIMEOUT_S,
                application_name=f"unleash-poller ({self.name})",
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
            raise self._diagnosis.connect_error(exc) from None
        try:
            row = await (
                await conn.execute(
                    "SELECT set_config('search_path', %s, false), "
                    "current_setting('synchronous_commit'), "
                    "set_config('statement_timeout', %s, false), "
                    "set_config('idle_in_transaction_session_timeout', %s, false)",
                    (
                        self._schema,
                        str(int(_STATEMENT_TIMEOUT_S * 1000)),
                        str(int(_IDLE_IN_TRANSACTION_S * 1000)),
                    ),
                )
            ).fetchone()
            if row is not None and row[1] == "off":
                await conn.execute("SET synchronous_commit = on")
        except psycopg.Error as exc:
            with contextlib.suppress(psycopg.Error, OSError):
                await conn.close()
            raise self._diagnosis.translate(exc) from None
        self.conn = conn
        self._made_at = made_at
        return conn

    @contextlib.asynccontextmanager
    async def using(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection, for one caller at a time. After an error the connection is kept
        only when it is idle and sound; a call cancelled mid-statement drops it (the
        server rolls back whatever it had not committed)."""
        async with self.lock:
            conn = await self._connect()
            try:
                yield conn
            except psycopg.Error as exc:
                if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                    await self.drop()
                error = self._diagnosis.translate(exc)
                if conn.broken and isinstance(error, StateUnavailableError):
                    self._outages.count += 1  # the server went away: for every connection
                raise error from None
            except BaseException:
                if conn.broken or conn.info.transaction_status != TransactionStatus.IDLE:
                    await self.drop()
                raise

    async def write(
        self, steps: Sequence[Step], epoch: int | None, *, durable: bool = True
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Run `steps` as one transaction in one round trip, fenced by the lease (`epoch`
        None: a tool's unfenced write); returns each step's cursor (rowcount, rows)."""
        async with self.using() as conn:
            cursors = [conn.cursor() for _ in steps]
            async with conn.pipeline():
                await conn.execute("SELECT fence(%s, %s)", (epoch, durable))
                for cursor, (query, params) in zip(cursors, steps, strict=True):
                    await cursor.execute(query, params)
                crash_point("state.before_commit")
            return cursors

    async def write_inline(
        self,
        steps: Sequence[tuple[LiteralString, dict[str, Any]]],
        epoch: int | None,
        *,
        durable: bool,
    ) -> list[psycopg.AsyncCursor[Any]]:
        """Run statements that carry their own `statements.FENCE`: one alone as one
        statement, several as one pipeline (one transaction)."""
        fence = {"epoch": epoch, "durable": durable}
        async with self.using() as conn:
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

    async def rows(self, query: LiteralString, params: Params = ()) -> list[tuple[Any, ...]]:
        async with self.using() as conn:
            return await (await conn.execute(query, params)).fetchall()
