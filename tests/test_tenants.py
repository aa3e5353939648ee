"""Tenant shares: start-time fair queuing by tenant, weighted, work-conserving, without saved credit,
on both backends, in-process, through every front and across OS processes.

Order is driven by one concurrency slot held and released (each call then costs a slot's share, 1),
or by the rates across processes, where the shares are counted over a window of grants.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import threading
import time
from typing import Any

import pytest
import redis
from _helpers import Ops, budget_keys, mock_provider, until, until_queued

from xflow_dist import AcquireTimeout, AsyncLimiter, Budget, ConfigurationError, Limiter
from xflow_dist._local import Held, LocalBudget, Waiting
from xflow_dist.httpx import TENANT_HEADER, AsyncRateLimitedTransport, RateLimitedTransport

_SPAWN = mp.get_context("spawn")


class _Slot:
    """A budget of one slot, taken; waiters queue as tenants; ``serve`` releases and says who got it."""

    def __init__(self, rclient: redis.Redis, name: str, weights: dict[str, float]) -> None:
        self.ops = Ops(rclient, Budget(name, max_concurrency=1, tenants=weights))
        self.weights = weights
        self.held, reply = self.ops.acquire()
        assert reply.kind == "granted"
        self.waiting: list[str] = []

    def queue(self, *ids: str) -> None:
        for lid in ids:  # the tenant is the id's letter
            tenant = lid[0]
            _, reply = self.ops.acquire(lease_id=lid, tenant=tenant, weight=self.weights.get(tenant, 1.0))
            assert reply.kind == "queued", (lid, reply)
            self.waiting.append(lid)

    def serve(self, n: int) -> list[str]:
        order = []
        for _ in range(n):
            assert self.ops.settle(self.held).settled
            granted = [w for w in self.waiting if self.ops.acquire(lease_id=w)[1].kind == "granted"]
            assert len(granted) == 1, granted
            self.held = granted[0]
            self.waiting.remove(self.held)
            order.append(self.held)
        return order


def test_tenants_of_equal_weight_take_turns(rclient: redis.Redis, name: str) -> None:
    slot = _Slot(rclient, name, {"a": 1, "b": 1})
    slot.queue("a1", "a2", "a3", "b1", "b2", "b3")
    assert slot.serve(6) == ["a1", "b1", "a2", "b2", "a3", "b3"]


def test_a_tenant_gets_its_weights_share(rclient: redis.Redis, name: str) -> None:
    slot = _Slot(rclient, name, {"a": 2, "b": 1})
    slot.queue("a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3")
    # tags: a 0, 0.5, 1, 1.5, 2, 2.5; b 0, 1, 2 (equal tags: by id, as Redis orders them)
    assert slot.serve(9) == ["a1", "b1", "a2", "a3", "b2", "a4", "a5", "b3", "a6"]


def test_an_idle_tenant_starts_at_the_virtual_time_with_no_credit_saved(rclient: redis.Redis, name: str) -> None:
    """b waited for nothing while a used the slot alone: it is not owed that time, it starts now."""
    slot = _Slot(rclient, name, {"a": 1, "b": 1, "c": 1})
    slot.queue("a1", "a2", "a3", "a4", "a5")
    assert slot.serve(3) == ["a1", "a2", "a3"]  # the virtual time is now 2 (a3's tag)
    slot.queue("b1", "b2", "b3", "c1")
    # b and c start at 2, a's next is at 3: one each, then turns; had b been owed the time it was
    # idle (started at 0), it would take the slot three times before a4
    assert slot.serve(6) == ["b1", "c1", "a4", "b2", "a5", "b3"]


def test_the_virtual_time_follows_the_grants_from_the_queue(rclient: redis.Redis, name: str) -> None:
    slot = _Slot(rclient, name, {"a": 1, "c": 1})
    slot.queue("a1", "a2", "a3")
    assert slot.serve(2) == ["a1", "a2"]  # the virtual time is 1
    slot.queue("c1", "c2")  # tags 1 and 2: c1 before a3 (2), c2 after it (equal tags, by id)
    assert slot.serve(3) == ["c1", "a3", "c2"]


def test_a_call_given_up_gives_its_tenant_its_turn_back(rclient: redis.Redis, name: str) -> None:
    """a2 leaves the queue (a timeout, a cancelled task): a's next call takes its turn, not the one
    after; without that, a tenant whose calls time out would wait longer each time, and time out again."""
    slot = _Slot(rclient, name, {"a": 1, "b": 1})
    slot.queue("a1", "a2", "b1")  # tags: a1 0, a2 1, b1 0
    assert slot.ops.cancel("a2") == "dequeued"
    slot.waiting.remove("a2")
    slot.queue("a3", "b2")  # a3 at 1 (a2's turn), b2 at 1: by id
    assert slot.serve(4) == ["a1", "b1", "a3", "b2"]


def test_a_dead_waiters_turn_goes_back_to_its_tenant(rclient: redis.Redis, name: str) -> None:
    """A ticket not renewed within its TTL is dropped when it reaches the head: its turn goes back."""
    ops = Ops(rclient, Budget(name, max_concurrency=1, tenants={}))
    held, _ = ops.acquire(tenant="a", weight=1)
    assert ops.acquire(lease_id="a-dead", tenant="a", weight=1, ticket_ttl=0.05)[1].kind == "queued"  # tag 1
    assert ops.acquire(lease_id="b1", tenant="b", weight=1)[1].kind == "queued"  # tag 0: ahead of it
    ops.wait_redis_until(ops.redis_now() + 0.1)  # a-dead's TTL passes
    assert ops.settle(held).settled  # b1 is granted; a-dead, now the head, is dropped at the next call
    assert ops.acquire(lease_id="b1")[1].kind == "granted"
    assert ops.status().queued == 0
    assert ops.acquire(lease_id="a2", tenant="a", weight=1)[1].kind == "queued"  # at 1, a-dead's turn
    assert ops.acquire(lease_id="c1", tenant="c", weight=1)[1].kind == "queued"  # at vt = 0
    assert ops.acquire(lease_id="c2", tenant="c", weight=1)[1].kind == "queued"  # at 1: after a2 (by id)
    assert ops.settle("b1").settled
    assert [lid for lid in ("a2", "c1", "c2") if ops.acquire(lease_id=lid)[1].kind == "granted"] == ["c1"]
    assert ops.settle("c1").settled  # a2 next: at 1, before c2 (had a kept a-dead's turn, a2 would be at 2)
    assert [lid for lid in ("a2", "c2") if ops.acquire(lease_id=lid)[1].kind == "granted"] == ["a2"]


def test_a_lead_call_does_not_push_the_other_tenants_behind_its_tenants_backlog(
    rclient: redis.Redis, name: str
) -> None:
    """a's lead call goes ahead (its place, tag less lead x cost, is far below); granted, it moves the
    virtual time to that place, not to its tag: b, arriving next, takes turns with a's backlog."""
    slot = _Slot(rclient, name, {"a": 1, "b": 1})
    slot.queue("a1", "a2", "a3", "a4")  # tags 0..3
    _, reply = slot.ops.acquire(lease_id="a-urgent", tenant="a", weight=1, lead=100)  # tag 4, place -96
    assert reply.kind == "queued"
    slot.waiting.append("a-urgent")
    assert slot.serve(1) == ["a-urgent"]
    slot.queue("b1", "b2")  # at the virtual time, 0, and 1 (had it moved to a-urgent's tag: 4 and 5)
    assert slot.serve(6) == ["a1", "b1", "a2", "b2", "a3", "a4"]


def test_a_tenant_alone_takes_the_whole_budget(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, tps=100, burst=1, tenants={"a": 1, "b": 4}))
    kinds = [ops.acquire(tokens=10, tenant="a", weight=1)[1].kind for _ in range(10)]
    assert kinds == ["granted"] * 10  # the whole bucket, though its weight is the smaller


def test_a_new_tenant_passes_a_backlog_and_fits_at_once(rclient: redis.Redis, name: str) -> None:
    """a's backlog waits for a full bucket; b's first small call goes before it and fits now."""
    ops = Ops(rclient, Budget(name, tps=100, burst=1, tenants={}))
    assert ops.acquire(tokens=60, tenant="a", weight=1)[1].kind == "granted"  # 40 left
    assert ops.acquire(tokens=100, tenant="a", weight=1)[1].kind == "queued"  # tag 0.6
    assert ops.acquire(tokens=5, tenant="b", weight=1)[1].kind == "granted"  # tag 0, the virtual time
    assert ops.status().queued == 1


def test_the_in_process_budget_keeps_the_virtual_time_as_the_scripts_do() -> None:
    core = LocalBudget(0.0, 0.0, 0.0, 1, 0.5, lambda t: None)
    held = core.acquire(0.0, 1, 0)
    assert isinstance(held, Held)
    waiters = {lid: core.acquire(0.0, 1, 0, None, True, 0, lid[0], 1.0) for lid in ("a1", "a2", "a3")}
    order = []

    def serve(n: int) -> None:
        nonlocal held
        for _ in range(n):
            assert held is not None
            core.settle(0.0, held, None)
            got = [lid for lid, w in waiters.items() if isinstance(w, Waiting) and w.held is not None]
            assert len(got) == 1
            order.append(got[0])
            w = waiters.pop(got[0])
            assert isinstance(w, Waiting)
            held = w.held

    serve(2)
    waiters.update({lid: core.acquire(0.0, 1, 0, None, True, 0, "c", 1.0) for lid in ("c1", "c2")})
    serve(3)
    assert order == ["a1", "a2", "c1", "a3", "c2"]


def test_the_in_process_budget_gives_a_cancelled_calls_turn_back() -> None:
    core = LocalBudget(0.0, 0.0, 0.0, 1, 0.5, lambda t: None)
    held = core.acquire(0.0, 1, 0)
    a1, a2, b1 = (core.acquire(0.0, 1, 0, None, True, 0, t, 1.0) for t in "aab")  # tags 0, 1, 0
    assert isinstance(a2, Waiting) and core.cancel(0.0, a2) == "dequeued"
    a3, b2 = (core.acquire(0.0, 1, 0, None, True, 0, t, 1.0) for t in "ab")  # both at 1: a3 first
    assert [t.tag for t in core.queue] == [0.0, 0.0, 1.0, 1.0]
    assert core.queue[2] is a3 and core.queue[3] is b2 and held is not None and a1 is not None and b1 is not None


def test_a_tenant_on_a_budget_not_shared_by_tenant_is_refused_before_redis(
    client: redis.Redis, redis_url: str, name: str
) -> None:
    with Limiter(Budget(name, rps=10), redis_url) as lim:
        with pytest.raises(ConfigurationError, match="not shared by tenant"):
            lim.acquire(tenant="a")
        with pytest.raises(ConfigurationError, match="not shared by tenant"):
            lim.try_acquire(tenant="a")
    with Limiter(Budget(name, rps=10, tenants={}), redis_url) as lim:
        for bad in ("", "a b", "x" * 129, 5):
            with pytest.raises(ConfigurationError, match="tenant's name"):
                lim.acquire(tenant=bad)  # type: ignore[arg-type]
    assert budget_keys(client, name) == []


@pytest.mark.parametrize(
    ("tenants", "default", "match"),
    [
        ([("a", 1)], 1.0, "mapping"),
        ({"a b": 1}, 1.0, "name"),
        ({"a": 0}, 1.0, "weight"),
        ({"a": -1}, 1.0, "weight"),
        ({"a": float("nan")}, 1.0, "weight"),
        ({"a": True}, 1.0, "weight"),
        ({"a": 1e10}, 1.0, "weight"),
        ({}, 0, "default_weight"),
    ],
)
def test_bad_tenants_are_refused(tenants: Any, default: float, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        Budget("b", rps=1, tenants=tenants, default_weight=default)


def test_weights_default_and_the_budget_stays_hashable() -> None:
    a = Budget("b", rps=1, tenants={"x": 2, "y": 1}, default_weight=0.5)
    assert a == Budget("b", rps=1, tenants={"y": 1, "x": 2}, default_weight=0.5) and hash(a)
    assert (a.weight("x"), a.weight("someone"), a.weight()) == (2.0, 0.5, 0.5)
    assert Budget("b", rps=1).weight() == 0.0


# --- across processes: the shares ------------------------------------------------------------------


def _member(
    url: str, name: str, tenant: str, tokens: int, threads: int, ready: Any, go: Any, stop_at: Any, out: Any
) -> None:
    budget = Budget(name, rps=100, tps=10_000, tenants={"a": 1, "b": 2, "c": 5})
    grants: list[tuple[float, int]] = []
    with Limiter(budget, url) as lim:
        lim.status()  # connected
        ready.set()
        go.wait(60)

        def loop() -> None:
            while time.time() < stop_at.value:
                try:
                    lease = lim.acquire(tokens=tokens, tenant=tenant, timeout=max(0.01, stop_at.value - time.time()))
                except AcquireTimeout:
                    return
                grants.append((time.time(), tokens))
                lease.release()

        pool = [threading.Thread(target=loop) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join(60)
    out.put((tenant, grants))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sizes", "binding"),
    [({"a": 10, "b": 10, "c": 10}, "requests"), ({"a": 400, "b": 100, "c": 200}, "tokens")],
)
def test_backlogged_tenants_get_their_weights_share_across_processes(
    redis_url: str, real_redis: bool, name: str, sizes: dict[str, int], binding: str
) -> None:
    """Three processes, tenants weighing 1:2:5, each backlogged by four threads: over the window,
    each tenant's share of the binding dimension is its weight's, within 2 points."""
    if not real_redis:
        pytest.skip("processes share a real redis-server")
    out = _SPAWN.Queue()
    go = _SPAWN.Event()
    stop_at = _SPAWN.Value("d", time.time() + 120)
    ready = [_SPAWN.Event() for _ in "abc"]
    procs = [
        _SPAWN.Process(target=_member, args=(redis_url, name, t, sizes[t], 4, r, go, stop_at, out))
        for t, r in zip("abc", ready, strict=True)
    ]
    for p in procs:
        p.start()
    try:
        assert all(r.wait(60) for r in ready)
        start = time.time()
        stop_at.value = start + 5.0
        go.set()
        results = dict(out.get(timeout=90) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    # the window: from the first second (every tenant backlogged) to the stop
    lo, hi = start + 1.0, start + 5.0
    used = {t: sum((1 if binding == "requests" else n) for at, n in g if lo <= at <= hi) for t, g in results.items()}
    total = sum(used.values())
    shares = {t: used[t] / total for t in "abc"}
    want = {"a": 1 / 8, "b": 2 / 8, "c": 5 / 8}
    assert total > 0
    for t in "abc":
        assert abs(shares[t] - want[t]) <= 0.02, (shares, used)


# --- the fronts -------------------------------------------------------------------------------------


def test_the_transport_takes_the_tenant_from_the_header_and_never_sends_it(redis_url: str, name: str) -> None:
    import httpx

    budget = Budget(name, max_concurrency=1, tenants={})
    seen: list[tuple[str, str | None]] = []
    transport = RateLimitedTransport(Limiter(budget, redis_url), mock_provider(seen, TENANT_HEADER), tokenizer=len)
    with transport.limiter as lim, httpx.Client(transport=transport, base_url="https://api.example/v1") as http:
        held = lim.acquire(tenant="a")

        def post(user: str) -> threading.Thread:
            body = {"model": "m", "messages": [], "max_tokens": 1, "user": user}
            kwargs = {"json": body, "headers": {TENANT_HEADER: user[0]}}
            t = threading.Thread(target=http.post, args=("/chat/completions",), kwargs=kwargs)
            t.start()
            return t

        threads = []
        for user, n in (("a2", 1), ("a3", 2), ("b1", 3)):
            threads.append(post(user))
            until(lambda n=n: lim.status().queued == n)
        held.release()
        for t in threads:
            t.join(timeout=10)
    # a had the slot (tag 0): a2 and a3 queue at 1 and 2, b1 at 0: it goes first
    assert seen == [("b1", None), ("a2", None), ("a3", None)]


async def test_the_async_transport_and_the_async_limiter_pass_the_tenant(redis_url: str, name: str) -> None:
    import httpx

    budget = Budget(name, max_concurrency=1, tenants={})
    seen: list[tuple[str, str | None]] = []

    def by_user(request: httpx.Request) -> str | None:
        return str(json.loads(request.content)["user"])[0]

    async with (
        AsyncLimiter(budget, redis_url) as lim,
        httpx.AsyncClient(
            transport=AsyncRateLimitedTransport(lim, mock_provider(seen, TENANT_HEADER), tenant=by_user, tokenizer=len),
            base_url="https://api.example/v1",
        ) as http,
    ):
        held = await lim.acquire(tenant="a")

        async def post(user: str) -> None:
            await http.post("/chat/completions", json={"model": "m", "messages": [], "max_tokens": 1, "user": user})

        calls = []
        for n, user in enumerate(("a2", "a3", "b1"), 1):
            calls.append(asyncio.ensure_future(post(user)))
            await until_queued(lim, n)
        await held.release()
        await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [user for user, _ in seen] == ["b1", "a2", "a3"]


@pytest.mark.parametrize("shared", [False, True])
async def test_the_compatible_schedulers_pass_the_tenant_through(shared: bool, redis_url: str, name: str) -> None:
    from xflow_dist.compat import RequestRateScheduler

    redis_args: dict[str, Any] = {"redis": redis_url, "name": name} if shared else {}
    started: list[str] = []

    async def job(label: str) -> None:
        started.append(label)

    async with RequestRateScheduler(max_rps=20, tenants={}, **redis_args) as scheduler:
        tasks = [await scheduler.start_task(job(f"a{i}"), tenant="a") for i in range(4)]  # one starts
        await until_queued(scheduler.limiter, 3)
        tasks.append(await scheduler.start_task(job("b1"), tenant="b"))  # tag: the virtual time, 0
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        assert started[:2] == ["a0", "b1"]
        with pytest.raises(ConfigurationError, match="tenant's name"):
            await scheduler.start_task(job("x"), tenant="a b")
        await scheduler.wait_pending()


def test_a_celery_task_waits_as_its_tenant(redis_url: str, name: str) -> None:
    from celery import Celery

    from xflow_dist.celery import _close_all, rate_limited_task

    app = Celery(f"tenant-{name}", set_as_current=False)
    app.conf.update(xflow_redis_url=redis_url)
    budget = Budget(name, max_concurrency=1, tenants={})
    started: list[str] = []

    def owner(label: str) -> str:
        return label[0]

    @rate_limited_task(app, shared=False, budget=budget, tenant=owner)
    def work(self: Any, label: str) -> None:
        started.append(label)

    try:
        with Limiter(budget, redis_url) as lim:
            held = lim.acquire(tenant="a")
            threads = []
            for n, label in enumerate(("a2", "a3", "b1"), 1):
                t = threading.Thread(target=work.apply, args=((label,),))
                t.start()
                threads.append(t)
                until(lambda n=n: lim.status().queued == n)
            held.release()
            for t in threads:
                t.join(timeout=10)
        assert started == ["b1", "a2", "a3"]
    finally:
        _close_all()
        app.close()
