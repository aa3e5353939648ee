"""Late calls: Redis runs a call its client gave up on when it reads it, later, from a closed
connection (a server frozen, then thawed). A call carries the moment its client gives up; run after
it, it changes nothing. And while a process runs on its local share it sends no settle that would
free, in Redis, a slot its share counts on (see ``_outage``).
Each test runs a redis-server of its own (``_servers.Server``) that it freezes with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
from _helpers import Ops, Running, until
from _servers import Server, in_flight

from xflow_dist import AsyncLimiter, Budget, Limiter, OutagePolicy
from xflow_dist._core import budget_args, keys, settle_args
from xflow_dist._scripts import register

pytestmark = pytest.mark.timeout(90)


def late_refusals(srv: Server) -> int:
    """How many script calls Redis refused as late (its error statistics, by the reply's prefix)."""
    c = srv.client()
    try:
        stats: dict[str, Any] = c.info("errorstats")
        return int(stats.get("errorstat_XFLOW_LATE", {}).get("count", 0))
    finally:
        c.close()


def redis_time(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return seconds + micros / 1_000_000


def test_a_settle_its_client_gave_up_on_frees_no_slot_when_redis_thaws(server: Server, name: str) -> None:
    """The premise first: without a give-up moment, Redis runs the abandoned settle at the thaw and
    the slot is free (another process may take it then). With one, the settle changes nothing."""
    budget = Budget(name, max_concurrency=2)
    client = server.client()
    ops = Ops(client, budget)
    first, _ = ops.acquire()
    second, _ = ops.acquire()
    assert in_flight(server, name) == 2
    assert ops.run("settle", settle_args("none", None))[0] == b"unknown"  # loaded: EVALSHA finds it
    for lid, bounded in ((first, False), (second, True)):
        give_up = redis_time(client) + 0.1 if bounded else 0.0
        sender = redis.Redis(port=server.port, socket_timeout=0.3)
        settle = register(sender)["settle"]
        sender.ping()  # connected before the freeze: the call itself is what waits
        server.freeze()
        try:
            with pytest.raises(redis.TimeoutError):
                settle(keys=keys(budget), args=[*budget_args(budget, True, give_up), *settle_args(lid, None)])
            sender.close()  # given up: the call sits unread in Redis's socket buffer
            time.sleep(0.3)  # frozen past the give-up moment (SIGCONT comes later, whatever the load)
        finally:
            server.thaw()
        if bounded:
            until(lambda: late_refusals(server) == 1)  # it ran, and refused
            assert in_flight(server, name) == 1  # the slot is still held: the client settles again
        else:
            until(lambda: in_flight(server, name) == 1)  # it ran at the thaw, a second after its client gave up
            assert late_refusals(server) == 0
    assert ops.run("settle", settle_args(second, None))[0] == b"settled"
    assert in_flight(server, name) == 0
    client.close()


def test_a_limiter_tells_the_moment_it_gives_up(server: Server, name: str) -> None:
    with Limiter(Budget(name, rps=100), server.url, io_timeout=0.4) as lim:
        assert lim._argv("status", [])[10] == "0"  # no reply yet: no Redis time known, no bound
        client = server.client()
        before = redis_time(client)
        lim.acquire().release()
        give_up = float(lim._argv("status", [])[10])
        after = redis_time(client)
        client.close()
        # from a reply read after Redis took its time: a little before the client's own give-up, and
        # not before the call was made (a process descheduled while the reply waited to be read
        # only makes the moment earlier: on the safe side); the upper bound is Redis's time read
        # after the moment was computed, which the estimate of Redis's clock can only trail
        assert before - 0.05 <= give_up - 0.4 <= after
    with Limiter(Budget(name + "-m", rps=100), "memory://late") as mem:
        mem.acquire().release()
        assert mem._argv("status", [])[10] == "0"  # in-process: no I/O to give up on


def test_a_clock_estimate_gone_wrong_costs_one_call(server: Server, name: str) -> None:
    """A failover to a server whose clock runs ahead: the first call is refused as late, the reply's
    Redis time resets the estimate, and the call is made again at once."""
    with Limiter(Budget(name, max_concurrency=3), server.url, io_timeout=0.5) as lim:
        lim.acquire().release()
        assert lim._offset is not None
        lim._offset -= 100.0  # it believes Redis 100 s behind its clock: its give-up moments have passed
        lease = lim.acquire(timeout=5)
        assert late_refusals(server) == 1
        assert in_flight(server, name) == 1  # granted once, by the second call
        lease.release()
        assert in_flight(server, name) == 0


async def test_a_clock_estimate_gone_wrong_costs_one_call_async(server: Server, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=3), server.url, io_timeout=0.5) as lim:
        await (await lim.acquire()).release()
        assert lim._offset is not None
        lim._offset -= 100.0
        lease = await lim.acquire(timeout=5)
        assert late_refusals(server) == 1
        await lease.release()
        assert in_flight(server, name) == 0


def test_a_local_share_sends_no_settle_and_opens_when_earlier_calls_are_past(server: Server, name: str) -> None:
    """Out on its share, a process settles its shared leases only on the way back, once its share's
    calls are registered; its share grants nothing until every call sent before the outage was found
    is past its give-up moment."""
    budget = Budget(name, max_concurrency=4)
    sent: list[str] = []
    with Limiter(budget, server.url, io_timeout=0.3, outage=OutagePolicy(probe_interval=0.05)) as lim:
        held = lim.acquire(timeout=5)
        run = lim._run

        def counted(op: str, argv: list[str]) -> Any:
            sent.append(op)
            return run(op, argv)

        lim._run = counted  # type: ignore[method-assign]
        server.freeze()
        try:
            share = lim.acquire(timeout=5)  # fails after 0.3 s: the share (the whole budget: a fleet of 1)
            outage = lim._outage
            assert outage is not None and outage.mode == "local"
            granted_at = time.monotonic()
            assert granted_at >= outage.opens == pytest.approx(outage.since + 0.3)
            sent.clear()
            held.release()  # a shared lease: its settle waits for the way back
            assert sent == []
        finally:
            server.thaw()
        until(lambda: lim.status().mode == "shared")
        until(lambda: in_flight(server, name) == 1)  # the share's call registered, the held one settled
        assert "settle" in sent and sent.index("rejoin") < sent.index("settle")
        share.release()
        until(lambda: in_flight(server, name) == 0)


def test_a_freeze_hands_no_slot_to_another_process_while_the_share_runs(server: Server, name: str) -> None:
    """A holds both slots, B waits for two. Redis freezes; A's calls end (their settles are given up
    on, then wait for the way back) and A runs a call on its share. At the thaw B gets no slot before
    A's way back has registered that call: never more than 2 at once."""
    budget = Budget(name, max_concurrency=2)
    policy = OutagePolicy(probe_interval=1.0)  # the way back well after the thaw
    running = Running()

    with (
        Limiter(budget, server.url, outage=policy, io_timeout=0.3) as a,
        Limiter(budget, server.url, outage=policy, io_timeout=5.0) as b,  # B never gives up in the freeze
    ):
        a.acquire(timeout=5).release()  # settle.lua loaded: at the thaw, EVALSHA finds it
        held = [a.acquire(timeout=5) for _ in range(2)]
        pool = a._client.connection_pool  # connected before the freeze, as in a busy process: a new
        warm = [pool.get_connection() for _ in range(4)]  # one would wait on its handshake instead
        for conn in warm:
            pool.release(conn)
        threads = [threading.Thread(target=lambda: running.call(b.acquire(timeout=30), 0.5)) for _ in range(2)]
        for t in threads:
            t.start()
        until(lambda: a._fleet == 2 and b.status().queued == 2)
        server.freeze()
        try:
            releases = [threading.Thread(target=lease.release) for lease in held]  # given up on after 0.3 s
            for t in releases:
                t.start()
            for t in releases:
                t.join(timeout=10)
            threads.append(threading.Thread(target=running.call, args=(a.acquire(timeout=5), 2.0)))  # 1 slot of 2
            threads[-1].start()
            time.sleep(0.4)  # past every give-up moment
        finally:
            server.thaw()
        for t in threads:
            t.join(timeout=30)
        assert running.most <= 2, f"{running.most} calls at once for 2 slots"
        assert running.now == 0 and in_flight(server, name) == 0


async def test_async_local_share_sends_no_settle_until_the_way_back(server: Server, name: str) -> None:
    budget = Budget(name, max_concurrency=4)
    sent: list[str] = []
    async with AsyncLimiter(budget, server.url, io_timeout=0.3, outage=OutagePolicy(probe_interval=0.05)) as lim:
        held = await lim.acquire(timeout=5)
        run = lim._run

        async def counted(op: str, argv: list[str]) -> Any:
            sent.append(op)
            return await run(op, argv)

        lim._run = counted  # type: ignore[method-assign]
        server.freeze()
        try:
            share = await lim.acquire(timeout=5)
            outage = lim._outage
            assert outage is not None and time.monotonic() >= outage.opens
            sent.clear()
            await held.release()
            assert sent == []
        finally:
            server.thaw()
        for _ in range(200):
            if in_flight(server, name) == 1 and (await lim.status()).mode == "shared":
                break
            await asyncio.sleep(0.05)
        assert in_flight(server, name) == 1 and sent.index("rejoin") < sent.index("settle")
        await share.release()
        assert in_flight(server, name) == 0


def test_a_share_opens_at_once_where_redis_refused(server: Server, name: str) -> None:
    """A killed Redis ran what it had read before it died: nothing sent can run later, no wait."""
    with Limiter(Budget(name, max_concurrency=2), server.url, io_timeout=0.3) as lim:
        lim.acquire(timeout=5).release()
        server.kill()
        lease = lim.acquire(timeout=5)
        outage = lim._outage
        assert outage is not None and outage.mode == "local" and outage.opens == outage.since
        lease.release()
