"""The StateStore contract: what every backend (SQLite, PostgreSQL) does the same way.

Each test runs once per backend (ids `sqlite`, `postgresql`). A test's coroutines all run on
one event loop (`run`), on which `store` was opened as the daemon opens it (`lock=True`,
leading when the backend has a lease). What only one backend has (SQLite's file lock and
file checks) is tested in test_state_sqlite.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from poller.config import StateConfig
from poller.schedule import Pause
from poller.state import (
    AttemptRecord,
    DeadLetter,
    FencedError,
    Gap,
    SqliteState,
    StateDump,
    StateError,
    StateStore,
    open_state,
)

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
BACKENDS = ("sqlite", "postgresql")
HOLDER = "test"  # one holder name for every store of a test, so a reopen takes the lease back


class Backend:
    """One backend for one test: opens stores on the test's event loop and closes them."""

    def __init__(self, kind: str, runner: asyncio.Runner, places: Callable[[], StateConfig]):
        self.kind = kind
        self._runner = runner
        self._places = places
        self.config = places()  # where `store` lives
        self._open: list[StateStore] = []

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return self._runner.run(coroutine)

    def new_place(self) -> StateConfig:
        """Another, empty place on this backend (a new file, a new schema)."""
        return self._places()

    async def open(
        self,
        config: StateConfig | None = None,
        *,
        lock: bool = True,
        create: bool = True,
        lead: bool = True,
    ) -> StateStore:
        """Open as the daemon does (`lock=True`: leading, so writes are not fenced, unless
        `lead` is False) or as a tool beside it (`lock=False`)."""
        store = await open_state(config or self.config, create=create, lock=lock)
        self._open.append(store)
        if lock and lead and store.leadership is not None:
            led, lease = await store.leadership.try_lead(HOLDER, 30)
            assert led, f"{store.where}: the test store could not lead: {lease}"
        return store

    async def close(self, store: StateStore) -> None:
        self._open.remove(store)
        await store.close()

    async def reopen(self, store: StateStore) -> StateStore:
        """Close `store` and open its place again, as a restarted daemon does."""
        await self.close(store)
        return await self.open()

    async def close_all(self) -> None:
        while self._open:
            await self._open.pop().close()


def _places(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], StateConfig]:
    if kind == "postgresql":
        pg_state: Callable[[], StateConfig] = request.getfixturevalue("pg_state")
        return pg_state
    numbers = iter(range(1, 1000))
    return lambda: StateConfig(tmp_path / f"state-{next(numbers)}" / "s.sqlite3")


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """The backend under test, with the test's event loop."""
    with asyncio.Runner() as runner:
        backend = Backend(request.param, runner, _places(request.param, request, tmp_path))
        try:
            yield backend
        finally:
            runner.run(backend.close_all())


@pytest.fixture
def store(backend: Backend) -> StateStore:
    """A fresh store, opened as the daemon opens it."""
    return backend.run(backend.open())


@pytest.fixture
def run(backend: Backend) -> Run[Any]:
    """Runs a coroutine on the loop `store` was opened on."""
    return backend.run


@pytest.fixture(params=BACKENDS, ids=lambda kind: f"to-{kind}")
def other_place(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """An empty place on either backend, to copy a state into."""
    return _places(request.param, request, tmp_path / "other")()


async def _stored_bodies(backend: Backend, store: StateStore) -> list[int]:
    """The ids of the event bodies the store holds, read behind the interface's back."""
    if isinstance(store, SqliteState):
        return [r[0] for r in store._conn.execute("SELECT id FROM events ORDER BY id")]
    import psycopg
    from psycopg import sql

    assert backend.config.url is not None
    async with await psycopg.AsyncConnection.connect(backend.config.url.reveal()) as conn:
        query = sql.SQL("SELECT id FROM {}.events ORDER BY id").format(
            sql.Identifier(backend.config.schema)
        )
        rows = await (await conn.execute(query)).fetchall()
    return [int(r[0]) for r in rows]


def _integrity_error(backend: Backend) -> type[Exception]:
    if backend.kind == "sqlite":
        return sqlite3.IntegrityError
    import psycopg

    return psycopg.IntegrityError


async def _pending_ids(store: StateStore, webhook: str) -> list[int]:
    return [p.event_id for p in await store.next_pending(webhook, 100)]


# -- a fresh store, the cursor, ingest -----------------------------------------------------


def test_fresh_store_is_empty(store: StateStore, run: Run[None]) -> None:
    """A new store has no cursor, gap, outbox, dead letter, pause, note, log or staging."""

    async def check() -> None:
        assert await store.high_water() is None
        assert await store.gaps() == []
        assert await store.pending_counts() == {}
        assert await store.oldest_pending() == {}
        assert await store.next_pending("a", 10) == []
        assert await store.dead_letters() == []
        assert await store.dead_letter_counts() == {}
        assert await store.pauses() == {}
        assert await store.pause("a") is None
        assert await store.attempt_log() == []
        assert await store.saved_text("profile") is None
        assert [rows async for rows in store.staged()] == []
        await store.check_in_place()  # untouched: fine

    run(check())


def test_where_names_the_store_without_its_password(backend: Backend, store: StateStore) -> None:
    """`where` says which store this is and never shows a password from the URL."""
    assert store.where
    if backend.config.url is None:
        assert store.where == str(backend.config.path)
    else:
        url = urllib.parse.urlsplit(backend.config.url.reveal())
        assert url.password
        assert url.password not in store.where
        assert url.path.lstrip("/") in store.where  # the database's name


def test_ingest_moves_cursor_with_outbox_and_survives_reopen(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """Cursor, outbox and gaps written by one ingest are all there after reopening."""

    async def check() -> None:
        await store.ingest(
            [(5, '{"id":5}'), (7, '{"id":7}')], [("a", 5), ("a", 7), ("b", 7)], 7, [6]
        )
        reopened = await backend.reopen(store)
        assert await reopened.high_water() == 7
        assert [g.id for g in await reopened.gaps()] == [6]
        assert await _pending_ids(reopened, "a") == [5, 7]
        assert await reopened.pending_counts() == {"a": 2, "b": 1}

    run(check())


def test_failed_ingest_leaves_nothing(backend: Backend, store: StateStore, run: Run[None]) -> None:
    """An ingest that fails mid-way writes neither outbox rows nor the cursor."""

    async def check() -> None:
        with pytest.raises(_integrity_error(backend)):
            # The outbox row references an event that is not there: the whole batch fails.
            await store.ingest([(1, "{}")], [("a", 1), ("a", 2)], 2)
        assert await store.high_water() is None
        assert await store.pending_counts() == {}
        assert await _stored_bodies(backend, store) == []
        # The store is usable after the failure.
        await store.ingest([(1, "{}")], [("a", 1)], 1)
        assert await store.high_water() == 1

    run(check())


def test_an_error_inside_an_ingest_transaction_undoes_all_of_it(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """A catch-up that fails between batches (or ends without finishing) writes nothing:
    the cursor and the outbox stay as they were."""

    async def fail_after_finishing() -> None:
        async with store.ingesting(now=5.0) as batch:
            await batch.add([(2, "{}")], [("a", 2)])
            await batch.add([(3, "{}")], [("b", 3)])
            await batch.finish(3, new_gaps=[4])
            raise ZeroDivisionError

    async def end_without_finishing() -> None:
        async with store.ingesting() as batch:
            await batch.add([(2, "{}")], [("a", 2)])

    async def check() -> None:
        await store.ingest([(1, "{}")], [("a", 1)], 1)
        with pytest.raises(ZeroDivisionError):
            await fail_after_finishing()
        with pytest.raises(RuntimeError, match="without moving the cursor"):
            await end_without_finishing()
        assert await store.high_water() == 1
        assert await store.gaps() == []
        assert await store.pending_counts() == {"a": 1}
        assert await _stored_bodies(backend, store) == [1]

    run(check())


def test_an_ingest_in_batches_commits_together(store: StateStore, run: Run[None]) -> None:
    """`ingesting` takes several batches in one transaction; `finish` moves the cursor and
    its gaps, which carry the transaction's time."""

    async def check() -> None:
        async with store.ingesting(now=42.0) as batch:
            assert not batch.finished
            await batch.add([(1, '{"id":1}'), (2, '{"id":2}')], [("a", 1), ("a", 2)])
            await batch.add([(5, '{"id":5}')], [("a", 5), ("b", 5)])
            await batch.finish(6, new_gaps=[3, 4])
            assert batch.finished
        assert await store.high_water() == 6
        assert await store.gaps() == [Gap(3, 42.0, 42.0, 0), Gap(4, 42.0, 42.0, 0)]
        pending = await store.next_pending("a", 10)
        assert [(p.event_id, p.body, p.enqueued_at) for p in pending] == [
            (1, '{"id":1}', 42.0),
            (2, '{"id":2}', 42.0),
            (5, '{"id":5}', 42.0),
        ]
        assert [(p.attempts, p.next_attempt_at, p.rate_limited) for p in pending] == [
            (0, 0.0, 0)
        ] * 3
        assert await store.oldest_pending() == {"a": 42.0, "b": 42.0}

    run(check())


def test_taking_in_an_event_again_keeps_its_retries(store: StateStore, run: Run[None]) -> None:
    """An event ingested or queued again while still pending keeps its attempts."""

    async def check() -> None:
        await store.ingest([(1, "{}")], [("a", 1)], 1, now=10.0)
        await store.retry_later("a", 1, 2, 99.0, "HTTP 500", rate_limited=1)
        await store.ingest([(1, "{}")], [("a", 1)], 1, now=20.0)
        assert await store.queue("a", [(1, "{}")], now=30.0) == 0
        [pending] = await store.next_pending("a", 10)
        assert (pending.attempts, pending.next_attempt_at, pending.rate_limited) == (2, 99.0, 1)
        assert pending.enqueued_at == 10.0

    run(check())


def test_gaps_are_rescheduled_settled_and_given_up(store: StateStore, run: Run[None]) -> None:
    """A gap keeps when it went missing; rechecks count up; a later ingest settles it;
    giving up forgets it. A gap reported again keeps its first time."""

    async def check() -> None:
        await store.ingest([], [], 10, [3, 5, 8], now=100.0)
        await store.reschedule_gaps([3, 8], 160.0)
        await store.reschedule_gaps([3], 220.0)
        await store.ingest([], [], 12, new_gaps=[5, 11], settled_gaps=[8], now=130.0)
        assert await store.gaps() == [
            Gap(3, 100.0, 220.0, 2),
            Gap(5, 100.0, 100.0, 0),
            Gap(11, 130.0, 130.0, 0),
        ]
        await store.give_up_gaps([3, 11])
        assert await store.gaps() == [Gap(5, 100.0, 100.0, 0)]
        assert await store.high_water() == 12

    run(check())


def test_set_cursor_forgets_gaps_and_keeps_the_outbox(store: StateStore, run: Run[None]) -> None:
    """Moving the cursor by hand (even backwards) drops the gaps and keeps what is owed."""

    async def check() -> None:
        await store.ingest([(4, "{}")], [("a", 4)], 9, [5, 6])
        await store.set_cursor(3)
        assert await store.high_water() == 3
        assert await store.gaps() == []
        assert await _pending_ids(store, "a") == [4]
        await store.set_cursor(20)
        assert await store.high_water() == 20

    run(check())


def test_notes_are_kept_and_replaced(backend: Backend, store: StateStore, run: Run[None]) -> None:
    """A saved note reads back (any text), a second save replaces it, and it survives a
    reopen."""

    async def check() -> None:
        await store.save_text("profile", '{"version": "8.2.0"}')
        await store.save_text("profile", "ünïcode ✓ \n and 'quotes'")
        await store.save_text("other", "")
        reopened = await backend.reopen(store)
        assert await reopened.saved_text("profile") == "ünïcode ✓ \n and 'quotes'"
        assert await reopened.saved_text("other") == ""
        assert await reopened.saved_text("missing") is None
        assert await reopened.high_water() is None

    run(check())


# -- staging -------------------------------------------------------------------------------


def test_staging_reads_back_in_id_order_by_batches(store: StateStore, run: Run[None]) -> None:
    """Staged pages read back in id order, `batch` at a time, each id once; clearing
    empties it; staging never touches the cursor or the outbox."""

    async def check() -> None:
        await store.stage([(5, '{"id":5}'), (1, '{"id":1}')])
        await store.stage([(3, '{"id":3}'), (1, '{"id":1}'), (9, '{"id":9}')])
        assert [rows async for rows in store.staged(batch=3)] == [
            [(1, '{"id":1}'), (3, '{"id":3}'), (5, '{"id":5}')],
            [(9, '{"id":9}')],
        ]
        assert await store.high_water() is None
        assert await store.pending_counts() == {}
        await store.clear_staging()
        assert [rows async for rows in store.staged()] == []

    run(check())


def test_staging_is_discarded_when_the_daemon_opens_the_store(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """Pages staged by a catch-up that did not finish are dropped at the next start (the
    cursor did not move, so they are fetched again)."""

    async def check() -> None:
        await store.stage([(1, "{}"), (2, "{}")])
        reopened = await backend.reopen(store)
        assert [rows async for rows in reopened.staged()] == []

    run(check())


def test_a_long_catch_up_is_taken_in_from_staging(store: StateStore, run: Run[None]) -> None:
    """The daemon's long catch-up: staged pages are read back inside the ingest transaction
    and taken in batch by batch; the cursor moves once, and then staging is cleared."""

    async def check() -> None:
        ids = range(1, 2501)
        for start in range(1, 2501, 500):
            await store.stage([(i, f'{{"id":{i}}}') for i in range(start, start + 500)])
        async with store.ingesting(now=7.0) as batch:
            async for rows in store.staged(batch=400):
                await batch.add(rows, [("a", i) for i, _ in rows if i % 2] + [("b", rows[0][0])])
            await batch.finish(2500)
        await store.clear_staging()
        assert await store.high_water() == 2500
        assert await store.pending_counts() == {"a": 1250, "b": 7}
        odd = [p.event_id for p in await store.next_pending("a", 2000)]
        assert odd == [i for i in ids if i % 2][:2000]
        assert [p.event_id for p in await store.next_pending("b", 9)] == list(range(1, 2501, 400))
        assert [rows async for rows in store.staged()] == []

    run(check())


def test_tasks_writing_while_a_catch_up_is_taken_in_all_land(
    store: StateStore, run: Run[None]
) -> None:
    """Workers marking deliveries, retries and dead letters from their own tasks while the
    ingest task holds its transaction open (across awaits) lose none of those writes."""

    async def catch_up() -> None:
        async with store.ingesting(now=2.0) as batch:
            for start in range(100, 200, 10):
                await batch.add(
                    [(i, "{}") for i in range(start, start + 10)],
                    [("b", i) for i in range(start, start + 10)],
                )
            await batch.finish(199)

    async def work(event_ids: range) -> None:
        for i in event_ids:
            await store.next_pending("a", 5, after=i - 1)
            if i % 3 == 0:
                await store.retry_later("a", i, 1, 50.0, "HTTP 503")
            elif i % 3 == 1:
                await store.delivered("a", i)
            else:
                await store.dead_letter("a", i, 4, "HTTP 400")

    async def check() -> None:
        await store.ingest([(i, "{}") for i in range(1, 61)], [("a", i) for i in range(1, 61)], 60)
        await asyncio.gather(catch_up(), work(range(1, 31)), work(range(31, 61)))
        assert await store.high_water() == 199
        assert await store.pending_counts() == {"a": 20, "b": 100}
        retried = await store.next_pending("a", 99)
        assert [(p.event_id, p.attempts) for p in retried] == [(i, 1) for i in range(3, 61, 3)]
        assert await store.dead_letter_counts() == {"a": 20}

    run(check())


def test_times_default_to_the_clock(store: StateStore, run: Run[None]) -> None:
    """Without `now`, what is taken in, queued, requeued or dead-lettered carries the
    time of the call (seconds since the epoch, as time.time() gives)."""

    async def check() -> None:
        before = time.time()
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("a", 2)], 2, [0])
        await store.queue("b", [(3, "{}")])
        await store.dead_letter("a", 2, 1, "HTTP 400")
        await store.queue("c", [(4, "{}")])
        await store.dead_letter("c", 4, 1, "HTTP 400")
        await store.requeue_dead_letters("c")
        after = time.time()
        times = [
            *(await store.oldest_pending()).values(),
            (await store.dead_letters("a"))[0].failed_at,
            (await store.gaps())[0].missing_since,
        ]
        assert len(times) == 5
        assert all(before - 1 <= t <= after + 1 for t in times), (before, times, after)

    run(check())


# -- the outbox ----------------------------------------------------------------------------


def test_next_pending_pages_by_id(store: StateStore, run: Run[None]) -> None:
    """next_pending gives a webhook's events in id order, at most `limit`, above `after`."""

    async def check() -> None:
        events = [(i, f'{{"id":{i}}}') for i in (2, 4, 6, 8)]
        await store.ingest(events, [("a", i) for i, _ in events] + [("b", 6)], 8)
        assert await _pending_ids(store, "a") == [2, 4, 6, 8]
        assert [p.event_id for p in await store.next_pending("a", 2)] == [2, 4]
        assert [p.event_id for p in await store.next_pending("a", 2, after=4)] == [6, 8]
        assert [p.event_id for p in await store.next_pending("a", 9, after=5)] == [6, 8]
        assert await store.next_pending("a", 9, after=8) == []
        [only] = await store.next_pending("b", 9)
        assert (only.webhook, only.event_id, only.body) == ("b", 6, '{"id":6}')
        assert await store.next_pending("nobody", 9) == []

    run(check())


def test_delivered_removes_row_and_unowed_event(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """Once every webhook has an event, its body is gone from the store."""

    async def check() -> None:
        await store.ingest([(1, '{"id":1}')], [("a", 1), ("b", 1)], 1)
        await store.delivered("a", 1)
        assert (await store.next_pending("b", 5))[0].body == '{"id":1}'
        await store.delivered("b", 1)
        assert await store.pending_counts() == {}
        assert await _stored_bodies(backend, store) == []

    run(check())


def test_delivered_takes_several_events_at_once(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """One `delivered` call marks several events; marking an event that is not pending
    (delivered already) changes nothing."""

    async def check() -> None:
        await store.ingest([(i, "{}") for i in (1, 2, 3)], [("a", 1), ("a", 2), ("a", 3)], 3)
        await store.delivered("a", 1, 3)
        assert await _pending_ids(store, "a") == [2]
        await store.delivered("a", 1)
        await store.delivered("b", 2)
        assert await _pending_ids(store, "a") == [2]
        assert await _stored_bodies(backend, store) == [2]

    run(check())


def test_retry_later_reschedules_one_event(store: StateStore, run: Run[None]) -> None:
    """retry_later sets the attempts, the next attempt and the 429 count of that event
    for that webhook only."""

    async def check() -> None:
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("a", 2), ("b", 1)], 2)
        await store.retry_later("a", 1, 3, 500.5, "HTTP 503", rate_limited=2)
        pending = await store.next_pending("a", 9)
        assert [(p.event_id, p.attempts, p.next_attempt_at, p.rate_limited) for p in pending] == [
            (1, 3, 500.5, 2),
            (2, 0, 0.0, 0),
        ]
        [other] = await store.next_pending("b", 9)
        assert (other.attempts, other.next_attempt_at, other.rate_limited) == (0, 0.0, 0)

    run(check())


def test_oldest_pending_is_per_webhook(store: StateStore, run: Run[None]) -> None:
    """oldest_pending gives, per webhook with anything owed, when its oldest event came in."""

    async def check() -> None:
        await store.ingest([(1, "{}")], [("a", 1)], 1, now=100.0)
        await store.ingest([(2, "{}")], [("a", 2), ("b", 2)], 2, now=200.0)
        await store.queue("c", [(9, "{}")], now=50.0)
        assert await store.oldest_pending() == {"a": 100.0, "b": 200.0, "c": 50.0}
        await store.delivered("a", 1)
        await store.delivered("c", 9)
        assert await store.oldest_pending() == {"a": 200.0, "b": 200.0}

    run(check())


def test_queue_adds_events_for_one_webhook_once(store: StateStore, run: Run[None]) -> None:
    """Queueing (redeliver) adds what is not pending already, for that webhook only."""

    async def check() -> None:
        await store.ingest([(3, "{}")], [("a", 3)], 10)
        assert await store.queue("a", [(1, '{"id":1}'), (2, '{"id":2}'), (3, "{}")]) == 2
        assert await store.queue("a", [(1, '{"id":1}')]) == 0
        assert await _pending_ids(store, "a") == [1, 2, 3]
        assert await store.pending_counts() == {"a": 3}
        assert await store.high_water() == 10
        assert await store.queue("b", [(2, '{"id":2}')], now=7.0) == 1
        [queued] = await store.next_pending("b", 9)
        assert (queued.event_id, queued.body, queued.enqueued_at) == (2, '{"id":2}', 7.0)

    run(check())


def test_parts_sent_are_kept_until_the_event_is_done(store: StateStore, run: Run[None]) -> None:
    """The answered requests of an event are kept per webhook while it is owed, through a
    dead letter and its requeue, and dropped once it is delivered or its letter removed."""

    async def check() -> None:
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("b", 1), ("a", 2)], 2)
        assert await store.parts_sent("a", 1) == frozenset()
        await store.part_sent("a", 1, "#general")
        await store.part_sent("a", 1, "#general")  # recorded twice: still one
        await store.part_sent("a", 1, "#ops")
        await store.part_sent("a", 2, "#ops")
        assert await store.parts_sent("a", 1) == {"#general", "#ops"}
        assert await store.parts_sent("b", 1) == frozenset()
        await store.dead_letter("a", 1, 5, "HTTP 500")
        assert await store.parts_sent("a", 1) == {"#general", "#ops"}
        assert await store.requeue_dead_letters("a") == 1
        assert await store.parts_sent("a", 1) == {"#general", "#ops"}
        await store.delivered("a", 1)
        assert await store.parts_sent("a", 1) == frozenset()
        await store.dead_letter("a", 2, 5, "HTTP 500")
        await store.remove_dead_letter("a", 2)
        assert await store.parts_sent("a", 2) == frozenset()

    run(check())


def test_error_texts_with_lone_surrogates_are_stored(store: StateStore, run: Run[None]) -> None:
    """A retry or dead-letter reason holding undecodable bytes (lone surrogates) is stored
    escaped instead of failing the transaction."""

    async def check() -> None:
        await store.ingest([(1, '{"id":1}'), (2, '{"id":2}')], [("a", 1), ("a", 2)], 2)
        await store.retry_later("a", 1, 1, 0.0, "bad header \udcff")
        await store.dead_letter("a", 2, 3, "HTTP 400 \ud800 ü")
        letter = (await store.dead_letters("a"))[0]
        assert letter.reason == "HTTP 400 \\ud800 ü"

    run(check())


def test_texts_from_outside_with_nul_or_surrogates_are_stored(
    store: StateStore, run: Run[None]
) -> None:
    """NUL and lone surrogates in reasons and errors (a receiver's answer, a pause reason,
    a logged error) are stored escaped, in every place that keeps them."""

    async def check() -> None:
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("a", 2)], 2)
        await store.retry_later("a", 1, 1, 0.0, "nul \x00 here")
        await store.dead_letter("a", 2, 1, "HTTP 400 \x00\udc80")
        await store.set_pause("a", Pause("answer \x00\udcfe", 1.0, False, 60.0))
        await store.record_attempts(
            [AttemptRecord("a", 1, 1.0, 1, None, "reset \x00 \udc81", None, "retry")], {"a": 9}
        )
        assert (await store.dead_letters())[0].reason == "HTTP 400 \\x00\\udc80"
        pause = await store.pause("a")
        assert pause is not None
        assert pause.reason == "answer \\x00\\udcfe"
        assert [r.error for r in await store.attempt_log()] == ["reset \\x00 \\udc81"]
        assert (await store.export_rows()).outbox[0][4] == "nul \\x00 here"

    run(check())


# -- dead letters --------------------------------------------------------------------------


def test_dead_letter_keeps_body_and_requeue_returns_it(store: StateStore, run: Run[None]) -> None:
    """A dead letter keeps the event and reason; requeue puts it back in the outbox."""

    async def check() -> None:
        await store.ingest([(3, '{"id":3}')], [("a", 3)], 3)
        await store.dead_letter("a", 3, 2, "HTTP 500 after 2 attempts")
        assert await store.pending_counts() == {}
        [letter] = await store.dead_letters("a")
        assert (letter.event_id, letter.attempts, letter.reason, letter.body) == (
            3,
            2,
            "HTTP 500 after 2 attempts",
            '{"id":3}',
        )
        assert await store.requeue_dead_letters("a") == 1
        assert await _pending_ids(store, "a") == [3]
        assert await store.dead_letters() == []

    run(check())


def test_dead_letters_are_listed_by_webhook_and_paged(store: StateStore, run: Run[None]) -> None:
    """dead_letters lists by event id (then webhook), for one webhook or all, above
    `after`, at most `limit`; dead_letter_counts counts per webhook."""

    async def check() -> None:
        events = [(i, f'{{"id":{i}}}') for i in (1, 2, 3)]
        await store.ingest(events, [("a", 1), ("b", 1), ("a", 2), ("b", 3)], 3)
        for webhook, event_id in (("b", 3), ("a", 2), ("b", 1), ("a", 1)):
            await store.dead_letter(webhook, event_id, event_id, f"reason {event_id}", now=9.5)
        assert await store.dead_letters() == [
            DeadLetter("a", 1, '{"id":1}', 1, "reason 1", 9.5),
            DeadLetter("b", 1, '{"id":1}', 1, "reason 1", 9.5),
            DeadLetter("a", 2, '{"id":2}', 2, "reason 2", 9.5),
            DeadLetter("b", 3, '{"id":3}', 3, "reason 3", 9.5),
        ]
        assert [d.event_id for d in await store.dead_letters("b")] == [1, 3]
        assert [d.event_id for d in await store.dead_letters("a", after=1)] == [2]
        assert [(d.webhook, d.event_id) for d in await store.dead_letters(limit=2)] == [
            ("a", 1),
            ("b", 1),
        ]
        assert [d.event_id for d in await store.dead_letters(after=1, limit=1)] == [2]
        assert await store.dead_letter_counts() == {"a": 2, "b": 2}
        assert await store.pending_counts() == {}

    run(check())


def test_requeue_dead_letters_of_one_webhook_or_all(store: StateStore, run: Run[None]) -> None:
    """Requeueing one webhook's dead letters leaves the others' in place; requeueing all
    moves the rest; each returns how many letters it moved, with attempts afresh."""

    async def check() -> None:
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("b", 1), ("b", 2)], 2)
        await store.dead_letter("a", 1, 4, "HTTP 500")
        await store.dead_letter("b", 1, 4, "HTTP 500")
        await store.dead_letter("b", 2, 4, "HTTP 500")
        assert await store.requeue_dead_letters("a") == 1
        assert await store.dead_letter_counts() == {"b": 2}
        assert await store.pending_counts() == {"a": 1}
        [requeued] = await store.next_pending("a", 9)
        assert (requeued.attempts, requeued.next_attempt_at, requeued.rate_limited) == (0, 0.0, 0)
        assert await store.requeue_dead_letters("nobody") == 0
        assert await store.requeue_dead_letters() == 2
        assert await store.dead_letters() == []
        assert await store.pending_counts() == {"a": 1, "b": 2}
        assert await store.requeue_dead_letters() == 0

    run(check())


def test_remove_dead_letter_drops_the_body_once_nobody_needs_it(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """Removing a dead letter keeps the body while another webhook owes the event or holds
    it as a letter, and drops it with the last one."""

    async def check() -> None:
        await store.ingest([(1, '{"id":1}')], [("a", 1), ("b", 1), ("c", 1)], 1)
        await store.dead_letter("a", 1, 3, "HTTP 500")
        await store.dead_letter("b", 1, 3, "HTTP 500")
        await store.remove_dead_letter("a", 1)
        assert [(d.webhook, d.body) for d in await store.dead_letters()] == [("b", '{"id":1}')]
        await store.remove_dead_letter("b", 1)
        assert await store.dead_letters() == []
        assert [p.body for p in await store.next_pending("c", 9)] == ['{"id":1}']
        assert await _stored_bodies(backend, store) == [1]
        await store.delivered("c", 1)
        assert await _stored_bodies(backend, store) == []
        await store.remove_dead_letter("a", 1)  # gone already: nothing happens

    run(check())


def test_a_tool_beside_the_daemon_requeues_and_the_daemon_notices(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """A store opened without the lock (`dead-letters replay`) writes beside the daemon's;
    the daemon's `written_elsewhere` says so once, and its own writes do not count."""

    async def check() -> None:
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("a", 2)], 2)
        await store.dead_letter("a", 1, 3, "HTTP 500")
        await store.dead_letter("a", 2, 3, "HTTP 500")
        assert not await store.written_elsewhere()  # the first call sets the mark
        await store.delivered("a", 9)
        assert not await store.written_elsewhere()
        tool = await backend.open(lock=False, create=False)
        assert await tool.requeue_dead_letters("a") == 2
        await backend.close(tool)
        assert await store.written_elsewhere()
        assert not await store.written_elsewhere()
        assert await _pending_ids(store, "a") == [1, 2]

    run(check())


# -- pauses --------------------------------------------------------------------------------


def test_pause_survives_reopen_and_resume_by_hand_makes_everything_due(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """A pause (with its probe time) is kept across a reopen; resume(retry_now) clears it
    and gives every pending event its retries afresh."""

    async def check() -> None:
        await store.ingest([(1, "{}"), (2, "{}")], [("a", 1), ("a", 2)], 2)
        await store.retry_later("a", 1, 3, 9e9, "HTTP 500", rate_limited=2)
        await store.set_pause(
            "a", Pause("5 events in a row", 10.0, awaits_resume=False, probe_at=70.0, probes=1)
        )
        reopened = await backend.reopen(store)
        assert await reopened.pauses() == {"a": Pause("5 events in a row", 10.0, False, 70.0, 1)}
        assert await reopened.resume("a", retry_now=True)
        assert not await reopened.resume("a")
        assert [
            (p.attempts, p.next_attempt_at, p.rate_limited)
            for p in await reopened.next_pending("a", 9)
        ] == [
            (0, 0.0, 0),
            (0, 0.0, 0),
        ]

    run(check())


def test_resume_without_retry_now_keeps_the_retries(store: StateStore, run: Run[None]) -> None:
    """A resume by a successful probe lifts the pause and leaves every retry as it was;
    retry_now touches that webhook's outbox only."""

    async def check() -> None:
        await store.ingest([(1, "{}")], [("a", 1), ("b", 1)], 1)
        await store.retry_later("a", 1, 3, 500.0, "HTTP 500", rate_limited=1)
        await store.retry_later("b", 1, 4, 600.0, "HTTP 500", rate_limited=2)
        await store.set_pause("a", Pause("5 events in a row", 1.0, False, 61.0))
        assert await store.resume("a")
        assert await store.pause("a") is None
        [a] = await store.next_pending("a", 9)
        assert (a.attempts, a.next_attempt_at, a.rate_limited) == (3, 500.0, 1)
        assert not await store.resume("a", retry_now=True)  # no pause, retries made due anyway
        [a] = await store.next_pending("a", 9)
        assert (a.attempts, a.next_attempt_at, a.rate_limited) == (0, 0.0, 0)
        [b] = await store.next_pending("b", 9)
        assert (b.attempts, b.next_attempt_at, b.rate_limited) == (4, 600.0, 2)

    run(check())


def test_pauses_are_per_webhook_and_replaced(store: StateStore, run: Run[None]) -> None:
    """Each webhook has at most one pause; setting it again replaces it; one that awaits a
    resume by hand keeps its infinite probe time."""

    async def check() -> None:
        by_hand = Pause("paused by hand", 5.0, awaits_resume=True, probe_at=math.inf)
        await store.set_pause("a", Pause("5 events in a row", 1.0, False, 61.0))
        await store.set_pause("a", Pause("HTTP 410", 2.0, False, 62.0, 3))
        await store.set_pause("b", by_hand)
        assert await store.pause("a") == Pause("HTTP 410", 2.0, False, 62.0, 3)
        assert await store.pauses() == {"a": Pause("HTTP 410", 2.0, False, 62.0, 3), "b": by_hand}
        assert await store.resume("b")
        assert await store.pauses() == {"a": Pause("HTTP 410", 2.0, False, 62.0, 3)}

    run(check())


def test_a_failed_probe_does_not_undo_a_resume_by_hand(store: StateStore, run: Run[None]) -> None:
    """A probe that fails after `webhooks resume` (from another process) lifted the pause
    moves nothing: the webhook stays resumed."""

    async def check() -> None:
        await store.set_pause("a", Pause("5 events in a row", 1.0, False, 61.0))
        assert await store.probe_failed("a", 181.0, 1)
        assert await store.pause("a") == Pause("5 events in a row", 1.0, False, 181.0, 1)
        await store.resume("a", retry_now=True)
        assert not await store.probe_failed("a", 421.0, 2)
        assert await store.pause("a") is None
        assert not await store.probe_failed("never-paused", 1.0, 1)
        assert await store.pauses() == {}

    run(check())


# -- the attempt log -----------------------------------------------------------------------


def test_attempt_log_keeps_the_last_n_per_webhook(store: StateStore, run: Run[None]) -> None:
    """Each webhook keeps its own last N attempts; reading takes the last ones, oldest first."""

    async def check() -> None:
        for batch in range(5):
            await store.record_attempts(
                [
                    AttemptRecord(
                        hook, batch * 10 + i, batch * 10 + i, 1, 200, None, 1.0, "delivered"
                    )
                    for i in range(10)
                    for hook in ("a", "b")
                ],
                {"a": 15, "b": 3},
            )
        assert [r.event_id for r in await store.attempt_log("a")] == list(range(35, 50))
        assert [r.event_id for r in await store.attempt_log("b")] == [47, 48, 49]
        assert [r.event_id for r in await store.attempt_log("a", last=2)] == [48, 49]
        assert [r.webhook for r in await store.attempt_log(event_id=49)] == ["a", "b"]

    run(check())


def test_attempt_log_keeps_every_field_and_continues_after_reopen(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """A logged attempt reads back as written (no status, an error, no latency); after a
    reopen the log goes on from where it was and is trimmed in order."""

    async def check() -> None:
        first = [
            AttemptRecord("a", 1, 10.0, 1, None, "connection refused", None, "retry"),
            AttemptRecord("a", 1, 20.0, 2, 503, None, 12.5, "retry"),
            AttemptRecord("a", 1, 30.0, 3, 200, None, 7.25, "delivered"),
        ]
        await store.record_attempts(first, {"a": 3})
        await store.record_attempts([], {"a": 3})
        assert await store.attempt_log() == first
        reopened = await backend.reopen(store)
        later = [AttemptRecord("a", 2, 40.0, 1, 500, None, 1.0, "dead_letter")]
        await reopened.record_attempts(later, {"a": 3})
        assert await reopened.attempt_log("a") == [*first[1:], *later]
        assert await reopened.attempt_log(event_id=1) == first[1:]
        assert await reopened.attempt_log("b") == []

    run(check())


def test_attempt_log_trims_to_a_thousand_by_default(store: StateStore, run: Run[None]) -> None:
    """A webhook missing from `keep` keeps its last 1000 attempts."""

    async def check() -> None:
        records = [AttemptRecord("a", i, float(i), 1, 200, None, 1.0, "ok") for i in range(1005)]
        await store.record_attempts(records, {})
        log = await store.attempt_log("a")
        assert [r.event_id for r in log] == list(range(5, 1005))

    run(check())


# -- the lease (a store several daemons share) -------------------------------------------


def test_a_daemon_that_lost_the_lease_writes_nothing(
    backend: Backend, store: StateStore, run: Run[None]
) -> None:
    """Once another daemon has taken the lease over, every write of the old leader is
    refused with FencedError and changes nothing; the new leader's writes go through.
    (A single-host store has no lease: its second daemon is refused at open instead.)"""
    if store.leadership is None:
        pytest.skip(f"{backend.kind} has no lease; see test_state_sqlite.py")

    async def check() -> None:
        old = store.leadership
        assert old is not None
        await store.ingest([(1, "{}")], [("a", 1)], 1)
        await store.dead_letter("a", 1, 1, "HTTP 500")
        before = (await old.lease()).epoch
        await old.resign(HOLDER)
        other = await backend.open(lead=False)
        assert other.leadership is not None
        led, lease = await other.leadership.try_lead("other", 30)
        assert led
        assert (lease.holder, lease.epoch > before) == ("other", True)
        writes: list[Callable[[], Coroutine[Any, Any, object]]] = [
            lambda: store.ingest([(2, "{}")], [("a", 2)], 2),
            lambda: store.set_cursor(9),
            lambda: store.queue("a", [(3, "{}")]),
            lambda: store.requeue_dead_letters("a"),
            lambda: store.set_pause("a", Pause("HTTP 410", 1.0, False, 61.0)),
            lambda: store.save_text("profile", "{}"),
            lambda: store.record_attempts(
                [AttemptRecord("a", 1, 1.0, 1, 200, None, 1.0, "ok")], {}
            ),
        ]
        for write in writes:
            with pytest.raises(FencedError):
                await write()
        assert not (await old.try_lead(HOLDER, 30))[0]
        assert await other.high_water() == 1
        assert await other.pending_counts() == {}
        assert await other.dead_letter_counts() == {"a": 1}
        assert await other.pauses() == {}
        assert await other.saved_text("profile") is None
        assert await other.attempt_log() == []
        await other.set_cursor(5)
        assert await other.high_water() == 5

    run(check())


# -- opening, reopening and copying a whole state ------------------------------------------


async def _fill(store: StateStore) -> None:
    """Write something into every part of a state."""
    await store.ingest(
        [(1, '{"id":1}'), (2, '{"id":2,"name":"ü"}'), (4, '{"id":4}'), (6, '{"id":6}')],
        [("a", 1), ("a", 2), ("b", 2), ("a", 4), ("b", 6)],
        7,
        new_gaps=[3, 5],
        now=100.0,
    )
    await store.retry_later("a", 2, 3, 200.0, "HTTP 503 \udcff", rate_limited=1)
    await store.part_sent("a", 2, "#general")
    await store.dead_letter("a", 4, 5, "HTTP 410 Gone", now=150.0)
    await store.part_sent("a", 4, "#ops")
    await store.dead_letter("b", 6, 2, "HTTP 400", now=160.0)
    await store.reschedule_gaps([3], 300.0)
    await store.save_text("profile", '{"version":"8.2.0"}')
    await store.set_pause("a", Pause("5 events in a row", 10.0, False, 70.0, 2))
    await store.set_pause("b", Pause("paused by hand", 11.0, True, math.inf, 0))
    await store.record_attempts(
        [
            AttemptRecord("a", 2, 101.0, 1, 503, None, 5.0, "retry"),
            AttemptRecord("b", 6, 102.0, 1, None, "reset", None, "dead_letter"),
            AttemptRecord("a", 4, 103.0, 5, 410, None, 2.0, "dead_letter"),
        ],
        {"a": 10, "b": 10},
    )
    await store.stage([(8, '{"id":8}')])  # staging is never part of a state's copy


def _sorted(dump: StateDump) -> StateDump:
    """The dump with its rows in one order, to compare dumps from different backends."""
    return dataclasses.replace(
        dump,
        events=sorted(dump.events),
        outbox=sorted(dump.outbox),
        gaps=sorted(dump.gaps, key=lambda g: g.id),
        dead_letters=sorted(dump.dead_letters),
        parts_sent=sorted(dump.parts_sent),
        attempt_log=sorted(dump.attempt_log, key=lambda r: (r.at, r.webhook)),
    )


_FILLED = StateDump(
    high_water=7,
    notes={"profile": '{"version":"8.2.0"}'},
    events=[(1, '{"id":1}'), (2, '{"id":2,"name":"ü"}'), (4, '{"id":4}'), (6, '{"id":6}')],
    outbox=[
        ("a", 1, 0, 0.0, None, 100.0, 0),
        ("a", 2, 3, 200.0, "HTTP 503 \\udcff", 100.0, 1),
        ("b", 2, 0, 0.0, None, 100.0, 0),
    ],
    gaps=[Gap(3, 100.0, 300.0, 1), Gap(5, 100.0, 100.0, 0)],
    dead_letters=[("a", 4, 5, "HTTP 410 Gone", 150.0), ("b", 6, 2, "HTTP 400", 160.0)],
    parts_sent=[("a", 2, "#general"), ("a", 4, "#ops")],
    pauses={
        "a": Pause("5 events in a row", 10.0, False, 70.0, 2),
        "b": Pause("paused by hand", 11.0, True, math.inf, 0),
    },
    attempt_log=[
        AttemptRecord("a", 2, 101.0, 1, 503, None, 5.0, "retry"),
        AttemptRecord("b", 6, 102.0, 1, None, "reset", None, "dead_letter"),
        AttemptRecord("a", 4, 103.0, 5, 410, None, 2.0, "dead_letter"),
    ],
)


async def _check_filled(store: StateStore) -> None:
    """What `_fill` wrote, read back through the store's own methods."""
    assert await store.high_water() == 7
    assert await store.gaps() == _FILLED.gaps
    assert await store.pending_counts() == {"a": 2, "b": 1}
    assert [
        (p.webhook, p.event_id, p.body, p.attempts, p.next_attempt_at, p.rate_limited)
        for p in await store.next_pending("a", 9)
    ] == [("a", 1, '{"id":1}', 0, 0.0, 0), ("a", 2, '{"id":2,"name":"ü"}', 3, 200.0, 1)]
    assert await store.oldest_pending() == {"a": 100.0, "b": 100.0}
    assert await store.dead_letters() == [
        DeadLetter("a", 4, '{"id":4}', 5, "HTTP 410 Gone", 150.0),
        DeadLetter("b", 6, '{"id":6}', 2, "HTTP 400", 160.0),
    ]
    assert await store.parts_sent("a", 2) == {"#general"}
    assert await store.parts_sent("a", 4) == {"#ops"}
    assert await store.pauses() == _FILLED.pauses
    assert await store.attempt_log() == _FILLED.attempt_log
    assert await store.saved_text("profile") == '{"version":"8.2.0"}'


def test_export_holds_the_whole_state_but_staging(store: StateStore, run: Run[None]) -> None:
    """export_rows gives every part of the state as it was written (bodies, errors,
    pauses, the attempt log), and no staged page."""

    async def check() -> None:
        await _fill(store)
        assert _sorted(await store.export_rows()) == _FILLED
        assert not await store.is_empty()

    run(check())


def test_reopen_keeps_everything(backend: Backend, store: StateStore, run: Run[None]) -> None:
    """Closing and opening the store again (a restart) keeps the whole state."""

    async def check() -> None:
        await _fill(store)
        await _check_filled(store)
        reopened = await backend.reopen(store)
        await _check_filled(reopened)
        assert [rows async for rows in reopened.staged()] == []
        assert _sorted(await reopened.export_rows()) == _FILLED

    run(check())


def test_a_state_copied_into_an_empty_store_works_there(
    backend: Backend, store: StateStore, other_place: StateConfig, run: Run[None]
) -> None:
    """A whole state imported into an empty store of either backend reads back the same
    and goes on working: delivery drops bodies, the attempt log continues, pauses hold."""

    async def check() -> None:
        await _fill(store)
        target = await backend.open(other_place)
        assert await target.is_empty()
        await target.import_rows(await store.export_rows())
        assert not await target.is_empty()
        await _check_filled(target)
        assert _sorted(await target.export_rows()) == _FILLED
        assert [rows async for rows in target.staged()] == []
        await target.delivered("a", 2)
        await target.delivered("b", 2)
        await target.delivered("a", 1)
        await target.remove_dead_letter("a", 4)
        assert await target.parts_sent("a", 2) == frozenset()
        assert [event_id for event_id, _ in (await target.export_rows()).events] == [6]
        await target.record_attempts(
            [AttemptRecord("a", 1, 200.0, 1, 200, None, 1.0, "delivered")], {"a": 2}
        )
        assert [r.at for r in await target.attempt_log("a")] == [103.0, 200.0]
        await backend.close(target)
        reopened = await backend.open(other_place)
        assert await reopened.high_water() == 7
        assert [r.at for r in await reopened.attempt_log("a")] == [103.0, 200.0]

    run(check())


@pytest.mark.parametrize(
    "write",
    [
        pytest.param(lambda s: s.set_cursor(0), id="cursor"),
        pytest.param(lambda s: s.save_text("profile", "{}"), id="note"),
        pytest.param(lambda s: s.queue("a", [(1, "{}")]), id="outbox"),
        pytest.param(lambda s: s.ingest([], [], 5, [4]), id="gap"),
    ],
)
def test_any_part_of_a_state_makes_the_store_not_empty(
    store: StateStore,
    run: Run[None],
    write: Callable[[StateStore], Coroutine[Any, Any, object]],
) -> None:
    """A fresh store is empty; is_empty is False as soon as any cursor, note, outbox row or
    gap is there, so a copy never lands on a state in use; staged pages alone do not count."""

    async def check() -> None:
        await store.stage([(1, "{}")])
        assert await store.is_empty()
        await write(store)
        assert not await store.is_empty()

    run(check())


def test_a_dead_letter_alone_makes_the_store_not_empty(store: StateStore, run: Run[None]) -> None:
    """A store whose only content is a dead letter is not empty."""

    async def check() -> None:
        await store.queue("a", [(1, "{}")])
        await store.dead_letter("a", 1, 1, "HTTP 400")
        assert await store.pending_counts() == {}
        assert not await store.is_empty()

    run(check())


def test_opening_a_missing_state_without_create_fails(backend: Backend, run: Run[None]) -> None:
    """A status tool (create=False) on a place with no state gets one StateError and
    creates nothing there: opening with create afterwards finds no state."""

    async def check() -> None:
        place = backend.new_place()
        with pytest.raises(StateError) as info:
            await backend.open(place, create=False, lock=False)
        assert "\n" not in str(info.value)
        if place.url is not None:
            assert place.url.reveal() not in str(info.value)
        created = await backend.open(place)
        assert await created.high_water() is None
        assert await created.pending_counts() == {}

    run(check())
