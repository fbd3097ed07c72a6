"""poller.aio.wait_set: the wait every idle loop of the daemon makes."""

from __future__ import annotations

import asyncio
import time

import pytest

from poller.aio import wait_set


def test_it_returns_false_after_the_timeout_when_nothing_sets_the_event() -> None:
    async def check() -> tuple[bool, float]:
        started = time.monotonic()
        return await wait_set(asyncio.Event(), 0.05), time.monotonic() - started

    got, waited = asyncio.run(check())
    assert got is False
    assert 0.04 <= waited < 1.0


def test_it_returns_true_as_soon_as_the_event_is_set() -> None:
    async def check() -> tuple[bool, float]:
        event = asyncio.Event()
        asyncio.get_running_loop().call_later(0.02, event.set)
        started = time.monotonic()
        return await wait_set(event, 30.0), time.monotonic() - started

    got, waited = asyncio.run(check())
    assert got is True
    assert waited < 5.0


def test_an_event_already_set_returns_at_once_even_with_no_time_left() -> None:
    async def check() -> bool:
        event = asyncio.Event()
        event.set()
        return await wait_set(event, 0.0)

    assert asyncio.run(check()) is True


def test_a_cancel_from_outside_is_not_taken_for_the_timeout() -> None:
    """The caller's cancellation (a stopping daemon) passes through; only the helper's own
    deadline becomes `False`."""

    async def check() -> None:
        task = asyncio.ensure_future(wait_set(asyncio.Event(), 30.0))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(check())


def test_it_makes_no_task_for_the_wait() -> None:
    """What the helper is for: no task is created per wait (wait_for makes one)."""

    async def check() -> int:
        before = len(asyncio.all_tasks())
        waiter = asyncio.ensure_future(wait_set(asyncio.Event(), 0.2))
        await asyncio.sleep(0.05)
        during = len(asyncio.all_tasks())
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        return during - before

    assert asyncio.run(check()) == 1  # the waiter itself, nothing under it
