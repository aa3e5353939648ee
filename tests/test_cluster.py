"""Redis Cluster: one budget's keys share a hash tag, so every script runs on one shard."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster
from _servers import RedisClusterGroup

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._core import keys

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster(real_redis: bool) -> Iterator[RedisClusterGroup]:
    """3 masters with a replica each (tests/_servers.py)."""
    if not real_redis:
        pytest.skip("Redis Cluster needs the redis-server binary")
    with RedisClusterGroup() as group:
        yield group


def test_budget_keys_hash_to_one_slot(name: str) -> None:
    slots = {redis.cluster.key_slot(k.encode()) for k in keys(Budget(name))}
    assert len(slots) == 1


def test_sync_limiter_on_a_cluster(cluster: RedisClusterGroup, name: str) -> None:
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    with Limiter(Budget(name, rps=50, burst=1, max_concurrency=1), rc) as lim:
        held = lim.acquire()
        assert not lim.try_acquire()
        rc.script_flush()  # NOSCRIPT on a cluster: loaded again where the budget lives
        held.release()
        with lim.acquire(timeout=5):
            assert lim.status().in_flight == 1
    rc.close()


async def test_async_limiter_on_a_cluster_wakes_a_queued_waiter(cluster: RedisClusterGroup, name: str) -> None:
    rc = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    async with AsyncLimiter(Budget(name, max_concurrency=1), rc) as lim:
        held = await lim.acquire()
        waiter = asyncio.create_task(_hold_once(lim))
        for _ in range(200):
            if (await lim.status()).queued:
                break
            await asyncio.sleep(0.01)
        await held.release()
        await asyncio.wait_for(waiter, 10)
        assert (await lim.status()).in_flight == 0
    await rc.aclose()


async def _hold_once(lim: AsyncLimiter) -> None:
    async with lim.acquire(timeout=10):
        pass
