"""The count of processes an outage shares the budget by (docs/reliability.md, "How a share is counted").

A busy process gets it in the reply of a settle it sends anyway (``settle.lua``'s census), once per
interval, so counting costs it no call of its own; a process that settles nothing asks Redis itself
(``PUBSUB NUMSUB``) once the count is an interval late.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import time
from typing import Any

import pytest

from xflow_dist import AsyncLimiter, Budget, Limiter, _async_limiter, _limiter
from xflow_dist._base import CENSUS_INTERVAL

_SPAWN = mp.get_context("spawn")
_BLOCK = 11  # ARGV[1..11], the budget block before a settle's own arguments


def _hold_a_subscription(url: str, name: str, ready: Any, stop: Any) -> None:
    """A process of the fleet: it has acquired once (so it holds the budget's channel), then idles."""
    with Limiter(Budget(name, rps=1000), url) as limiter:
        limiter.acquire(timeout=10).release()
        ready.release()
        stop.wait(60)


def test_a_busy_process_is_counted_by_its_settles_alone(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three processes on the budget; the third settles 30 times. Its settles bring the count (3), one
    settle per interval asks for it, and the process never asks Redis on its own (on the code before,
    the events reader asked, every interval, and a settle never brought it)."""
    asked: list[str] = []
    monkeypatch.setattr(_limiter, "subscribers", lambda _client, channel: asked.append(channel) or 0)
    ready, stop = _SPAWN.Semaphore(0), _SPAWN.Event()
    procs = [_SPAWN.Process(target=_hold_a_subscription, args=(redis_url, name, ready, stop)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            assert ready.acquire(timeout=60), "a process of the fleet did not start"
        with Limiter(Budget(name, rps=1000), redis_url) as limiter:
            settle, counted = limiter._scripts["settle"], []

            def spy(keys: list[str], args: list[str]) -> Any:
                counted.append(args[_BLOCK + 8 : _BLOCK + 9] == ["1"])  # ARGV[20], the census, asked
                return settle(keys=keys, args=args)

            limiter._scripts["settle"] = spy
            began = time.monotonic()
            for _ in range(30):
                limiter.acquire(timeout=5).release()
            took = time.monotonic() - began
            assert limiter.processes == 3
            assert 1 <= counted.count(True) <= 1 + took / CENSUS_INTERVAL, counted
            if took < CENSUS_INTERVAL:  # (the reader asks only once the count is an interval late)
                assert asked == []
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()


async def test_a_process_that_settles_nothing_asks_redis_itself(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process that only waits (its tickets queued, no lease to settle) is still counted: its events
    reader asks Redis once no settle brought the count within an interval of its due time."""
    asked: list[str] = []
    count = _async_limiter.async_subscribers

    async def counting(client: Any, channel: str) -> int:
        asked.append(channel)
        return await count(client, channel)

    monkeypatch.setattr(_async_limiter, "async_subscribers", counting)
    budget = Budget(name, max_concurrency=1)
    async with AsyncLimiter(budget, redis_url) as holder, AsyncLimiter(budget, redis_url) as waiter:
        lease = await holder.acquire(timeout=5)
        waiting = asyncio.ensure_future(waiter.acquire(timeout=30))
        deadline = time.monotonic() + 3 * CENSUS_INTERVAL + 5
        while waiter.processes != 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert waiter.processes == 2
        assert asked, "the count came without the reader asking, though the waiter settled nothing"
        assert not waiting.done()
        await lease.release()
        await (await waiting).release()
