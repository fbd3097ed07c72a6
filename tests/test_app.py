"""The daemon's lifecycle in-process: signal handlers it installs and removes."""

from __future__ import annotations

import asyncio
import os
import signal
import tomllib
from pathlib import Path

import pytest

from poller.app import App
from poller.config import Config, parse_config
from poller.state import State

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _config(tmp_path: Path) -> Config:
    # Nothing listens on port 1: the daemon keeps backing off until it is stopped.
    return parse_config(
        tomllib.loads("""
[unleash]
url = "http://127.0.0.1:1"
token = "t"
[state]
path = "s.sqlite3"
[[webhooks]]
name = "a"
url = "http://127.0.0.1:1/a"
"""),
        tmp_path,
    )


class _Announcing(App):
    """An App that says when it is running (its signal handlers are in place by then)."""

    def __init__(self, config: Config, state: State) -> None:
        super().__init__(config, state)
        self.started = asyncio.Event()

    def _warn_orphans(self) -> None:
        super()._warn_orphans()
        self.started.set()


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
