"""The command line without a server: version, render, status, cursor, dead letters, errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from aioresponses import CallbackResult, aioresponses

from poller import __version__
from poller.app import STATE_CHECK_EVERY_S
from poller.cli import main
from poller.state import SqliteState
from tests.support.cli import run_poller

EVENT = {
    "id": 5,
    "type": "feature-created",
    "createdBy": "ann",
    "createdAt": "2026-11-28T13:05:31.123Z",
    "createdByUserId": 1,
    "data": {"name": "f"},
    "preData": None,
    "tags": [],
    "featureName": "f",
    "project": "default",
    "environment": None,
    "label": "Flag created",
    "summary": "**ann** created **f**",
}


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f"""
[unleash]
url = "http://127.0.0.1:1"
token_file = "token"
[state]
path = "{tmp_path}/state/s.sqlite3"
[[webhooks]]
name = "plain"
url = "http://127.0.0.1:1/plain"
[[webhooks]]
name = "chat"
url = "http://127.0.0.1:1/chat"
body_template = '{{"text": "{{{{eventMarkdown}}}}", "by": "{{{{event.createdBy}}}}"}}'
""")
    (tmp_path / "token").write_text("*:*.t\n")
    return path


def test_version_from_the_installed_command() -> None:
    """The console script `unleash-poller --version` prints the package version."""
    command = shutil.which("unleash-poller") or str(Path(sys.executable).parent / "unleash-poller")
    result = subprocess.run([command, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == f"unleash-poller {__version__}"


def test_the_daemon_does_not_load_the_modules_of_the_commands_run_by_hand() -> None:
    """`run` imports poller.cli and poller.app; the modules of import, redeliver, dead-letter
    replay and state copy load only when their command runs, so the daemon does not hold
    them in memory (~0.2 MB)."""
    by_hand = ["poller.importer", "poller.redeliver", "poller.replay", "poller.state.copy"]
    probe = (
        f"import sys, poller.cli, poller.app;print([m for m in {by_hand!r} if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
    loaded = subprocess.run(
        [sys.executable, "-c", probe.replace("poller.app;", "poller.app, poller.importer;")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert loaded.strip() == "['poller.importer']"  # the probe itself can see a module


def test_render_prints_the_exact_body(config: Path, tmp_path: Path) -> None:
    """`render` prints the bytes the webhook would get, with nothing added."""
    event = tmp_path / "e.json"
    event.write_text(json.dumps(EVENT))
    result = run_poller("render", "-c", config, "--webhook", "chat", "--event", event)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (
        '{"text": "*ann* created *[f](http://127.0.0.1:1/projects/default/features/f)* in '
        'project *[default](http://127.0.0.1:1/projects/default)*", "by": "ann"}'
    )
    plain = run_poller("render", "-c", config, "--webhook", "plain", "--event", event)
    assert plain.stdout.startswith('{"id":5,"type":"feature-created","createdBy":"ann",')
    assert "label" not in plain.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold one event (a JSON object)"),
    ],
)
def test_render_bad_event_file(config: Path, tmp_path: Path, content: str, message: str) -> None:
    """A bad event file is one clear line and exit 65, not a traceback."""
    event = tmp_path / "e.json"
    event.write_text(content)
    result = run_poller("render", "-c", config, "--webhook", "plain", "--event", event)
    assert result.returncode == 65
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_render_unknown_webhook(config: Path, tmp_path: Path) -> None:
    """Naming a webhook that is not configured lists the ones that are."""
    event = tmp_path / "e.json"
    event.write_text(json.dumps(EVENT))
    result = run_poller("render", "-c", config, "--webhook", "nope", "--event", event)
    assert result.returncode == 64
    assert "no webhook named 'nope' (configured: plain, chat)" in result.stderr


def test_status_needs_a_state_file_then_reports(config: Path, tmp_path: Path) -> None:
    """`status` says so when there is no state yet; then reports cursor, gaps, pending and
    dead letters per webhook, also as JSON."""
    missing = run_poller("status", "-c", config)
    assert missing.returncode == 74
    assert "no state file" in missing.stderr
    state = SqliteState.open(tmp_path / "state" / "s.sqlite3")
    asyncio.run(
        state.ingest(
            [(4, json.dumps(EVENT)), (6, json.dumps(EVENT))],
            [("plain", 4), ("chat", 4), ("plain", 6)],
            6,
            [5],
        )
    )
    asyncio.run(state.dead_letter("chat", 4, 2, "HTTP 500 after 2 attempts"))
    asyncio.run(state.close())
    text = run_poller("status", "-c", config)
    assert text.returncode == 0
    assert "cursor: 6   gaps: 1 (ids 5)" in text.stdout
    assert "plain: pending 2, dead letters 0" in text.stdout
    report = json.loads(run_poller("status", "-c", config, "--json").stdout)
    assert report["cursor"] == 6
    assert report["gaps"] == [5]
    assert report["webhooks"]["chat"]["dead_letters"] == 1
    assert report["webhooks"]["plain"]["pending"] == 2
    listed = run_poller("dead-letters", "list", "-c", config)
    assert listed.stdout.split("\t")[:3] == ["chat", "4", "feature-created"]
    assert "HTTP 500 after 2 attempts" in listed.stdout


def test_status_on_sqlite_names_the_backend_and_a_single_daemon(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a SQLite state, `status --json` says backend "sqlite", where the file is, role
    "single" and no lease; the text report has no lease line (that is for a shared state)."""
    path = tmp_path / "state" / "s.sqlite3"
    state = SqliteState.open(path)
    asyncio.run(state.ingest([(4, json.dumps(EVENT))], [("plain", 4)], 4))
    asyncio.run(state.close())
    assert main(["status", "-c", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["backend"] == "sqlite"
    assert report["where"] == str(path)
    assert report["role"] == "single"
    assert report["lease"] is None
    assert (report["cursor"], report["webhooks"]["plain"]["pending"]) == (4, 1)
    assert main(["status", "-c", str(config)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("cursor: 4   gaps: 0"), text
    assert "lease" not in text


def test_cursor_set_refuses_beside_a_running_daemon(config: Path, tmp_path: Path) -> None:
    """`cursor set` moves the cursor and clears gaps, but not while the daemon's lock is held."""
    state = SqliteState.open(tmp_path / "state" / "s.sqlite3")
    asyncio.run(state.ingest([], [], 10, [7]))
    busy = run_poller("cursor", "set", "-c", config, "3")
    assert busy.returncode == 74
    assert "stop the daemon first" in busy.stderr
    asyncio.run(state.close())
    moved = run_poller("cursor", "set", "-c", config, "3")
    assert moved.returncode == 0, moved.stderr
    assert "cursor moved from 10 to 3" in moved.stdout
    state = SqliteState.open(tmp_path / "state" / "s.sqlite3", lock=False)
    assert (asyncio.run(state.high_water()), asyncio.run(state.gaps())) == (3, [])
    asyncio.run(state.close())


def test_replay_beside_a_running_daemon_hands_letters_back(config: Path, tmp_path: Path) -> None:
    """With the daemon running, replay moves dead letters back into its outbox."""
    state = SqliteState.open(tmp_path / "state" / "s.sqlite3")
    asyncio.run(state.ingest([(4, json.dumps(EVENT))], [("plain", 4)], 4))
    asyncio.run(state.dead_letter("plain", 4, 2, "HTTP 500"))
    result = run_poller("dead-letters", "replay", "-c", config)
    assert result.returncode == 0, result.stderr
    assert "daemon is running: 1 dead letter(s) moved back to its outbox" in result.stdout
    assert asyncio.run(state.pending_counts()) == {"plain": 1}
    asyncio.run(state.close())


def test_missing_config_file(tmp_path: Path) -> None:
    """A config path that does not exist is one line and exit 78."""
    result = run_poller("check", "-c", tmp_path / "nope.toml")
    assert result.returncode == 78
    missing = tmp_path / "nope.toml"
    assert result.stderr.strip() == f"{missing}: cannot read: No such file or directory"


def test_a_state_file_deleted_while_running_stops_the_daemon_with_74(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Deleting the state file under a running daemon stops it with exit 74, within
    STATE_CHECK_EVERY_S (the check is not made on every poll), and one line that says
    what happened and that a fresh start on `latest` does not flood."""
    config = tmp_path / "c.toml"
    state_path = tmp_path / "s.sqlite3"
    config.write_text(f"""
[unleash]
url = "http://unleash.test"
token = "t"
poll_interval_s = 0.05
[state]
path = "{state_path}"
[[webhooks]]
name = "a"
url = "http://127.0.0.1:1/a"
""")
    config.chmod(0o600)
    probes = []
    deleted_at: list[float] = []

    def answer(url: object, **kwargs: Any) -> CallbackResult:
        if kwargs["params"] == {"limit": "1"}:
            probes.append(url)
            if len(probes) == 3:
                state_path.unlink()
                deleted_at.append(time.monotonic())
            if len(probes) == 200:  # not noticed: stop it, so the test fails instead of hanging
                os.kill(os.getpid(), signal.SIGTERM)
        return CallbackResult(payload={"events": [{"id": 1, "type": "a"}], "total": 1})

    logging = structlog.get_config()
    try:
        with aioresponses() as mocked:
            mocked.get(re.compile(r"^http://unleash\.test/.*"), callback=answer, repeat=True)
            code = main(["run", "-c", str(config)])
        stopped_at = time.monotonic()
    finally:
        structlog.configure(**logging)  # run pointed it at this test's captured stderr
    assert code == 74
    assert stopped_at - deleted_at[0] < STATE_CHECK_EVERY_S + 2.0  # + the stop itself
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"unleash-poller: {state_path}: the state file was deleted")
    assert 'start_from = "latest" that does not re-send old events' in last


def test_render_for_a_chosen_unleash_version_and_url(config: Path, tmp_path: Path) -> None:
    """`render --unleash-version/--unleash-url` renders offline as that server would."""
    event = tmp_path / "e.json"
    event.write_text(json.dumps(EVENT))
    args = ("render", "-c", config, "--webhook", "chat", "--event", event)
    on_8 = run_poller(*args, "--unleash-version", "8.2.0", "--unleash-url", "http://localhost:4242")
    assert on_8.returncode == 0, on_8.stderr
    assert "(http://localhost:4242/projects/default/features/f)" in on_8.stdout
    on_5 = run_poller(*args, "--unleash-version", "5.12.8")
    assert on_5.stdout == '{"text": "", "by": "ann"}'  # 5.x has no eventMarkdown
    offline = run_poller(*args)  # nothing given and Unleash unreachable: says so, renders as 8.x
    assert offline.returncode == 0
    assert "could not ask Unleash" in offline.stderr
    assert "(http://127.0.0.1:1/projects/default/features/f)" in offline.stdout
    bad = run_poller(*args, "--unleash-version", "latest")
    assert bad.returncode == 2
    assert "'latest' is not a version like 8.2.0" in bad.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("webhooks", "pause", "nope"),
        ("webhooks", "resume", "nope"),
        ("attempts", "--webhook", "nope"),
        ("redeliver", "--webhook", "nope", "--from-id", "1"),
    ],
)
def test_unknown_webhook_in_control_commands_is_one_line(
    config: Path, args: tuple[str, ...]
) -> None:
    """Every control command names an unknown webhook in one line and exits 64."""
    result = run_poller(*args, "-c", config)
    assert result.returncode == 64
    assert result.stderr.strip().splitlines() == [
        "unleash-poller: no webhook named 'nope' (configured: plain, chat)"
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "yesterday"), "--since 'yesterday': not an ISO 8601 time"),
        (("--since", "2026-11-28", "--until", "28/11/2026"), "--until '28/11/2026': not an ISO"),
        (("--from-id", "9", "--to-id", "3"), "--to-id 3 is before --from-id 9 (reversed range)"),
        (("--since", "2026-11-28T10:00Z", "--until", "2026-11-28T10:00Z"), "is not after --since"),
        (("--from-id", "1", "--since", "2026-11-28"), "give --from-id or --since (one of them)"),
        ((), "give --from-id or --since (one of them)"),
        (("--since", "2026-11-28", "--to-id", "4"), "--to-id goes with --from-id"),
    ],
)
def test_bad_redeliver_range_is_one_line(config: Path, args: tuple[str, ...], message: str) -> None:
    """A malformed time or a reversed, empty or mixed range: one line, exit 64, before
    Unleash is asked anything."""
    result = run_poller("redeliver", "-c", config, "--webhook", "plain", *args)
    assert result.returncode == 64, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("unleash-poller: redeliver: "), lines
    assert message in lines[0]


def test_pause_and_resume_by_hand_with_the_daemon_stopped_and_running(
    config: Path, tmp_path: Path
) -> None:
    """`webhooks pause` works on a stopped daemon's file and beside a running one (its
    lock held); `status` shows the pause and the pending count; `resume` lifts it."""
    path = tmp_path / "state" / "s.sqlite3"
    state = SqliteState.open(path)
    asyncio.run(state.ingest([(4, json.dumps(EVENT))], [("plain", 4)], 4))
    asyncio.run(state.close())
    paused = run_poller("webhooks", "pause", "plain", "-c", config)  # daemon stopped
    assert paused.returncode == 0, paused.stderr
    status = run_poller("status", "-c", config)
    assert "plain: paused since " in status.stdout
    assert "(paused by hand); pending 1" in status.stdout
    as_json = json.loads(run_poller("status", "-c", config, "--json").stdout)
    assert as_json["webhooks"]["plain"]["paused"]["reason"] == "paused by hand"
    assert as_json["webhooks"]["chat"]["paused"] is None
    daemon = SqliteState.open(path)  # holds the lock, as a running daemon does
    try:
        resumed = run_poller("webhooks", "resume", "plain", "-c", config)
        assert resumed.returncode == 0, resumed.stderr
        assert "plain: resumed; 1 pending event(s) are delivered now" in resumed.stdout
        # The first call only takes the baseline.
        assert asyncio.run(daemon.written_elsewhere()) is False
        assert asyncio.run(daemon.pause("plain")) is None
        assert run_poller("webhooks", "pause", "chat", "-c", config).returncode == 0
        # What wakes a running daemon's workers.
        assert asyncio.run(daemon.written_elsewhere()) is True
        assert asyncio.run(daemon.pause("chat")) is not None
    finally:
        asyncio.run(daemon.close())


def test_attempts_lists_the_log_as_text_and_json(config: Path, tmp_path: Path) -> None:
    """`attempts` prints each attempt (time, webhook, event, number, status or error,
    latency, outcome), filtered by webhook, event and --last; --json one object a line."""
    from poller.state import AttemptRecord

    state = SqliteState.open(tmp_path / "state" / "s.sqlite3")
    asyncio.run(
        state.record_attempts(
            [
                AttemptRecord("plain", 4, 1_800_000_000.25, 1, 500, None, 12.5, "retry"),
                AttemptRecord("plain", 4, 1_800_000_001.5, 2, 200, None, 3.0, "delivered"),
                AttemptRecord(
                    "chat", 5, 1_800_000_002.0, 1, None, "timed out after 10s", 10000.0, "retry"
                ),
            ],
            {"plain": 10, "chat": 10},
        )
    )
    asyncio.run(state.close())
    text = run_poller("attempts", "-c", config).stdout.splitlines()
    assert text == [
        "2027-01-15T08:00:00.250Z\tplain\t4\t#1\tHTTP 500\t12.5ms\tretry",
        "2027-01-15T08:00:01.500Z\tplain\t4\t#2\tHTTP 200\t3.0ms\tdelivered",
        "2027-01-15T08:00:02.000Z\tchat\t5\t#1\ttimed out after 10s\t10000.0ms\tretry",
    ]
    assert len(run_poller("attempts", "-c", config, "--webhook", "plain").stdout.splitlines()) == 2
    assert len(run_poller("attempts", "-c", config, "--event", "5").stdout.splitlines()) == 1
    last = run_poller("attempts", "-c", config, "--last", "1", "--json").stdout.splitlines()
    assert [json.loads(line) for line in last] == [
        {
            "webhook": "chat",
            "event_id": 5,
            "at": "2027-01-15T08:00:02.000Z",
            "attempt": 1,
            "status": None,
            "error": "timed out after 10s",
            "latency_ms": 10000.0,
            "outcome": "retry",
        }
    ]
    bad = run_poller("attempts", "-c", config, "--last", "0")
    assert (bad.returncode, bad.stderr.strip()) == (64, "unleash-poller: --last must be at least 1")


def test_run_once_with_postgresql_down_is_a_temporary_failure(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """PostgreSQL not reachable at a --once run is not a state unusable for good (74): it
    exits 75 (try again later) with one line that names the state, password masked."""
    config = tmp_path / "c.toml"
    config.write_text("""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
url = "postgresql://u:secret@127.0.0.1:1/db"
[[webhooks]]
name = "a"
url = "http://127.0.0.1:1/a"
""")
    config.chmod(0o600)
    logging = structlog.get_config()
    try:
        code = main(["run", "-c", str(config), "--once"])
    finally:
        structlog.configure(**logging)
    err = capsys.readouterr().err
    assert code == 75
    assert "secret" not in err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("unleash-poller: postgresql://u:***@127.0.0.1:1/db")


@pytest.mark.parametrize(
    ("holder", "expires_in_s", "role"),
    [
        ("host-a:4242", 5.0, "leader"),  # this node's daemon
        ("host-a:4242", -1.0, "standby"),  # its lease ran out: nobody leads right now
        ("host-b:4242", 5.0, "standby"),  # another node's daemon
        ("host-a:4242/cli", 5.0, "standby"),  # a command (cursor set, state copy) holds it
        ("host-ab:4242", 5.0, "standby"),  # a node whose name merely starts the same
        (None, 0.0, "standby"),  # free
    ],
)
def test_status_role_is_leader_only_for_this_nodes_daemon(
    holder: str | None, expires_in_s: float, role: str
) -> None:
    from poller.cli import _role
    from poller.config import Secret, StateConfig
    from poller.state import LeaseView

    config = dataclasses.replace(
        _config_for_role(),
        state=StateConfig(Path("unused"), url=Secret("postgresql://u@h/d"), node_name="host-a"),
    )
    assert _role(config, LeaseView(holder, 3, expires_in_s)) == role
    assert _role(config, None) == "single"


def _config_for_role() -> Any:
    from poller.config import parse_config

    return parse_config(
        {"unleash": {"url": "http://127.0.0.1:1", "token": "t"},
         "webhooks": [{"name": "a", "url": "http://127.0.0.1:2/"}]},
        Path.cwd(),
    )  # fmt: skip
