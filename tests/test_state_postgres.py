"""The PostgreSQL state's own behaviour: the lease and fencing between daemons, schema
creation and versions, privileges, lost connections, and texts PostgreSQL cannot hold.

What both backends do alike is in test_state_contract.py. These run against the local
cluster: one database per session, a fresh schema per test.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from poller.config import Secret, StateConfig
from poller.state import AttemptRecord, FencedError, StateError, StateUnavailableError
from tests.support.pgstate import state_config
from tests.support.unleash import PostgresDatabase, _as_postgres

ENABLE_HINT = "install PostgreSQL 15 (psql, pg_ctlcluster) and psycopg, or run `bash .ci/run`"

if importlib.util.find_spec("psycopg") is None:
    if os.environ.get("CI", "").lower() == "true":
        raise ImportError(f"CI=true and psycopg is missing. To enable: {ENABLE_HINT}")
    pytest.skip(f"needs psycopg. To enable: {ENABLE_HINT}", allow_module_level=True)

import psycopg  # noqa: E402

from poller.state.postgres import (  # noqa: E402
    SCHEMA_VERSION,
    PostgresState,
    link,
    statements,
    where_of,
)


@pytest.fixture(scope="session")
def database(pg_database: PostgresDatabase) -> PostgresDatabase:
    """This session's database on the local cluster (tests/support/pgstate.py: skipped
    without one, failed under CI)."""
    return pg_database


def _url(db: PostgresDatabase, user: str | None = None, password: str | None = None) -> str:
    user = urllib.parse.quote(user or db.user, safe="")
    password = urllib.parse.quote(password or db.password, safe="")
    return f"postgresql://{user}:{password}@{db.host}:{db.port}/{db.name}"


@pytest.fixture
def place(database: PostgresDatabase, tmp_path: Path) -> StateConfig:
    """A `[state]` in a schema of its own on the session's database."""
    return state_config(database, tmp_path / "unused.sqlite3")


def _run(coroutine: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coroutine)


async def _admin(db: PostgresDatabase, query: str, params: tuple[Any, ...] = ()) -> list[Any]:
    """Run SQL behind the store's back (as the test role), returning the rows if any."""
    async with await psycopg.AsyncConnection.connect(_url(db), autocommit=True) as conn:
        cursor = await conn.execute(query, params)
        return await cursor.fetchall() if cursor.description else []


async def _until(check: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


def _expire(db: PostgresDatabase, place: StateConfig) -> Coroutine[Any, Any, list[Any]]:
    """Make the lease expired by the database's clock, as if its holder had stopped."""
    return _admin(
        db,
        f"UPDATE {place.schema}.lease SET expires_at = clock_timestamp() - interval '1 second'",
    )


# -- the lease -----------------------------------------------------------------------------


def test_only_one_of_two_daemons_leads_and_renewing_keeps_the_epoch(place: StateConfig) -> None:
    """Two stores on one schema: the first to ask leads, the second stands by and sees who
    leads; renewing keeps the epoch and pushes the expiry out."""

    async def check() -> None:
        a = await PostgresState.open(place)
        b = await PostgresState.open(place)
        try:
            led, first = await a.try_lead("a", 30)
            assert led
            assert (first.holder, first.epoch) == ("a", 1)
            assert 29 < first.expires_in_s <= 30
            led, seen = await b.try_lead("b", 30)
            assert not led
            assert (seen.holder, seen.epoch) == ("a", 1)
            led, renewed = await a.try_lead("a", 60)
            assert led
            assert (renewed.holder, renewed.epoch) == ("a", 1)
            assert renewed.expires_in_s > 59
            assert (await b.lease()).holder == "a"
        finally:
            await a.close()
            await b.close()

    _run(check())


def test_a_lease_that_expires_is_taken_over_with_a_higher_epoch(place: StateConfig) -> None:
    """When the leader stops renewing, the standby takes over once the lease expires by
    the database's clock, with the epoch raised; the old leader cannot renew then."""

    async def check() -> None:
        a = await PostgresState.open(place)
        b = await PostgresState.open(place)
        try:
            assert (await a.try_lead("a", 1))[0]
            assert not (await b.try_lead("b", 30))[0]

            async def taken() -> bool:
                return (await b.try_lead("b", 30))[0]

            await _until(taken)
            lease = await b.lease()
            assert (lease.holder, lease.epoch) == ("b", 2)
            led, seen = await a.try_lead("a", 30)
            assert not led
            assert (seen.holder, seen.epoch) == ("b", 2)
        finally:
            await a.close()
            await b.close()

    _run(check())


def test_resign_lets_the_standby_take_over_at_once(place: StateConfig) -> None:
    """A leader that resigns at a clean stop frees the lease: the standby leads on its next
    try, without waiting for the expiry, and the resigned store writes nothing more."""

    async def check() -> None:
        a = await PostgresState.open(place)
        b = await PostgresState.open(place)
        try:
            assert (await a.try_lead("a", 600))[0]
            assert not (await b.try_lead("b", 600))[0]
            await a.resign("a")
            assert (await a.lease()).holder is None
            led, lease = await b.try_lead("b", 600)
            assert led
            assert (lease.holder, lease.epoch) == ("b", 2)
            with pytest.raises(FencedError):
                await a.set_cursor(1)
        finally:
            await a.close()
            await b.close()

    _run(check())


def test_a_standby_that_never_led_writes_nothing(place: StateConfig) -> None:
    """A daemon's store (lock=True) refuses every write until it leads; a tool's store
    (lock=False) beside it writes, and the daemon notices."""

    async def check() -> None:
        daemon = await PostgresState.open(place)
        tool = await PostgresState.open(place, lock=False)
        try:
            for write in (
                daemon.ingest([(1, "{}")], [("a", 1)], 1),
                daemon.queue("a", [(1, "{}")]),
                daemon.save_text("profile", "{}"),
                daemon.stage([(1, "{}")]),
            ):
                with pytest.raises(FencedError, match="does not hold the lease"):
                    await write
            assert await daemon.is_empty()
            assert not await daemon.written_elsewhere()
            assert await tool.queue("a", [(1, "{}")]) == 1
            assert await daemon.written_elsewhere()
            assert await daemon.pending_counts() == {"a": 1}
        finally:
            await daemon.close()
            await tool.close()

    _run(check())


def test_the_old_leaders_writes_are_fenced_and_commit_nothing(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """After a takeover, every write of the old leader (which still believes it leads)
    raises FencedError and leaves the state as it was, multi-statement ones included."""

    async def check() -> None:
        old = await PostgresState.open(place)
        new = await PostgresState.open(place)
        try:
            assert (await old.try_lead("old", 30))[0]
            await old.ingest([(1, '{"id":1}'), (2, '{"id":2}')], [("a", 1), ("a", 2)], 2)
            await old.dead_letter("a", 2, 1, "HTTP 500")
            await _expire(database, place)
            assert (await new.try_lead("new", 30))[0]
            before = await new.export_rows()
            writes = [
                old.ingest([(3, "{}")], [("a", 3)], 3, [4]),
                old.delivered("a", 1),
                old.retry_later("a", 1, 2, 9.0, "HTTP 503"),
                old.dead_letter("a", 1, 3, "HTTP 500"),
                old.requeue_dead_letters(),
                old.remove_dead_letter("a", 2),
                old.part_sent("a", 1, "#x"),
                old.set_cursor(9),
                old.clear_staging(),
                old.resume("a", retry_now=True),
            ]
            for write in writes:
                with pytest.raises(FencedError, match="took the lease over"):
                    await write

            async def catch_up() -> None:
                async with old.ingesting() as batch:
                    await batch.add([(5, "{}")], [("a", 5)])
                    await batch.finish(5)

            with pytest.raises(FencedError):
                await catch_up()
            assert await new.export_rows() == before
            assert await new.high_water() == 2
        finally:
            await old.close()
            await new.close()

    _run(check())


def test_a_write_open_at_the_takeover_commits_first_and_the_next_is_fenced(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """A catch-up transaction the old leader opened before the takeover holds the lease
    row: the takeover waits until it commits, so it is kept whole, and the old leader's
    next write is refused."""

    async def check() -> None:
        old = await PostgresState.open(place)
        new = await PostgresState.open(place)
        try:
            assert (await old.try_lead("old", 30))[0]
            async with old.ingesting(now=1.0) as batch:
                await batch.add([(1, '{"id":1}')], [("a", 1)])
                await _expire(database, place)
                takeover = asyncio.create_task(new.try_lead("new", 30))

                async def waiting() -> bool:
                    rows = await _admin(
                        database,
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE '%%FOR UPDATE%%'",
                    )
                    return bool(rows[0][0])

                await _until(waiting)
                assert not takeover.done()
                await batch.add([(2, '{"id":2}')], [("a", 2)])
                await batch.finish(2)
            led, lease = await takeover
            assert led
            assert lease.epoch == 2
            assert await new.high_water() == 2
            assert await new.pending_counts() == {"a": 2}
            with pytest.raises(FencedError):
                await old.delivered("a", 1)
            assert await new.pending_counts() == {"a": 2}
        finally:
            await old.close()
            await new.close()

    _run(check())


def test_the_leader_renews_while_its_own_catch_up_is_open(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """A renewal does not queue behind the leader's own long ingest transaction (which
    holds the lease row for the fence); a standby that would take over an expired lease
    meanwhile gives up after a bounded wait instead of hanging, and leads nothing."""

    async def check() -> None:
        leader = await PostgresState.open(place)
        standby = await PostgresState.open(place)
        try:
            assert (await leader.try_lead("a", 30))[0]
            async with leader.ingesting() as batch:
                await batch.add([(1, "{}")], [("a", 1)])
                led, lease = await asyncio.wait_for(leader.try_lead("a", 30), 5)
                assert (led, lease.epoch) == (True, 1)
                await _expire(database, place)
                led, lease = await asyncio.wait_for(standby.try_lead("b", 3), 5)
                assert (led, lease.holder, lease.epoch) == (False, "a", 1)
                await batch.finish(1)
            assert await standby.high_water() == 1
        finally:
            await leader.close()
            await standby.close()

    _run(check())


def test_a_leader_gone_silent_in_its_catch_up_does_not_block_the_takeover(
    database: PostgresDatabase, place: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A leader that stops answering inside a catch-up (its host gone, frozen, cut off)
    leaves a transaction holding the lease row; the server ends it after the idle limit,
    rather than when its own keepalives notice (hours), so a standby takes the expired
    lease over, and nothing of that catch-up is committed."""
    monkeypatch.setattr(link, "_IDLE_IN_TRANSACTION_S", 0.5)

    async def check() -> None:
        leader = await PostgresState.open(place)
        standby = await PostgresState.open(place)
        added = asyncio.Event()

        async def silent_catch_up() -> None:
            async with leader.ingesting() as batch:
                await batch.add([(1, "{}")], [("a", 1)])
                added.set()
                await asyncio.Event().wait()  # never comes back to the server

        try:
            assert (await leader.try_lead("a", 30))[0]
            task = asyncio.create_task(silent_catch_up())
            await added.wait()
            await _expire(database, place)

            async def took_over() -> bool:
                return (await standby.try_lead("b", 1))[0]

            await _until(took_over, timeout_s=20)
            assert (await standby.lease()).epoch == 2
            assert await standby.pending_counts() == {}
            task.cancel()
            with pytest.raises((asyncio.CancelledError, StateUnavailableError)):
                await task
        finally:
            await leader.close()
            await standby.close()

    _run(check())


def test_a_takeover_discards_the_old_leaders_staged_pages(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """Pages the old leader staged for a catch-up it never finished are not the new
    leader's: taking over starts with an empty staging table."""

    async def check() -> None:
        old = await PostgresState.open(place)
        new = await PostgresState.open(place)
        try:
            assert (await old.try_lead("old", 30))[0]
            await old.stage([(7, "{}")])
            assert [rows async for rows in new.staged()] == [[(7, "{}")]]
            await _expire(database, place)
            assert (await new.try_lead("new", 30))[0]
            assert [rows async for rows in new.staged()] == []
        finally:
            await old.close()
            await new.close()

    _run(check())


# -- opening -------------------------------------------------------------------------------


def test_two_daemons_starting_at_once_make_the_schema_once(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """Two first starts at the same moment both open the one state (no error from racing
    to create it), and it is made exactly once."""

    async def check() -> None:
        stores = await asyncio.gather(*(PostgresState.open(place) for _ in range(3)))
        for store in stores:
            await store.close()
        rows = await _admin(
            database,
            f"SELECT value FROM {place.schema}.meta WHERE key = 'schema_version'",
        )
        assert rows == [(str(SCHEMA_VERSION),)]

    _run(check())


def test_a_state_of_a_newer_schema_version_is_refused(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """A schema written by a newer unleash-poller is refused with one StateError line that
    names the store (without the password) and both versions."""

    async def check() -> None:
        await (await PostgresState.open(place)).close()
        await _admin(
            database,
            f"UPDATE {place.schema}.meta SET value = %s WHERE key = 'schema_version'",
            (str(SCHEMA_VERSION + 1),),
        )
        with pytest.raises(StateError) as info:
            await PostgresState.open(place)
        message = str(info.value)
        assert f"schema version {SCHEMA_VERSION + 1}" in message
        assert f"understands {SCHEMA_VERSION}" in message
        assert f"(schema {place.schema})" in message
        assert database.password not in message
        assert ":***@" in message
        assert "\n" not in message
        assert not isinstance(info.value, StateUnavailableError)

    _run(check())


@pytest.fixture
def stranger(database: PostgresDatabase) -> Iterator[tuple[str, str]]:
    """A login role with no privilege on the session's database but CONNECT (PUBLIC's)."""
    name, password = f"poller_stranger_{os.getpid()}", "stranger-pw-3141"
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(database.port), "-d"]
    _as_postgres([*psql, database.name, "-c", f"CREATE ROLE {name} LOGIN PASSWORD '{password}'"])
    try:
        yield name, password
    finally:
        _as_postgres([*psql, database.name, "-c", f"DROP OWNED BY {name}; DROP ROLE {name}"])


def _as(place: StateConfig, db: PostgresDatabase, user: str, password: str) -> StateConfig:
    return StateConfig(place.path, url=Secret(_url(db, user, password)), schema=place.schema)


def test_missing_privileges_are_one_clear_line_each(
    database: PostgresDatabase, place: StateConfig, stranger: tuple[str, str]
) -> None:
    """A role that may not create the schema, use it, or connect at all gets a permanent
    StateError naming the store and what to grant, never the password."""
    user, password = stranger
    mine = _as(place, database, user, password)
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(database.port), "-d"]

    async def refused() -> str:
        with pytest.raises(StateError) as info:
            await PostgresState.open(mine)
        assert not isinstance(info.value, StateUnavailableError)
        message = str(info.value)
        assert password not in message
        assert "\n" not in message
        assert message.startswith(f"postgresql://{user}:***@")
        return message

    async def check() -> None:
        message = await refused()  # no CREATE on the database
        assert f"cannot create schema {place.schema}" in message
        assert f"CREATE on database {database.name}" in message
        await (await PostgresState.open(place)).close()  # made by its owner
        message = await refused()  # the schema is there, but not for this role
        assert f"USAGE and CREATE on schema {place.schema}" in message
        _as_postgres(
            [*psql, database.name, "-c", f"REVOKE CONNECT ON DATABASE {database.name} FROM PUBLIC"]
        )
        try:
            message = await refused()
            assert "grant the role CONNECT on the database" in message
        finally:
            _as_postgres(
                [*psql, database.name, "-c", f"GRANT CONNECT ON DATABASE {database.name} TO PUBLIC"]
            )

    _run(check())


def test_a_schema_made_for_the_role_is_enough_without_create_on_the_database(
    database: PostgresDatabase, place: StateConfig, stranger: tuple[str, str]
) -> None:
    """The setup for a schema inside Unleash's own database: a DBA makes the schema owned
    by the poller's role, which has no CREATE on the database; the first start makes the
    tables in it and the state works."""
    user, password = stranger
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(database.port), "-d"]
    _as_postgres([*psql, database.name, "-c", f"CREATE SCHEMA {place.schema} AUTHORIZATION {user}"])

    async def check() -> None:
        store = await PostgresState.open(_as(place, database, user, password))
        try:
            assert (await store.try_lead("a", 30))[0]
            await store.ingest([(1, "{}")], [("a", 1)], 1)
            assert await store.pending_counts() == {"a": 1}
        finally:
            await store.close()

    _run(check())


def test_a_database_not_in_utf8_is_refused_at_open(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """Event bodies are any Unicode, which a LATIN1 (or SQL_ASCII) database cannot hold:
    opening the state there is one clear StateError, not a driver error on the first
    event with a character outside it."""
    latin1 = f"{database.name}_latin1"
    psql = ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-p", str(database.port)]
    _as_postgres([*psql, "-d", "postgres", "-c", f"DROP DATABASE IF EXISTS {latin1} WITH (FORCE)"])
    _as_postgres(
        [*psql, "-d", "postgres", "-c", f"CREATE DATABASE {latin1} OWNER {database.user} "
         "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"]
    )  # fmt: skip
    assert place.url is not None
    url = place.url.reveal().replace(f"/{database.name}", f"/{latin1}")
    config = StateConfig(place.path, url=Secret(url), schema=place.schema)

    async def check() -> None:
        with pytest.raises(StateError) as info:
            await PostgresState.open(config)
        assert not isinstance(info.value, StateUnavailableError)
        assert "encoding LATIN1" in str(info.value)
        assert "UTF8" in str(info.value)
        assert database.password not in str(info.value)

    try:
        _run(check())
    finally:
        _as_postgres([*psql, "-d", "postgres", "-c", f"DROP DATABASE {latin1} WITH (FORCE)"])


def test_a_wrong_password_is_permanent_and_never_shown(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """A password the server refuses is a StateError (waiting will not cure it) that names
    the store with the password masked."""
    wrong = "not-the-Pa55word"

    async def check() -> None:
        with pytest.raises(StateError) as info:
            await PostgresState.open(_as(place, database, database.user, wrong))
        message = str(info.value)
        assert not isinstance(info.value, StateUnavailableError)
        assert "password authentication failed" in message
        assert wrong not in message
        assert urllib.parse.quote(wrong) not in message
        assert message.startswith(f"postgresql://{database.user}:***@{database.host}")

    _run(check())


def test_a_client_key_password_in_the_url_is_masked_too(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """`sslpassword` (the client key's passphrase) is a password like `password`: every
    message names the store with it masked, from the start and when connecting fails."""
    passphrase = "Key-Passphrase-77"  # noqa: S105 (a test value)
    url = f"{_url(database)}?sslmode=disable&sslpassword={passphrase}&password={passphrase}x"
    config = StateConfig(place.path, url=Secret(url.replace(":5432/", ":1/")), schema=place.schema)
    assert where_of(config) == (
        f"postgresql://{database.user}:***@{database.host}:1/{database.name}"
        f"?sslmode=disable&sslpassword=***&password=*** (schema {place.schema})"
    )

    async def check() -> None:
        with pytest.raises(StateUnavailableError) as info:
            await PostgresState.open(config)
        assert passphrase not in str(info.value)

    _run(check())


def test_a_server_that_refuses_connections_is_transient(place: StateConfig) -> None:
    """Nothing listening (PostgreSQL down or restarting) is StateUnavailableError, which the
    daemon backs off and retries on, not a reason to exit."""
    assert place.url is not None
    down = StateConfig(
        place.path,
        url=Secret(place.url.reveal().replace(":5432/", ":1/")),
        schema=place.schema,
    )

    async def check() -> None:
        with pytest.raises(StateUnavailableError) as info:
            await PostgresState.open(down)
        assert ":***@" in str(info.value)
        assert "unleash-poller-test" not in str(info.value)

    _run(check())


# -- lost connections ----------------------------------------------------------------------


def test_terminated_connections_are_transient_and_the_next_call_reconnects(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """pg_terminate_backend of the store's connections (a server restart, a failover)
    fails the next call with StateUnavailableError, without the password. That one
    failure stands for all three connections: the next calls, on any of them, work on new
    connections at once (a leader back after a restart must not lose its next term to
    the second stale connection), and the lease is still held."""

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            assert (await store.try_lead("a", 30))[0]
            await store.ingest([(1, "{}")], [("a", 1)], 1)
            killed = await _admin(
                database,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'unleash-poller%%'",
            )
            assert len(killed) == 3  # the lease's, the ingest's and the workers' connection
            with pytest.raises(StateUnavailableError) as info:
                await store.pending_counts()
            assert database.password not in str(info.value)
            assert str(info.value).startswith(f"postgresql://{database.user}:***@")
            # The lease's and the ingest's connections are made afresh, not tried first.
            led, lease = await store.try_lead("a", 30)
            assert (led, lease.epoch) == (True, 1)
            assert await store.pending_counts() == {"a": 1}
            await store.set_cursor(2)
            assert await store.high_water() == 2
            led, lease = await store.try_lead("a", 30)
            assert (led, lease.epoch) == (True, 1)
        finally:
            await store.close()

    _run(check())


def test_a_statement_stuck_behind_a_lock_gives_up_as_transient(
    database: PostgresDatabase, place: StateConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that waits on a lock held behind the daemon's back (an operator's open
    transaction, a server too slow to answer) ends in StateUnavailableError after the
    statement timeout, on the lease's connection too, instead of hanging the daemon; once
    the lock is gone the same store works again."""
    monkeypatch.setattr(link, "_STATEMENT_TIMEOUT_S", 0.2)

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            assert (await store.try_lead("a", 30))[0]
            async with await psycopg.AsyncConnection.connect(_url(database)) as blocker:
                await blocker.execute(
                    f"LOCK TABLE {place.schema}.lease, {place.schema}.meta IN ACCESS EXCLUSIVE MODE"
                )
                for call in (store.high_water, lambda: store.try_lead("a", 30)):
                    with pytest.raises(StateUnavailableError) as info:
                        # The guard only turns a hang into a failure; the timeout is 0.2 s.
                        await asyncio.wait_for(call(), 20)
                    assert "statement timeout" in str(info.value)
                    assert database.password not in str(info.value)
                await blocker.rollback()
            assert await store.high_water() is None
            assert (await store.try_lead("a", 30))[0]
        finally:
            await store.close()

    _run(check())


def test_a_call_cancelled_mid_transaction_leaves_nothing(place: StateConfig) -> None:
    """A catch-up cancelled between its batches (the daemon stopping) commits none of it,
    and the store goes on working."""

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            assert (await store.try_lead("a", 30))[0]
            added = asyncio.Event()

            async def catch_up() -> None:
                async with store.ingesting() as batch:
                    await batch.add([(1, "{}")], [("a", 1)])
                    added.set()
                    await asyncio.Event().wait()  # until cancelled

            task = asyncio.create_task(catch_up())
            await added.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await store.pending_counts() == {}
            assert await store.high_water() is None
            await store.ingest([(2, "{}")], [("a", 2)], 2)
            assert await store.high_water() == 2
        finally:
            await store.close()

    _run(check())


# -- texts PostgreSQL cannot hold as they are ----------------------------------------------


def test_bodies_with_lone_surrogates_or_nul_keep_their_json_value(place: StateConfig) -> None:
    """An event body holding a lone surrogate or a NUL (a redelivered event as json.dumps
    wrote it) is stored as the JSON escape ingest writes, which parses to the same value;
    an already escaped body comes back byte for byte."""
    raw = json.dumps({"name": "x\ud800y", "nul": "a\x00b"}, ensure_ascii=False)
    escaped = '{"name":"x\\ud800y"}'

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            assert (await store.try_lead("a", 30))[0]
            assert await store.queue("a", [(1, raw), (2, escaped)]) == 2
            first, second = await store.next_pending("a", 10)
            assert json.loads(first.body) == json.loads(raw)
            assert second.body == escaped
            await store.dead_letter("a", 1, 1, "HTTP 400 \udcff \x00")
            [letter] = await store.dead_letters("a")
            assert letter.reason == "HTTP 400 \\udcff \\x00"
            assert json.loads(letter.body) == json.loads(raw)
            with pytest.raises(ValueError, match="note 'profile'"):
                await store.save_text("profile", "\ud800")
        finally:
            await store.close()

    _run(check())


def test_one_attempt_log_call_for_two_webhooks_trims_each(place: StateConfig) -> None:
    """The attempt log's one statement per webhook numbers and trims each webhook's part on
    its own, keeping `keep` of the new records when they are more, and none with 0."""

    def records(webhook: str, ids: range) -> list[AttemptRecord]:
        return [AttemptRecord(webhook, i, float(i), 1, 200, None, 1.0, "delivered") for i in ids]

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            assert (await store.try_lead("a", 30))[0]
            await store.record_attempts(records("a", range(1, 4)) + records("b", range(1, 3)), {})
            await store.record_attempts(
                records("a", range(4, 9)) + records("b", range(3, 5)), {"a": 3, "b": 0}
            )
            assert [r.event_id for r in await store.attempt_log("a")] == [6, 7, 8]
            assert await store.attempt_log("b") == []
            await store.record_attempts(records("a", range(9, 10)), {"a": 3})
            assert [r.event_id for r in await store.attempt_log("a")] == [7, 8, 9]
        finally:
            await store.close()

    _run(check())


async def _attempt_seqs(db: PostgresDatabase, place: StateConfig, webhook: str) -> list[Any]:
    rows = await _admin(
        db,
        f"SELECT seq, event_id FROM {place.schema}.attempt_log WHERE webhook = %s ORDER BY seq",
        (webhook,),
    )
    return [tuple(row) for row in rows]


def test_the_attempt_log_numbers_on_after_a_tool_or_another_leader_wrote(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """The store keeps the last number it wrote; when a tool or another leader logged to
    the webhook meanwhile, it numbers on after them (no number twice, none skipped) and
    the trim still keeps exactly the last N. A store whose lease was taken writes nothing."""

    def records(ids: range) -> list[AttemptRecord]:
        return [AttemptRecord("a", i, float(i), 1, 200, None, 1.0, "delivered") for i in ids]

    async def check() -> None:
        a = await PostgresState.open(place)
        b = await PostgresState.open(place)
        tool = await PostgresState.open(place, lock=False)
        try:
            assert (await a.try_lead("a", 30))[0]
            await a.record_attempts(records(range(1, 4)), {"a": 4})
            await tool.record_attempts(records(range(4, 6)), {"a": 4})
            await a.record_attempts(records(range(6, 8)), {"a": 4})
            assert await _attempt_seqs(database, place, "a") == [(4, 4), (5, 5), (6, 6), (7, 7)]
            await _expire(database, place)
            assert (await b.try_lead("b", 30))[0]
            with pytest.raises(FencedError):  # from the statement's own fence
                await a.record_attempts(records(range(100, 102)), {"a": 4})
            await b.record_attempts(records(range(8, 9)), {"a": 4})
            await b.resign("b")
            assert (await a.try_lead("a", 30))[0]
            await a.record_attempts(records(range(9, 11)), {"a": 4})
            assert await _attempt_seqs(database, place, "a") == [(7, 7), (8, 8), (9, 9), (10, 10)]
            assert [r.event_id for r in await tool.attempt_log("a")] == [7, 8, 9, 10]
        finally:
            for store in (a, b, tool):
                await store.close()

    _run(check())


def test_the_attempt_log_keeps_exactly_the_last_n_when_n_changes(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """Each call trims to exactly its own `keep`, whether it shrinks or grows between
    calls (the store trims from where its last trim stopped)."""

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            assert (await store.try_lead("a", 30))[0]
            logged = 0
            for keep, calls in ((5, 6), (2, 3), (20, 4), (7, 1), (1, 2)):
                for _ in range(calls):
                    batch = [
                        AttemptRecord("a", logged + i, 0.0, 1, 200, None, 1.0, "delivered")
                        for i in range(1, 4)
                    ]
                    await store.record_attempts(batch, {"a": keep})
                    logged += len(batch)
                    kept = list(range(max(logged - keep, 0) + 1, logged + 1))
                    seqs = await _attempt_seqs(database, place, "a")
                    if keep >= 20:  # growing keeps what the smaller one left, and adds
                        assert [seq for seq, _ in seqs] == [seq for seq, _ in seqs if seq in kept]
                        assert seqs[-3:] == [(i, i) for i in kept[-3:]]
                    else:
                        assert seqs == [(i, i) for i in kept], (keep, logged)
        finally:
            await store.close()

    _run(check())


def test_next_pending_on_an_unanalysed_outbox_reads_only_its_batch(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """The plan of the outbox read holds without statistics: on an outbox just filled that
    nothing has analysed, it reads no more outbox rows than its LIMIT (it used to fetch and
    sort every pending row of the webhook). The rows of the next webhook it may pass are
    not returned."""

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            schema = place.schema
            await _admin(database, f"ALTER TABLE {schema}.outbox SET (autovacuum_enabled = off)")
            await _admin(database, f"ALTER TABLE {schema}.events SET (autovacuum_enabled = off)")
            assert (await store.try_lead("a", 30))[0]
            events = [(i, "{}") for i in range(1, 5001)]
            owed = [(hook, i) for hook in ("a", "b") for i, _ in events]
            await store.ingest(events, owed, 5000)
            unanalysed = await _admin(
                database,
                "SELECT count(*) FROM pg_stats WHERE schemaname = %s AND tablename = 'outbox'",
                (schema,),
            )
            assert unanalysed == [(0,)]
            async with await psycopg.AsyncConnection.connect(_url(database)) as conn:
                await conn.execute(f"SET search_path = {schema}")
                cursor = await conn.execute(
                    "EXPLAIN (ANALYZE, FORMAT JSON) " + statements.NEXT_PENDING,
                    {"w": "a", "after": 100, "n": 64},
                )
                [[plan]] = await cursor.fetchall()

            def scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
                if node.get("Relation Name") == "outbox":
                    yield node
                for child in node.get("Plans", []):
                    yield from scans(child)

            outbox_scans = list(scans(plan[0]["Plan"]))
            assert outbox_scans, plan
            assert all(n["Actual Rows"] <= 64 for n in outbox_scans), plan
            pending = await store.next_pending("a", 64, 100)
            assert [p.event_id for p in pending] == list(range(101, 165))
            tail = await store.next_pending("a", 64, 4990)
            assert [(p.webhook, p.event_id) for p in tail] == [("a", i) for i in range(4991, 5001)]
            assert await store.next_pending("a", 64, 5000) == []
        finally:
            await store.close()

    _run(check())


def test_a_schema_dropped_or_made_again_under_the_daemon_stops_it(
    database: PostgresDatabase, place: StateConfig
) -> None:
    """The PostgreSQL side of check_in_place: a state schema made again while the daemon
    ran is another state, and a dropped one is gone; both are a permanent StateError."""

    async def check() -> None:
        store = await PostgresState.open(place)
        try:
            await store.check_in_place()
            await _admin(database, f"DROP SCHEMA {place.schema} CASCADE")
            with pytest.raises(StateError, match="tables are gone") as info:
                await store.check_in_place()
            assert not isinstance(info.value, StateUnavailableError)
            await (await PostgresState.open(place)).close()
            with pytest.raises(StateError, match="replaced by another") as info:
                await store.check_in_place()
            assert not isinstance(info.value, StateUnavailableError)
        finally:
            await store.close()

    _run(check())
