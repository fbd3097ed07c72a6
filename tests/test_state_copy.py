"""`state copy`: a whole state moves into an empty store and nothing is lost on the way."""

from __future__ import annotations

import asyncio
import math
import sqlite3
from pathlib import Path

import pytest

from poller.config import StateConfig
from poller.schedule import Pause
from poller.state import AttemptRecord, SqliteState, StateDump, StateStore
from poller.state.copy import (
    CopyRefusedError,
    CopySummary,
    TargetNotEmptyError,
    copy_configured,
    copy_state,
)

NOW = 1_790_000_000.0


async def fill(state: StateStore) -> None:
    """A state with something in every table `state copy` moves: two webhooks' outboxes
    (one row retried, with its error and 429 count), a gap, a dead letter, a sent part,
    two pauses (one awaiting a resume, probe_at inf), notes and an attempt log."""
    events = [
        (i, f'{{"id":{i},"type":"feature-updated","data":{{"n":"é{i}"}}}}') for i in (3, 5, 7, 8)
    ]
    owed = [("alpha", 3), ("alpha", 5), ("alpha", 7), ("beta", 5), ("beta", 8)]
    await state.ingest(events, owed, 8, new_gaps=[4, 6], now=NOW)
    await state.retry_later("alpha", 3, 2, NOW + 30.5, "HTTP 503 from receiver", rate_limited=1)
    await state.dead_letter("beta", 5, 7, "HTTP 400 (gave up)", now=NOW + 1)
    await state.part_sent("alpha", 7, "#general")
    await state.set_pause("alpha", Pause("HTTP 410 Gone", NOW, True, math.inf, 0))
    await state.set_pause("beta", Pause("receiver down", NOW + 2, False, NOW + 60.25, 3))
    await state.reschedule_gaps([6], NOW + 120)
    await state.save_text("server_profile", '{"version":"8.2.0"}')
    await state.save_text("other", "x")
    await state.record_attempts(
        [
            AttemptRecord("alpha", 3, NOW, 1, 503, None, 12.5, "retry"),
            AttemptRecord("beta", 5, NOW + 0.5, 1, None, "connection refused", None, "retry"),
            AttemptRecord("alpha", 3, NOW + 1, 2, 429, None, 3.25, "retry"),
        ],
        {"alpha": 100, "beta": 100},
    )


def sqlite(path: Path, *, create: bool = True) -> SqliteState:
    return SqliteState.open(path, create=create, lock=True)


def test_sqlite_to_sqlite_keeps_every_row(tmp_path: Path) -> None:
    """Copying into a fresh SQLite file gives a target whose export equals the source's,
    and whose ordinary reads (next pending, dead letters, pauses, attempt log) agree."""

    async def run() -> tuple[CopySummary, StateDump, StateDump]:
        source = sqlite(tmp_path / "a.sqlite3")
        await fill(source)
        target = sqlite(tmp_path / "b.sqlite3")
        try:
            summary = await copy_state(source, target)
            before, after = await source.export_rows(), await target.export_rows()
            assert await target.next_pending("alpha", 10) == await source.next_pending("alpha", 10)
            assert await target.dead_letters() == await source.dead_letters()
            assert await target.pauses() == await source.pauses()
            assert await target.attempt_log() == await source.attempt_log()
            assert await target.parts_sent("alpha", 7) == frozenset({"#general"})
            assert await target.saved_text("server_profile") == '{"version":"8.2.0"}'
        finally:
            await source.close()
            await target.close()
        return summary, before, after

    summary, before, after = asyncio.run(run())
    assert after == before
    assert summary == CopySummary(
        cursor=8, events=4, outbox=4, dead_letters=1, gaps=2, notes=2, pauses=2,
        parts_sent=1, attempt_log=3,
    )  # fmt: skip
    assert before.outbox[0] == ("alpha", 3, 2, NOW + 30.5, "HTTP 503 from receiver", NOW, 1)
    assert before.pauses["alpha"].probe_at == math.inf


def test_the_copy_keeps_working_as_a_state(tmp_path: Path) -> None:
    """After the copy the target behaves as the source would: the attempt log goes on
    numbering after the copied rows, and delivering the last owed event drops its body."""

    async def run() -> None:
        source = sqlite(tmp_path / "a.sqlite3")
        await fill(source)
        target = sqlite(tmp_path / "b.sqlite3")
        await copy_state(source, target)
        await source.close()
        await target.record_attempts(
            [AttemptRecord("alpha", 3, NOW + 5, 3, 200, None, 1.0, "delivered")], {"alpha": 3}
        )
        log = await target.attempt_log("alpha")
        assert [r.attempt for r in log] == [1, 2, 3]
        await target.delivered("beta", 8)
        assert [e for e, _ in (await target.export_rows()).events] == [3, 5, 7]
        await target.close()

    asyncio.run(run())


def test_a_target_that_is_not_empty_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    """A target holding anything (here only a note) is refused before a row is written."""

    async def run() -> StateDump:
        source = sqlite(tmp_path / "a.sqlite3")
        await fill(source)
        target = sqlite(tmp_path / "b.sqlite3")
        await target.save_text("server_profile", "kept")
        try:
            with pytest.raises(TargetNotEmptyError, match=r"b\.sqlite3: already holds a state"):
                await copy_state(source, target)
            return await target.export_rows()
        finally:
            await source.close()
            await target.close()

    left = asyncio.run(run())
    assert left == StateDump(None, {"server_profile": "kept"}, [], [], [], [], [], {}, [])


@pytest.mark.parametrize(
    "leftover",
    ["cursor", "pause", "attempt"],
)
def test_is_empty_sees_every_kind_of_row(tmp_path: Path, leftover: str) -> None:
    """A store with only a cursor, only a pause or only a logged attempt is not empty."""

    async def run() -> tuple[bool, bool]:
        state = sqlite(tmp_path / "s.sqlite3")
        fresh = await state.is_empty()
        if leftover == "cursor":
            await state.set_cursor(5)
        elif leftover == "pause":
            await state.set_pause("a", Pause("by hand", NOW, True, math.inf))
        else:
            await state.record_attempts(
                [AttemptRecord("a", 1, NOW, 1, 200, None, 1.0, "delivered")], {"a": 10}
            )
        after = await state.is_empty()
        await state.close()
        return fresh, after

    assert asyncio.run(run()) == (True, False)


def test_a_failed_import_leaves_the_target_empty(tmp_path: Path) -> None:
    """An import that breaks mid-way (an outbox row whose event is missing) writes nothing:
    the target stays empty, so the copy can simply be run again."""

    async def run() -> bool:
        target = sqlite(tmp_path / "b.sqlite3")
        dump = StateDump(
            high_water=9,
            notes={"n": "v"},
            events=[(1, "{}")],
            outbox=[("a", 1, 0, 0.0, None, NOW, 0), ("a", 2, 0, 0.0, None, NOW, 0)],
            gaps=[],
            dead_letters=[],
            parts_sent=[],
            pauses={},
            attempt_log=[],
        )
        with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
            await target.import_rows(dump)
        empty = await target.is_empty()
        await target.close()
        return empty

    assert asyncio.run(run())


def test_a_source_held_by_the_daemon_is_refused_before_the_target_is_made(
    tmp_path: Path,
) -> None:
    """While a daemon holds the state file's lock, the copy is refused with a line that
    says to stop it, and no target file is made."""

    async def run() -> None:
        daemon = sqlite(tmp_path / "a.sqlite3")
        try:
            with pytest.raises(CopyRefusedError, match=r"a\.sqlite3: a running unleash-poller"):
                await copy_configured(
                    StateConfig(tmp_path / "a.sqlite3"), StateConfig(tmp_path / "b.sqlite3")
                )
        finally:
            await daemon.close()

    asyncio.run(run())
    assert not (tmp_path / "b.sqlite3").exists()
