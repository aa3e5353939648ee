"""The compatible schedulers' in-process budget (``_local``) makes the scripts' decisions.

``LocalBudget`` keeps floats where the scripts keep strings and skips what only a shared budget
needs (TTLs, renewals, claims). This replays random histories, off any grid (rates, costs, clock
steps in microseconds), on it and on ``_engine`` (the scripts in plain Python, proved against the
Lua by ``test_engine.py`` and ``test_model.py``), at the same clock: every acquire is granted or
queued alike, every head is told the same fit time and granted at the same moment, settles refund
the same tokens, cooldowns pause alike, and after every step both hold the same leases, the same
queue and the same buckets.

A queued waiter of the shared budget comes back when told its fit time (or later: ``late``), and
claims a grant made to it in the queue at once; the in-process budget's head is ticked at the same
moments.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xflow_dist import AcquireTimeout, Budget, ConfigurationError, CooldownPolicy, InvalidCostError
from xflow_dist._core import acquire_args, budget_args, cooldown_args, key_names, settle_args
from xflow_dist._engine import LATE_CREDIT, Engine
from xflow_dist._local import Held, LocalBudget, Waiting

POLICY = CooldownPolicy(base=0.3, jitter=0.5, quiet=1.1)
TTL = 86_400.0  # no lease or ticket lapses in a history: the waiters are all alive

RATES = st.sampled_from([0.0, 0.5, 3.0, 7.5, 40.0, 1000.0])
TOKEN_RATES = st.sampled_from([0.0, 10.0, 95.5, 1000.0])
BURSTS = st.sampled_from([0.0, 0.25, 1.0, 2.5])
STEP = st.one_of(st.integers(0, 2_000), st.integers(0, 400_000), st.integers(0, 13_000_000))  # microseconds
LATE = st.sampled_from([0, 0, 0, 700, 30_000, 90_000])  # microseconds a head comes back after its time
ACQUIRE = st.tuples(
    st.just("acquire"),
    st.sampled_from([1.0, 2.0, 0.1 + 0.2]),
    st.sampled_from([0.0, 1.0, 7.3, 40.0, 2600.0, 123.456789012345678]),
    st.sampled_from([None, None, None, 0.0, 0.3]),  # max wait
    st.sampled_from([True, True, True, False]),  # may queue
    st.sampled_from([0, 0, 0, 1, 2, 7]),  # the priority class's lead
    st.sampled_from(["", "a", "b", "c"]),  # the tenant, where the budget is shared by tenant
)
WEIGHTS = {"": 1.0, "a": 1.0, "b": 2.5, "c": 0.3}  # any weights: this test is off every grid
OP = st.one_of(
    ACQUIRE,
    ACQUIRE,
    st.tuples(st.just("settle"), st.integers(0, 30), st.sampled_from([None, 0.0, 3.1, 7.3, 80.0])),
    st.tuples(st.just("cancel"), st.integers(0, 30)),
    st.tuples(st.just("cooldown"), st.sampled_from([None, 0.0, 0.4, 1.7]), st.floats(0, 0.99)),
    st.tuples(st.just("clear")),
)


class Twins:
    """One history on both: the engine through its scripts' arguments, the local budget directly."""

    def __init__(self, budget: Budget, start_us: int) -> None:
        self.budget = budget
        self.keys = key_names(budget.name)
        self.block = budget_args(budget)
        self.us = start_us
        self.events: list[str] = []
        self.engine = Engine(lambda _c, m: self.events.append(m), lambda: self.us / 1e6)
        self.local = LocalBudget(
            budget.request_rate or 0.0, budget.token_rate or 0.0, budget.credit, budget.max_concurrency or 0,
            min(budget.claim_window, budget.lease_ttl), lambda t: None,
        )  # fmt: skip
        self.items: dict[str, Held | Waiting] = {}
        self.order: list[str] = []
        self.fit: dict[str, float] = {}  # the fit time the engine last told each ticket
        self.fair = False  # the budget is shared by tenant: every call carries a weight

    @property
    def now(self) -> float:
        """The engine's ``now`` for this clock (TIME in microseconds, as the scripts read it)."""
        return self.us // 1_000_000 + (self.us % 1_000_000) / 1000000

    def run(self, op: str, argv: list[str]) -> list[str]:
        reply = self.engine.run(op, self.keys, self.block + argv)
        while self.events:  # as the fronts hear them: a grant in the queue is claimed at once
            words = self.events.pop(0).split()
            if words[0] == "g":
                assert self.run("acquire", self._acquire_args(words[1]))[0] == "granted"
            elif words[0] == "h":
                self.fit[words[1]] = float(words[2])
        return reply

    def _acquire_args(self, lid: str, creq: float = 1.0, ctok: float = 0.0) -> list[str]:
        return acquire_args(lid, creq, ctok, None, True, TTL, False, True)

    # --- the steps ---

    def acquire(
        self, creq: float, ctok: float, max_wait: float | None, may_queue: bool, lead: int, tenant: str
    ) -> None:
        lid = f"p.{len(self.order):06d}"  # ids in arrival order: equal places go by id, by arrival locally
        weight = WEIGHTS[tenant] if self.fair else 0.0
        args = acquire_args(lid, creq, ctok, max_wait, may_queue, TTL, False, True, lead, tenant, weight)
        want = self.run("acquire", args)
        got = self.local.acquire(self.now, creq, ctok, max_wait, may_queue, lead, tenant, weight)
        if want[0] == "refused":  # nothing queued nor charged: the same exact wait, or none
            assert got == (None if want[1] == "-1" else pytest.approx(float(want[1]), abs=1e-6)), (want, got)
            return
        self.order.append(lid)
        assert isinstance(got, Held | Waiting)
        self.items[lid] = got
        assert (want[0], type(got)) in (("granted", Held), ("queued", Waiting)), (want, got)

    def pick(self, i: int) -> tuple[str, Held | Waiting] | None:
        if not self.order:
            return None
        lid = self.order[i % len(self.order)]
        return lid, self.items[lid]

    def settle(self, i: int, actual: float | None) -> None:
        picked = self.pick(i)
        if picked is None:
            return
        lid, item = picked
        held = item.held if isinstance(item, Waiting) else item
        want = self.run("settle", settle_args(lid, actual))
        if held is None:  # still queued: the engine knows no lease of that id
            assert want[0] == "unknown"
            self.local.tick(self.now)
            return
        was_open = held.open
        got = self.local.settle(self.now, held, actual)
        assert want[0] == ("settled" if was_open else "unknown"), want
        assert float(want[1]) == pytest.approx(got, abs=1e-6), (want, got)

    def cancel(self, i: int) -> None:
        picked = self.pick(i)
        if picked is None:
            return
        lid, item = picked
        want = self.run("cancel", [lid])[0]
        assert self.local.cancel(self.now, item) == want

    def cooldown(self, retry_after: float | None, draw: float) -> None:
        want = self.run("cooldown", cooldown_args(POLICY, retry_after, draw))
        p = POLICY
        until, level, started = self.local.cooldown(
            self.now, retry_after, p.base, p.max_backoff, p.quiet, p.jitter, draw, p.max_pause
        )
        assert (float(want[1]), int(want[3]), want[4] == "1") == (until, level, started), want

    def clear(self) -> None:
        want = self.run("clear_cooldown", [])
        until, level = self.local.clear_cooldown(self.now)
        if max(float(want[1]), until) > self.now:
            assert (float(want[1]), int(want[3])) == (until, level), want
        # else no pause was in force either way (the scripts' keys may have expired since the last)

    def wait(self, step_us: int, late_us: int) -> None:
        """Move the clock on; each head due before then comes back at its time (plus ``late``)."""
        target = self.us + step_us
        for _ in range(10_000):
            due = self.local.due
            head = self._engine_queue()[:1]
            if due is None:
                break
            assert head and self.fit.get(head[0]) == pytest.approx(due, abs=1e-6), (head, self.fit, due)
            at = max(self.us, math.ceil(due * 1e6) + late_us)
            while at // 1_000_000 + (at % 1_000_000) / 1000000 < due:  # the first microsecond at or after it
                at += 1
            if at > target:
                break
            self.us = at
            self.run("acquire", self._acquire_args(head[0]))  # the waiter is back; it claims if granted
            self.local.tick(self.now)  # (a fit told before the state's rounding may be a microsecond early)
            self.check()
        self.us = target

    # --- both remember the same ---

    def _engine_queue(self) -> list[str]:
        b = self.engine.budgets.get(self.keys[0])
        return list(b.queue) if b is not None else []

    def check(self) -> None:
        b = self.engine.budgets.get(self.keys[0])
        local, now = self.local, self.now
        ids = {id(item): lid for lid, item in self.items.items()}
        queued = [ids[id(t)] for t in local.queue]  # in the local budget's order
        assert all(isinstance(self.items[lid], Waiting) and self.items[lid].queued for lid in queued)  # type: ignore[union-attr]
        assert len(queued) == sum(isinstance(i, Waiting) and i.queued for i in self.items.values())
        held = {
            lid
            for lid, item in self.items.items()
            if (h := item.held if isinstance(item, Waiting) else item) is not None and h.open
        }
        if b is None:  # the keys expired: nothing was left to remember, so nothing is here either
            assert not queued and not held
            assert max(local.rt, local.tt, local.cu, local.cr) <= now
            return
        assert list(b.queue) == queued
        if queued and local._slot_free():  # a head held back by the rates or a pause has its tick set
            head = self.items[queued[0]]
            assert isinstance(head, Waiting)
            fit = local._fit(now, head.requests, head.tokens)
            # (told before the operation rounded the state: a tick up to a microsecond off comes back,
            # and one that the rounding put at now or before still ticks, a microsecond after now)
            if fit <= now:
                assert local.due is None or local.due <= now + 1e-6, (local.due, fit)
            else:
                assert local.due == pytest.approx(fit, abs=1e-6), (local.due, fit)
        for lid in queued:  # and each ticket was told the same fit time (it counts when it is charged)
            assert b.tickets[lid].fit == self.items[lid].fit, (lid, b.tickets[lid].fit, self.items[lid].fit)  # type: ignore[union-attr]
        assert set(b.data) == held
        for lid in held:  # each lease charged the cost as the scripts keep it (14 digits)
            item = self.items[lid]
            h = item.held if isinstance(item, Waiting) else item
            assert h is not None and (b.data[lid].creq, b.data[lid].ctok) == (h.requests, h.tokens), lid
        assert local.in_flight == len(held)
        f = b.state
        for key, mine in (("rt", local.rt), ("tt", local.tt), ("cu", local.cu), ("cr", local.cr)):
            theirs = f.get(key, 0)
            if max(theirs, mine) > now:  # in the past, a value is only "full" or "not paused"
                assert theirs == mine, (key, theirs, mine)
        if f.get("cu", 0) > now or f.get("cr", 0) > now:
            assert f.get("cl", 0) == local.cl


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(
    rps=RATES,
    tps=TOKEN_RATES,
    burst=BURSTS,
    max_concurrency=st.sampled_from([None, 1, 3]),
    start_us=st.integers(1_000_000, 2_000_000_000_000_000),
    steps=st.lists(st.tuples(STEP, LATE, OP), min_size=1, max_size=60),
    fair=st.booleans(),
)
def test_the_in_process_budget_decides_as_the_scripts(
    rps: float,
    tps: float,
    burst: float,
    max_concurrency: int | None,
    start_us: int,
    steps: list[tuple[int, int, tuple[Any, ...]]],
    fair: bool,
) -> None:
    budget = Budget(
        "local",
        rps=rps or None,
        tps=tps or None,
        burst=burst,
        max_concurrency=max_concurrency,
        overdraft=True,
        dispatch_margin=0.0,
        lease_ttl=TTL,
    )
    twins = Twins(budget, start_us)
    twins.fair = fair
    for step_us, late_us, (kind, *args) in steps:
        twins.wait(step_us, late_us)
        getattr(twins, kind)(*args)
        twins.check()
    twins.wait(60_000_000, 0)  # everything queued is served in the end, alike
    twins.check()


# --------------------------------------------------------------------------------------------
# The front: LocalLimiter in a running loop
# --------------------------------------------------------------------------------------------


def _limiter(**kw: Any) -> Any:
    from xflow_dist.compat._inprocess import LocalLimiter

    return LocalLimiter(Budget("local", overdraft=True, dispatch_margin=0.0, **kw), CooldownPolicy(jitter=0.0))


def _give_back(limiter: Any, now: float, tickets: Any) -> None:
    """Tickets whose tasks never ran: each gives back its place, or the grant made to it."""
    for t in tickets:
        assert isinstance(t, Waiting)
        t.waiter.cancel()  # type: ignore[union-attr]
        limiter._core.cancel(now, t)


async def test_a_grant_made_to_a_waiter_cancelled_before_it_ran_is_given_back() -> None:
    limiter = _limiter(max_concurrency=1, tps=100.0, burst=1.0)  # 100 tokens of credit: only the slot binds
    first = await limiter.acquire(tokens=10)
    waiting = asyncio.ensure_future(limiter.acquire(tokens=20))
    await asyncio.sleep(0)  # queued now
    assert (await limiter.status()).queued == 1
    await first.release()  # the queue's head is granted here...
    waiting.cancel()  # ...and its task cancelled before it could take the lease
    with pytest.raises(asyncio.CancelledError):
        await waiting
    status = await limiter.status()
    assert (status.in_flight, status.queued) == (0, 0)
    assert status.tokens_available == pytest.approx(90, abs=2)  # the 20 tokens came back; 10 were spent
    again = await asyncio.wait_for(limiter.acquire(tokens=0), 1)  # and the slot is free
    await again.release()
    await limiter.aclose()


async def test_the_head_is_granted_by_the_loops_timer_at_its_fit_time() -> None:
    limiter = _limiter(rps=20.0)  # one start every 50 ms
    t0 = time.monotonic()
    leases = [await limiter.acquire() for _ in range(4)]
    elapsed = time.monotonic() - t0
    assert 0.15 - 0.002 <= elapsed < 1.0, elapsed  # three waits of 50 ms, nothing polled in between
    for lease in leases:
        await lease.release()
    await limiter.aclose()


async def test_an_in_process_lease_refuses_what_it_cannot_learn_and_bad_usage() -> None:
    limiter = _limiter(tps=100.0)
    lease = await limiter.acquire(tokens=5)
    with pytest.raises(ConfigurationError, match="learns nothing"):
        await lease.report(3, headers={"x-ratelimit-limit-tokens": "100"})
    with pytest.raises(InvalidCostError):
        await lease.report(float("nan"))
    assert not lease.closed  # nothing was settled by the refusals
    reply = await lease.report(3)
    assert reply is not None and reply.refunded == pytest.approx(2)
    assert lease.closed and await lease.report(3) is None  # once only
    status = await limiter.status()
    assert (status.mode, status.in_flight, status.tpm) == ("in-process", 0, pytest.approx(6000))
    with pytest.raises(InvalidCostError):
        limiter.acquire(tokens=-1)
    await limiter.aclose()


def test_a_scheduler_keeps_its_budget_from_one_event_loop_to_the_next() -> None:
    from xflow_dist.compat import TokenRateScheduler

    s = TokenRateScheduler(max_tps=1000, max_concurrency=4)

    async def spend() -> float:
        t0 = time.monotonic()
        tasks = [await s.start_task(asyncio.sleep(0), estimated_tokens=1500) for _ in range(2)]
        await asyncio.gather(*tasks)
        await s.aclose()
        return time.monotonic() - t0

    first = asyncio.run(spend())  # 3,000 tokens at 1,000/s: the second start waits 1.5 s
    second = asyncio.run(spend())  # the debt carried over: each start here waits its turn
    assert 1.4 < first < 3.0, first
    assert second >= 2.9, second  # a fresh budget would have let the first start at once (1.5 s)


async def test_a_lease_the_caller_dropped_gives_its_slot_back() -> None:
    limiter = _limiter(max_concurrency=1)
    lease = await limiter.acquire()
    del lease
    gc.collect()
    again = await asyncio.wait_for(limiter.acquire(), 2)  # the slot came back (not held forever)
    assert (await limiter.status()).in_flight == 1
    await again.release()
    await limiter.aclose()


async def test_the_in_process_limiter_answers_as_an_async_limiter() -> None:
    limiter = _limiter(rps=2.0, max_concurrency=1)
    async with limiter.acquire() as lease:  # a context manager, as AsyncLimiter.acquire's
        assert not lease.closed
        refused = await limiter.try_acquire()
        assert not refused and refused.retry_after is None  # the slot holds it back: no time to tell
    assert lease.closed
    later = await limiter.try_acquire()
    assert not later and later.retry_after == pytest.approx(0.5, abs=0.05)  # the rate: exact
    with pytest.raises(AcquireTimeout) as err:
        await limiter.acquire(timeout=0.1)  # known at once to come after the deadline
    assert err.value.retry_after == pytest.approx(0.5, abs=0.05)
    assert (await limiter.status()).queued == 0  # nothing was left queued
    granted = await limiter.acquire(timeout=1.0)
    await granted.release()
    with pytest.raises(ConfigurationError):
        limiter.acquire(timeout=-1)
    await limiter.aclose()


async def test_a_head_ticked_late_by_the_loop_is_granted_as_of_its_time() -> None:
    """The loop's timer fires late (epoll sleeps in whole milliseconds); nothing else acted on the
    budget meanwhile, so the head is charged as a waiter back on time would be, not as a late one
    (whose credit stops at one refill time: here it would lose 2 ms of the rate)."""
    limiter = _limiter(rps=1000.0)
    clock = [1000.0]
    limiter._now = lambda: clock[0]
    first = limiter._enter(1.0, 0.0)  # granted at 1000.000: the next start is due at 1000.001
    second = limiter._enter(1.0, 0.0)
    assert isinstance(second, Waiting) and limiter._timer_at == pytest.approx(1000.001)
    clock[0] = 1000.004  # the timer's callback runs 3 ms late
    limiter._tick()
    assert second.held is not None  # granted...
    assert limiter._core.rt == pytest.approx(1000.002)  # ...and charged from 1000.001, its time
    _give_back(limiter, clock[0], [second])
    first._release_now()  # type: ignore[union-attr]
    await limiter.aclose()


async def test_a_call_that_comes_before_the_late_timer_grants_the_head_as_of_its_time() -> None:
    """The same when a release runs first: the timer's time is replayed before the release."""
    limiter = _limiter(rps=1000.0)
    clock = [1000.0]
    limiter._now = lambda: clock[0]
    first = limiter._enter(1.0, 0.0)
    second = limiter._enter(1.0, 0.0)
    third = limiter._enter(1.0, 0.0)
    assert isinstance(second, Waiting) and isinstance(third, Waiting)
    clock[0] = 1000.0045  # the release comes 3.5 ms after the second's time, before the timer's callback
    first._release_now()  # type: ignore[union-attr]
    assert second.held is not None and third.held is not None  # each as of its own time: 1000.001, .002
    assert limiter._core.rt == pytest.approx(1000.003)
    _give_back(limiter, clock[0], [second, third])
    await limiter.aclose()


async def test_a_loop_paused_within_the_timers_slack_catches_its_heads_up() -> None:
    """A collection held the loop 45 ms at 1,000 starts a second: the heads due meanwhile are granted
    as of their times, as XtremeFlow's booked starts catch up, and the next is due on the same grid."""
    from xflow_dist.compat._inprocess import TIMER_SLACK

    limiter = _limiter(rps=1000.0)
    clock = [1000.0]
    limiter._now = lambda: clock[0]
    first = limiter._enter(1.0, 0.0)  # granted at 1000.000
    queued = [limiter._enter(1.0, 0.0) for _ in range(60)]  # due at 1000.001, .002, ... .060
    clock[0] = 1000.0455
    assert 0.005 < clock[0] - 1000.001 <= TIMER_SLACK
    limiter._tick()
    granted = [t for t in queued if isinstance(t, Waiting) and t.held is not None]
    assert len(granted) == 45  # 1000.001 to 1000.045: none lost to the pause...
    assert limiter._core.rt == pytest.approx(1000.046)  # ...and the 46th is due at its own time
    _give_back(limiter, clock[0], queued)
    first._release_now()  # type: ignore[union-attr]
    await limiter.aclose()


async def test_a_loop_held_up_longer_than_the_timers_slack_makes_the_heads_late_waiters() -> None:
    """A blocking call held the loop 1.9 s past the heads' times: they are late waiters, granted now
    by the late head's rule (at most one refill time of credit), not all at once as if on time."""
    from xflow_dist.compat._inprocess import TIMER_SLACK

    limiter = _limiter(rps=10.0)
    clock = [1000.0]
    limiter._now = lambda: clock[0]
    first = limiter._enter(1.0, 0.0)
    queued = [limiter._enter(1.0, 0.0) for _ in range(5)]  # due at 1000.1, .2, .3, .4, .5
    assert all(isinstance(t, Waiting) for t in queued)
    clock[0] = 1002.0
    assert clock[0] - 1000.1 > TIMER_SLACK
    limiter._tick()
    granted = [t for t in queued if isinstance(t, Waiting) and t.held is not None]
    assert len(granted) == 1  # the head alone, charged from now less its credit (62.5 ms here)...
    assert limiter._core.rt == pytest.approx(1002.0 - LATE_CREDIT + 0.1)  # ...and the next is paced from it
    _give_back(limiter, clock[0], queued)
    first._release_now()  # type: ignore[union-attr]
    await limiter.aclose()


def test_a_lease_dropped_after_its_loop_closed_gives_its_slot_back() -> None:
    from xflow_dist.compat import TaskScheduler

    s = TaskScheduler(1)
    kept: list[Any] = []

    async def take() -> None:
        kept.append(await s.limiter.acquire())

    asyncio.run(take())  # the loop ends with the lease held
    kept.clear()
    gc.collect()

    async def again() -> int:
        lease = await asyncio.wait_for(s.limiter.acquire(), 2)  # the slot is free again
        await lease.release()
        return (await s.limiter.status()).in_flight

    assert asyncio.run(again()) == 0
