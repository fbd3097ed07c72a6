"""PostgreSQL for state tests: one database per test session, a fresh schema per test.

Making a database takes a while; a schema takes a moment, and the PostgreSQL state keeps all
its tables in the schema `[state] schema` names, so a schema of its own isolates a test.

Fixtures (tests/conftest.py loads this module as a plugin):
- `pg_database`: the session's `PostgresDatabase`, `poller_contract_<pid>`, made by
  `ensure_postgres` and dropped at the end of the session. Without PostgreSQL (or psycopg)
  whatever uses it is skipped, saying how to enable it; under CI=true it fails instead.
- `pg_state`: call it for a `StateConfig` on PostgreSQL in a new, empty schema (each call
  another one).

`state_url(db)` is the `postgresql://user:password@127.0.0.1:port/db` URL for a database, to
write into a config or hand to `Secret`; `state_config(db, path)` makes the config itself.
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from poller.config import Secret, StateConfig
from tests.support.unleash import HarnessError, PostgresDatabase, drop_database, ensure_postgres

ENABLE_HINT = "install PostgreSQL 15 (psql, pg_ctlcluster) and psycopg, or run `bash .ci/run`"

_schemas = itertools.count(1)


def state_url(db: PostgresDatabase) -> str:
    """The URL the state backend connects with (it holds the password: never log it)."""
    user = urllib.parse.quote(db.user, safe="")
    password = urllib.parse.quote(db.password, safe="")
    return f"postgresql://{user}:{password}@{db.host}:{db.port}/{db.name}"


def fresh_schema(prefix: str = "t") -> str:
    """A schema name no other test of this session (or of a parallel one) uses."""
    return f"{prefix}_{os.getpid()}_{next(_schemas)}"


def state_config(db: PostgresDatabase, path: Path, schema: str | None = None) -> StateConfig:
    """A `[state]` on `db`, in `schema` (a fresh one by default). `path` is the SQLite
    path the config also carries; the PostgreSQL backend does not use it."""
    return StateConfig(path, url=Secret(state_url(db)), schema=schema or fresh_schema())


def _unavailable(reason: str) -> None:
    message = f"needs PostgreSQL for the state: {reason}. To enable: {ENABLE_HINT}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_database() -> Iterator[PostgresDatabase]:
    """The session's PostgreSQL database for state tests (skips or, under CI, fails without)."""
    missing = [t for t in ("psql", "pg_ctlcluster", "pg_lsclusters") if shutil.which(t) is None]
    if importlib.util.find_spec("psycopg") is None:
        missing.append("psycopg (pip install -e '.[test]')")
    if missing:
        _unavailable(f"missing {', '.join(missing)}")
    try:
        db = ensure_postgres(f"poller_contract_{os.getpid()}")
    except HarnessError as exc:
        _unavailable(str(exc))
        raise  # not reached: _unavailable skips or fails
    try:
        yield db
    finally:
        drop_database(db)


@pytest.fixture
def pg_state(pg_database: PostgresDatabase, tmp_path: Path) -> Callable[[], StateConfig]:
    """Call for a `StateConfig` on the session's database in a new schema of its own."""
    return lambda: state_config(pg_database, tmp_path / "unused.sqlite3")
