"""The asyncio front: the same guarantees as ``Limiter``, plus cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis
from _helpers import budget_keys

from xflow_dist import AcquireTimeout, AsyncLimiter, Budget, InvalidCostError


async def test_async_with_acquire_and_report(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, tps=10, burst=100, max_concurrency=2), url) as lim:
        async with lim.acquire(tokens=600) as lease:
            assert (await lim.status()).in_flight == 1
            reply = await lease.report(actual_tokens=100)
            assert reply is not None and reply.refunded == pytest.approx(500)
        s = await lim.status()
        assert s.in_flight == 0
        assert s.tokens_available == pytest.approx(900, abs=20)


async def test_concurrency_is_never_exceeded_and_waiters_are_woken(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=3), url) as lim:
        inflight = peak = 0

        async def call() -> None:
            nonlocal inflight, peak
            async with lim.acquire(timeout=30):
                inflight += 1
                peak = max(peak, inflight)
                await asyncio.sleep(0.02)
                inflight -= 1

        t0 = time.monotonic()
        await asyncio.gather(*(call() for _ in range(30)))
        assert peak == 3
        # 10 rounds of 20 ms: woken by releases, not by a slow poll
        assert time.monotonic() - t0 < 3.0
        s = await lim.status()
        assert (s.in_flight, s.queued) == (0, 0)


async def test_cancelling_a_queued_acquire_gives_the_ticket_back(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), url) as lim:
        held = await lim.acquire()
        task = asyncio.create_task(_acquire(lim))
        for _ in range(200):
            if (await lim.status()).queued:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert (await lim.status()).queued == 0
        await held.release()
        assert (await lim.status()).in_flight == 0


async def _acquire(lim: AsyncLimiter) -> None:
    async with lim.acquire():
        pass


async def test_cancelling_during_the_rate_sleep_refunds_the_reservation(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, tps=100, burst=1), url) as lim:
        await (await lim.acquire(tokens=100)).release()
        task = asyncio.create_task(_acquire_tokens(lim, 100))  # reserved 1 s ahead
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        s = await lim.status()
        # the 100 tokens reserved for the cancelled caller are credit again
        assert s.tokens_available > -10
        assert s.in_flight == 0


async def _acquire_tokens(lim: AsyncLimiter, tokens: float) -> None:
    async with lim.acquire(tokens=tokens):
        pass


async def test_timeout_while_queued(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), url) as lim:
        held = await lim.acquire()
        t0 = time.monotonic()
        with pytest.raises(AcquireTimeout):
            await lim.acquire(timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert (await lim.status()).queued == 0
        await held.release()


async def test_cooldown_pauses_pending_starts_in_this_process(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, rps=10), url) as lim:
        for _ in range(3):
            await (await lim.acquire()).release()
        task = asyncio.create_task(_acquire(lim))
        await asyncio.sleep(0.05)
        pause = await lim.cooldown(retry_after=0.8)
        t0 = time.monotonic()
        await asyncio.wait_for(task, 10)
        assert time.monotonic() - t0 >= pause.remaining - 0.05


async def test_try_acquire(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), url) as lim:
        first = await lim.try_acquire()
        assert first and first.lease is not None
        second = await lim.try_acquire()
        assert not second and second.retry_after is None
        await first.lease.release()


async def test_bad_input_raises_before_anything_is_awaited(client: redis.Redis, redis_url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, tpm=1_000), redis_url) as lim:
        with pytest.raises(InvalidCostError):
            lim.acquire(tokens=-1)
        with pytest.raises(InvalidCostError):
            await lim.try_acquire(tokens=float("nan"))
    assert budget_keys(client, name) == []


async def test_heartbeat_keeps_long_calls_alive(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=2, lease_ttl=0.6), url) as lim:
        first = await lim.acquire()
        second = await lim.acquire()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.8:  # three TTLs
            assert (await lim.status()).in_flight == 2
            await asyncio.sleep(0.1)
        assert not first.lost
        assert not second.lost
        await first.release()
        await second.release()
        assert (await lim.status()).in_flight == 0
