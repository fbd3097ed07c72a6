"""The daemon's lifecycle in-process: signal handlers it installs and removes, reloads,
and the server's profile (renderers rebuilt once per detection/reload)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import tomllib
from pathlib import Path

import aiohttp
import pytest

from poller.app import App
from poller.config import Config, UnleashConfig, WebhookConfig, load_config, parse_config
from poller.render import ServerProfile
from poller.state import State

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

    def __init__(self, config: Config, state: State) -> None:
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
    state = State.open(config.state.path)

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
        state.close()
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
    state = State.open(config.state.path)
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
        state.close()
    assert errors == []


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
    state = State.open(tmp_path / "state.sqlite3")
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

        asyncio.run(reload())
        assert app.config.webhooks[0].escape == "unleash"
        assert "(http://localhost:4242/projects/default/features/f)" in _body(app)
        assert _body(app).endswith("|&lt;b&gt;")  # the explicit value wins
        assert app._detected is False  # ui-config is read again on the next poll
        assert worker.hook is app.config.webhooks[0]
    finally:
        state.close()
