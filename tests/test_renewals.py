"""Queued tickets are renewed in rounds, one renew.lua call per limiter, not one acquire per waiter."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import redis
from _helpers import acquire_in_thread, counting_scripts, ops, until

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._core import keys
from xflow_dist._events import HeadNotice, Renewed, Resubscribed
from xflow_dist._renewals import MAX_RENEW, Renewals, renewal_only

TTL = 0.4  # a renewal round every 0.2 s


def test_a_round_takes_every_ticket_due_within_a_quarter_ttl() -> None:
    r = Renewals(4.0)
    r.queued("a", 0.0)  # due at 2
    r.queued("b", 0.9)  # due at 2.9: within a quarter TTL (1 s) of the round at 2
    r.queued("c", 1.5)  # due at 3.5: not
    assert r.take(1.9) == []  # nothing due yet
    assert r.take(2.0) == ["a", "b"]
    assert r.next_due() == 3.5
    assert r.take(3.5) == ["c", "a", "b"]  # a and b were due at 4: within 1 s, so they come along
    # granted (its notice follows), dropped: their waiters are told, and they leave the table
    assert r.notices(["c", "a", "b"], [b"q", b"g", b"-"], 3.5) == [("a", Renewed(True)), ("b", Renewed(False))]
    assert r.next_due() == 5.5 and r.take(5.5) == ["c"]
    many = Renewals(4.0)
    for i in range(MAX_RENEW + 5):
        many.queued(str(i), 0.0)
    assert len(many.take(2.0)) == MAX_RENEW


def test_a_round_tells_the_head_when_to_come_back_unless_that_is_only_its_renewal() -> None:
    r = Renewals(4.0)
    for lid in ("a", "b"):
        r.queued(lid, 0.0)
    ids = r.take(2.0)
    assert r.notices(ids, ["h0.750000", "q"], 2.0) == [("a", HeadNotice("a", 0.75, 2.0))]
    assert r.notices(ids, ["h2.000000", "q"], 2.0) == []  # the renewal interval: the rounds do it
    assert r.notices(ids, None, 2.0) == [("a", Resubscribed()), ("b", Resubscribed())]  # the call failed
    assert not r


def test_only_the_renewal_interval_is_left_to_the_rounds() -> None:
    assert renewal_only(15.0, 30.0) and renewal_only(0.166667, 0.3333333)
    assert not renewal_only(14.5, 30.0) and not renewal_only(20.0, 30.0)  # a fit time, a lease's expiry


def test_a_round_never_shortens_a_ticket_and_tells_the_head_its_time(client: redis.Redis, name: str) -> None:
    o = ops(client, name, max_concurrency=1, lease_ttl=1)
    held, first = o.acquire()
    assert first.kind == "granted"
    _, parked = o.acquire(lease_id="p.parked", ticket_ttl=100)  # a Celery re-queue keeps it 100 s
    assert parked.kind == "queued"
    assert o.acquire(lease_id="q.later", ticket_ttl=2)[1].kind == "queued"
    now, *statuses = [x.decode() for x in o.run("renew", ["2", "p.parked", "q.later", "x.unknown"])]
    # the head comes back when the held lease would expire (its holder may be dead): in about 1 s
    assert statuses[0][0] == "h" and 0.9 < float(statuses[0][1:]) <= 1.0
    assert statuses[1:] == ["q", "-"]
    tickets = {k.decode(): v.decode().split() for k, v in client.hgetall(keys(o.budget)[4]).items()}
    assert float(tickets["p.parked"][2]) > float(now) + 99  # still alive 100 s, not 2
    assert 1.9 < float(tickets["q.later"][2]) - float(now) <= 2.0
    o.settle(held)
    assert o.run("renew", ["2", "p.parked"])[1] == b"g"  # granted in the queue: its waiter claims it


def _threads_in_turn(lim: Limiter, n: int) -> list[tuple[Any, dict[str, object]]]:
    """``n`` waiters on ``lim``, each on a thread of its own and queued before the next starts."""
    waiters = []
    for k in range(n):
        waiters.append(acquire_in_thread(lim, timeout=30))
        until(lambda k=k: lim.status().queued == k + 1)  # type: ignore[misc]
    return waiters


def test_a_deep_queue_is_renewed_in_rounds_not_waiter_by_waiter(url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=1), url, ticket_ttl=TTL) as lim:
        counts = counting_scripts(lim)
        holder = lim.acquire()
        waiters = _threads_in_turn(lim, 6)
        until(lambda: counts["renew"] >= 6)  # 1.2 s at least: three TTLs that only the rounds bridged
        assert counts["acquire"] == 1 + 6  # each waiter asked once and never came back to renew
        holder.release()
        starts = []
        for thread, out in waiters:
            thread.join(10)
            starts.append(out["at"])
            out["lease"].release()  # type: ignore[attr-defined]
        assert starts == sorted(starts)  # in their turn: no ticket died and went to the back
        # and none came back: each grant was firm (this process is connected, tests/test_connected.py);
        # had a ticket died, its waiter would have asked again
        assert counts["acquire"] == 1 + 6


def test_a_ticket_dropped_meanwhile_sends_its_waiter_back(redis_url: str, client: redis.Redis, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=1), redis_url, ticket_ttl=TTL) as lim:
        counts = counting_scripts(lim)
        holder = lim.acquire()
        thread, out = acquire_in_thread(lim, timeout=30)
        until(lambda: lim.status().queued == 1)
        queue_key, tickets_key = keys(lim.budget)[3:5]
        (ticket,) = client.zrange(queue_key, 0, -1)
        client.zrem(queue_key, ticket)  # as if it had not been renewed in time
        client.hdel(tickets_key, ticket)
        until(lambda: counts["acquire"] == 3)  # the round answered "-": the waiter queued again
        assert lim.status().queued == 1
        holder.release()
        thread.join(10)
        out["lease"].release()  # type: ignore[attr-defined]
        assert counts["acquire"] == 3  # the holder, the first ask, the second (granted firm: no claim)


async def _queue_in_turn(lim: AsyncLimiter, n: int, hold: float) -> tuple[list[asyncio.Task[None]], list[int]]:
    """``n`` waiters on ``lim``, each queued before the next starts; each holds its lease ``hold``
    seconds. Returns their tasks and the order in which they were granted (filled as they are)."""
    order: list[int] = []

    async def waiter(k: int) -> None:
        lease = await lim.acquire(timeout=30)
        order.append(k)
        await asyncio.sleep(hold)
        await lease.release()

    tasks = []
    for k in range(n):
        tasks.append(asyncio.create_task(waiter(k)))
        for _ in range(1000):  # bounded: each queues before the next starts
            if (await lim.status()).queued == k + 1:
                break
            await asyncio.sleep(0.01)
    return tasks, order


def test_the_async_front_renews_in_rounds_too(url: str, name: str) -> None:
    async def main() -> None:
        async with AsyncLimiter(Budget(name, max_concurrency=1), url, ticket_ttl=TTL) as lim:
            counts: Counter[str] = Counter()
            run = lim._run

            async def counted(op: str, argv: list[str]) -> Any:
                counts[op] += 1
                return await run(op, argv)

            lim._run = counted  # type: ignore[method-assign]
            holder = await lim.acquire()
            tasks, order = await _queue_in_turn(lim, 6, hold=0.0)
            deadline = time.monotonic() + 10
            while counts["renew"] < 6 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert counts["renew"] >= 6
            assert counts["acquire"] == 1 + 6
            await holder.release()
            await asyncio.wait_for(asyncio.gather(*tasks), 10)
            assert order == list(range(6))
            assert counts["acquire"] == 1 + 6  # no claims: granted firm

    asyncio.run(main())


RIDE_TTL = 1.0  # tickets due for renewal every 0.5 s; a settle takes those due within 0.25 s


def _riding(limiter: Any) -> list[int]:
    """Spy on ``limiter``'s settles: how many queued tickets each renews on its way."""
    settle, carried = limiter._scripts["settle"], []

    def spy(keys: list[str], args: list[str]) -> Any:
        carried.append(max(0, len(args) - _BLOCK - 10))  # ARGV[22..]: the tickets it renews
        return settle(keys=keys, args=args)

    limiter._scripts["settle"] = spy
    return carried


_BLOCK = 11  # the budget block: ARGV[1..11]


def test_a_busy_process_renews_its_tickets_on_its_settles(url: str, name: str) -> None:
    """20 waiters for one slot, each holding it 60 ms: a 1.2 s queue, longer than a ticket lives
    unrenewed. The settles, one every 60 ms, renew the tickets; no round is needed, no ticket dies
    (each waiter asks once) and they start in their turn."""
    with Limiter(Budget(name, max_concurrency=1), url, ticket_ttl=RIDE_TTL) as lim:
        counts = counting_scripts(lim)
        carried = _riding(lim)
        holder = lim.acquire()
        waiters = _threads_in_turn(lim, 20)
        holder.release()
        starts = []
        for thread, out in waiters:
            thread.join(30)
            starts.append(out["at"])
            time.sleep(0.06)  # hold it (a real call's length), then settle
            out["lease"].release()  # type: ignore[attr-defined]
        assert starts == sorted(starts)
        assert counts["acquire"] == 1 + 20  # none asked again: no ticket died, none granted on the way did
        assert sum(carried) >= 10 and counts["renew"] == 0, (carried, counts)


def test_the_async_front_renews_on_its_settles_too(url: str, name: str) -> None:
    async def main() -> None:
        async with AsyncLimiter(Budget(name, max_concurrency=1), url, ticket_ttl=RIDE_TTL) as lim:
            counts = counting_scripts(lim)
            carried = _riding(lim)
            holder = await lim.acquire()
            tasks, order = await _queue_in_turn(lim, 20, hold=0.06)
            await holder.release()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
            assert order == list(range(20))
            assert counts["acquire"] == 1 + 20
            assert sum(carried) >= 10 and counts["renew"] == 0, (carried, counts)

    asyncio.run(main())


def test_the_table_stays_in_order_of_due_time() -> None:
    """A ticket set again moves behind the others, so a settle reads only what it takes."""
    r = Renewals(4.0)
    for k in range(5):
        r.queued(str(k), k * 0.1)  # due at 2.0 .. 2.4
    assert r.riders(0.5) == []  # none due within 1 s
    assert r.riders(1.15) == ["0", "1"]  # due by 2.15; now due at 3.15
    r.queued("2", 1.2)  # asked again: due at 3.2, behind 0 and 1
    assert r.next_due() == 2.3
    assert r.take(2.3) == ["3", "4", "0", "1", "2"]  # all due within 3.3, in order
    r.discard("4")
    assert r.take(4.3) == ["3", "0", "1", "2"] and r.next_due() == 6.3
