"""Durable state in PostgreSQL, shared by several daemons of which one leads under a lease.

The same guarantees as the SQLite file hold (see `base`), and one more: a daemon that lost
the lease commits nothing. Every write of a leading store runs in one transaction with
`fence()`, which refuses (SQLSTATE UP001 -> FencedError) unless the lease row still
carries the store's epoch. A store opened with `lock=False` (a tool beside the daemon)
writes unfenced and bumps a counter the daemon reads in `written_elsewhere`.

Durability: the cursor, an ingest, staging, dead letters, pauses, notes and the lease
commit with the server's synchronous_commit (raised to `on` when the server's default is
`off`). Delivery marks, retry marks and the attempt log commit with synchronous_commit=off:
PostgreSQL may lose the last few hundred milliseconds of them in a crash of the server
(never of this process), which re-sends those events: the duplicate SQLite's
synchronous=NORMAL allows too, and it spares a WAL flush on every delivery.

The parts, each read on its own: `store` (the StateStore methods), `lease` (who leads,
takeover and fencing order), `link` (a connection, its lock, its timeouts, how a write
runs), `messages` (driver errors as the daemon's, passwords masked), `schema` (the tables,
the fence, creation and version), `statements` (the hot paths' SQL and the ingest's
steps), `state_copy` (a whole state out and in).
"""

from __future__ import annotations

from poller.state.postgres.messages import where_of
from poller.state.postgres.schema import SCHEMA_VERSION
from poller.state.postgres.store import PostgresIngestBatch, PostgresState

__all__ = ["SCHEMA_VERSION", "PostgresIngestBatch", "PostgresState", "where_of"]
