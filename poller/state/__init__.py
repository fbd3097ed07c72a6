"""The daemon's durable state: one interface (`StateStore`, in `base`), two backends.

SQLite (`sqlite.SqliteState`, the default) is one file on one host. PostgreSQL
(`postgres.PostgresState`) is shared by several daemons, of which one leads under a lease.
"""

from __future__ import annotations

from poller.config import StateConfig
from poller.state.base import (
    AttemptRecord,
    DeadLetter,
    EventRow,
    FencedError,
    Gap,
    IngestBatch,
    Leadership,
    LeaseView,
    Pending,
    StateDump,
    StateError,
    StateLockedError,
    StateStore,
    StateUnavailableError,
)
from poller.state.sqlite import SqliteState

__all__ = [
    "AttemptRecord",
    "DeadLetter",
    "EventRow",
    "FencedError",
    "Gap",
    "IngestBatch",
    "Leadership",
    "LeaseView",
    "Pending",
    "SqliteState",
    "StateDump",
    "StateError",
    "StateLockedError",
    "StateStore",
    "StateUnavailableError",
    "open_state",
]


async def open_state(config: StateConfig, *, create: bool = True, lock: bool = True) -> StateStore:
    """Open the configured state. `lock` is for the daemon (and tools that write while it is
    stopped): SQLite takes its file lock; PostgreSQL readies the lease. A tool opened with
    `lock=False` reads, and writes only what is safe beside a running daemon."""
    if config.url is None:
        return SqliteState.open(config.path, create=create, lock=lock)
    # Imported only when asked for: psycopg is the `postgres` extra.
    from poller.state.postgres import PostgresState  # noqa: PLC0415

    return await PostgresState.open(config, create=create, lock=lock)
