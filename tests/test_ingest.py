"""Taking events into the outbox: paging, staging, gaps from late commits, start positions.

The source here is an in-memory event log that pages newest first, like Unleash; the
same behaviour is proven against a real Unleash in the end-to-end tests.
"""

from __future__ import annotations

import asyncio
import sqlite3
import tempfile
import tomllib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from poller import ingest as ingest_module
from poller.config import Config, parse_config
from poller.ingest import Ingest
from poller.sink import NullMetrics
from poller.source import Capabilities, Event, Page, UnleashError
from poller.state import EventRow, SqliteState


class RecordingSink(NullMetrics):
    """Keeps what Ingest reports itself (given-up gaps, burst overflows)."""

    def __init__(self) -> None:
        self.gaps_expired: list[int] = []
        self.burst_overflows: list[int] = []

    def on_gaps_expired(self, count: int) -> None:
        self.gaps_expired.append(count)

    def on_burst_overflow(self, count: int = 1) -> None:
        self.burst_overflows.append(count)


class FakeLog:
    """Newest-first pages over a list of visible events, like Unleash's search endpoint."""

    def __init__(self) -> None:
        self.visible: list[Event] = []
        self.capabilities = Capabilities("search", id_filter=True)
        self.on_page: list[Event] = []  # events that become visible after the first page
        self.order = "id"  # or "created": newest-first by position in `visible` (commit time)
        self.pages_read = 0
        # The probe reports the log's size (as Unleash's search API does), so a burst of more
        # than a page is read oldest page first; False keeps every read newest first.
        self.report_total = True
        self.probed_total: int | None = None
        self.total_skew = 0  # added to the size the probe reports (a log that moved, a liar)
        self.on_read: list[Event] = []  # become visible after the first oldest-first read
        # The size asked for by each oldest-first read (pages_read counts the newest-first ones).
        self.read_sizes: list[int] = []

    def add(self, *ids: int, kind: str = "feature-created", project: str = "default") -> None:
        for i in ids:
            self.visible.append(
                {
                    "id": i,
                    "type": kind,
                    "project": project,
                    "createdAt": f"2026-01-01T00:00:{i % 60:02d}.000Z",
                }
            )

    def _sorted(self) -> list[Event]:
        if self.order == "created":
            return sorted(self.visible, key=self.visible.index, reverse=True)
        return sorted(self.visible, key=lambda e: e["id"], reverse=True)  # type: ignore[arg-type,return-value]

    async def changed(self) -> bool:
        if self.report_total:
            self.probed_total = len(self.visible) + self.total_skew
        return True

    async def page(self, offset: int, limit: int) -> Page:
        events = self._sorted()
        return Page(events[offset : offset + limit], len(events))

    async def read(self, offset: int, limit: int) -> Page:
        page = await self.page(offset, limit)
        self.read_sizes.append(limit)
        self.visible.extend(self.on_read)
        self.on_read = []
        return page

    async def pages(self, first_limit: int, limit: int) -> AsyncIterator[Page]:
        offset, size = 0, first_limit
        while True:
            page = await self.page(offset, size)
            self.pages_read += 1
            yield page
            if self.on_page:
                self.visible.extend(self.on_page)
                self.on_page = []
            if len(page.events) < size:
                return
            offset += len(page.events)
            size = limit

    async def fetch_ids(self, ids: Sequence[int]) -> tuple[list[Event], list[int]]:
        return [e for e in self.visible if e["id"] in set(ids)], []


def _config(
    tmp_path: Path, start_from: str = '"latest"', extra: str = "", page_size: int = 10
) -> Config:
    text = f"""
[unleash]
url = "http://u"
token = "t"
start_from = {start_from}
gap_grace_s = 10
page_size = {page_size}
[state]
path = "s.sqlite3"
[[webhooks]]
name = "all"
url = "http://h/all"
[[webhooks]]
name = "web"
url = "http://h/web"
projects = ["web"]
{extra}
"""
    return parse_config(tomllib.loads(text), tmp_path)


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


def _ingest(
    tmp_path: Path, log: FakeLog, start_from: str = '"latest"', sink: RecordingSink | None = None
) -> tuple[Ingest, SqliteState, set[str]]:
    state = SqliteState.open(tmp_path / "s.sqlite3")
    woken: set[str] = set()
    config = _config(tmp_path, start_from)
    ingest = Ingest(config, state, log, woken.update, sink or RecordingSink())  # type: ignore[arg-type]
    return ingest, state, woken


def _pending(state: SqliteState, hook: str) -> list[int]:
    return [p.event_id for p in asyncio.run(state.next_pending(hook, 100_000))]


async def _staged(state: SqliteState) -> list[list[EventRow]]:
    return [rows async for rows in state.staged()]


def test_latest_start_skips_history_then_takes_new_events(tmp_path: Path, log: FakeLog) -> None:
    """From `latest`, old events are not delivered; later ones are, to matching webhooks."""
    log.add(1, 2, 3)
    ingest, state, woken = _ingest(tmp_path, log)
    assert asyncio.run(ingest.poll()) == 0
    assert asyncio.run(state.high_water()) == 3
    assert asyncio.run(state.pending_counts()) == {}
    log.add(4)
    log.add(5, project="web")
    assert asyncio.run(ingest.poll()) == 2
    assert _pending(state, "all") == [4, 5]
    assert _pending(state, "web") == [5]
    assert woken == {"all", "web"}
    assert asyncio.run(state.gaps()) == []


def test_the_cursor_is_read_from_the_state_when_polling_not_when_made(
    tmp_path: Path, log: FakeLog
) -> None:
    """Ingest reads the cursor at its first poll, and again at `load()` (after a takeover
    another daemon may have moved it): events up to the cursor the state holds then are
    not taken in again, and no `latest` start skips what lies above it."""
    log.add(1, 2, 3)
    ingest, state, _ = _ingest(tmp_path, log)
    assert ingest.high_water is None
    asyncio.run(state.ingest([], [], 1))  # written after Ingest was made
    assert asyncio.run(ingest.poll()) == 2
    assert _pending(state, "all") == [2, 3]
    log.add(4, 5, 6)
    asyncio.run(state.ingest([], [], 5))  # another leader took 4 and 5 meanwhile
    asyncio.run(ingest.load())
    assert ingest.high_water == 5
    assert asyncio.run(ingest.poll()) == 1
    assert _pending(state, "all") == [2, 3, 6]


def test_explicit_start_id_and_earliest(tmp_path: Path, log: FakeLog) -> None:
    """`start_from = N` delivers ids above N; `earliest` delivers all, with no gaps below the
    oldest event (older ids were deleted by Unleash, not pending)."""
    log.add(100, 101, 103)
    ingest, state, _ = _ingest(tmp_path, log, "101")
    asyncio.run(ingest.poll())
    assert _pending(state, "all") == [103]
    assert [g.id for g in asyncio.run(state.gaps())] == [102]
    asyncio.run(state.close())
    ingest, state, _ = _ingest(tmp_path / "b", log, '"earliest"')
    asyncio.run(ingest.poll())
    assert _pending(state, "all") == [100, 101, 103]
    assert [g.id for g in asyncio.run(state.gaps())] == [102]


def test_burst_across_pages_and_staging(
    tmp_path: Path, log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of many pages (spilled to disk) is taken in whole, once, in id order."""
    monkeypatch.setattr(ingest_module, "STAGE_AT", 25)
    log.report_total = False  # else it is read oldest page first, and nothing is staged
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(2, 503))
    assert asyncio.run(ingest.poll()) == 501
    assert _pending(state, "all") == list(range(2, 503))
    assert asyncio.run(state.gaps()) == []
    assert asyncio.run(_staged(state)) == []


def _woken_at(
    tmp_path: Path, log: FakeLog, page_size: int = 10
) -> tuple[Ingest, SqliteState, list[tuple[int, int]]]:
    """An Ingest whose every wake notes (newest-first pages read so far, cursor)."""
    state = SqliteState.open(tmp_path / "s.sqlite3")
    wakes: list[tuple[int, int]] = []
    holder: list[Ingest] = []

    def wake(hooks: set[str]) -> None:
        wakes.append((log.pages_read, holder[0].high_water or 0))

    config = _config(tmp_path, page_size=page_size)
    holder.append(Ingest(config, state, log, wake, RecordingSink()))  # type: ignore[arg-type]
    return holder[0], state, wakes


def test_a_burst_is_read_oldest_page_first_and_each_page_woken_as_taken(
    tmp_path: Path, log: FakeLog
) -> None:
    """Once a read has measured the log, a burst of several pages is read from its oldest
    page up: each page's events are taken in (durably, cursor moved) and the workers woken
    before the next page is read, so delivery starts after one page, not the whole burst."""
    log.add(1, 2, 3)
    ingest, state, wakes = _woken_at(tmp_path, log)
    asyncio.run(ingest.poll())  # `latest`: cursor 3, the log's size measured
    log.add(*range(4, 49))  # 45 new events, pages of 10
    log.pages_read = 0
    log.read_sizes = []
    assert asyncio.run(ingest.poll()) == 45
    # Pages of 10 read one place deeper than the size says: 9 new events each, oldest first,
    # until no more than a page is left; that is read newest first (one page).
    assert wakes == [(0, 12), (0, 21), (0, 30), (0, 39), (1, 48)]
    assert len(log.read_sizes) == 4
    assert log.pages_read == 1
    assert _pending(state, "all") == list(range(4, 49))
    assert _pending(state, "web") == []
    assert asyncio.run(state.gaps()) == []
    assert asyncio.run(state.high_water()) == 48


def test_a_burst_is_read_oldest_first_in_pages_no_bigger_than_a_burst_page(
    tmp_path: Path, log: FakeLog
) -> None:
    """At the default page_size (1,000) a burst is still read oldest first in pages of
    BURST_PAGE (250): a page's objects are all a burst holds at once, so its peak stays
    small. Every event is taken once, in id order, each page woken as it is taken."""
    assert ingest_module.BURST_PAGE == 250
    log.add(*range(1, 1001))
    ingest, state, wakes = _woken_at(tmp_path, log, page_size=1000)
    asyncio.run(ingest.poll())  # `latest`: cursor 1000, the log's size measured
    log.add(*range(1001, 2001))  # 1,000 new events: one page_size, four burst pages
    log.pages_read = 0
    log.read_sizes = []
    assert asyncio.run(ingest.poll()) == 1000
    # Read 12 deeper than the size says (5 % of a page): 238 new events a page, oldest
    # first, until no more than a burst page is left (48), which the newest-first read takes.
    assert log.read_sizes == [250, 250, 250, 250]
    assert [cursor for _, cursor in wakes] == [1238, 1476, 1714, 1952, 2000]
    assert log.pages_read == 1
    assert _pending(state, "all") == list(range(1001, 2001))
    assert asyncio.run(state.high_water()) == 2000


def test_oldest_first_stops_at_a_missing_id_and_the_rest_is_read_newest_first(
    tmp_path: Path, log: FakeLog
) -> None:
    """A run is taken only while no id is missing: at a hole (a rolled-back or still open
    transaction) the newest-first read takes over, and the hole becomes a gap."""
    log.add(1)
    ingest, state, wakes = _woken_at(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(2, 16), *range(17, 50))  # 16 missing
    log.pages_read = 0
    assert asyncio.run(ingest.poll()) == 47
    assert wakes[:2] == [(0, 10), (0, 15)]  # a run of 9, then 5 up to the hole
    assert [g.id for g in asyncio.run(state.gaps())] == [16]
    assert _pending(state, "all") == [*range(2, 16), *range(17, 50)]
    log.add(16)
    asyncio.run(ingest.recheck_gaps(now=10**10))
    assert _pending(state, "all") == list(range(2, 50))


@pytest.mark.parametrize("skew", [-40, -9, -1, 1, 5, 40, 10**6])
def test_a_log_size_that_is_wrong_costs_a_read_never_an_event(
    tmp_path: Path, log: FakeLog, skew: int
) -> None:
    """The size the probe reported is only a hint where the oldest page lies: whatever it
    says (events deleted, more arrived, a proxy's stale answer), every event is taken in
    once, in id order."""
    log.add(*range(1, 6))
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(6, 66))
    log.total_skew = skew
    assert asyncio.run(ingest.poll()) == 60
    assert _pending(state, "all") == list(range(6, 66))
    assert asyncio.run(state.gaps()) == []
    assert len(log.read_sizes) <= 60 // 5 + 1  # each oldest-first read took half a page or ended it


def test_an_oldest_first_read_that_fails_falls_back_to_reading_newest_first(
    tmp_path: Path, log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server that fails the read the size pointed to (an offset past its end, say) does
    not fail the poll, or every poll after it while the size stays wrong: the newest-first
    read takes the burst in."""
    log.add(*range(1, 6))
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())

    asked: list[int] = []

    async def refuse(offset: int, limit: int) -> Page:
        asked.append(offset)
        raise UnleashError("bad_response", f"offset {offset} is past the end")

    monkeypatch.setattr(log, "read", refuse)
    log.add(*range(6, 66))
    log.total_skew = 10**6
    assert asyncio.run(ingest.poll()) == 60
    assert _pending(state, "all") == list(range(6, 66))
    assert asked == [10**6 + 60 - 10 + 1]  # one try where the size pointed, then newest first
    assert asyncio.run(ingest.poll()) == 0  # and the next poll is not failed by it either


def test_events_arriving_during_an_oldest_first_read_are_not_lost(
    tmp_path: Path, log: FakeLog
) -> None:
    """Events that arrive after the probe shift every page deeper: the next page's place
    is corrected from the size each page reports, and nothing is lost or taken twice."""
    log.add(1)
    ingest, state, wakes = _woken_at(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(2, 60))
    log.pages_read = 0
    log.on_read = [{"id": i, "type": "feature-created", "createdAt": "x"} for i in range(60, 67)]
    asyncio.run(ingest.poll())
    # Oldest first went on past the arrival: the second page missed (it lay 7 places
    # higher than thought), the size it reported put the third right, and the run taken
    # then spans both (11..26); then 9 events a page, up to the last full page.
    assert [cursor for pages, cursor in wakes if pages == 0] == [10, 26, 35, 44, 53, 62]
    asyncio.run(ingest.poll())
    assert _pending(state, "all") == list(range(2, 67))
    assert asyncio.run(state.gaps()) == []


def test_without_a_measured_log_or_an_id_filter_a_burst_is_read_newest_first(
    tmp_path: Path, log: FakeLog
) -> None:
    """The first read of a run measures the log (it cannot be read oldest first), and a
    server without the id filter, whose late ids are found only by reading down to
    them, is always read newest first."""
    log.add(*range(1, 40))
    ingest, state, _ = _ingest(tmp_path, log, start_from="2")
    asyncio.run(ingest.poll())
    assert len(log.read_sizes) == 0
    assert _pending(state, "all") == list(range(3, 40))
    log.capabilities = Capabilities("search", id_filter=False)
    log.add(*range(40, 80))
    asyncio.run(ingest.poll())
    assert len(log.read_sizes) == 0
    assert _pending(state, "all") == list(range(3, 80))


def test_events_arriving_while_paging_are_not_lost(tmp_path: Path, log: FakeLog) -> None:
    """New events shifting offsets mid-way through paging cause no gap and no duplicate."""
    log.report_total = False  # newest first only
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(2, 120))
    log.on_page = [{"id": i, "type": "feature-created", "createdAt": "x"} for i in range(120, 135)]
    asyncio.run(ingest.poll())
    asyncio.run(ingest.poll())
    assert _pending(state, "all") == list(range(2, 135))


def test_late_commit_is_found_by_recheck(tmp_path: Path, log: FakeLog) -> None:
    """An id that was not visible when later ids were (an open transaction) is taken in
    when it commits, though the cursor has passed it."""
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(2, 4, 5)  # 3 is still uncommitted
    asyncio.run(ingest.poll())
    assert [g.id for g in asyncio.run(state.gaps())] == [3]
    assert _pending(state, "all") == [2, 4, 5]
    log.add(3)
    with capture_logs() as logs:
        asyncio.run(ingest.recheck_gaps(now=10**10))
    assert _pending(state, "all") == [2, 3, 4, 5]
    assert asyncio.run(state.gaps()) == []
    assert [e["count"] for e in logs if e["event"] == "gap.filled"] == [1]


def test_rolled_back_id_is_given_up_after_grace(tmp_path: Path, log: FakeLog) -> None:
    """An id that never appears is re-checked, then given up once the grace period passes."""
    log.add(1)
    sink = RecordingSink()
    ingest, state, _ = _ingest(tmp_path, log, sink=sink)
    asyncio.run(ingest.poll())
    log.add(3)
    asyncio.run(ingest.poll())
    [gap] = asyncio.run(state.gaps())
    asyncio.run(ingest.recheck_gaps(now=gap.missing_since + 1))
    [gap] = asyncio.run(state.gaps())
    assert gap.checks == 1
    assert gap.next_check_at > gap.missing_since + 1
    asyncio.run(ingest.recheck_gaps(now=gap.missing_since + 11))
    assert asyncio.run(state.gaps()) == []
    assert sink.gaps_expired == [1]


def test_gap_rechecks_back_off_doubling_to_a_cap(tmp_path: Path, log: FakeLog) -> None:
    """A missing id is asked again after 1, 2, 4 ... s, at most 30 s apart, however many
    times it has been asked (a long grace period once overflowed 2.0**checks)."""
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)  # gap_grace_s 10: not reached below
    asyncio.run(ingest.poll())
    log.add(3)
    asyncio.run(ingest.poll())
    [gap] = asyncio.run(state.gaps())
    now = gap.next_check_at
    waits = []
    for _ in range(3):
        asyncio.run(ingest.recheck_gaps(now=now))
        [gap] = asyncio.run(state.gaps())
        waits.append(gap.next_check_at - now)
        now = gap.next_check_at
    assert waits == [1.0, 2.0, 4.0]
    with sqlite3.connect(tmp_path / "s.sqlite3") as db:
        db.execute("UPDATE gaps SET checks = 1100")
    db.close()
    ingest.gaps = {g.id: g for g in asyncio.run(state.gaps())}
    asyncio.run(ingest.recheck_gaps(now=now))
    [gap] = asyncio.run(state.gaps())
    assert gap.next_check_at - now == 30.0
    assert gap.checks == 1101


def test_legacy_burst_overflow_is_reported_to_the_sink(tmp_path: Path, log: FakeLog) -> None:
    """When the legacy API's newest events do not reach down to the cursor, the poll
    reports one burst overflow to the metrics sink."""
    log.capabilities = Capabilities("legacy", id_filter=False)
    log.add(1)
    sink = RecordingSink()
    ingest, state, _ = _ingest(tmp_path, log, sink=sink)
    asyncio.run(ingest.poll())
    log.add(*range(2, 201))

    async def newest_100(first_limit: int, limit: int) -> AsyncIterator[Page]:
        yield Page(log._sorted()[:100], 100)  # all the legacy events API returns

    log.pages = newest_100  # type: ignore[method-assign]
    asyncio.run(ingest.poll())
    assert sink.burst_overflows == [1]
    assert _pending(state, "all") == list(range(101, 201))


def test_legacy_gap_below_a_small_burst_is_not_an_overflow(tmp_path: Path, log: FakeLog) -> None:
    """On the legacy API a burst that reaches down to the cursor is no overflow, even when
    a rolled-back id leaves its lowest new id above cursor + 1."""
    log.capabilities = Capabilities("legacy", id_filter=False)
    log.add(1)
    sink = RecordingSink()
    ingest, state, _ = _ingest(tmp_path, log, sink=sink)
    asyncio.run(ingest.poll())
    log.add(*range(3, 20))  # 2 rolled back
    with capture_logs() as logs:
        assert asyncio.run(ingest.poll()) == 17
    assert sink.burst_overflows == []
    assert [e for e in logs if e["event"] == "poll.burst_overflow"] == []
    assert [g.id for g in asyncio.run(state.gaps())] == [2]


def test_reading_stops_at_the_page_that_reaches_the_cursor(tmp_path: Path, log: FakeLog) -> None:
    """A poll reads no page past the first one holding an id at or below the cursor."""
    log.report_total = False  # newest first only
    log.add(*range(1, 200))
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(200, 255))  # 55 new: the first page (50) and part of the second
    log.pages_read = 0
    assert asyncio.run(ingest.poll()) == 55
    assert log.pages_read == 2
    assert _pending(state, "all") == list(range(200, 255))


def test_a_long_catch_up_logs_its_progress(
    tmp_path: Path, log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every tenth page a catch-up read newest first logs how far it has got, counting
    staged events too."""
    log.report_total = False
    monkeypatch.setattr(ingest_module, "STAGE_AT", 25)
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(*range(2, 252))  # pages of 50 then 10: 250 new events fill 21 pages
    with capture_logs() as logs:
        assert asyncio.run(ingest.poll()) == 250
    progress = [(e["pages"], e["new_events"]) for e in logs if e["event"] == "poll.catching_up"]
    assert progress == [(10, 140), (20, 240)]
    assert {e["total_in_unleash"] for e in logs if e["event"] == "poll.catching_up"} == {251}
    assert _pending(state, "all") == list(range(2, 252))


def test_late_commit_found_in_a_normal_page(tmp_path: Path, log: FakeLog) -> None:
    """A gap id that shows up in the newest pages is taken in by the ordinary poll."""
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(2, 4)
    asyncio.run(ingest.poll())
    log.add(3)
    asyncio.run(ingest.poll())
    assert _pending(state, "all") == [2, 3, 4]
    assert asyncio.run(state.gaps()) == []


def test_without_id_filter_late_ids_are_found_by_reading_deeper(
    tmp_path: Path, log: FakeLog
) -> None:
    """On servers that ignore the id filter (5.x, 6.x) a missing id is looked for further
    down the newest-first pages, and taken in when it shows up there."""
    log.capabilities = Capabilities("search", id_filter=False)
    log.add(1)
    ingest, state, _ = _ingest(tmp_path, log)
    asyncio.run(ingest.poll())
    log.add(2, *range(4, 40))
    asyncio.run(ingest.poll())
    assert [g.id for g in asyncio.run(state.gaps())] == [3]
    # The late event sorts by its (old) timestamp: below the 36 newer ones, past one page.
    log.visible.insert(0, {"id": 3, "type": "feature-created", "createdAt": "x"})
    log.order = "created"
    asyncio.run(ingest.poll())
    assert _pending(state, "all") == list(range(2, 40))
    assert asyncio.run(state.gaps()) == []


class StaleProbeLog(FakeLog):
    """A server (or proxy) that answers 304 to every probe, whatever was added."""

    probes = 0

    async def changed(self) -> bool:
        self.probes += 1
        return False


def test_a_probe_that_always_says_unchanged_cannot_hide_events(tmp_path: Path) -> None:
    """With every probe answered 304, new events are still read within
    full_read_interval_s, with a warning that the probe missed them."""
    log = StaleProbeLog()
    log.add(1, 2)
    now = [1000.0]
    state = SqliteState.open(tmp_path / "s.sqlite3")
    config = _config(tmp_path, extra="")
    ingest = Ingest(config, state, log, lambda hooks: None, clock=lambda: now[0])  # type: ignore[arg-type]
    assert config.unleash.full_read_interval_s == 60.0
    asyncio.run(ingest.poll())  # `latest`: the cursor starts at 2
    log.add(3)
    now[0] += 59.0
    assert asyncio.run(ingest.poll()) == 0  # trusted: the probe said nothing changed
    now[0] += 1.0
    with capture_logs() as logs:
        assert asyncio.run(ingest.poll()) == 1
    assert _pending(state, "all") == [3]
    assert [line["event"] for line in logs if line["log_level"] == "warning"] == [
        "poll.probe_missed_events"
    ]
    log.add(4)
    now[0] += 30.0
    assert asyncio.run(ingest.poll()) == 0  # the interval counts from the last full read
    assert log.probes == 4


def _unfiltered_config(tmp_path: Path) -> Config:
    text = """
[unleash]
url = "http://u"
token = "t"
start_from = "latest"
page_size = 10
[state]
path = "s.sqlite3"
[[webhooks]]
name = "all"
url = "http://h/all"
[[webhooks]]
name = "also"
url = "http://h/also"
events = ["*"]
"""
    return parse_config(tomllib.loads(text), tmp_path)


@pytest.mark.parametrize("stage_at", [25, 10_000])
def test_unfiltered_webhooks_get_the_bodies_as_read(
    tmp_path: Path, log: FakeLog, monkeypatch: pytest.MonkeyPatch, stage_at: int
) -> None:
    """With no webhook filtering, a burst is owed to every webhook with the body as Unleash
    sent it, whether it was spilled to the state file (kept as text) or held in memory."""
    monkeypatch.setattr(ingest_module, "STAGE_AT", stage_at)
    log.add(1)
    state = SqliteState.open(tmp_path / "s.sqlite3")
    ingest = Ingest(_unfiltered_config(tmp_path), state, log, lambda hooks: None)  # type: ignore[arg-type]
    asyncio.run(ingest.poll())
    log.add(*range(2, 103))
    log.visible[5]["data"] = {"ü": [1.5, None, "\u2028"], "n": 10**20}
    assert asyncio.run(ingest.poll()) == 101
    expected = [ingest_module._dump(e) for e in sorted(log.visible[1:], key=lambda e: e["id"])]  # type: ignore[arg-type,return-value]
    for hook in ("all", "also"):
        assert [p.body for p in asyncio.run(state.next_pending(hook, 1000))] == expected


def test_a_catch_up_gives_memory_back_once_workers_are_woken(
    tmp_path: Path, log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Taking in GIVE_BACK_AT events or more hands the memory back (right after the poll,
    on the next loop turn); a smaller take does not."""
    monkeypatch.setattr(ingest_module, "GIVE_BACK_AT", 50)
    monkeypatch.setattr(ingest_module, "STAGE_AT", 25)
    calls: list[str] = []
    monkeypatch.setattr(ingest_module.memory, "give_back", lambda: calls.append("trim") or True)
    log.add(1)
    ingest, _, woken = _ingest(tmp_path, log)

    async def poll_then_turn() -> list[str]:
        await ingest.poll()
        seen = list(calls)
        await asyncio.sleep(0)
        return seen

    asyncio.run(poll_then_turn())
    log.add(*range(2, 51))  # 49 events
    assert asyncio.run(poll_then_turn()) == []
    assert calls == []
    log.add(*range(51, 101))  # 50 events
    assert asyncio.run(poll_then_turn()) == []  # not before the workers get to run
    assert calls == ["trim"]
    assert woken == {"all"}


def test_starting_from_latest_over_a_full_page_gives_memory_back(
    tmp_path: Path, log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`latest` reads a whole page to find where to start: that page's memory is handed
    back too, once it is a large one."""
    monkeypatch.setattr(ingest_module, "GIVE_BACK_AT", 10)
    calls: list[str] = []
    monkeypatch.setattr(ingest_module.memory, "give_back", lambda: calls.append("trim") or True)
    log.add(*range(1, 10))
    small, _, _ = _ingest(tmp_path / "small", log)

    async def poll_then_turn(ingest: Ingest) -> None:
        await ingest.poll()
        await asyncio.sleep(0)

    asyncio.run(poll_then_turn(small))
    assert calls == []
    log.add(10)
    full, _, _ = _ingest(tmp_path / "full", log)
    asyncio.run(poll_then_turn(full))
    assert calls == ["trim"]
    assert full.high_water == 10


@settings(max_examples=150, deadline=None)
@given(
    before=st.integers(1, 30),
    burst=st.integers(0, 90),
    picks=st.lists(st.integers(0, 89), max_size=12),
    arriving=st.integers(0, 15),
    skew=st.integers(-30, 30),
    order=st.sampled_from(["id", "created"]),
)
def test_oldest_first_takes_every_event_once_and_never_behind_the_cursor(
    before: int, burst: int, picks: list[int], arriving: int, skew: int, order: str
) -> None:
    """Whatever the burst (ids rolled back, ids committed late, events arriving while it is
    read, a wrong size, pages in commit order): every event is taken in once, and an event
    is only ever taken below the cursor as a gap that is settled, never behind in order."""
    burst_ids = list(range(before + 1, before + 1 + burst))
    holes = {burst_ids[i] for i in picks[: len(picks) // 2] if i < burst}
    late = {burst_ids[i] for i in picks[len(picks) // 2 :] if i < burst} - holes
    log = FakeLog()
    log.order = order
    log.add(*range(1, before + 1))
    with tempfile.TemporaryDirectory() as tmp:
        ingest, state, _ = _ingest(Path(tmp), log)
        taken: list[tuple[list[int], list[int]]] = []
        real_ingest = state.ingest

        async def recording(events, owed, high_water, new_gaps=(), settled_gaps=(), **kw):  # type: ignore[no-untyped-def]
            taken.append(([i for i, _ in events], list(settled_gaps)))
            await real_ingest(events, owed, high_water, new_gaps, settled_gaps, **kw)

        state.ingest = recording  # type: ignore[method-assign]

        async def scenario() -> None:
            await ingest.poll()
            log.add(*(i for i in burst_ids if i not in holes and i not in late))
            after = before + burst + 1
            log.on_read = [
                {"id": i, "type": "feature-created", "createdAt": "x"}
                for i in range(after, after + arriving)
            ]
            log.total_skew = skew
            await ingest.poll()
            log.add(*sorted(late))
            await ingest.poll()
            await ingest.recheck_gaps(now=10**10)
            await ingest.poll()

        asyncio.run(scenario())
        expected = sorted(int(e["id"]) for e in log.visible if int(e["id"]) > before)  # type: ignore[call-overload]
        assert _pending(state, "all") == expected
        seen: list[int] = []
        for ids, settled in taken:
            assert not set(ids) & set(seen), "taken twice"
            behind = [i for i in ids if seen and i < max(seen)]
            assert set(behind) <= set(settled), f"taken behind the cursor: {behind}"
            seen.extend(ids)
