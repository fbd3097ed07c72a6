"""The lease: which of the daemons sharing a state leads, and the epoch its writes carry.

One row holds the holder, the epoch and the expiry (judged by the database's clock). A
takeover first locks that row FOR UPDATE, which waits for every write already holding it
FOR KEY SHARE (its fence); so a write that began before the takeover commits before the
epoch moves, and any later one is refused. A renewal changes no key column, so it takes
a weaker lock and never waits behind a long ingest.

The holder is the daemon's `node:pid`: a store that asks under the holder already in the
row but does not know its epoch (the same daemon, reopened) takes it over at once with
the epoch raised, which fences whatever that earlier store might still write.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

from poller.state.base import FencedError, LeaseView, StateError
from poller.state.postgres.link import Link
from poller.state.postgres.statements import LEASE_COLUMNS


class PostgresLease:
    """The lease as one store sees it, on its own connection (a renewal never queues
    behind the store's other work)."""

    def __init__(self, link: Link, where: str, *, fenced: bool) -> None:
        self.link = link
        self._where = where
        self._fenced = fenced
        self.epoch: int | None = None  # the lease epoch this store leads under

    def held_epoch(self) -> int | None:
        """The epoch to fence a write with (None: a tool's unfenced write)."""
        if not self._fenced:
            return None
        if self.epoch is None:
            raise FencedError(
                f"{self._where}: this daemon does not hold the lease; it writes nothing "
                "until it leads"
            )
        return self.epoch

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        """Renew (one statement) or take over (after a lock-free look, so a standby never
        queues behind the leader's writes while the lease is live). Expiry is judged by
        the database's clock."""
        if not self._fenced:
            raise RuntimeError("try_lead on a store opened with lock=False")
        async with self.link.using() as conn:
            if self.epoch is not None:
                row = await (
                    await conn.execute(
                        "UPDATE lease SET expires_at = clock_timestamp() "
                        "+ make_interval(secs => %s) WHERE holder = %s AND epoch = %s "
                        f"RETURNING {LEASE_COLUMNS}",
                        (ttl_s, holder, self.epoch),
                    )
                ).fetchone()
                if row is not None:
                    return True, LeaseView(*row)
                self.epoch = None
            view = await read_lease(conn)
            if view.holder not in (None, holder) and view.expires_in_s > 0:
                return False, view
            taken = await _take_over(conn, holder, ttl_s)
            if taken is None:
                return False, await read_lease(conn)
            self.epoch = taken.epoch
            return True, taken

    async def resign(self, holder: str) -> None:
        """Free the lease at once, if this store holds it."""
        epoch, self.epoch = self.epoch, None
        if epoch is None:
            return
        async with self.link.using() as conn:
            await conn.execute(
                "UPDATE lease SET holder = NULL, expires_at = NULL "
                "WHERE holder = %s AND epoch = %s",
                (holder, epoch),
            )

    async def view(self) -> LeaseView:
        async with self.link.using() as conn:
            return await read_lease(conn)


async def _take_over(
    conn: psycopg.AsyncConnection[Any], holder: str, ttl_s: float
) -> LeaseView | None:
    """Raise the epoch if the lease is free, expired or already `holder`'s. The FOR UPDATE
    waits for the old leader's writes in flight (bounded, so a standby is not stuck behind
    a long one: it tries again at its next turn). A new leader starts with no staged page:
    one left by the old leader is not its catch-up."""
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
                    f"RETURNING {LEASE_COLUMNS}",
                    (holder, ttl_s, holder),
                )
            ).fetchone()
            if row is not None:
                await conn.execute("DELETE FROM staging")
    except errors.LockNotAvailable:
        return None
    return None if row is None else LeaseView(*row)


async def read_lease(conn: psycopg.AsyncConnection[Any]) -> LeaseView:
    row = await (await conn.execute(f"SELECT {LEASE_COLUMNS} FROM lease")).fetchone()
    if row is None:
        raise StateError("the lease row is missing")
    return LeaseView(*row)
