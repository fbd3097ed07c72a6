"""`state copy`: a whole state moves into an empty store and nothing is lost on the way."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sqlite3
import urllib.parse
from collections.abc import Callable
from pathlib import Path

import pytest

from poller.config import StateConfig
from poller.schedule import Pause
from poller.state import AttemptRecord, SqliteState, StateDump, StateStore, open_state
from poller.state.copy import (
    CopyMismatchError,
    CopySummary,
    TargetNotEmptyError,
    copy_state,
)
from tests.support.cli import run_poller

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


class _LosesALetter(SqliteState):
    """A target whose import silently drops the last dead letter (a broken backend)."""

    async def import_rows(self, dump: StateDump) -> None:
        await super().import_rows(dataclasses.replace(dump, dead_letters=dump.dead_letters[:-1]))


def test_a_copy_that_reads_back_short_is_an_error_naming_the_table(tmp_path: Path) -> None:
    """When the target holds fewer rows than were copied, copy_state raises a StateError
    (exit 74) that says which table and how many, instead of reporting success."""

    async def run() -> None:
        source = sqlite(tmp_path / "a.sqlite3")
        await fill(source)
        target = _LosesALetter.open(tmp_path / "b.sqlite3", create=True, lock=True)
        try:
            with pytest.raises(CopyMismatchError, match=r"\(dead_letters 1 → 0\)"):
                await copy_state(source, target)
        finally:
            await source.close()
            await target.close()

    asyncio.run(run())


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


# -- the command: `unleash-poller state copy` --------------------------------------------

SECRET = "s3cret-pw"  # noqa: S105 - a made-up password the output must never show


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "poller.toml"
    path.write_text(
        "[unleash]\n"
        'url = "http://127.0.0.1:1"\n'
        'token_file = "token"\n'
        "[state]\n"
        f'path = "{tmp_path}/a.sqlite3"\n'
        "[[webhooks]]\n"
        'name = "alpha"\n'
        'url = "http://127.0.0.1:1/alpha"\n'
    )
    (tmp_path / "token").write_text("*:*.t\n")
    return path


def _filled(path: Path) -> None:
    async def run() -> None:
        state = sqlite(path)
        await fill(state)
        await state.close()

    asyncio.run(run())


def _export(path: Path) -> StateDump:
    async def run() -> StateDump:
        state = SqliteState.open(path, create=False, lock=False)
        try:
            return await state.export_rows()
        finally:
            await state.close()

    return asyncio.run(run())


def test_the_command_copies_into_a_new_file_and_says_what_it_moved(tmp_path: Path) -> None:
    """`state copy --to-file` exits 0 with one summary line, and the new file holds
    exactly what the configured one does."""
    config = _config(tmp_path)
    _filled(tmp_path / "a.sqlite3")
    done = run_poller("state", "copy", "--to-file", tmp_path / "b.sqlite3", "-c", config)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"copied {tmp_path}/a.sqlite3 to {tmp_path}/b.sqlite3: cursor 8, 4 event(s), "
        "4 outbox row(s), 1 dead letter(s), 2 gap(s); also 2 note(s), 2 pause(s), "
        "1 sent part(s), 3 logged attempt(s)"
    ]
    assert _export(tmp_path / "b.sqlite3") == _export(tmp_path / "a.sqlite3")


def test_the_command_refuses_a_target_that_holds_a_state(tmp_path: Path) -> None:
    """Into a file that already holds a state: exit 2, one line, the file unchanged."""
    config = _config(tmp_path)
    _filled(tmp_path / "a.sqlite3")
    assert (
        run_poller("state", "copy", "--to-file", tmp_path / "b.sqlite3", "-c", config).returncode
        == 0
    )
    before = _export(tmp_path / "b.sqlite3")
    again = run_poller("state", "copy", "--to-file", tmp_path / "b.sqlite3", "-c", config)
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"unleash-poller: state copy: {tmp_path}/b.sqlite3: already holds a state; "
        "copy only into an empty one"
    ]
    assert _export(tmp_path / "b.sqlite3") == before


def test_the_command_refuses_while_the_daemon_holds_the_state(tmp_path: Path) -> None:
    """While a daemon holds the state file's lock: exit 2, one line saying to stop it,
    and no target made."""
    config = _config(tmp_path)
    _filled(tmp_path / "a.sqlite3")
    daemon = sqlite(tmp_path / "a.sqlite3", create=False)
    try:
        refused = run_poller("state", "copy", "--to-file", tmp_path / "b.sqlite3", "-c", config)
    finally:
        asyncio.run(daemon.close())
    assert refused.returncode == 2
    assert refused.stderr.splitlines() == [
        f"unleash-poller: state copy: {tmp_path}/a.sqlite3: a daemon is running on this "
        "state; stop it first (systemctl stop unleash-poller)"
    ]
    assert not (tmp_path / "b.sqlite3").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--to-file", "{tmp}/a.sqlite3"), "is the source"),
        ((), "one of the arguments --to --to-file is required"),
        (("--to", f"mysql://poller:{SECRET}@db/state"), "mysql://poller:***@db/state is not a"),
        (("--to", "postgresql://db/state", "--schema", "Bad-Name"), "not a lower-case SQL"),
    ],
)
def test_bad_usage_exits_2_in_one_line_without_the_password(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """Usage errors (the source as target, no target, a URL of another kind, a bad schema
    name) exit 2 with a message that never holds the URL's password."""
    config = _config(tmp_path)
    _filled(tmp_path / "a.sqlite3")
    before = _export(tmp_path / "a.sqlite3")
    done = run_poller("state", "copy", "-c", config, *(a.format(tmp=tmp_path) for a in args))
    assert done.returncode == 2
    assert message in done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert _export(tmp_path / "a.sqlite3") == before


# -- into PostgreSQL -----------------------------------------------------------------------


def _in_one_order(dump: StateDump) -> StateDump:
    """The dump's rows sorted, to compare dumps of different backends."""
    return dataclasses.replace(
        dump,
        events=sorted(dump.events),
        outbox=sorted(dump.outbox),
        gaps=sorted(dump.gaps, key=lambda g: g.id),
        dead_letters=sorted(dump.dead_letters),
        parts_sent=sorted(dump.parts_sent),
        attempt_log=sorted(dump.attempt_log, key=lambda r: (r.webhook, r.at, r.attempt)),
    )


async def _leading(config: StateConfig) -> StateStore:
    """A store opened as the daemon (or `state copy`) opens it: leading under its lease."""
    store = await open_state(config, create=True, lock=True)
    if store.leadership is not None:
        led, lease = await store.leadership.try_lead("test-copy", 30)
        assert led, lease
    return store


def test_sqlite_to_postgresql_and_back_keeps_every_row(
    tmp_path: Path, pg_state: Callable[[], StateConfig]
) -> None:
    """SQLite → PostgreSQL → a new SQLite file: each copy holds exactly the source's rows
    (bodies, errors, 429 counts, inf probe times, the attempt log in order)."""

    async def run() -> tuple[StateDump, StateDump, StateDump, CopySummary]:
        source = sqlite(tmp_path / "a.sqlite3")
        await fill(source)
        postgres = await _leading(pg_state())
        back = sqlite(tmp_path / "back.sqlite3")
        try:
            summary = await copy_state(source, postgres)
            assert await copy_state(postgres, back) == summary
            assert await postgres.attempt_log("alpha") == await source.attempt_log("alpha")
            assert await postgres.next_pending("alpha", 10) == await source.next_pending(
                "alpha", 10
            )
            return (
                await source.export_rows(),
                await postgres.export_rows(),
                await back.export_rows(),
                summary,
            )
        finally:
            for store in (source, postgres, back):
                await store.close()

    original, in_postgres, back, summary = asyncio.run(run())
    assert _in_one_order(in_postgres) == _in_one_order(original)
    assert back == original
    assert summary.outbox == 4
    assert summary.attempt_log == 3


def test_a_postgresql_target_that_holds_a_state_is_refused_untouched(
    tmp_path: Path, pg_state: Callable[[], StateConfig]
) -> None:
    """A PostgreSQL schema that holds only a cursor is refused, and keeps only that."""

    async def run() -> StateDump:
        source = sqlite(tmp_path / "a.sqlite3")
        await fill(source)
        target = await _leading(pg_state())
        await target.set_cursor(3)
        try:
            with pytest.raises(TargetNotEmptyError, match="already holds a state"):
                await copy_state(source, target)
            return await target.export_rows()
        finally:
            await source.close()
            await target.close()

    assert asyncio.run(run()) == StateDump(3, {}, [], [], [], [], [], {}, [])


def _target_url(config: StateConfig) -> str:
    assert config.url is not None
    return config.url.reveal()


def test_the_command_copies_into_postgresql_without_printing_the_password(
    tmp_path: Path, pg_state: Callable[[], StateConfig]
) -> None:
    """`state copy --to postgresql://…` exits 0 and its one line names the target with the
    password masked; the schema then holds the state; a second run is refused (exit 2),
    again without the password."""
    config = _config(tmp_path)
    _filled(tmp_path / "a.sqlite3")
    target = pg_state()
    url = _target_url(target)
    password = urllib.parse.unquote(urllib.parse.urlsplit(url).password or "")
    assert password
    done = run_poller("state", "copy", "-c", config, "--to", url, "--schema", target.schema)
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    [line] = done.stdout.splitlines()
    assert line.startswith(f"copied {tmp_path}/a.sqlite3 to postgresql://")
    assert ":***@" in line
    assert line.endswith(
        "cursor 8, 4 event(s), 4 outbox row(s), 1 dead letter(s), 2 gap(s); also 2 note(s), "
        "2 pause(s), 1 sent part(s), 3 logged attempt(s)"
    )

    async def read() -> StateDump:
        store = await open_state(target, create=False, lock=False)
        try:
            return await store.export_rows()
        finally:
            await store.close()

    assert _in_one_order(asyncio.run(read())) == _in_one_order(_export(tmp_path / "a.sqlite3"))
    again = run_poller("state", "copy", "-c", config, "--to", url, "--schema", target.schema)
    assert again.returncode == 2
    assert "already holds a state" in again.stderr
    assert password not in again.stdout + again.stderr


def test_an_unreachable_postgresql_target_is_74_in_one_line_without_the_password(
    tmp_path: Path,
) -> None:
    """A target that cannot be reached: exit 74, one line naming it redacted, no traceback."""
    config = _config(tmp_path)
    _filled(tmp_path / "a.sqlite3")
    url = f"postgresql://poller:{SECRET}@127.0.0.1:1/state?connect_timeout=2"
    done = run_poller("state", "copy", "-c", config, "--to", url)
    assert done.returncode == 74, done.stderr
    assert SECRET not in done.stdout + done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert "Traceback" not in done.stderr
