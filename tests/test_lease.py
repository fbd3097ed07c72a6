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
