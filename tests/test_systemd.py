"""sd_notify against a real AF_UNIX datagram socket standing in for systemd's."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from poller import systemd


class FakeManager:
    """A bound datagram socket, like pid 1's notify socket; collects what arrives."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(5)

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def recv_all(self) -> list[bytes]:
        """Every datagram already queued, without waiting for more."""
        got = []
        self.sock.setblocking(False)
        try:
            while True:
                got.append(self.sock.recv(4096))
        except BlockingIOError:
            return got
        finally:
            self.sock.settimeout(5)


@pytest.fixture
def path_manager(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    address = str(tmp_path / "notify")
    manager = FakeManager(address)
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield manager
    manager.sock.close()


@pytest.fixture
def abstract_manager(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeManager]:
    name = f"unleash-poller-test-{uuid.uuid4().hex}"
    manager = FakeManager("\0" + name)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield manager
    manager.sock.close()


def test_notify_without_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside systemd, notify sends nothing and says so."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_sends_fields_as_one_datagram_to_a_path(path_manager: FakeManager) -> None:
    """Fields arrive as one newline-joined datagram at a filesystem socket."""
    assert systemd.notify("READY=1", "STATUS=polling http://u") is True
    assert path_manager.recv() == b"READY=1\nSTATUS=polling http://u"


def test_notify_reaches_an_abstract_socket(abstract_manager: FakeManager) -> None:
    """An '@' address means the Linux abstract namespace, as sd_notify reads it."""
    assert systemd.notify("STOPPING=1") is True
    assert abstract_manager.recv() == b"STOPPING=1"


def test_notify_keeps_utf8_status(path_manager: FakeManager) -> None:
    """A status line with non-ASCII text is sent as UTF-8."""
    assert systemd.notify("STATUS=webhook «ops» retrying")
    assert path_manager.recv() == "STATUS=webhook «ops» retrying".encode()


@pytest.mark.parametrize("field", ["READY=1\nWATCHDOG=1", "READY"])
def test_notify_rejects_malformed_fields(path_manager: FakeManager, field: str) -> None:
    """A field with a newline (which would inject another) or without '=' is refused."""
    with pytest.raises(ValueError, match="KEY=value"):
        systemd.notify(field)
    assert path_manager.recv_all() == []


def test_notify_to_a_missing_socket_returns_false(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket that went away is reported as False, not raised."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert systemd.notify("WATCHDOG=1") is False


def test_notify_ignores_unknown_transports(monkeypatch: pytest.MonkeyPatch) -> None:
    """An address we do not speak (e.g. systemd 254's vsock:) is a no-op."""
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


def test_reloading_sends_monotonic_timestamp(path_manager: FakeManager) -> None:
    """RELOADING=1 carries CLOCK_MONOTONIC in microseconds, as systemd 253 requires."""
    before = time.monotonic_ns() // 1000
    assert systemd.reloading()
    after = time.monotonic_ns() // 1000
    first, second = path_manager.recv().decode().split("\n")
    assert first == "RELOADING=1"
    key, value = second.split("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("-5", None, None),
        ("thirty", None, None),
        ("", None, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, usec: str | None, pid: str | None, expected: float | None
) -> None:
    """WATCHDOG_USEC becomes seconds, only when WATCHDOG_PID (if set) is our pid."""
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(
                name, {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            )
    assert systemd.watchdog_interval_s() == expected


def test_watchdog_loop_pings_and_sends_status_on_change(
    path_manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each tick pings WATCHDOG=1, adds STATUS= only when it changed, and ends STOPPING=1."""
    monkeypatch.setenv("WATCHDOG_USEC", "20000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    lines = iter(["polling, 0 pending", "polling, 0 pending", "2 pending\nsecond line"])

    async def main() -> None:
        stop = asyncio.Event()

        def status() -> str:
            line = next(lines)
            if "second" in line:
                stop.set()
            return line

        await asyncio.wait_for(systemd.watchdog_loop(stop, status), 5)

    asyncio.run(main())
    assert path_manager.recv_all() == [
        b"WATCHDOG=1\nSTATUS=polling, 0 pending",
        b"WATCHDOG=1",
        b"WATCHDOG=1\nSTATUS=2 pending second line",
        b"STOPPING=1\nSTATUS=" + systemd.STOPPING_STATUS.encode(),
    ]


def test_watchdog_loop_without_watchdog_sends_only_status(path_manager: FakeManager) -> None:
    """Without WatchdogSec= there is no WATCHDOG=1, but STATUS= is still kept current."""

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(systemd.watchdog_loop(stop, lambda: "idle"))
        await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert path_manager.recv_all() == [
        b"STATUS=idle",
        b"STOPPING=1\nSTATUS=" + systemd.STOPPING_STATUS.encode(),
    ]


def test_watchdog_loop_outside_systemd_waits_for_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET the loop still returns only once stop is set."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)

    async def main() -> bool:
        stop = asyncio.Event()
        task = asyncio.create_task(systemd.watchdog_loop(stop, lambda: "x"))
        await asyncio.sleep(0.05)
        still_running = not task.done()
        stop.set()
        await asyncio.wait_for(task, 5)
        return still_running

    assert asyncio.run(main())


def test_blocked_event_loop_stops_the_pings(
    path_manager: FakeManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pings come from the event loop: while it is blocked none arrive, so systemd would
    see the watchdog expire."""
    monkeypatch.setenv("WATCHDOG_USEC", "40000")  # a ping every 20 ms
    arrivals: list[float] = []

    def listen() -> None:
        while True:
            data = path_manager.recv()
            arrivals.append(time.monotonic())
            if data.startswith(b"STOPPING=1"):
                return

    listener = threading.Thread(target=listen)
    listener.start()
    blocked: list[float] = []

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(systemd.watchdog_loop(stop, lambda: "ok"))
        await asyncio.sleep(0.1)
        started = time.monotonic()
        time.sleep(0.5)  # noqa: ASYNC251 - the point: a loop stuck in blocking code
        blocked.extend([started, time.monotonic()])
        await asyncio.sleep(0.1)
        stop.set()
        await task

    asyncio.run(main())
    listener.join(5)
    start, end = blocked
    assert [t for t in arrivals if start + 0.05 < t < end] == []
    assert len([t for t in arrivals if t < start]) >= 3
    assert len([t for t in arrivals if t > end]) >= 2
