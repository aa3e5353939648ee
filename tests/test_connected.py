"""Firm grants: a ticket granted in the queue to a process that is connected needs no claim.

Each limiter holds its process's own channel subscribed beside the budget's (``own_channel``); the
scripts ask Redis whether anyone holds it (``connected()`` in ``lua/_prelude.lua``). Connected, the
grant is firm and its waiter starts on the notice: an acquire and a settle per request. A process
whose connection is gone (SIGKILL closes its sockets) still gets a provisional grant, taken back
after the claim window (``tests/test_hardening.py``); one frozen with its connection open holds a
firm grant until its lease expires, like a call in flight. The notices about a connected process's
tickets go to its own channel, so that they wake that process alone.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any

import pytest
import redis
from _helpers import Ops, counting_scripts, results_of_processes, watch

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._base import own_channel
from xflow_dist._core import channel, keys, place_of
from xflow_dist._events import GrantNotice, Mailroom, parse

_SPAWN = mp.get_context("spawn")


def test_the_notices_about_a_connected_process_s_tickets_wake_that_process_alone(redis_url: str, name: str) -> None:
    """Every process holds the budget's channel; a grant to a ticket of a connected process goes to that
    process's own channel only (with 16 processes on the budget, on the shared channel it would wake
    all 16); a pause still goes to every process. (Hints go the same way: the model test checks where
    every event goes.)"""
    client = redis.Redis.from_url(redis_url)
    o = Ops(client, Budget(name, rps=100, burst=1, max_concurrency=1))
    mine = watch(o)  # the waiter's process: the budget's channel and its own
    other = client.pubsub()  # any other process of the fleet
    other.subscribe(channel(o.budget))
    assert other.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    try:
        holder, _ = o.acquire()
        waiter, q = o.acquire()  # the slot is taken, the rate not yet
        assert q.kind == "queued"
        o.settle(holder)  # the slot free: granted firm (for when the rate lets it start)
        o.cooldown(1.0)  # to every process, after the grant
        heard = []
        while len(heard) < 2 and (msg := mine.get_message(timeout=5)) is not None:
            heard.append((msg["channel"].decode(), msg["data"].decode().split()[:2]))
        own = f"{channel(o.budget)}:{o.process}"
        assert [where for where, _ in heard] == [own, channel(o.budget)], heard
        assert heard[0][1] == ["g", waiter] and heard[1][1][0] == "c"
        first = other.get_message(timeout=5)  # published in order: a notice would have come first
        assert first is not None and first["data"].decode().startswith("c "), first
    finally:
        mine.close()
        other.close()
        client.close()


def test_a_grant_to_a_waiter_of_a_connected_process_needs_no_claim(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=1, lease_ttl=20.0)
    with Limiter(budget, url) as holder, Limiter(budget, url) as other:
        held = holder.acquire()
        counts = counting_scripts(other)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda: got.append(other.acquire(timeout=10)))
        waiter.start()
        deadline = time.monotonic() + 5
        while holder.status().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert holder.status().queued == 1
        held.release()
        waiter.join(timeout=10)
        assert got, "the waiter was not served"
        assert counts["acquire"] == 1, f"the waiter came back to claim: {dict(counts)}"
        if url.startswith("redis"):
            client = redis.Redis.from_url(url)
            data = client.hget(keys(budget)[2], got[0].id)
            expiry = client.zscore(keys(budget)[1], got[0].id)
            now = float(client.time()[0])
            client.close()
            assert data is not None and not data.endswith(b" p"), "the grant is provisional"
            assert expiry is not None and expiry - now > 15, "a firm grant lives a lease TTL, not a claim window"
        got[0].release()
        assert holder.status().in_flight == 0


def test_a_ticket_of_a_process_not_connected_is_granted_provisionally(redis_url: str, name: str) -> None:
    """No one holds the ticket's process channel (a waiter that died, or an away Celery ticket): the
    grant waits for a claim and is taken back after the claim window."""
    budget = Budget(name, max_concurrency=1, claim_window=0.5)
    events = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
    events.subscribe(channel(budget))
    with Limiter(budget, redis_url) as lim:
        held = lim.acquire()
        ghost = "deadbeef0000.0123456789abcdef0123456789abcdef"  # a process that subscribed nothing
        raw = lim._run("acquire", lim._park_args(ghost, 1, 0, 0.0, place_of(budget, None, None)))
        assert raw[0] in (b"queued", "queued")
        held.release()
        messages = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not messages:
            msg = events.get_message(timeout=0.5)
            if msg is not None and msg["data"].split()[:2] == [b"g", ghost.encode()]:
                messages.append(msg["data"])
        assert messages and parse(messages[0]) == GrantNotice(ghost, firm=False)
        deadline = time.monotonic() + 5
        while lim.status().in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        assert lim.status().in_flight == 0, "the unclaimed grant was not taken back"
    events.close()


def _contend(url: str, name: str, rounds: int, out: Any) -> None:
    budget = Budget(name, max_concurrency=1, lease_ttl=20.0)
    with Limiter(budget, url) as lim:
        counts = counting_scripts(lim)
        for _ in range(rounds):
            lease = lim.acquire(timeout=20)
            time.sleep(0.01)  # the call, while the other process queues for the slot
            lease.release()
        out.put((os.getpid(), dict(counts)))


@pytest.mark.timeout(90)
def test_processes_handing_a_slot_over_spend_an_acquire_and_a_settle_per_request(redis_url: str, name: str) -> None:
    """Two processes contending for one slot: every hand-over is a grant in the queue, made firm
    (both processes connected), so each request costs exactly one acquire and one settle."""
    rounds = 25
    results = results_of_processes(_contend, (redis_url, name, rounds), 2, 60)
    for _, counts in results:
        assert counts.get("acquire") == rounds, f"claims or returns beyond one acquire per request: {counts}"
        assert counts.get("settle") == rounds, counts
    client = redis.Redis.from_url(redis_url)
    assert client.zcard(keys(Budget(name, max_concurrency=1))[1]) == 0
    client.close()


def _frozen_waiter(url: str, name: str, ready: Any) -> None:
    with Limiter(Budget(name, max_concurrency=1, lease_ttl=2.0, claim_window=0.25), url) as lim:
        hub = lim._hub()  # subscribed, this process connected
        assert hub is not None
        ready.put(os.getpid())
        lim.acquire(timeout=30).release()


@pytest.mark.timeout(60)
def test_a_frozen_process_holds_a_firm_grant_until_its_lease_expires(redis_url: str, name: str) -> None:
    """SIGSTOPped while queued, its connection open: it is granted firm, and the slot comes back
    only when that lease expires (lease_ttl = 2 s), not after a claim window; then the next waiter."""
    budget = Budget(name, max_concurrency=1, lease_ttl=2.0, claim_window=0.25)
    ready: Any = _SPAWN.Queue()
    child = _SPAWN.Process(target=_frozen_waiter, args=(redis_url, name, ready))
    with Limiter(budget, redis_url) as lim:
        held = lim.acquire()
        child.start()
        try:
            pid = ready.get(timeout=30)
            deadline = time.monotonic() + 10
            while lim.status().queued == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert lim.status().queued == 1
            os.kill(pid, signal.SIGSTOP)
            released = time.monotonic()
            held.release()  # granted, firm, to the frozen process
            with lim.acquire(timeout=10):
                waited = time.monotonic() - released
            assert 1.5 < waited < 4.0, f"the slot came back after {waited:.2f}s, not at the lease's expiry"
        finally:
            if child.pid is not None:
                os.kill(child.pid, signal.SIGKILL)
            child.join(timeout=10)


def test_only_the_budget_channels_subscription_resets() -> None:
    """Both channels confirm their subscription; only the budget's means notices may have been lost."""
    mail: Mailroom[list[object]] = Mailroom(list, "{xflow:b}:events")
    assert mail.resets({"type": "subscribe", "channel": b"{xflow:b}:events", "data": 1})
    assert not mail.resets({"type": "subscribe", "channel": own_channel("{xflow:b}:events").encode(), "data": 2})
    assert parse(b"g a 1.000000 f") == GrantNotice("a", firm=True)
    assert parse(b"g a 1.000000") == GrantNotice("a", firm=False)
    assert parse(b"g a 1.000000 x") is None


async def test_an_async_waiter_of_a_connected_process_needs_no_claim(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=1)
    async with AsyncLimiter(budget, url) as holder, AsyncLimiter(budget, url) as other:
        held = await holder.acquire()
        counts = counting_scripts(other)
        task = asyncio.ensure_future(other.acquire(timeout=10))
        deadline = time.monotonic() + 5
        while (await holder.status()).queued == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await held.release()
        lease = await asyncio.wait_for(task, 10)
        assert counts["acquire"] == 1, f"the waiter came back to claim: {dict(counts)}"
        await lease.release()
