"""start_eagerly: a group commit that never waits (SQLite) runs at once, one that waits
(PostgreSQL) carries on as a task with the same result, error and cancel."""

from __future__ import annotations

import asyncio

import pytest

from poller.worker_ordered import start_eagerly


def test_a_coroutine_that_never_waits_is_done_on_return() -> None:
    """No task is made, and the work is done when start_eagerly returns."""
    done: list[int] = []

    async def commit() -> None:
        done.append(1)

    async def main() -> None:
        assert start_eagerly(commit()) is None
        assert done == [1]

    asyncio.run(main())


def test_a_coroutine_that_never_waits_raises_on_return() -> None:
    """Its error is raised by start_eagerly itself."""

    async def commit() -> None:
        raise OSError("disk full")

    async def main() -> None:
        with pytest.raises(OSError, match="disk full"):
            start_eagerly(commit())

    asyncio.run(main())


def test_a_coroutine_that_waits_carries_on_as_a_task() -> None:
    """The part before its first wait runs at once; the task finishes the rest, the value
    it waited for included, and raises what the coroutine raised after the wait."""
    steps: list[str] = []

    async def commit(gate: asyncio.Future[str]) -> None:
        steps.append("before")
        steps.append(await gate)
        raise OSError("connection lost")

    async def main() -> None:
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        task = start_eagerly(commit(gate))
        assert task is not None
        assert steps == ["before"]
        gate.set_result("after")
        with pytest.raises(OSError, match="connection lost"):
            await task
        assert steps == ["before", "after"]

    asyncio.run(main())


def test_cancelling_the_task_cancels_the_coroutine_where_it_waits() -> None:
    """A cancel reaches the coroutine at its wait, so its cleanup runs."""
    cleaned: list[bool] = []

    async def commit() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    async def main() -> None:
        task = start_eagerly(commit())
        assert task is not None
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert cleaned == [True]

    asyncio.run(main())
