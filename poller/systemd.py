"""The systemd notify protocol, spoken directly: one datagram of `KEY=value` lines per call.

`Type=notify` waits for READY=1; `WatchdogSec=` expects WATCHDOG=1 more often than the
interval; STATUS= is the line `systemctl status` shows. Outside systemd ($NOTIFY_SOCKET
unset) every call is a no-op, so the daemon runs the same from a terminal or a test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

from poller.aio import wait_set
from poller.log import get as get_logger

log = get_logger()

# The notify socket of pid 1 has a large receive buffer, so a send does not block in
# practice; the timeout only bounds how long a wedged manager could stall the event loop.
_SEND_TIMEOUT_S = 1.0
# How often STATUS= is refreshed when no watchdog interval sets the pace.
STATUS_REFRESH_S = 15.0
STOPPING_STATUS = "stopping: draining in-flight deliveries"


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        # Linux abstract namespace: sd_notify spells its leading NUL byte as '@'.
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # Unset, or a transport we do not speak (systemd >= 254 also offers vsock:).
    return None


def notify(*fields: str) -> bool:
    """Send `fields` (e.g. "READY=1", "STATUS=polling") as one datagram to $NOTIFY_SOCKET.

    Returns True when sent; False when not under systemd or the send failed, which is
    never fatal: at worst systemd shows a stale status, or its watchdog restarts us.
    """
    for field in fields:
        # A newline would smuggle in another assignment, "=" is what makes it one.
        if "\n" in field or "=" not in field:
            raise ValueError(f"not a single KEY=value notify field: {field!r}")
    address = _address()
    if address is None or not fields:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.sendto("\n".join(fields).encode(), address)
    except OSError as exc:
        log.warning(
            "systemd.notify_failed", fields=[f.split("=", 1)[0] for f in fields], error=str(exc)
        )
        return False
    return True


def reloading() -> bool:
    """Tell systemd a SIGHUP reload began; send READY=1 when it is done (systemd >= 253
    waits for that before `systemctl reload` returns; older ones ignore both)."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")


def watchdog_interval_s() -> float | None:
    """The `WatchdogSec=` systemd gave this process, or None when there is none for us."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    # A child that inherited the environment must not think it is the one being watched.
    if pid is not None and pid != str(os.getpid()):
        return None
    return usec / 1_000_000 if usec > 0 else None


def _one_line(text: str) -> str:
    return " ".join(text.split())


async def watchdog_loop(stop: asyncio.Event, status: Callable[[], str]) -> None:
    """Until `stop` is set: WATCHDOG=1 every half watchdog interval, STATUS= whenever
    `status()` changes; then STOPPING=1. Returns only once `stop` is set, so it can sit
    beside the other tasks of the daemon.

    The pings are sent from the event loop on purpose, not from a thread: a loop that is
    blocked or spinning stops them, and systemd then kills and restarts the service.
    """
    if _address() is None:
        await stop.wait()
        return
    watchdog = watchdog_interval_s()
    period = watchdog / 2 if watchdog is not None else STATUS_REFRESH_S
    log.info("systemd.notify_loop", watchdog_s=watchdog, every_s=period)
    shown: str | None = None
    while not stop.is_set():
        line = _one_line(status())
        fields = ["WATCHDOG=1"] if watchdog is not None else []
        if line != shown:
            fields.append(f"STATUS={line}")
            shown = line
        if fields:
            notify(*fields)
        await wait_set(stop, period)
    notify("STOPPING=1", f"STATUS={STOPPING_STATUS}")
