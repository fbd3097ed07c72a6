"""A state store on either backend, for tests of what uses the state (workers, controls).

Fixtures (tests/conftest.py loads this module as a plugin):
- `state_kind`: `"sqlite"` or `"postgresql"`; a test using `state` runs once per backend
  (ids `sqlite`, `postgresql`). A test about SQLite itself (its file, its errors) says so
  with `@sqlite_only`.
- `run`: runs a coroutine on the test's one event loop. PostgreSQL connections belong to
  the loop they were opened on, so every coroutine that touches `state` goes through `run`
  (never `asyncio.run`, which makes a new loop each time).
- `state`: a store opened on that loop as the daemon opens it (`lock=True`, and leading
  when the backend has a lease): SQLite at tmp_path/s.sqlite3 (the `path = "s.sqlite3"`
  of the tests' configs), PostgreSQL in a fresh schema of the session's database.

`stored_text(state, state_config)` is everything the state holds, as bytes, to look for what
must never be stored (a secret). `outbox_rows(state, state_config, webhook)` counts a
webhook's outbox rows on a connection of its own (a thread may call it while the store is in
use), as a daemon started after a kill -9 would see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from poller.config import StateConfig
from poller.state import SqliteState, StateStore, open_state

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
BACKENDS = ("sqlite", "postgresql")
HOLDER = "test"

# For a test about SQLite itself: it runs on the SQLite backend only.
sqlite_only = pytest.mark.parametrize("state_kind", ["sqlite"], indirect=True)


@pytest.fixture(params=BACKENDS)
def state_kind(request: pytest.FixtureRequest) -> str:
    """The backend `state` is on."""
    kind: str = request.param
    return kind


@pytest.fixture
def run() -> Iterator[Run[Any]]:
    """Runs a coroutine on the test's event loop (the one `state` was opened on)."""
    with asyncio.Runner() as runner:
        yield runner.run


@pytest.fixture
def state_config(state_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """Where `state` lives."""
    if state_kind == "postgresql":
        pg_state: Callable[[], StateConfig] = request.getfixturevalue("pg_state")
        return pg_state()
    return StateConfig(tmp_path / "s.sqlite3")


@pytest.fixture
def state(state_config: StateConfig, run: Run[Any]) -> Iterator[StateStore]:
    """A fresh store, opened (and leading) as the daemon opens it; closed at the end."""

    async def open_leading() -> StateStore:
        store = await open_state(state_config, create=True, lock=True)
        if store.leadership is not None:
            led, lease = await store.leadership.try_lead(HOLDER, 30)
            assert led, f"{store.where}: the test store could not lead: {lease}"
        return store

    store = run(open_leading())
    try:
        yield store
    finally:
        run(store.close())


def outbox_rows(store: StateStore, config: StateConfig, webhook: str) -> int:
    """How many outbox rows `webhook` has, read on a connection of its own (blocking: call
    it from a thread other than the loop's, or where blocking does not matter)."""
    if isinstance(store, SqliteState):
        uri = f"file:{config.path}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            count: int = conn.execute(
                "SELECT count(*) FROM outbox WHERE webhook = ?", (webhook,)
            ).fetchone()[0]
        return count
    import psycopg  # the `postgres` extra
    from psycopg import sql

    assert config.url is not None
    query = sql.SQL("SELECT count(*) FROM {}.outbox WHERE webhook = %s").format(
        sql.Identifier(config.schema)
    )
    with psycopg.connect(config.url.reveal()) as conn:
        row = conn.execute(query, (webhook,)).fetchone()
    assert row is not None
    pg_count: int = row[0]
    return pg_count


def stored_text(store: StateStore, config: StateConfig) -> bytes:
    """All the state holds: SQLite's file and its WAL, or every row of every table of the
    PostgreSQL schema as text."""
    if isinstance(store, SqliteState):
        return config.path.read_bytes() + Path(f"{config.path}-wal").read_bytes()
    import psycopg  # the `postgres` extra
    from psycopg import sql

    assert config.url is not None
    chunks: list[str] = []
    with psycopg.connect(config.url.reveal()) as conn:
        tables = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            (config.schema,),
        ).fetchall()
        for (table,) in tables:
            query = sql.SQL("SELECT t::text FROM {}.{} AS t").format(
                sql.Identifier(config.schema), sql.Identifier(table)
            )
            chunks += [row[0] for row in conn.execute(query)]
    assert chunks, f"{config.schema}: no rows at all"
    return "\n".join(chunks).encode()
