"""From Unleash pages to the durable outbox: which events are new, which ids are missing.

A reader that only remembers the highest id it has seen loses events: ids come from a
sequence, so a long transaction can commit an event with a lower id after later ones are
visible. So the cursor is the highest id taken in *plus* the ids below it not yet seen
("gaps"); gaps are re-asked by id for a grace period, then given up with a log line (they
are almost always rolled-back transactions).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

from poller import memory
from poller.backoff import backoff_s
from poller.config import Config, WebhookConfig
from poller.faults import crash_point
from poller.filters import EventFilter
from poller.log import get as get_logger
from poller.render import UNREADABLE, Event
from poller.sink import MetricsSink, NullMetrics
from poller.source import UnleashError, UnleashSource
from poller.state import Gap, StateStore

FIRST_PAGE = 50  # most polls find a handful of events: ask for a small page first
# Beyond this many new events, spill to the state file, not memory. Small, because the
# events held are many small Python objects: the allocator keeps the memory they took
# (not all of it can be given back), so a burst held whole would raise the daemon's
# resident memory for good by a few kB per event.
STAGE_AT = 1000
GIVE_BACK_AT = 1000  # after taking in this many events, give the memory back to the OS
MAX_NEW_GAPS = 10000  # a jump this large in the id sequence is not a set of open transactions
GAP_RECHECK_MAX_S = 30.0
# The oldest page of a burst is read this share of a page deeper than the growth of the
# log's size says, so that it still holds the oldest new event when a few more came in.
OLDEST_PAGE_OVERLAP = 0.05
PROGRESS_EVERY_PAGES = 10
# A burst is read oldest first in pages of at most this many events (or page_size, if
# smaller). A page is held as Python objects while it is taken in, and pymalloc keeps an
# arena that a burst's peak filled while a single block in it is in use: pages of 1,000
# left the idle daemon 2-3 arenas (MiB) it never gave back, pages of 250 1-2; pages of
# 100 none, but 50 reads of a 5,000-event burst then lagged 8 workers (bench/README,
# session 11).
BURST_PAGE = 250

log = get_logger()


_SURROGATE = re.compile("[\ud800-\udfff]")


def _dump(event: Event) -> str:
    """The event as JSON text for the state file. A JavaScript string may hold a lone
    surrogate (valid JSON, `"\\ud800"`), which UTF-8 cannot carry: it is written as a
    `\\uXXXX` escape, as JSON.stringify writes it, and reads back as the same string."""
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # Outside strings JSON text is ASCII, so every surrogate sits inside one.
            text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text


@dataclass
class Ingest:
    config: Config
    state: StateStore
    source: UnleashSource
    wake: Callable[[set[str]], None]
    metrics: MetricsSink = field(default_factory=NullMetrics)
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        self.last_poll_ok_at = 0.0  # Unix time; 0 until Unleash first answers
        self._full_read_at = self.clock()
        self.high_water: int | None = None
        self.gaps: dict[int, Gap] = {}
        # The log's size when the last complete read began: what a burst is measured from.
        self._total_read: int | None = None
        self._loaded = False
        self._filters = [(h.name, _filter(h)) for h in self.config.webhooks]

    async def load(self) -> None:
        """Read the cursor and the gaps from the state (again: after a takeover or a
        reconnect the state, not memory, says where to go on)."""
        self.high_water = await self.state.high_water()
        self.gaps = {g.id: g for g in await self.state.gaps()}
        self._total_read = None
        self._loaded = True

    def reconfigure(self, config: Config) -> None:
        self.config = config
        self._total_read = None  # another token may see another log
        self._filters = [(h.name, _filter(h)) for h in config.webhooks]

    async def _initialise(self) -> int:
        """Where a fresh state starts: `latest` takes nothing from before the first run."""
        start = self.config.unleash.start_from
        if start == "earliest":
            high = 0
        elif isinstance(start, int):
            high = start
        else:
            # A whole page: on servers that leave ties in created_at unordered, a small page
            # could hold part of the newest transaction's events and miss its highest id.
            page = await self.source.read(0, self.config.unleash.page_size)
            high = max((int(e["id"]) for e in page.events), default=0)  # type: ignore[call-overload]
            if len(page.events) >= GIVE_BACK_AT:
                asyncio.get_running_loop().call_soon(self.give_back)
        await self.state.ingest([], [], high)
        self.high_water = high
        log.info("cursor.initialised", start_from=start, high_water=high)
        return high

    async def poll(self, *, force: bool = False) -> int:
        """Take in every event newer than the cursor; return how many were new."""
        if not self._loaded:
            await self.load()
        high = self.high_water if self.high_water is not None else await self._initialise()
        overdue = self.clock() - self._full_read_at >= self.config.unleash.full_read_interval_s
        unchanged = not force and not await self.source.changed()
        if unchanged and not overdue:
            self.last_poll_ok_at = time.time()
            return 0
        self._full_read_at = self.clock()
        new = await self._read(high)
        if unchanged and new:
            log.warning(
                "poll.probe_missed_events",
                new_events=new,
                detail="the If-None-Match probe said nothing changed, yet the read made "
                "every full_read_interval_s found new events: a proxy or server that "
                "answers 304 wrongly delays them by up to that interval",
            )
        return new

    async def _read(self, high: int) -> int:
        early, high, left = await self._take_oldest_first(high)
        collected, staged, reached_known = await self._collect(high, left)
        if not reached_known and self.source.capabilities.api == "legacy" and high > 0:
            self._warn_overflow(high, collected)
        if staged:
            await self.state.stage([(i, _dump(e)) for i, e in collected.items()])
            new = await self._take_staged(high)
        else:
            new = await self._take(high, collected)
        self.last_poll_ok_at = time.time()
        self._give_back_after(early + new)
        return early + new

    def _give_back_after(self, taken: int) -> None:
        if taken >= GIVE_BACK_AT:
            # Once the workers' first requests are out (they were just woken), not before.
            asyncio.get_running_loop().call_soon(self.give_back)

    async def _take_oldest_first(self, high: int) -> tuple[int, int, dict[int, Event]]:
        """A burst of more than a page (BURST_PAGE, or page_size if smaller): read it
        oldest page first, taking in each page's run of ids just above the cursor before
        the next page is read, so that the workers are delivering while the rest is read
        (and nothing need be staged). Where the oldest page lies comes from the growth
        of the log's size since the last read. Only a run with no id missing is taken, so
        no event found later can sort before it; at the first page without one (a
        rolled-back id, a log that moved), the newest-first read takes over from the
        cursor reached.

        Returns how many events were taken, the cursor after them, and the new events of
        those pages not taken (for the read that follows, which stops short of them)."""
        total, self.source.probed_total = self.source.probed_total, None
        known, limit = self._total_read, min(self.config.unleash.page_size, BURST_PAGE)
        if known is None or total is None or high <= 0 or not self.source.capabilities.id_filter:
            return 0, high, {}  # without an id filter, late ids are found only by reading down
        taken, left = 0, dict[int, Event]()
        newer = total - known  # how many events are newer than the cursor, by the log's size
        overlap = max(1, int(limit * OLDEST_PAGE_OVERLAP))
        moved = 0  # pages in a row that missed because more came in
        # A page that missed (more came in) is kept in `left`, for the run that follows.
        while newer > limit and len(left) < STAGE_AT + 2 * limit:
            try:
                page = await self.source.read(newer - limit + overlap, limit)
            except UnleashError as exc:
                # A size that sends the read past the log's end (a liar, a proxy) must not
                # fail every poll: the newest-first read, which needs no size, goes on.
                log.debug("poll.oldest_page_failed", error=str(exc))
                break
            grown = page.total is not None and page.total > total
            if page.total is not None:
                newer, total = newer + page.total - total, page.total  # more came in
            left.update(_new_in(page.events, high, self.gaps, high)[0])
            end = high
            while end + 1 in left:
                end += 1
            if end == high:
                if grown and moved < 2:
                    moved += 1  # the page moved deeper under the new events: again, there
                    continue
                log.debug("poll.oldest_page_missed", high_water=high, newer=newer)
                break
            moved = 0
            await self._take(high, {i: left.pop(i) for i in range(high + 1, end + 1)})
            crash_point("poll.run_taken")
            run, high = end - high, end
            taken, newer = taken + run, newer - run
            if run < limit // 2:
                break  # not a burst's oldest page: read the rest newest first
        return taken, high, left

    async def _collect(
        self, high: int, collected: dict[int, Event]
    ) -> tuple[dict[int, Event], int, bool]:
        """Read pages, newest first, down to the first one that reaches ids already known,
        adding to `collected`. Returns the new events still in memory, how many were
        staged to the state file, and whether the known ids were reached (if not, older
        new events may be missed)."""
        staged = 0
        pages = 0
        total: int | None = None
        reached_known = False
        async for page in self.source.pages(FIRST_PAGE, self.config.unleash.page_size):
            pages += 1
            if pages == 1:
                total = page.total
            # Without re-checks by id, late ids can only be found by reading down to them.
            floor = min(self.gaps, default=high) if not self.source.capabilities.id_filter else high
            new, reached_known = _new_in(page.events, high, self.gaps, floor)
            collected.update(new)
            log.debug(
                "poll.page_fetched",
                events=len(page.events),
                total=page.total,
                new=len(collected) + staged,
            )
            crash_point("poll.page_fetched")
            if pages % PROGRESS_EVERY_PAGES == 0:
                # A long catch-up (a backfill from `earliest`) shows that it is moving.
                log.info(
                    "poll.catching_up",
                    pages=pages,
                    new_events=len(collected) + staged,
                    total_in_unleash=page.total,
                )
            if len(collected) >= STAGE_AT:
                await self.state.stage([(i, _dump(e)) for i, e in collected.items()])
                staged += len(collected)
                collected.clear()
            if reached_known:
                break
        self._total_read = total
        return collected, staged, reached_known

    def _warn_overflow(self, high: int, collected: dict[int, Event]) -> None:
        lowest = min(collected, default=high + 1)
        missing = lowest - high - 1
        if missing > 0:
            self.metrics.on_burst_overflow()
            log.error(
                "poll.burst_overflow",
                missing_at_least=missing,
                detail="the legacy events API returns only the newest 100 events; "
                "more arrived between two polls and the older ones cannot be read. "
                "Upgrade Unleash or lower poll_interval_s",
            )

    def _wanted(self, event: Event) -> list[str]:
        """The webhooks that want `event`. One we could not read cannot be filtered: every
        webhook dead-letters it."""
        return [name for name, flt in self._filters if UNREADABLE in event or flt.matches(event)]

    def _owed(
        self, events: Iterable[tuple[int, Event]]
    ) -> tuple[list[tuple[int, str]], list[tuple[str, int]]]:
        rows: list[tuple[int, str]] = []
        owed: list[tuple[str, int]] = []
        for event_id, event in events:
            if wanted := self._wanted(event):
                rows.append((event_id, _dump(event)))
                owed.extend((name, event_id) for name in wanted)
        return rows, owed

    def _owed_staged(
        self, staged: list[tuple[int, str]]
    ) -> tuple[list[tuple[int, str]], list[tuple[str, int]]]:
        """`_owed` for staged rows, whose bodies are already the text to store: it is kept
        as it is, and parsed only when some webhook filters what it gets."""
        if all(flt.matches_everything for _, flt in self._filters):
            names = [name for name, _ in self._filters]
            return staged, [(name, event_id) for event_id, _ in staged for name in names]
        rows: list[tuple[int, str]] = []
        owed: list[tuple[str, int]] = []
        for event_id, body in staged:
            if wanted := self._wanted(json.loads(body)):
                rows.append((event_id, body))
                owed.extend((name, event_id) for name in wanted)
        return rows, owed

    async def _take(self, high: int, collected: dict[int, Event]) -> int:
        ids = sorted(collected)
        tracker = _GapTracker(high)
        for i in ids:
            tracker.see(i)
        settled = [i for i in ids if i in self.gaps]
        rows, owed = self._owed((i, collected[i]) for i in ids)
        await self.state.ingest(rows, owed, tracker.high, tracker.missing, settled)
        await self._after_take(high, tracker, settled, len(owed))
        if owed:
            self.wake({name for name, _ in owed})
        return tracker.count

    async def _take_staged(self, high: int) -> int:
        """A long catch-up: everything is on disk; walk it in id order, a batch at a time,
        inside one transaction, so memory stays flat however long the history."""
        tracker = _GapTracker(high)
        settled: list[int] = []
        owed_count = 0
        hooks: set[str] = set()
        async with self.state.ingesting() as batch:
            async for staged in self.state.staged():
                for i, _ in staged:
                    tracker.see(i)
                settled.extend(i for i, _ in staged if i in self.gaps)
                rows, owed = self._owed_staged(staged)
                await batch.add(rows, owed)
                owed_count += len(owed)
                hooks.update(name for name, _ in owed)
            await batch.finish(tracker.high, tracker.missing, settled)
        await self.state.clear_staging()
        await self._after_take(high, tracker, settled, owed_count)
        if hooks:
            self.wake(hooks)
        return tracker.count

    async def _after_take(
        self, old: int, tracker: _GapTracker, settled: list[int], owed: int
    ) -> None:
        self.high_water = tracker.high
        self.gaps = {g.id: g for g in await self.state.gaps()}
        if settled:
            log.warning(
                "gap.filled",
                ids=settled[:20],
                count=len(settled),
                detail="events committed after later ones; delivered now",
            )
        if tracker.missing:
            log.info("gap.opened", ids=tracker.missing[:20], count=len(tracker.missing))
        if tracker.high != old:
            log.info(
                "cursor.advanced",
                **{"from": old, "to": tracker.high},
                events=tracker.count,
                deliveries=owed,
            )

    def give_back(self) -> None:
        """What a catch-up held is free now: hand it back to the OS."""
        self.state.release_memory()
        if memory.give_back():
            log.debug("memory.given_back")

    async def recheck_gaps(self, now: float | None = None) -> None:
        """Ask again for missing ids that are due; give up on those past the grace period."""
        now = time.time() if now is None else now
        if not self._loaded:
            await self.load()
        due = [g for g in self.gaps.values() if g.next_check_at <= now]
        if not due:
            return
        found, failing = await self.source.fetch_ids([g.id for g in due])
        if failing:
            await self.state.give_up_gaps(failing)
            self.metrics.on_gaps_expired(len(failing))
            log.error(
                "gap.unreadable",
                ids=failing[:20],
                count=len(failing),
                detail="Unleash answers 500 for these ids (events it cannot format; its "
                "own integration skips them too); given up",
            )
            due = [g for g in due if g.id not in set(failing)]
        found_by_id = {int(e["id"]): e for e in found if int(e["id"]) in self.gaps}  # type: ignore[call-overload]
        if found_by_id:
            ids = sorted(found_by_id)
            rows, owed = self._owed((i, found_by_id[i]) for i in ids)
            high = self.high_water or 0
            await self.state.ingest(rows, owed, high, (), ids)
            await self._after_take(high, _GapTracker(high), ids, len(owed))
            if owed:
                self.wake({name for name, _ in owed})
            self._give_back_after(len(ids))
        grace = self.config.unleash.gap_grace_s
        expired = [g.id for g in due if g.id not in found_by_id and now - g.missing_since >= grace]
        if expired:
            await self.state.give_up_gaps(expired)
            self.metrics.on_gaps_expired(len(expired))
            log.warning(
                "gap.expired",
                ids=expired[:20],
                count=len(expired),
                grace_s=grace,
                detail="ids never appeared (rolled-back transactions); given up",
            )
        waiting = [g for g in due if g.id not in found_by_id and g.id not in set(expired)]
        for checks in {g.checks for g in waiting}:
            delay = backoff_s(checks, 1.0, GAP_RECHECK_MAX_S)
            await self.state.reschedule_gaps(
                [g.id for g in waiting if g.checks == checks], now + delay
            )
        self.gaps = {g.id: g for g in await self.state.gaps()}

    def next_gap_check(self) -> float | None:
        return min((g.next_check_at for g in self.gaps.values()), default=None)


def _new_in(
    events: Iterable[Event], high: int, gaps: Container[int], floor: int
) -> tuple[list[tuple[int, Event]], bool]:
    """The events of a page above the cursor `high` or filling a gap, by id, and whether
    the page reached down to `floor` (ids already known, so no older page is needed)."""
    new: list[tuple[int, Event]] = []
    reached_known = False
    for event in events:
        event_id = int(event["id"])  # type: ignore[call-overload]
        if event_id > high or event_id in gaps:
            new.append((event_id, event))
        elif event_id <= floor:
            reached_known = True
    return new, reached_known


def _filter(hook: WebhookConfig) -> EventFilter:
    return EventFilter(hook.events, hook.projects, hook.environments, hook.tags)


class _GapTracker:
    """Follows new ids in ascending order and notes the ones skipped between them."""

    def __init__(self, high: int) -> None:
        self.high = high
        self.count = 0
        self.missing: list[int] = []
        # From `earliest` (cursor 0) the ids below the oldest event were deleted, not pending.
        self._last = high if high > 0 else None

    def see(self, event_id: int) -> None:
        if event_id <= self.high:
            return
        if self._last is not None and event_id - self._last > 1:
            room = MAX_NEW_GAPS - len(self.missing)
            skipped = range(max(self._last + 1, event_id - room), event_id)
            if len(skipped) < event_id - self._last - 1:
                log.warning(
                    "gap.too_large",
                    from_id=self._last,
                    to_id=event_id,
                    detail=f"tracking at most {MAX_NEW_GAPS} missing ids",
                )
            self.missing.extend(skipped)
        self._last = event_id
        self.high = event_id
        self.count += 1
