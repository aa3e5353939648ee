"""Redis Cluster (Valkey's with ``XFLOW_TEST_SERVER=valkey``): one budget's keys share a hash tag,
so every script runs on one shard."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest
import redis
import redis.asyncio.cluster
import redis.cluster

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._core import keys
from xflow_dist._embedded import EmbeddedRedis, free_port

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def cluster_nodes(embedded: EmbeddedRedis) -> Iterator[list[int]]:
    binary = embedded.binary
    if binary is None:
        pytest.skip("a cluster needs the redis-server or valkey-server binary")
    ports = [_cluster_port() for _ in range(3)]
    procs = []
    with tempfile.TemporaryDirectory(prefix="xflow-cluster-") as tmp:
        for port in ports:
            procs.append(
                subprocess.Popen(
                    [
                        binary,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        f"{tmp}/nodes-{port}.conf",
                        "--save",
                        "",
                        "--appendonly",
                        "no",
                        "--dir",
                        tmp,
                        "--loglevel",
                        "warning",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        try:
            for port, proc in zip(ports, procs, strict=True):
                _wait_ping(port, proc)
            slots = [range(0, 5461), range(5461, 10923), range(10923, 16384)]
            for port, rng in zip(ports, slots, strict=True):
                redis.Redis(host="127.0.0.1", port=port).execute_command("CLUSTER ADDSLOTS", *rng)
            for port in ports[1:]:
                redis.Redis(host="127.0.0.1", port=ports[0]).execute_command("CLUSTER MEET", "127.0.0.1", port)
            deadline = time.monotonic() + 30
            while not all(_converged(port) for port in ports):
                assert time.monotonic() < deadline, "cluster did not converge"
                time.sleep(0.1)
            yield ports
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(timeout=10)


def _converged(port: int) -> bool:
    """Every node sees all slots and all peers: pub/sub then reaches the whole cluster."""
    info = redis.Redis(host="127.0.0.1", port=port).cluster("info")
    return info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == 3


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    import socket

    for _ in range(200):
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise AssertionError("no free port pair for a cluster node")


def _wait_ping(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(host="127.0.0.1", port=port).ping()
            return
        except redis.ConnectionError:
            assert proc.poll() is None, f"cluster node on port {port} exited"
            assert time.monotonic() < deadline, f"cluster node on port {port} did not answer"
            time.sleep(0.05)


def test_budget_keys_hash_to_one_slot(name: str) -> None:
    slots = {redis.cluster.key_slot(k.encode()) for k in keys(Budget(name))}
    assert len(slots) == 1


def test_sync_limiter_on_a_cluster(cluster_nodes: list[int], name: str) -> None:
    rc = redis.cluster.RedisCluster(host="127.0.0.1", port=cluster_nodes[0])
    with Limiter(Budget(name, rps=50, burst=1, max_concurrency=1), rc) as lim:
        held = lim.acquire()
        assert not lim.try_acquire()
        rc.script_flush()  # NOSCRIPT on a cluster: loaded again where the budget lives
        held.release()
        with lim.acquire(timeout=5):
            assert lim.status().in_flight == 1
    rc.close()


async def test_async_limiter_on_a_cluster_wakes_a_queued_waiter(cluster_nodes: list[int], name: str) -> None:
    rc = redis.asyncio.cluster.RedisCluster(host="127.0.0.1", port=cluster_nodes[0])
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
