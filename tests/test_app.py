"""The daemon's lifecycle in-process: signal handlers it installs and removes, reloads,
and the server's profile (renderers rebuilt once per detection/reload)."""

from __future__ import annotations

import asyncio
import gc
import math
import os
import re
import signal
import time
import tomllib
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses
from structlog.testing import capture_logs
from yarl import URL

from poller import app as app_module
from poller import memory
from poller.app import COUNTS_EVERY_S, STATE_CHECK_EVERY_S, App
from poller.config import Config, UnleashConfig, WebhookConfig, load_config, parse_config
from poller.render import ServerProfile, parse_saved_profile, saved_profile_text
from poller.schedule import Pause
from poller.state import SqliteState, StateError
from tests.support.unleash import free_port

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _toml(max_in_flight: int = 1) -> str:
    # Nothing listens on port 1: the daemon keeps backing off until it is stopped.
    return f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
[[webhooks]]
name = "a"
url = "http://127.0.0.1:1/a"
max_in_flight = {max_in_flight}
"""


def _config(tmp_path: Path) -> Config:
    return parse_config(tomllib.loads(_toml()), tmp_path)


class _Announcing(App):
    """An App that says when it is running (its signal handlers are in place by then)."""

    def __init__(self, config: Config, state: SqliteState) -> None:
        super().__init__(config, state)
        self.started = asyncio.Event()

        self.worker_started = asyncio.Event()

    def _warn_orphans(self) -> None:
        super()._warn_orphans()
        self.started.set()

    def _start_worker(self, hook: WebhookConfig, session: aiohttp.ClientSession) -> None:
        super()._start_worker(hook, session)
        self.worker_started.set()


def test_run_removes_its_signal_handlers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After App.run returns, SIGTERM/SIGINT/SIGHUP have no loop handler and the Python
    handlers from before it ran are back."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    config = _config(tmp_path)
    state = SqliteState.open(config.state.path)

    async def main() -> tuple[list[bool], list[object], list[object]]:
        loop = asyncio.get_running_loop()
        before = [signal.getsignal(sig) for sig in SIGNALS]
        app = _Announcing(config, state)
        running = asyncio.create_task(app.run())
        await asyncio.wait_for(app.started.wait(), 10)
        os.kill(os.getpid(), signal.SIGTERM)  # handled by the daemon: a clean stop
        assert await asyncio.wait_for(running, 10) == 0
        after = [signal.getsignal(sig) for sig in SIGNALS]
        return [loop.remove_signal_handler(sig) for sig in SIGNALS], before, after

    try:
        removed, before, after = asyncio.run(main())
    finally:
        asyncio.run(state.close())
    assert removed == [False, False, False]
    assert after == before


def test_two_reloads_in_one_loop_turn_replace_the_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two reloads handled before the event loop runs anything else (two quick SIGHUPs)
    that each change max_in_flight: the worker is retired once, its replacement has the
    newest settings, and no task fails on the way."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    path = tmp_path / "poller.toml"
    path.touch(mode=0o600)
    path.write_text(_toml(1))
    config = load_config(path)
    state = SqliteState.open(config.state.path)
    errors: list[dict[str, object]] = []

    async def main() -> int:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        app = _Announcing(config, state)
        running = asyncio.create_task(app.run())
        await asyncio.wait_for(app.worker_started.wait(), 10)
        first = app.workers["a"]
        app.worker_started.clear()
        for max_in_flight in (2, 4):
            path.write_text(_toml(max_in_flight))
            app.reload()
        await asyncio.wait_for(app.worker_started.wait(), 10)
        replacement = app.workers["a"]
        assert replacement is not first
        assert replacement.hook.max_in_flight == 4
        assert app.retiring == {}
        gc.collect()  # a failed task that nobody awaited is reported when it is freed
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(running, 10)

    try:
        assert asyncio.run(main()) == 0
    finally:
        asyncio.run(state.close())
    assert errors == []


def test_on_sqlite_the_daemon_leads_alone_and_its_metrics_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While App runs on a SQLite state, /metrics shows unleash_poller_leader 1.0 and lease
    epoch 0, the outbox and pause gauges read from the state (which only a leader does),
    and /healthz says role "single"."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    port = free_port()
    config = parse_config(
        tomllib.loads(_toml() + f'[metrics]\nlisten = "127.0.0.1:{port}"\n'), tmp_path
    )
    state = SqliteState.open(config.state.path)
    event = '{"id": 1, "type": "feature-created", "createdBy": "me", "data": {}}'

    async def seed() -> None:
        await state.ingest([(1, event)], [("a", 1)], 1)
        # Paused by hand: the event stays pending however long the test takes.
        await state.set_pause("a", Pause("by hand", time.time(), True, math.inf))

    async def main() -> tuple[list[str], dict[str, object]]:
        await seed()
        app = _Announcing(config, state)
        running = asyncio.create_task(app.run())
        try:
            await asyncio.wait_for(app.worker_started.wait(), 10)
            assert app.leading
            async with aiohttp.ClientSession() as session:
                base = f"http://127.0.0.1:{port}"
                async with session.get(f"{base}/metrics") as resp:
                    assert resp.status == 200
                    page = (await resp.text()).splitlines()
                async with session.get(f"{base}/healthz") as resp:
                    health = await resp.json()
        finally:
            app._request_stop()
            assert await asyncio.wait_for(running, 10) == 0
        return page, health

    try:
        page, health = asyncio.run(main())
    finally:
        asyncio.run(state.close())
    assert "unleash_poller_leader 1.0" in page
    assert "unleash_poller_lease_epoch 0.0" in page
    assert 'unleash_poller_outbox_pending{webhook="a"} 1.0' in page
    assert 'unleash_poller_webhook_paused{webhook="a"} 1.0' in page
    assert health["role"] == "single"
    assert health["cursor"] == 1


def test_the_state_file_is_checked_once_a_second_not_on_every_poll(tmp_path: Path) -> None:
    """Whether the state file is still in place, and whether another connection (a
    `dead-letters replay`) wrote to it, is asked at most every STATE_CHECK_EVERY_S, not
    on every 0.4 s poll; but it is asked: a hand-back wakes the workers, and a deleted
    file stops the daemon, within that time."""
    config = _config(tmp_path)
    path = config.state.path
    state = SqliteState.open(path)
    event = '{"id": 1, "type": "feature-created", "createdBy": "me", "data": {}}'

    async def main() -> list[bool]:
        app = App(config, state)
        woken = asyncio.Event()
        app.workers = {"a": SimpleNamespace(wake=woken)}  # type: ignore[dict-item]
        await app._check_state(now=100.0)  # takes the baseline
        tool = SqliteState.open(path, lock=False)
        await tool.ingest([(1, event)], [("a", 1)], 1)
        await tool.close()
        seen = []
        await app._check_state(now=100.0 + STATE_CHECK_EVERY_S - 0.1)  # too soon
        seen.append(woken.is_set())
        await app._check_state(now=100.0 + STATE_CHECK_EVERY_S)
        seen.append(woken.is_set())
        path.unlink()
        await app._check_state(now=100.0 + 2 * STATE_CHECK_EVERY_S - 0.1)  # too soon
        with pytest.raises(StateError, match="deleted while the daemon ran"):
            await app._check_state(now=100.0 + 2 * STATE_CHECK_EVERY_S)
        return seen

    try:
        seen = asyncio.run(main())
    finally:
        asyncio.run(state.close())
    assert seen == [False, True]


def test_the_status_line_reads_outbox_counts_kept_for_two_seconds(tmp_path: Path) -> None:
    """The status line (systemd STATUS=, the watchdog) shows the pending and paused
    webhooks as last counted: a count is taken again only COUNTS_EVERY_S after the last,
    so a backlog's COUNT does not run on every poll."""
    config = _config(tmp_path)
    state = SqliteState.open(config.state.path)
    event = '{"id": 1, "type": "feature-created", "createdBy": "me", "data": {}}'

    async def main() -> list[str]:
        app = App(config, state)
        app.ingest = SimpleNamespace(high_water=1)  # type: ignore[assignment]
        await state.ingest([(1, event)], [("a", 1)], 1)
        await app._refresh_counts(now=100.0)
        lines = [app.status_line()]
        await state.ingest([(2, event)], [("a", 2)], 2)
        await state.set_pause("a", Pause("by hand", time.time(), True, math.inf))
        await app._refresh_counts(now=100.0 + COUNTS_EVERY_S - 0.1)  # too soon: kept
        lines.append(app.status_line())
        await app._refresh_counts(now=100.0 + COUNTS_EVERY_S)
        lines.append(app.status_line())
        return lines

    try:
        lines = asyncio.run(main())
    finally:
        asyncio.run(state.close())
    assert lines[0] == "polling; cursor 1, 1 pending, 0 delivered, 0 dead-lettered"
    assert lines[1] == lines[0]
    assert lines[2] == "polling; cursor 1, 2 pending, 0 delivered, 0 dead-lettered; paused: a"


EVENT = {
    "id": 1,
    "type": "feature-created",
    "createdBy": "ann",
    "data": {"name": "f", "description": "<b>"},
    "featureName": "f",
    "project": "default",
}


class _Reconfigurable:
    """Stands in for the source and ingest, which a reload only reconfigures."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def reconfigure(self, config: Config | UnleashConfig) -> None:
        self.calls.append(config)


class _Worker:
    """Stands in for a running worker: records the webhook settings it is handed."""

    def __init__(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self.handed: list[WebhookConfig] = []

    def reconfigure(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self.handed.append(hook)


def _write_chat(path: Path, description_escape: str = "") -> Path:
    path.write_text(
        f"""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "{path.parent}/state.sqlite3"
[[webhooks]]
name = "chat"
url = "http://127.0.0.1:1/chat"
body_template = '{{{{eventMarkdown}}}}|{{{{event.data.description}}}}'
{description_escape}
"""
    )
    path.chmod(0o600)
    return path


def _body(app: App) -> str:
    return app.config.webhooks[0].renderer.render(EVENT).decode()


def test_profile_is_applied_and_kept_across_a_reload(tmp_path: Path) -> None:
    """A detected profile rebuilds the renderers; a reload applies it to the new config at
    once and asks the server again on the next poll."""
    path = _write_chat(tmp_path / "c.toml")
    state = SqliteState.open(tmp_path / "state.sqlite3")
    try:
        app = App(load_config(path), state)
        worker = _Worker(app.config.webhooks[0])
        app.workers["chat"] = worker  # type: ignore[assignment]
        assert "(http://127.0.0.1:1/projects/default/features/f)" in _body(app)
        app._apply_profile(ServerProfile("7.6.5", "http://localhost:4242"))
        assert "(http://localhost:4242/projects/default/features/f)" in _body(app)
        assert _body(app).endswith("|<b>")  # 7.x: no escaping
        assert worker.handed == [app.config.webhooks[0]]  # the running worker got it
        app._detected = True
        app.source = _Reconfigurable()  # type: ignore[assignment]
        app.ingest = _Reconfigurable()  # type: ignore[assignment]
        _write_chat(path, 'escape = "unleash"')

        async def reload() -> None:
            app._reload(path)
            assert app._profile_task is not None  # ui-config is asked again, in the background
            await app._stop_profile_reads()

        asyncio.run(reload())
        assert app.config.webhooks[0].escape == "unleash"
        assert "(http://localhost:4242/projects/default/features/f)" in _body(app)
        assert _body(app).endswith("|&lt;b&gt;")  # the explicit value wins
        assert app._detected is False  # the events API is asked again on the next poll
        assert worker.hook is app.config.webhooks[0]
    finally:
        asyncio.run(state.close())


# -- ui-config is optional to polling and delivery ----------------------------------------

UNLEASH = "http://unleash.test"
SEARCH = re.compile(r"^http://unleash\.test/api/admin/search/events.*$")
UI_CONFIG = f"{UNLEASH}/api/admin/ui-config"
HOOK = "http://hook.test/h"


class _FakeUnleash:
    """Stands in for Unleash (events API and ui-config) and the receiver, via aioresponses."""

    def __init__(self) -> None:
        self.events: list[dict[str, object]] = []
        self.ui_config: dict[str, str] | None = None  # None: answers 503
        self.ui_config_asked = 0
        self.bodies: dict[int, str] = {}

    def add(self, event_id: int) -> None:
        self.events.insert(
            0,
            {
                "id": event_id,
                "type": "feature-created",
                "createdAt": "2026-11-28T10:00:00.000Z",
                "data": {"name": f"<b>{event_id}"},
                "featureName": f"f{event_id}",
                "project": "default",
            },
        )

    def search(self, url: URL, **_: object) -> CallbackResult:
        events = self.events
        if "id" in url.query:
            wanted = {int(x) for x in url.query["id"].split(":")[1].split(",")}
            events = [e for e in events if e["id"] in wanted]
        offset, limit = int(url.query.get("offset", 0)), int(url.query.get("limit", 50))
        return CallbackResult(
            payload={"events": events[offset : offset + limit], "total": len(events)}
        )

    def ui(self, _url: URL, **_: object) -> CallbackResult:
        self.ui_config_asked += 1
        if self.ui_config is None:
            return CallbackResult(status=503, body="maintenance")
        return CallbackResult(payload=self.ui_config)

    def hook(self, _url: URL, **kwargs: object) -> CallbackResult:
        body = kwargs["data"]
        assert isinstance(body, bytes)
        self.bodies[int(body.split(b"|")[0])] = body.decode()
        return CallbackResult(status=200)

    def mock(self, mocked: aioresponses) -> None:
        mocked.get(SEARCH, callback=self.search, repeat=True)
        mocked.get(UI_CONFIG, callback=self.ui, repeat=True)
        mocked.post(HOOK, callback=self.hook, repeat=True)


def _fake_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(f"""
[unleash]
url = "{UNLEASH}"
token = "t"
start_from = 0
poll_interval_s = 0.05
backoff_max_s = 0.2
[state]
path = "s.sqlite3"
[[webhooks]]
name = "h"
url = "{HOOK}"
body_template = "{{{{event.id}}}}|{{{{event.data.name}}}}"
""")
    path.chmod(0o600)
    return path


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def _run_app(
    fake: _FakeUnleash, path: Path, state: SqliteState, scenario: Callable[[App], Awaitable[None]]
) -> None:
    """Run the daemon on `path` against `fake` while `scenario(app)` runs; then stop it."""

    async def main() -> None:
        app = App(load_config(path), state)
        task = asyncio.create_task(app.run())
        try:
            await scenario(app)
        finally:
            app._request_stop()
            await task

    with aioresponses() as mocked:
        fake.mock(mocked)
        asyncio.run(main())


def test_ui_config_failing_never_holds_up_polling_and_its_answer_is_applied_later(
    tmp_path: Path,
) -> None:
    """ui-config answering 503 (the review's repro): events are still polled and delivered,
    rendered as the config was loaded (8.x: HTML-escaped); once ui-config answers, its
    profile (7.6.5: no escaping) is applied to later deliveries and kept in the state. A
    reload asks again in the background while delivery goes on with the profile in use."""
    fake = _FakeUnleash()
    for i in (1, 2, 3):
        fake.add(i)
    path = _fake_config(tmp_path)
    state = SqliteState.open(tmp_path / "s.sqlite3")

    async def scenario(app: App) -> None:
        await _until(lambda: len(fake.bodies) == 3, "events 1-3 delivered")
        assert fake.bodies[1] == "1|&lt;b&gt;1"
        assert app.profile is None
        fake.ui_config = {"version": "7.6.5", "unleashUrl": "http://ui.test"}
        await _until(lambda: app.profile is not None, "the profile applied")
        assert app.profile == ServerProfile("7.6.5", "http://ui.test")
        fake.add(4)
        await _until(lambda: 4 in fake.bodies, "event 4 delivered")
        assert fake.bodies[4] == "4|<b>4"  # 7.6.5 does not escape
        # A reload while ui-config is down again: polling and delivery go on, with the
        # profile already read; ui-config is asked again in the background.
        fake.ui_config = None
        asked = fake.ui_config_asked
        app.reload()
        await _until(lambda: fake.ui_config_asked >= asked + 2, "ui-config retried")
        fake.add(5)
        await _until(lambda: 5 in fake.bodies, "event 5 delivered after the reload")
        assert fake.bodies[5] == "5|<b>5"
        fake.ui_config = {"version": "8.2.0", "unleashUrl": "http://ui.test"}
        await _until(lambda: app.profile is not None and app.profile.version == "8.2.0", "8.2.0")
        fake.add(6)
        await _until(lambda: 6 in fake.bodies, "event 6 delivered")
        assert fake.bodies[6] == "6|&lt;b&gt;6"

    _run_app(fake, path, state, scenario)
    saved = parse_saved_profile(asyncio.run(state.saved_text("server_profile")))
    asyncio.run(state.close())
    assert saved is not None
    assert (saved.version, saved.unleash_url) == ("8.2.0", "http://ui.test")


def test_a_start_while_ui_config_fails_renders_with_the_profile_saved_by_the_last_run(
    tmp_path: Path,
) -> None:
    """After a restart with ui-config down, bodies render as for the server the last run
    read (7.6.5 here, saved in the state), not as for 8.x, and one warning says so."""
    fake = _FakeUnleash()
    fake.add(1)
    path = _fake_config(tmp_path)
    state = SqliteState.open(tmp_path / "s.sqlite3")
    asyncio.run(
        state.save_text(
            "server_profile", saved_profile_text(ServerProfile("7.6.5", "http://ui.test"))
        )
    )

    async def scenario(app: App) -> None:
        await _until(lambda: 1 in fake.bodies, "event 1 delivered")
        await _until(lambda: fake.ui_config_asked >= 3, "ui-config retried")

    with capture_logs() as logs:
        _run_app(fake, path, state, scenario)
    asyncio.run(state.close())
    assert fake.bodies[1] == "1|<b>1"
    warnings = [e for e in logs if e.get("event") == "unleash.profile_unknown"]
    assert len(warnings) == 1, warnings
    assert "7.6.5" in str(warnings[0]["rendering_as"])


def test_the_stop_summary_counts_the_outbox_as_the_run_leaves_it(tmp_path: Path) -> None:
    """`app.stopped` reports what is pending at the end, not the count cached before the
    poll: a --once run that takes in three events for a paused webhook says 3 pending."""
    fake = _FakeUnleash()
    for i in (1, 2, 3):
        fake.add(i)
    state = SqliteState.open(tmp_path / "s.sqlite3")

    async def main() -> int:
        await state.set_pause("h", Pause("by hand", time.time(), True, math.inf))
        return await App(load_config(_fake_config(tmp_path)), state).run(once=True)

    with aioresponses() as mocked, capture_logs() as logs:
        fake.mock(mocked)
        try:
            assert asyncio.run(main()) == 0
        finally:
            asyncio.run(state.close())
    [stopped] = [e for e in logs if e.get("event") == "app.stopped"]
    assert (stopped["cursor"], stopped["pending"], stopped["delivered"]) == (3, 3, 0)
    assert fake.bodies == {}


def test_memory_is_given_back_once_quiet_after_a_burst_of_deliveries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once after starting, then once the daemon has gone quiet after GIVE_BACK_AT
    deliveries or more (never while they are going out); a few deliveries give nothing."""
    monkeypatch.setattr(app_module, "GIVE_BACK_AT", 5)
    monkeypatch.setattr(app_module, "SETTLE_S", 0.3)
    fake = _FakeUnleash()
    path = _fake_config(tmp_path)
    state = SqliteState.open(tmp_path / "s.sqlite3")
    given: list[int] = []  # how many bodies had arrived at each give-back
    monkeypatch.setattr(memory, "give_back", lambda: given.append(len(fake.bodies)) or True)

    async def scenario(app: App) -> None:
        await _until(lambda: given == [0], "the give-back after starting")
        for i in range(1, 11):
            fake.add(i)
        await _until(lambda: len(fake.bodies) == 10, "events 1-10 delivered")
        await _until(lambda: len(given) == 2, "the give-back after the burst")
        assert given == [0, 10]
        fake.add(11)
        fake.add(12)
        await _until(lambda: len(fake.bodies) == 12, "events 11-12 delivered")
        await asyncio.sleep(1.0)  # quiet for more than SETTLE_S, on 2 deliveries only
        assert given == [0, 10]

    _run_app(fake, path, state, scenario)
    asyncio.run(state.close())
