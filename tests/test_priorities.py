"""Priority classes: a class's lead puts its calls ahead of the last ``lead`` arrivals, FIFO holds
within a class, and no waiter is passed more than the leads allow (aging), on both backends, through
both fronts and across OS processes.

Order is driven by a concurrency slot held and released (the next grant goes to the head), or by a
bucket that holds enough for small calls and not for the head: nothing depends on timing.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import redis
from _helpers import Ops, budget_keys, mock_provider, until, until_queued

from xflow_dist import AcquireTimeout, AsyncLimiter, Budget, Cap, ConfigurationError, Limiter
from xflow_dist._core import place_of
from xflow_dist._local import Held, LocalBudget, Waiting
from xflow_dist.httpx import PRIORITY_HEADER, AsyncRateLimitedTransport, RateLimitedTransport

_SPAWN = mp.get_context("spawn")


def _one_slot(rclient: redis.Redis, name: str) -> tuple[Ops, str]:
    """A budget of one slot, taken: every acquire after it queues."""
    ops = Ops(rclient, Budget(name, max_concurrency=1))
    held, reply = ops.acquire()
    assert reply.kind == "granted"
    return ops, held


def _served(ops: Ops, held: str, waiters: list[str]) -> list[str]:
    """Release the slot again and again: the order in which the waiters are granted it."""
    order: list[str] = []
    for _ in waiters:
        assert ops.settle(held).settled
        granted = [w for w in waiters if w not in order and ops.acquire(lease_id=w)[1].kind == "granted"]
        assert len(granted) == 1, granted  # one slot: one grant (claimed by that acquire)
        order.append(granted[0])
        held = granted[0]
    return order


def test_a_class_with_a_lead_is_served_before_earlier_waiters_and_fifo_holds_within_it(
    rclient: redis.Redis, name: str
) -> None:
    ops, held = _one_slot(rclient, name)
    for lid, lead in (("b1", 0), ("b2", 0), ("i1", 10), ("b3", 0), ("i2", 10)):
        assert ops.acquire(lease_id=lid, lead=lead)[1].kind == "queued"
    assert _served(ops, held, ["b1", "b2", "i1", "b3", "i2"]) == ["i1", "i2", "b1", "b2", "b3"]


def test_a_lead_goes_ahead_of_the_last_lead_arrivals_only(rclient: redis.Redis, name: str) -> None:
    """Places: b1 1, i1 2-2-0.5, i2 3-2-0.5, i3 4-2-0.5: i3 arrived more than 2 arrivals after b1."""
    ops, held = _one_slot(rclient, name)
    for lid, lead in (("b1", 0), ("i1", 2), ("i2", 2), ("i3", 2)):
        assert ops.acquire(lease_id=lid, lead=lead)[1].kind == "queued"
    assert _served(ops, held, ["b1", "i1", "i2", "i3"]) == ["i1", "i2", "b1", "i3"]


def test_calls_that_pass_the_queue_at_once_count_against_the_waiters_bound(rclient: redis.Redis, name: str) -> None:
    """A head that needs the whole bucket, and small calls of a class with a lead that fit at once:
    they pass it twice (its lead), then queue behind it, however much the bucket holds for them."""
    ops = Ops(rclient, Budget(name, tps=100, burst=1))
    assert ops.acquire(tokens=50)[1].kind == "granted"  # 50 of 100 left: the head's 100 fit in 0.5 s
    assert ops.acquire(tokens=100, lease_id="big")[1].kind == "queued"
    kinds = [ops.acquire(tokens=1, lead=2)[1].kind for _ in range(4)]
    assert kinds == ["granted", "granted", "queued", "queued"]
    assert ops.status().queued == 3


def test_try_acquire_with_a_lead_passes_a_queue_it_leads(url: str, name: str) -> None:
    budget = Budget(name, tps=100, burst=1, priorities={"interactive": 5, "batch": 0})
    with Limiter(budget, url) as lim:
        lim.acquire(tokens=50).release()
        with lim.acquire(tokens=1):
            pass
        t, out = _waiting(lim, tokens=100)  # a head that needs a full bucket
        until(lambda: lim.status().queued == 1)
        assert not lim.try_acquire(tokens=1).granted  # no class: behind the head
        decision = lim.try_acquire(tokens=1, priority="interactive")
        assert decision.granted and decision.lease is not None
        decision.lease.release()
        t.join(timeout=10)
        assert out.get("granted"), out


def _waiting(lim: Limiter, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        with lim.acquire(timeout=10, **kwargs):
            out["granted"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


def test_the_limiter_serves_a_class_first_and_the_default_class_behind(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=1, priorities={"interactive": 100, "batch": 0}, default_priority="batch")
    with Limiter(budget, url) as lim:
        lease = lim.acquire()
        batch, b_out = _waiting(lim)
        until(lambda: lim.status().queued == 1)
        interactive, i_out = _waiting(lim, priority="interactive")
        until(lambda: lim.status().queued == 2)
        lease.release()
        for t in (batch, interactive):
            t.join(timeout=10)
        assert i_out["granted"] < b_out["granted"]


async def test_the_async_limiter_passes_the_class_through(url: str, name: str) -> None:
    import asyncio

    budget = Budget(name, max_concurrency=1, priorities={"interactive": 100})
    async with AsyncLimiter(budget, url) as lim:
        lease = await lim.acquire()
        order: list[str] = []

        async def call(label: str, priority: str | None) -> None:
            async with lim.acquire(timeout=10, priority=priority):
                order.append(label)

        batch = asyncio.ensure_future(call("batch", None))
        await until_queued(lim, 1)
        interactive = asyncio.ensure_future(call("interactive", "interactive"))
        await until_queued(lim, 2)
        await lease.release()
        await asyncio.wait_for(asyncio.gather(batch, interactive), 10)
        assert order == ["interactive", "batch"]


def test_an_unknown_class_is_refused_before_redis_is_touched(client: redis.Redis, redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rps=10, priorities={"interactive": 5}), redis_url) as lim:
        for bad in ("interactve", "", 5):
            with pytest.raises(ConfigurationError, match="priority class"):
                lim.acquire(priority=bad)  # type: ignore[arg-type]
            with pytest.raises(ConfigurationError):
                lim.try_acquire(priority=bad)  # type: ignore[arg-type]
        assert budget_keys(client, name) == []
    with Limiter(Budget(name, rps=10), redis_url) as lim, pytest.raises(ConfigurationError, match="none are defined"):
        lim.acquire(priority="interactive")


@pytest.mark.parametrize(
    ("priorities", "default", "match"),
    [
        ({}, None, "non-empty mapping"),
        ([("a", 1)], None, "non-empty mapping"),
        ({"a b": 1}, None, "name"),
        ({"a": -1}, None, "whole number"),
        ({"a": 1.5}, None, "whole number"),
        ({"a": True}, None, "whole number"),
        ({"a": 10**10}, None, "whole number"),
        ({"a": 1}, "b", "not one of"),
        (None, "a", "needs priorities"),
    ],
)
def test_bad_priorities_are_refused(priorities: Any, default: str | None, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Budget("b", rps=1, priorities=priorities, default_priority=default)


def test_a_budget_with_classes_stays_hashable_and_equal_by_value() -> None:
    a = Budget("b", rps=1, priorities={"x": 1, "y": 0})
    b = Budget("b", rps=1, priorities={"y": 0, "x": 1})
    assert a == b and hash(a) == hash(b)
    assert a.lead("x") == 1 and a.lead() == 0
    assert Budget("b", rps=1, priorities={"x": 7}, default_priority="x").lead() == 7


def _fleet_member(url: str, name: str, priority: str | None, ready: Any, go: Any, out: Any) -> None:
    budget = Budget(name, max_concurrency=1, priorities={"interactive": 1000})
    with Limiter(budget, url) as lim:
        ready.set()
        with lim.acquire(timeout=30, priority=priority):
            out.put((priority or "batch", time.time()))
        go.wait(30)


@pytest.mark.slow
def test_a_class_goes_first_across_processes(redis_url: str, real_redis: bool, name: str) -> None:
    if not real_redis:
        pytest.skip("processes share a real redis-server")
    budget = Budget(name, max_concurrency=1, priorities={"interactive": 1000})
    out = _SPAWN.Queue()
    go = _SPAWN.Event()
    procs = []
    with Limiter(budget, redis_url) as lim:
        lease = lim.acquire()
        try:
            for i, priority in enumerate([None, None, "interactive", None, "interactive"]):
                ready = _SPAWN.Event()
                p = _SPAWN.Process(target=_fleet_member, args=(redis_url, name, priority, ready, go, out))
                p.start()
                procs.append(p)
                assert ready.wait(60)
                until(lambda i=i: lim.status().queued == i + 1, timeout=30)
            go.set()  # each member lets its slot go as soon as it has it
            lease.release()
            order = [out.get(timeout=30)[0] for _ in procs]
        finally:
            for p in procs:
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
    assert order == ["interactive", "interactive", "batch", "batch", "batch"]


# --- the in-process budget of the compatible API ---------------------------------------------------


def test_the_in_process_budget_bounds_the_passes_as_the_scripts_do() -> None:
    """Overdraft: a head waits while its bucket is in debt; calls that cost none of that bucket
    fit at once and pass it, a lead's worth of times, as acquire.lua lets them."""
    core = LocalBudget(0.0, 100.0, 1.0, 0, 0.5, lambda t: None)
    assert isinstance(core.acquire(0.0, 1, 150), Held)  # 50 tokens in debt until 0.5 s
    assert isinstance(core.acquire(0.0, 1, 10), Waiting)
    kinds = [type(core.acquire(0.001, 1, 0, lead=2)) for _ in range(3)]
    assert kinds == [Held, Held, Waiting]
    assert [t.requests for t in core.queue] == [1, 1]


@pytest.mark.parametrize("shared", [False, True])
async def test_the_compatible_schedulers_pass_the_class_through(shared: bool, redis_url: str, name: str) -> None:
    import asyncio

    from xflow_dist.compat import RequestRateScheduler

    redis_args: dict[str, Any] = {"redis": redis_url, "name": name} if shared else {}
    scheduler = RequestRateScheduler(max_rps=20, priorities={"interactive": 100, "batch": 0}, **redis_args)
    started: list[str] = []

    async def job(label: str) -> None:
        started.append(label)

    async with scheduler:
        tasks = [await scheduler.start_task(job(f"b{i}")) for i in range(4)]  # one starts, three wait 50 ms apart
        await until_queued(scheduler.limiter, 3)
        tasks.append(await scheduler.start_task(job("i"), priority="interactive"))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert started[:2] == ["b0", "i"]
        # the batch in the order its requests reached the budget: in-process, the order they started
        assert started[2:] == ["b1", "b2", "b3"] if not shared else sorted(started[2:]) == ["b1", "b2", "b3"]
        with pytest.raises(ConfigurationError, match="priority class"):
            await scheduler.start_task(job("x"), priority="urgent")
        await scheduler.wait_pending()


# --- the transports --------------------------------------------------------------------------------


def test_the_transport_takes_the_class_from_the_header_and_never_sends_it(redis_url: str, name: str) -> None:
    import httpx

    budget = Budget(name, max_concurrency=1, priorities={"interactive": 100})
    seen: list[tuple[str, str | None]] = []
    with (
        Limiter(budget, redis_url) as lim,
        httpx.Client(
            transport=RateLimitedTransport(lim, mock_provider(seen, PRIORITY_HEADER), tokenizer=len),
            base_url="https://api.example/v1",
        ) as http,
    ):
        held = lim.acquire()

        def post(user: str, headers: dict[str, str]) -> threading.Thread:
            body = {"model": "m", "messages": [], "max_tokens": 1, "user": user}
            t = threading.Thread(
                target=http.post, args=("/chat/completions",), kwargs={"json": body, "headers": headers}
            )
            t.start()
            return t

        batch = post("batch", {})
        until(lambda: lim.status().queued == 1)
        interactive = post("interactive", {PRIORITY_HEADER: "interactive"})
        until(lambda: lim.status().queued == 2)
        held.release()
        for t in (batch, interactive):
            t.join(timeout=10)
        http.get("/models", headers={PRIORITY_HEADER: "interactive"})  # not budgeted: passes, without it
        with pytest.raises(ConfigurationError, match="priority class"):
            http.post("/chat/completions", json={"model": "m", "messages": []}, headers={PRIORITY_HEADER: "urgent"})
    assert seen == [("interactive", None), ("batch", None), ("/v1/models", None)]


async def test_the_async_transport_takes_the_class_from_a_function_of_the_request(redis_url: str, name: str) -> None:
    import asyncio

    import httpx

    budget = Budget(name, max_concurrency=1, priorities={"interactive": 100})
    seen: list[tuple[str, str | None]] = []

    def by_user(request: httpx.Request) -> str | None:
        return "interactive" if b'"chat-ui"' in request.content else None

    async with (
        AsyncLimiter(budget, redis_url) as lim,
        httpx.AsyncClient(
            transport=AsyncRateLimitedTransport(
                lim, mock_provider(seen, PRIORITY_HEADER), priority=by_user, tokenizer=len
            ),
            base_url="https://api.example/v1",
        ) as http,
    ):
        held = await lim.acquire()

        async def post(user: str) -> None:
            await http.post("/chat/completions", json={"model": "m", "messages": [], "max_tokens": 1, "user": user})

        batch = asyncio.ensure_future(post("nightly"))
        await until_queued(lim, 1)
        interactive = asyncio.ensure_future(post("chat-ui"))
        await until_queued(lim, 2)
        await held.release()
        await asyncio.wait_for(asyncio.gather(batch, interactive), 10)
    assert seen == [("chat-ui", None), ("nightly", None)]
    with pytest.raises(ConfigurationError, match="priority must be"):
        AsyncRateLimitedTransport(lim, priority=5)  # type: ignore[arg-type]


# --- Celery -----------------------------------------------------------------------------------------


def test_a_celery_task_waits_in_its_class_and_its_transport_keeps_it(redis_url: str, name: str) -> None:
    from celery import Celery

    from xflow_dist.celery import _close_all, rate_limited_task

    app = Celery(f"prio-{name}", set_as_current=False)
    app.conf.update(xflow_redis_url=redis_url)
    budget = Budget(name, max_concurrency=1, priorities={"interactive": 100})
    started: list[str] = []
    asked: list[str | None] = []
    real = Limiter.acquire

    def spy(self: Limiter, *args: Any, **kwargs: Any) -> Any:
        asked.append(kwargs.get("priority"))
        return real(self, *args, **kwargs)

    @rate_limited_task(
        app, shared=False, budget=budget, priority_class=lambda label: "interactive" if label == "i" else None
    )
    def work(self: Any, label: str) -> None:
        started.append(label)

    try:
        with Limiter(budget, redis_url) as lim:
            held = lim.acquire()
            batch = threading.Thread(target=work.apply, args=(("b",),))
            batch.start()
            until(lambda: lim.status().queued == 1)
            interactive = threading.Thread(target=work.apply, args=(("i",),))
            interactive.start()
            until(lambda: lim.status().queued == 2)
            held.release()
            for t in (batch, interactive):
                t.join(timeout=10)
        assert started == ["i", "b"]

        @rate_limited_task(app, shared=False, budget=budget, priority_class="interactive", name=f"t-{name}")
        def calls_twice(self: Any) -> None:
            from xflow_dist.celery import _LeaseFirst

            first = _LeaseFirst(self.request.xflow_run)
            assert first.acquire() is self.lease  # the first call is paid by the task's lease
            self.lease.release()
            first.acquire().release()  # a later call acquires, in the task's class

        import unittest.mock

        with unittest.mock.patch.object(Limiter, "acquire", spy):
            calls_twice.apply().get()
        assert asked == ["interactive", "interactive"]
    finally:
        _close_all()
        app.close()


# -- reservations: the top class is granted now for its fit time -------------------------------------


def test_the_top_class_is_reserved_its_fit_time_and_later_arrivals_come_after_it(
    rclient: redis.Redis, name: str
) -> None:
    """An empty bucket refilling 100 tokens/s: a reserving arrival of 50 is granted now, starting
    when 50 have refilled; the next reservation starts 0.5 s after it; a batch head that waited
    before them is told its turn after both."""
    ops = Ops(rclient, Budget(name, tps=100, burst=1, lease_ttl=30))
    assert ops.acquire(tokens=100)[1].kind == "granted"
    assert ops.acquire(tokens=50, lease_id="batch")[1].kind == "queued"
    _, first = ops.acquire(tokens=50, lead=5, reserve=True)
    assert first.kind == "granted"
    assert first.start - first.now == pytest.approx(0.5, abs=0.05)
    assert first.expiry == pytest.approx(first.start + 30, abs=1e-6)  # its lease runs from its start
    _, second = ops.acquire(tokens=50, lead=5, reserve=True)
    assert second.kind == "granted" and second.start == pytest.approx(first.start + 0.5, abs=1e-6)
    _, batch = ops.acquire(tokens=50, lease_id="batch")
    assert batch.kind == "queued" and batch.wait == pytest.approx(second.start + 0.5 - batch.now, abs=1e-6)
    assert ops.status().in_flight == 3 and ops.status().queued == 1


def test_a_reservation_is_made_only_for_the_rates_within_the_wait_allowed(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, tps=100, burst=1))
    assert ops.acquire(tokens=100)[1].kind == "granted"
    _, short = ops.acquire(tokens=50, lead=5, reserve=True, max_wait=0.1)
    assert short.kind == "refused" and short.retry_after == pytest.approx(0.5, abs=0.05)
    _, unreserved = ops.acquire(tokens=50, lead=5)  # no reserve: it queues, as before
    assert unreserved.kind == "queued"
    assert ops.cancel(_) == "dequeued"
    ops.cooldown(5.0)  # a cooldown sets the fit time: it may be extended, so nothing is reserved
    _, paused = ops.acquire(tokens=50, lead=5, reserve=True)
    assert paused.kind == "queued" and ops.status().in_flight == 1


def test_a_reservation_given_back_before_its_start_frees_its_slot_and_what_it_held_beyond_its_share(
    rclient: redis.Redis, name: str
) -> None:
    """Tokens bind (100/s, a burst of 1 s): a reservation of 50 holds the bucket until 0.5 s after
    its start; charged up to a full second after it, it gives back the other 50 when cancelled."""
    ops = Ops(rclient, Budget(name, tps=100, burst=1, max_concurrency=1))
    assert ops.settle(ops.acquire(tokens=100)[0]).settled
    lid, reserved = ops.acquire(tokens=50, lead=5, reserve=True)
    assert reserved.kind == "granted" and ops.status().in_flight == 1
    assert ops.cancel(lid) == "cancelled"
    assert ops.status().in_flight == 0  # the slot at once
    _, again = ops.acquire(tokens=50, lead=5, reserve=True)
    assert again.start == pytest.approx(reserved.start, abs=0.05)  # the same start: nothing more held


def test_a_refund_before_a_reservation_starts_never_hands_out_its_share_again(
    rclient: redis.Redis, name: str
) -> None:
    """A full bucket of 100 tokens taken by L; a reservation of 50 then starts when 50 have refilled.
    L given back: its 100 come back, except what the reservation holds, so a call of 100 fits only
    0.5 s after the reservation's start (150 tokens in 0.5 s: rate x 0.5 + capacity), not at it."""
    ops = Ops(rclient, Budget(name, tps=100, burst=1))
    held, _ = ops.acquire(tokens=100)
    _, reserved = ops.acquire(tokens=50, lead=5, reserve=True)
    assert reserved.kind == "granted" and reserved.start > reserved.now
    assert ops.cancel(held) == "cancelled"
    _, big = ops.acquire(tokens=100, queue=False)
    assert big.kind == "refused" and big.retry_after is not None
    assert big.now + big.retry_after == pytest.approx(reserved.start + 0.5, abs=1e-3)


def test_reservations_at_one_start_hold_together_what_a_refund_of_an_earlier_call_would_free(
    rclient: redis.Redis, name: str
) -> None:
    """4 requests/s and 16 tokens/s, a burst of 1 s. G takes every token and a request; R1 (3
    requests, 8 tokens) is reserved for when its tokens refill, S, after the request bucket has
    filled up again: its requests are charged from S, and G's spent request is forgotten there.
    R2 (1 request) is reserved for S too: the two hold the whole bucket of 4 at S. G given back
    must not free a request at S (5 in one instant): the next call fits a refill time after it."""
    ops = Ops(rclient, Budget(name, rps=4, tps=16, burst=1))
    held, _ = ops.acquire(requests=1, tokens=16)
    _, r1 = ops.acquire(requests=3, tokens=8, lead=5, reserve=True)
    _, r2 = ops.acquire(requests=1, tokens=0, lead=5, reserve=True)
    assert r1.kind == r2.kind == "granted" and r1.start > r1.now
    assert r2.start == pytest.approx(r1.start, abs=1e-6)
    assert ops.cancel(held) == "cancelled"
    _, late = ops.acquire(requests=1, tokens=0, queue=False)
    assert late.kind == "refused" and late.retry_after is not None
    assert late.now + late.retry_after == pytest.approx(r2.start + 0.25, abs=1e-3)


def test_a_call_that_passes_caps_is_not_reserved(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, tps=100, burst=1, caps={"team": Cap(tps=1000)}))
    assert ops.acquire(tokens=100)[1].kind == "granted"
    _, capped = ops.acquire(tokens=50, lead=5, reserve=True, tenant="team")
    assert capped.kind == "queued"  # caps keep no reservation's hold: it waits, as without one


def test_only_the_top_class_with_a_lead_reserves() -> None:
    budget = Budget("b", rps=1, priorities={"interactive": 100, "normal": 5, "batch": 0})
    assert [place_of(budget, p, None).reserve for p in ("interactive", "normal", "batch")] == [True, False, False]
    assert not place_of(Budget("b", rps=1), None, None).reserve
    assert not place_of(Budget("b", rps=1, priorities={"batch": 0}), "batch", None).reserve


def test_the_limiter_starts_a_reserved_call_at_its_time_after_one_round_trip(url: str, name: str) -> None:
    """The interactive call returns once its start has come, having run one script: no claim."""
    budget = Budget(name, tps=100, burst=1, priorities={"interactive": 100, "batch": 0})
    with Limiter(budget, url) as lim:
        lim.acquire(tokens=100).release()
        ops: list[str] = []
        run = lim._run

        def counted(op: str, argv: list[str]) -> Any:
            ops.append(op)
            return run(op, argv)

        lim._run = counted  # type: ignore[method-assign]
        asked = time.monotonic()
        with lim.acquire(tokens=50, priority="interactive", timeout=10):
            waited = time.monotonic() - asked
        assert ops[0] == "acquire" and ops.count("acquire") == 1, ops
        assert waited >= 0.4  # it slept until its start (0.5 s of refill, less the calls before)


async def test_a_caller_that_gives_up_during_its_reservation_gives_it_back(url: str, name: str) -> None:
    import asyncio

    budget = Budget(name, tps=10, burst=1, priorities={"interactive": 100})
    async with AsyncLimiter(budget, url) as lim:
        await (await lim.acquire(tokens=10)).release()  # empty: 5 tokens fit in 0.5 s
        task = asyncio.ensure_future(lim.acquire(tokens=5, priority="interactive", timeout=10))
        for _ in range(500):  # until it holds its reservation (bounded)
            if (await lim.status()).in_flight == 1:
                break
            await asyncio.sleep(0.005)
        assert (await lim.status()).in_flight == 1 and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = await lim.status()
        assert status.in_flight == 0
        # given back: the bucket holds its refill since it emptied (less than 0.5 s), not 5 tokens of debt less it
        assert status.tokens_available is not None and 0 <= status.tokens_available < 5


def test_a_pause_announced_before_a_reservation_starts_holds_the_call_until_it_ends(url: str, name: str) -> None:
    budget = Budget(name, tps=100, burst=1, priorities={"interactive": 100, "batch": 0})
    with Limiter(budget, url) as lim, Limiter(budget, url) as other:
        lim.acquire(tokens=100).release()  # empty: 50 tokens fit in 0.5 s
        out: dict[str, float] = {}

        def call() -> None:
            with lim.acquire(tokens=50, priority="interactive", timeout=10):
                out["started"] = time.monotonic()

        t = threading.Thread(target=call, daemon=True)
        t.start()
        until(lambda: other.status().in_flight == 1)  # reserved, waiting for its start
        paused = time.monotonic()
        other.cooldown(2.0)  # a 429 in another process of the fleet: a 2 s pause
        t.join(timeout=10)
        assert out["started"] - paused >= 1.9  # held until the pause ended, not sent at its start


def test_keep_place_never_turns_a_long_wait_into_a_reservation(url: str, name: str) -> None:
    """Refused for a wait longer than the timeout, a top-class call takes its place in the queue and
    leaves at once with its ticket: it is not reserved (its caller would be held for the whole wait)."""
    budget = Budget(name, tps=10, burst=1, priorities={"interactive": 100})
    with Limiter(budget, url) as lim:
        lim.acquire(tokens=10).release()  # empty: 10 tokens fit in 1 s
        asked = time.monotonic()
        with pytest.raises(AcquireTimeout) as caught:
            lim.acquire(tokens=10, priority="interactive", timeout=0.2, keep_place=True)
        assert time.monotonic() - asked < 0.9 and caught.value.ticket is not None
        status = lim.status()
        assert status.queued == 1 and status.in_flight == 0
