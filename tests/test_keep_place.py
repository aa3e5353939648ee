"""A waiter that leaves the queue for a while keeps its place: ``acquire(keep_place=True)``,
``park`` and ``acquire(ticket=...)`` (what a Celery task re-queued with a countdown uses).

Time is driven by the budget's own rate: a bucket of 100 tokens refilling at 100 a second, emptied
first, so that a cost of 100 fits one second later and a cost of 10 a tenth of a second later.
"""

from __future__ import annotations

import time

import pytest

from xflow_dist import AcquireTimeout, AsyncLimiter, Budget, InvalidCostError, Limiter


def _drained(name: str, url: str) -> Limiter:
    lim = Limiter(Budget(name, tps=100, burst=1), url)
    lim.acquire(tokens=100).release()  # the bucket is empty: 100 tokens fit in 1 s, 10 in 0.1 s
    return lim


def test_a_kept_place_is_not_passed_by_later_smaller_waiters(url: str, name: str) -> None:
    with _drained(name, url) as lim:
        with pytest.raises(AcquireTimeout) as big:
            lim.acquire(tokens=100, timeout=0.05, keep_place=True)
        ticket = big.value.ticket
        assert ticket is not None
        assert lim.status().queued == 1  # the ticket stayed
        # a later, smaller caller would fit in 0.1 s on its own, but queues behind the kept place
        with pytest.raises(AcquireTimeout) as small:
            lim.acquire(tokens=10, timeout=0.3)
        assert small.value.ticket is None  # without keep_place nothing is kept
        assert lim.status().queued == 1
        started = time.monotonic()
        lease = lim.acquire(tokens=100, ticket=ticket, timeout=5)  # back: served in its turn
        assert lease.id == ticket
        assert time.monotonic() - started < 1.5
        lease.release()
        assert lim.status().queued == 0


def test_park_keeps_a_ticket_beyond_its_ttl_and_hands_over_a_grant_made_meanwhile(url: str, name: str) -> None:
    lim = Limiter(Budget(name, tps=100, burst=1), url, ticket_ttl=0.5)
    with lim:
        lim.acquire(tokens=100).release()
        with pytest.raises(AcquireTimeout) as big:
            lim.acquire(tokens=100, timeout=0.05, keep_place=True)
        ticket = big.value.ticket
        assert ticket is not None
        assert lim.park(ticket, 0.3, 100) is None  # queued: kept 0.3 s + its TTL
        time.sleep(0.6)  # past its own TTL of 0.5 s, within the parked time
        assert lim.status().queued == 1, "the parked ticket outlived its usual TTL"
        time.sleep(0.6)  # now it fits: granted provisionally, which park claims
        lease = lim.park(ticket, 0.3, 100)
        assert lease is not None and lease.id == ticket
        lease.release()


def test_a_ticket_that_never_comes_back_loses_its_place_within_the_claim_window(url: str, name: str) -> None:
    with _drained(name, url) as lim:
        with pytest.raises(AcquireTimeout) as big:
            lim.acquire(tokens=100, timeout=0.05, keep_place=True)
        assert big.value.ticket is not None
        started = time.monotonic()
        lease = lim.acquire(tokens=10, timeout=5)  # behind the abandoned place
        waited = time.monotonic() - started
        lease.release()
    # the abandoned ticket's turn came at about 1 s; it was granted, unclaimed, and passed over
    # after the claim window (0.5 s): then its refund let the small caller in at once
    assert 0.8 < waited < 1.0 + 0.5 + 1.0


async def test_the_async_front_keeps_a_place_too(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, tps=100, burst=1), url) as lim:
        first = await lim.acquire(tokens=100)  # the bucket is empty
        await first.release()
        with pytest.raises(AcquireTimeout) as big:
            await lim.acquire(tokens=100, timeout=0.05, keep_place=True)
        ticket = big.value.ticket
        assert ticket is not None and await lim.park(ticket, 0.1, 100) is None
        lease = await lim.acquire(tokens=100, ticket=ticket, timeout=5)
        assert lease.id == ticket
        await lease.release()


def test_a_ticket_not_made_by_acquire_is_refused_before_redis(url: str, name: str) -> None:
    with Limiter(Budget(name, tps=100, burst=1), url) as lim:
        for bad in ("", "x y", "../etc", 42):
            with pytest.raises(InvalidCostError):
                lim.acquire(tokens=1, ticket=bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidCostError):
                lim.park(bad, 1.0)  # type: ignore[arg-type]
        assert lim.status().queued == 0 and lim.status().in_flight == 0
