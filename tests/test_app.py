"""The daemon's lifecycle in-process: signal handlers it installs and removes, reloads."""

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
from poller.config import Config, WebhookConfig, load_config, parse_config
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
