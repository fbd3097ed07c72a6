"""The state store's one interface, which the SQLite and PostgreSQL backends both implement.

The rest of the daemon talks to a `StateStore` and does not know which backend it has. Every
method is a coroutine: SQLite answers at once from the event-loop thread, PostgreSQL over
an asyncio connection that never blocks the loop.

Guarantees both backends give:
- the cursor (high water plus gaps) moves only in the transaction that writes what each
  webhook owes (`ingest`/`ingesting`), so a crash keeps both or neither;
- an event leaves a webhook's outbox only by `delivered` (after a 2xx), `dead_letter`, or
  an operator's command;
- a store that leads under a lease (`Leadership`) commits nothing once another holder has
  taken over: every write is conditional on its epoch and raises `FencedError` otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from poller.schedule import Pause

EventRow = tuple[int, str]  # (event id, the event's JSON text as stored)


class StateError(Exception):
    """The state cannot be used; the message says which store and why. Exit 74."""


class StateLockedError(StateError):
    """Another unleash-poller process holds the SQLite state file."""


class StateUnavailableError(StateError):
    """The state store cannot be reached now (PostgreSQL down or restarting): transient.
    The daemon stops delivering, reconnects with back-off and resumes from the state."""


class FencedError(StateError):
    """A write was refused because another daemon took the lease over (a newer epoch):
    this daemon is no longer the leader and must stand by."""


@dataclass(frozen=True)
class Pending:
    webhook: str
    event_id: int
    body: str
    attempts: int
    next_attempt_at: float
    enqueued_at: float
    rate_limited: int = 0  # 429 answers so far, which do not count in `attempts`


@dataclass(frozen=True)
class AttemptRecord:
    """One delivery attempt as the attempt log keeps it: never a body, a header or a
    secret. `status` is the HTTP status, or None with `error` when none came back."""

    webhook: str
    event_id: int
    at: float
    attempt: int
    status: int | None
    error: str | None
    latency_ms: float | None
    outcome: str


@dataclass(frozen=True)
class DeadLetter:
    webhook: str
    event_id: int
    body: str
    attempts: int
    reason: str
    failed_at: float


@dataclass(frozen=True)
class Gap:
    id: int
    missing_since: float
    next_check_at: float
    checks: int


@dataclass(frozen=True)
class LeaseView:
    """The lease row as one read saw it. `expires_in_s` is by the database's clock."""

    holder: str | None
    epoch: int
    expires_in_s: float


class IngestBatch(Protocol):
    """Writes inside an open ingest transaction; `finish` moves the cursor."""

    finished: bool

    async def add(self, events: Sequence[EventRow], owed: Iterable[tuple[str, int]]) -> None: ...

    async def finish(
        self, high_water: int, new_gaps: Iterable[int] = (), settled_gaps: Iterable[int] = ()
    ) -> None: ...


class Leadership(Protocol):
    """The lease of a shared store (PostgreSQL): one holder at a time, an epoch raised at
    every takeover. Renewing and taking over are the same call."""

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        """Renew the lease if `holder` has it, take it over if it is free or expired;
        returns whether `holder` now leads, and the lease as it stands. On success, every
        later write by this store is fenced by the returned epoch."""
        ...

    async def resign(self, holder: str) -> None:
        """Give the lease up at a clean stop, so a standby takes over without waiting."""
        ...

    async def lease(self) -> LeaseView: ...


class StateStore(Protocol):
    """One open state. Call it from the event-loop thread only."""

    @property
    def where(self) -> str:
        """What to name in messages: the file path, or the database URL without secrets."""
        ...

    @property
    def leadership(self) -> Leadership | None:
        """The lease, for a store several daemons share; None for a single-host store."""
        ...

    async def close(self) -> None: ...

    async def check_in_place(self) -> None:
        """Raise StateError when the store is no longer the one written to (a SQLite file
        deleted or replaced under the daemon)."""
        ...

    async def written_elsewhere(self) -> bool:
        """Whether a tool beside the daemon (`dead-letters replay`) committed since the
        last call, so the workers look at their outboxes again."""
        ...

    def release_memory(self) -> None:
        """Drop caches a catch-up filled (SQLite's page cache)."""
        ...

    @property
    def answers_at_once(self) -> bool:
        """True when no call ever waits on I/O (SQLite, on the loop's thread): a caller may
        then run a call to its end without a task of its own (see worker_ordered)."""
        ...

    # -- cursor ------------------------------------------------------------------------
    async def high_water(self) -> int | None: ...
    async def gaps(self) -> list[Gap]: ...
    async def ingest(
        self,
        events: Sequence[EventRow],
        owed: Iterable[tuple[str, int]],
        high_water: int,
        new_gaps: Iterable[int] = (),
        settled_gaps: Iterable[int] = (),
        *,
        now: float | None = None,
    ) -> None: ...
    def ingesting(
        self, *, now: float | None = None
    ) -> AbstractAsyncContextManager[IngestBatch]: ...
    async def set_cursor(self, high_water: int) -> None: ...
    async def reschedule_gaps(self, gap_ids: Iterable[int], next_check_at: float) -> None: ...
    async def give_up_gaps(self, gap_ids: Iterable[int]) -> None: ...
    async def saved_text(self, key: str) -> str | None: ...
    async def save_text(self, key: str, value: str) -> None: ...

    # -- staging -----------------------------------------------------------------------
    async def stage(self, events: Sequence[EventRow]) -> None: ...
    def staged(self, batch: int = 1000) -> AsyncIterator[list[EventRow]]: ...
    async def clear_staging(self) -> None: ...

    # -- outbox ------------------------------------------------------------------------
    async def next_pending(self, webhook: str, limit: int, after: int = -1) -> list[Pending]: ...
    async def delivered(self, webhook: str, *event_ids: int) -> None: ...
    async def retry_later(
        self,
        webhook: str,
        event_id: int,
        attempts: int,
        next_attempt_at: float,
        error: str,
        rate_limited: int = 0,
    ) -> None: ...
    async def dead_letter(
        self, webhook: str, event_id: int, attempts: int, reason: str, now: float | None = None
    ) -> None: ...
    async def parts_sent(self, webhook: str, event_id: int) -> frozenset[str]: ...
    async def part_sent(self, webhook: str, event_id: int, part: str) -> None: ...
    async def pending_counts(self) -> dict[str, int]: ...
    async def oldest_pending(self) -> dict[str, float]: ...
    async def queue(
        self, webhook: str, events: Sequence[EventRow], now: float | None = None
    ) -> int: ...

    # -- pauses ------------------------------------------------------------------------
    async def pause(self, webhook: str) -> Pause | None: ...
    async def pauses(self) -> dict[str, Pause]: ...
    async def set_pause(self, webhook: str, pause: Pause) -> None: ...
    async def probe_failed(self, webhook: str, probe_at: float, probes: int) -> bool: ...
    async def resume(self, webhook: str, *, retry_now: bool = False) -> bool: ...

    # -- attempt log -------------------------------------------------------------------
    async def record_attempts(
        self, records: Sequence[AttemptRecord], keep: Mapping[str, int]
    ) -> None: ...
    async def attempt_log(
        self, webhook: str | None = None, event_id: int | None = None, last: int | None = None
    ) -> list[AttemptRecord]: ...

    # -- dead letters ------------------------------------------------------------------
    async def dead_letters(
        self, webhook: str | None = None, after: int = -1, limit: int = 1000
    ) -> list[DeadLetter]: ...
    async def dead_letter_counts(self) -> dict[str, int]: ...
    async def remove_dead_letter(self, webhook: str, event_id: int) -> None: ...
    async def requeue_dead_letters(self, webhook: str | None = None) -> int: ...

    # -- moving a state (`state copy`) -------------------------------------------------
    async def is_empty(self) -> bool:
        """No cursor, outbox, dead letter, gap or note: safe to copy into."""
        ...

    async def export_rows(self) -> StateDump: ...
    async def import_rows(self, dump: StateDump) -> None:
        """Write a whole state into an empty store, in one transaction."""
        ...


@dataclass(frozen=True)
class StateDump:
    """A whole state, for `state copy` (bodies included; staging never is)."""

    high_water: int | None
    notes: dict[str, str]
    events: list[EventRow]
    outbox: list[tuple[str, int, int, float, str | None, float, int]]
    # (webhook, event_id, attempts, next_attempt_at, last_error, enqueued_at, rate_limited)
    gaps: list[Gap]
    dead_letters: list[tuple[str, int, int, str, float]]
    # (webhook, event_id, attempts, reason, failed_at)
    parts_sent: list[tuple[str, int, str]]
    pauses: dict[str, Pause]
    attempt_log: list[AttemptRecord]


def storable(text: str) -> str:
    """An error text as a database can store it: a receiver's or aiohttp's text may carry
    lone surrogates (undecodable bytes), which UTF-8 cannot; they become `\\udcxx` escapes.
    PostgreSQL refuses NUL in text too, so it becomes `\\x00`."""
    if text.isascii() and "\x00" not in text:
        return text
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")
