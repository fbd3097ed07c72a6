"""`unleash-poller redeliver`: re-read a range of events from Unleash's own history and
queue them for one webhook again, through its filters, in id order.

The events go into the outbox, nothing is sent from here: a running daemon picks them
up (it sees the state file written by another process), a stopped one delivers them on
its next start. A range is event ids (`--from-id A [--to-id B]`) or times
(`--since ISO [--until ISO]`). Ids are looked up by id where the server can (7.x+);
otherwise, and for times, the log is paged through from the newest event back.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass

from poller.app import make_session
from poller.config import Config, WebhookConfig
from poller.filters import EventFilter
from poller.render import Event
from poller.source import UnleashSource
from poller.state import StateStore

_ID_CHUNK = 100  # ids per lookup: Unleash answers at most `limit` events per page


class RangeError(ValueError):
    """A range that cannot be redelivered; the message is one line for the operator."""


@dataclass(frozen=True)
class Range:
    """Inclusive bounds: ids, or aware datetimes (UTC when given without a zone)."""

    from_id: int | None = None
    to_id: int | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def __post_init__(self) -> None:
        if (self.from_id is None) == (self.since is None):
            raise RangeError("give --from-id or --since (one of them)")
        if self.from_id is None and self.to_id is not None:
            raise RangeError("--to-id goes with --from-id")
        if self.since is None and self.until is not None:
            raise RangeError("--until goes with --since")
        if self.from_id is not None and self.from_id < 0:
            raise RangeError(f"--from-id {self.from_id}: event ids are >= 0")
        if self.to_id is not None and self.from_id is not None and self.to_id < self.from_id:
            raise RangeError(
                f"--to-id {self.to_id} is before --from-id {self.from_id} (reversed range)"
            )
        if self.until is not None and self.since is not None and self.until <= self.since:
            raise RangeError(
                f"--until {self.until.isoformat()} is not after --since "
                f"{self.since.isoformat()} (empty or reversed range)"
            )

    def holds(self, event: Event) -> bool:
        if self.from_id is not None:
            event_id = _id(event)
            return self.from_id <= event_id and (self.to_id is None or event_id <= self.to_id)
        created = created_at(event)
        assert self.since is not None
        return created is not None and (
            self.since <= created and (self.until is None or created <= self.until)
        )

    def describe(self) -> str:
        if self.from_id is not None:
            return f"ids {self.from_id}..{'' if self.to_id is None else self.to_id}"
        assert self.since is not None
        until = "" if self.until is None else self.until.isoformat()
        return f"{self.since.isoformat()}..{until}"


def parse_time(text: str, option: str) -> dt.datetime:
    """An ISO 8601 date or date-time from the command line, as an aware datetime; one
    without a zone is UTC (Unleash's own `createdAt` is UTC)."""
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise RangeError(
            f"{option} {text!r}: not an ISO 8601 time (e.g. 2026-11-28 or 2026-11-28T10:00:00Z)"
        ) from None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def created_at(event: Event) -> dt.datetime | None:
    """An event's `createdAt`, or None when it has none that parses."""
    value = event.get("createdAt")
    if not isinstance(value, str):
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


@dataclass(frozen=True)
class Result:
    queued: int  # newly queued for the webhook
    already_pending: int  # in range and wanted, but still pending anyway
    filtered_out: int  # in range, not wanted by the webhook's filters
    method: str  # how the events were read, for the operator


Progress = Callable[[int, str], None]  # (events read so far, what is being done)


async def redeliver(
    source: UnleashSource,
    state: StateStore,
    hook: WebhookConfig,
    wanted: Range,
    page_size: int,
    progress: Progress | None = None,
) -> Result:
    """Read `wanted` from Unleash and queue what `hook`'s filters take. Raises RangeError
    for a range beyond the log or with no event in it."""
    caps = await source.detect()
    first = await source.read(0, 1)
    if not first.events:
        raise RangeError("Unleash's event log is empty: nothing to redeliver")
    newest = _id(first.events[0])
    if wanted.from_id is not None and wanted.from_id > newest:
        raise RangeError(f"--from-id {wanted.from_id} is beyond the log (newest event is {newest})")
    if wanted.to_id is not None and wanted.to_id > newest:
        raise RangeError(f"--to-id {wanted.to_id} is beyond the log (newest event is {newest})")
    events: dict[int, Event] = {}
    method = ""
    if wanted.from_id is not None and caps.id_filter:
        method = "looked up by id"
        events = await _by_id(source, wanted, newest, progress)
    if not source.capabilities.id_filter or not method:  # none, or found ignored on the way
        method = (
            "paged through the log from the newest event (this Unleash has no lookup by id)"
            if wanted.from_id is not None
            else "paged through the log from the newest event back to --since"
        )
        events = await _by_paging(source, wanted, page_size, progress)
    if not events:
        raise RangeError(f"no events in {wanted.describe()} (nothing queued)")
    event_filter = EventFilter(hook.events, hook.projects, hook.environments)
    rows = [
        (i, json.dumps(events[i], ensure_ascii=False, separators=(",", ":")))
        for i in sorted(events)
        if event_filter.matches(events[i])
    ]
    queued = await state.queue(hook.name, rows)
    return Result(queued, len(rows) - queued, len(events) - len(rows), method)


async def _by_id(
    source: UnleashSource, wanted: Range, newest: int, progress: Progress | None
) -> dict[int, Event]:
    assert wanted.from_id is not None
    last = newest if wanted.to_id is None else wanted.to_id
    found: dict[int, Event] = {}
    for start in range(wanted.from_id, last + 1, _ID_CHUNK):
        ids = list(range(start, min(start + _ID_CHUNK, last + 1)))
        events, _failing = await source.fetch_ids(ids)
        found.update((_id(e), e) for e in events if wanted.holds(e))
        if progress:
            progress(len(found), f"ids up to {ids[-1]} of {last}")
    return found


async def _by_paging(
    source: UnleashSource, wanted: Range, page_size: int, progress: Progress | None
) -> dict[int, Event]:
    """Newest first, until a whole page lies before the range: pages are ordered by
    creation time, and an id can commit a little out of order, so one page of margin."""
    found: dict[int, Event] = {}
    read = 0
    async for page in source.pages(page_size, page_size):
        read += len(page.events)
        found.update((_id(e), e) for e in page.events if wanted.holds(e))
        if progress:
            progress(read, f"{len(found)} in range")
        if page.events and all(_before(e, wanted) for e in page.events):
            break
    return found


def _before(event: Event, wanted: Range) -> bool:
    if wanted.from_id is not None:
        return _id(event) < wanted.from_id
    created = created_at(event)
    return created is not None and wanted.since is not None and created < wanted.since


def _id(event: Event) -> int:
    value = event["id"]
    assert isinstance(value, int)  # source._check_event made sure
    return value


async def redeliver_from(
    config: Config, state: StateStore, hook: WebhookConfig, wanted: Range, progress: Progress | None
) -> Result:
    """`redeliver` with its own HTTP session (the CLI's entry point)."""
    async with make_session(config) as session:
        source = UnleashSource(session, config.unleash)
        return await redeliver(source, state, hook, wanted, config.unleash.page_size, progress)
