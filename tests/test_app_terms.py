"""Terms of a leader under a lease, in-process, with a fake lease over a SQLite state: what
a term leaves behind when it ends, and what a standby starts (nothing)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

from poller.app import EX_TEMPFAIL, App
from poller.config import Config, WebhookConfig, load_config
from poller.lease import LeaseLostError
from poller.state import LeaseView, SqliteState, StateUnavailableError
from tests.test_app import _fake_config, _FakeUnleash, _toml


class _FakeLeadership:
    """A lease one holder has at a time; `other` set: another daemon holds it."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self.other: str | None = None
        self.epoch = 0
        self.refused = asyncio.Event()  # told a daemon that another leads

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        if self.other is not None:
            self.refused.set()
            return False, LeaseView(self.other, self.epoch, 100.0)
        if self.holder != holder:
            self.holder, self.epoch = holder, self.epoch + 1
        return True, LeaseView(holder, self.epoch, ttl_s)

    async def resign(self, holder: str) -> None:
        if self.holder == holder:
            self.holder = None

    async def lease(self) -> LeaseView:
        return LeaseView(self.other or self.holder, self.epoch, 100.0)


class _Shared:
    """A SQLite state that says it is shared: it has a lease."""

    def __init__(self, inner: SqliteState, leadership: _FakeLeadership) -> None:
        self._inner = inner
        self.leadership = leadership

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _HangingWorker:
    """Stands for a worker whose request in flight never ends (until `release`)."""

    def __init__(self, hook: WebhookConfig) -> None:
        self.hook = hook
        self.stop = asyncio.Event()
        self.wake = asyncio.Event()
        self.release = asyncio.Event()

    def reconfigure(self, hook: WebhookConfig) -> None:
        self.hook = hook

    async def commit_marks(self, *, attempts: bool = True) -> None:
        return None

    async def run(self) -> None:
        await self.release.wait()


class _App(App):
    def __init__(self, config: Config, state: Any) -> None:
        super().__init__(config, state)
        self.starts: list[tuple[str, bool]] = []  # (webhook, leading) at each worker start
        self.worker_started = asyncio.Event()
        self.made: list[_HangingWorker] = []
        self.term_stopped = asyncio.Event()  # a term's workers are stopped

    async def _stop_workers(self) -> None:
        await super()._stop_workers()
        self.term_stopped.set()

    def _start_worker(self, hook: WebhookConfig, session: aiohttp.ClientSession) -> None:
        worker = _HangingWorker(hook)
        self.made.append(worker)
        self.starts.append((hook.name, self.leading))
        task = asyncio.create_task(worker.run(), name=f"worker:{hook.name}")
        task.add_done_callback(self._worker_done)
        self.workers[hook.name] = worker  # type: ignore[assignment]
        self.tasks[hook.name] = task
        self.worker_started.set()


def _write(path: Path, text: str) -> None:
    path.write_text(text)


def _run(
    tmp_path: Path,
    body: Callable[[_App, Path, _FakeLeadership], Awaitable[None]],
    *,
    other: str | None = None,
    app_class: type[_App] = _App,
) -> None:
    """Run the App while `body` runs (`other`: another daemon leads from the start)."""
    path = tmp_path / "poller.toml"
    path.touch(mode=0o600)
    path.write_text(_toml(1))
    config = load_config(path)
    inner = SqliteState.open(config.state.path)
    leadership = _FakeLeadership()
    leadership.other = other

    async def main() -> int:
        app = app_class(config, _Shared(inner, leadership))
        running = asyncio.create_task(app.run())
        try:
            await asyncio.wait_for(body(app, path, leadership), 10)
        finally:
            for worker in app.made:
                worker.release.set()
            os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(running, 10)

    try:
        assert asyncio.run(main()) == 0
    finally:
        asyncio.run(inner.close())


def test_a_worker_retiring_when_the_term_ends_ends_with_the_term(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload replaces a worker whose request hangs; the lease is lost meanwhile. The
    retiring worker is stopped with the term, and its replacement is not started in
    standby (nor beside the next term's worker)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    async def body(app: _App, path: Path, leadership: _FakeLeadership) -> None:
        await asyncio.wait_for(app.worker_started.wait(), 10)
        first = app.made[0]
        _write(path, _toml(2))  # a new max_in_flight: the worker is replaced
        app.reload()
        assert "a" in app.retiring
        leadership.other = "b:1"  # taken over
        assert app.lease is not None
        app.lease.stand_down()
        app._end_term(LeaseLostError("taken over by b:1"))
        await app.term_stopped.wait()
        assert not app.leading
        assert app.retiring == {}  # stopped with the term
        first.release.set()
        await asyncio.sleep(0)
        assert [s for s in app.starts if not s[1]] == []  # nothing started in standby
        assert app.workers == {}

    _run(tmp_path, body)


def test_a_reload_in_standby_asks_nothing_of_unleash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A standby touches nothing: a reload does not start reading ui-config (a request to
    Unleash, then a write of its answer to the state)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    async def body(app: _App, path: Path, leadership: _FakeLeadership) -> None:
        await leadership.refused.wait()
        assert not app.leading
        _write(path, _toml(1).replace('token = "t"', 'token = "t2"'))
        app.reload()
        assert app._profile_task is None
        assert app.starts == []

    _run(tmp_path, body, other="b:1")


class _MarksFail(_Shared):
    """PostgreSQL goes away when the first delivery marks are committed."""

    async def delivered(self, hook: str, *event_ids: int) -> None:
        raise StateUnavailableError("postgresql://u:***@db/x: server closed the connection")


def test_once_whose_state_goes_away_midway_does_not_exit_0(tmp_path: Path) -> None:
    """A --once run on a shared state that loses it while delivering (marks not
    committed) did not do its work: it exits 75 (try again), not 0."""
    fake = _FakeUnleash()
    for i in (1, 2, 3):
        fake.add(i)
    config = load_config(_fake_config(tmp_path))
    inner = SqliteState.open(config.state.path)

    async def main() -> int:
        with aioresponses() as mocked:
            fake.mock(mocked)
            app = App(config, _MarksFail(inner, _FakeLeadership()))  # type: ignore[arg-type]
            return await asyncio.wait_for(app.run(once=True), 10)

    try:
        assert asyncio.run(main()) == EX_TEMPFAIL
    finally:
        asyncio.run(inner.close())
    assert fake.bodies  # it did deliver: the marks are what failed


def test_a_new_leader_is_healthy_while_its_first_poll_is_due(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon that stood by for an hour, then took over, has not polled yet: its health
    counts the poll age from the start of its term, not of the process (a liveness probe
    would kill the new leader right after every takeover)."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    async def body(app: _App, path: Path, leadership: _FakeLeadership) -> None:
        await app.worker_started.wait()
        ok, details = app.health()
        assert ok, details
        assert details["role"] == "leader"

    real_init = _App.__init__

    def init(self: _App, config: Config, state: Any) -> None:
        real_init(self, config, state)
        self.started_at -= 3600  # stood by for an hour before this term

    monkeypatch.setattr(_App, "__init__", init)
    _run(tmp_path, body)


def test_a_stop_while_a_term_begins_starts_no_worker(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the term is still reading the server (it waits up to a request for
    ui-config): no worker starts after it, so no delivery begins after the stop."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    # A worker wrongly started hangs (see _HangingWorker): cut short, so the assert says so.
    config = dataclasses.replace(load_config(_fake_config(tmp_path)), drain_timeout_s=0.2)
    inner = SqliteState.open(config.state.path)

    class _StoppedEarly(_App):
        async def _begin_term(self) -> None:
            await super()._begin_term()
            self._request_stop()  # as the SIGTERM handler does

    async def main() -> list[tuple[str, bool]]:
        app = _StoppedEarly(config, _Shared(inner, _FakeLeadership()))
        with aioresponses() as mocked:
            _FakeUnleash().mock(mocked)
            assert await asyncio.wait_for(app.run(), 10) == 0
        return app.starts

    try:
        assert asyncio.run(main()) == []
    finally:
        asyncio.run(inner.close())


class _CountingLeadership(_FakeLeadership):
    def __init__(self) -> None:
        super().__init__()
        self.tries = 0
        self.renewed = asyncio.Event()  # a try after the first: a renewal

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        self.tries += 1
        if self.tries > 1:
            self.renewed.set()
        return await super().try_lead(holder, ttl_s)


def test_once_renews_the_lease_while_it_polls(tmp_path: Path) -> None:
    """--once takes the lease, then asks the server and ingests (a long poll: a backlog, a
    slow server) before its workers start. The lease is renewed meanwhile: otherwise it
    runs out during the poll, and no delivery may start (or another daemon takes over)."""
    config = load_config(_fake_config(tmp_path))
    # A short lease (below what the config allows), so a renewal is due within the poll.
    config = dataclasses.replace(config, state=dataclasses.replace(config.state, lease_ttl_s=0.3))
    inner = SqliteState.open(config.state.path)
    leadership = _CountingLeadership()
    renewed_while_polling: list[bool] = []

    class _SlowPoll(App):
        async def _detect(self) -> None:
            await super()._detect()
            try:  # stands for a poll that outlasts the lease
                await asyncio.wait_for(leadership.renewed.wait(), 5)
            except TimeoutError:
                renewed_while_polling.append(False)
            else:
                renewed_while_polling.append(True)

    async def main() -> None:
        app = _SlowPoll(config, _Shared(inner, leadership))  # type: ignore[arg-type]
        with aioresponses() as mocked:
            _FakeUnleash().mock(mocked)
            await asyncio.wait_for(app.run(once=True), 20)

    try:
        asyncio.run(main())
    finally:
        asyncio.run(inner.close())
    assert renewed_while_polling == [True]


def test_a_reload_while_a_term_begins_starts_each_worker_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGHUP while the term is still reading the server: the reload starts the workers
    (this daemon leads), and the term must not start a second one beside each: the first
    would be left running, never stopped, into the next term."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    class _ReloadedEarly(_App):
        async def _begin_term(self) -> None:
            await super()._begin_term()
            self.reload()  # as the SIGHUP handler does

    async def body(app: _App, path: Path, leadership: _FakeLeadership) -> None:
        await app.worker_started.wait()
        await asyncio.sleep(0)  # the term goes on past starting its workers
        assert app.starts == [("a", True)]

    _run(tmp_path, body, app_class=_ReloadedEarly)


def test_once_with_the_state_gone_when_it_asks_for_the_lease_exits_75(
    tmp_path: Path,
) -> None:
    """PostgreSQL went away between the open and the look at the lease: --once did
    nothing and says so in one line; exit 75 (try again), not a StateError's 74."""

    class _Away(_FakeLeadership):
        async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
            raise StateUnavailableError("postgresql://u:***@db/x: connection refused")

    config = load_config(_fake_config(tmp_path))
    inner = SqliteState.open(config.state.path)

    async def main() -> int:
        app = App(config, _Shared(inner, _Away()))  # type: ignore[arg-type]
        with aioresponses() as mocked:
            _FakeUnleash().mock(mocked)
            return await asyncio.wait_for(app.run(once=True), 10)

    try:
        assert asyncio.run(main()) == EX_TEMPFAIL
    finally:
        asyncio.run(inner.close())
