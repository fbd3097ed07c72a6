"""Small asyncio helpers the daemon's loops share."""

from __future__ import annotations

import asyncio
import contextlib


async def wait_set(event: asyncio.Event, timeout_s: float) -> bool:
    """Wait until `event` is set or `timeout_s` has passed; whether it is set.

    `asyncio.wait_for(event.wait(), t)` makes a task for the wait and needs more loop
    turns to start it and to cancel it on the timeout. An idle daemon does this once per
    poll, so here the current task waits itself, under `asyncio.timeout`.
    """
    if event.is_set():
        return True
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout_s):
            await event.wait()
    return event.is_set()
