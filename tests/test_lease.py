"""LeaseKeeper against a fake lease: when a term is over."""

from __future__ import annotations

import asyncio

import pytest

from poller.lease import LeaseKeeper, LeaseLostError
from poller.state import LeaseView


class _Lease:
    """Answers each try_lead with the next of `epochs` (None: another daemon leads)."""

    def __init__(self, *epochs: int | None) -> None:
        self.epochs = list(epochs)

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        epoch = self.epochs.pop(0)
        if epoch is None:
            return False, LeaseView("other:1", 9, ttl_s)
        return True, LeaseView(holder, epoch, ttl_s)

    async def resign(self, holder: str) -> None:
        return None

    async def lease(self) -> LeaseView:
        return LeaseView(None, 0, 0.0)


def test_a_renewal_under_a_new_epoch_ends_the_term() -> None:
    """The renewal found the lease taken and freed meanwhile (paused past a takeover by
    another daemon, which then stopped), and took it again under a higher epoch. What this
    daemon holds in memory predates the other's term: the term is over, and the next one
    starts from what the state says."""
    lease = _Lease(1, 3, 3)
    keeper = LeaseKeeper(lease, "me:1", 0.03)

    async def main() -> None:
        assert await keeper.try_once()
        with pytest.raises(LeaseLostError):
            await asyncio.wait_for(keeper.keep(), 10)
        assert not keeper.may_send()

    asyncio.run(main())


def test_renewals_under_the_same_epoch_keep_the_term() -> None:
    lease = _Lease(1, 1, 1, None)
    keeper = LeaseKeeper(lease, "me:1", 0.03)

    async def main() -> None:
        assert await keeper.try_once()
        with pytest.raises(LeaseLostError, match="taken over by other:1"):
            await asyncio.wait_for(keeper.keep(), 10)
        assert lease.epochs == []  # renewed twice before the takeover

    asyncio.run(main())


class _Hanging(_Lease):
    """A state that takes the connection and never answers (a connect or a statement
    waiting out its timeout)."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.left: asyncio.Event | None = None

    async def try_lead(self, holder: str, ttl_s: float) -> tuple[bool, LeaseView]:
        self.asked += 1
        self.left = asyncio.Event()
        try:
            await asyncio.sleep(3600)
        finally:
            self.left.set()
        raise AssertionError("unreachable")


def test_a_standby_stops_at_once_while_its_look_at_the_state_hangs() -> None:
    """Standing by, a stop set while the look at the lease waits on a state that does not
    answer ends acquire at once (False) and gives that look up."""
    lease = _Hanging()
    keeper = LeaseKeeper(lease, "me:1", 15.0)

    async def main() -> float:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(keeper.acquire(stop), 5) is False
        took = asyncio.get_running_loop().time() - started
        assert lease.left is not None
        await asyncio.wait_for(lease.left.wait(), 1)  # the look was given up
        return took

    took = asyncio.run(main())
    assert lease.asked == 1
    assert took < 1.0
    assert not keeper.leading


def test_a_standby_cancelled_while_looking_is_cancelled_and_gives_the_look_up() -> None:
    """A cancel from outside passes through acquire (it is not taken for a stop)."""
    lease = _Hanging()
    keeper = LeaseKeeper(lease, "me:1", 15.0)

    async def main() -> None:
        task = asyncio.create_task(keeper.acquire(asyncio.Event()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert lease.left is not None
        await asyncio.wait_for(lease.left.wait(), 1)

    asyncio.run(main())


def test_a_standby_still_takes_the_lease_when_it_frees() -> None:
    """Looking under a stop that is not set changes nothing: another leads, then the lease
    is free and this daemon leads."""
    lease = _Lease(None, None, 4)
    keeper = LeaseKeeper(lease, "me:1", 0.03)

    async def main() -> bool:
        return await asyncio.wait_for(keeper.acquire(asyncio.Event()), 5)

    assert asyncio.run(main()) is True
    assert keeper.leading
    assert keeper.epoch == 4
    assert lease.epochs == []


def test_every_look_at_the_lease_is_reported_with_the_epoch_it_saw() -> None:
    """Standing by, taking the lease and renewing it: each look says whether this daemon
    leads and the epoch it saw, so a standby's metrics follow takeovers among others."""
    lease = _Lease(None, 2, 2, None)
    looks: list[tuple[bool, int]] = []
    keeper = LeaseKeeper(
        lease, "me:1", 0.03, on_look=lambda leads, epoch: looks.append((leads, epoch))
    )

    async def main() -> None:
        assert await asyncio.wait_for(keeper.acquire(asyncio.Event()), 5)
        with pytest.raises(LeaseLostError):
            await asyncio.wait_for(keeper.keep(), 5)

    asyncio.run(main())
    assert looks == [(False, 9), (True, 2), (True, 2), (False, 9)]
