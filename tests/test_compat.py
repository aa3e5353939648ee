"""``xflow_dist.compat``: XtremeFlow 0.4.4's API and timing over a shared budget, its flaws fixed.

Start times are taken with ``time.monotonic()`` in the task, right after it was granted; bounds
allow for a busy two-core machine (a start may be measured late, never early by more than the
slack). Where the budget must be shared, the test uses the suite's real redis-server.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import itertools
import json
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
import redis

from xflow_dist import ConfigurationError, InvalidCostError, XflowError
from xflow_dist._exceptions import InvalidTaskError, OutsideTaskError
from xflow_dist.compat import (
    RequestRateScheduler,
    RetryException,
    TaskScheduler,
    TokenRateScheduler,
    async_pipeline,
    auto_backoff,
    get_context,
    kv_batch,
    report_token_usage,
)

ROOT = Path(__file__).resolve().parent.parent
SLACK = 0.05  # how early a measured start may look against its ideal: the previous one measured late
CLOCK = 0.002  # Redis TIME (the wall clock) against time.monotonic() over a second or two


@pytest.fixture(params=["redis", "memory", "in-process"])
def url(request: pytest.FixtureRequest, redis_url: str) -> str | None:
    """Each place a scheduler's budget can live: the spawned server, the embedded ``memory://``
    (the scripts' engine, shared by name in this process) and none at all (``redis=None``, the
    default: the scheduler's own budget, ``LocalLimiter``)."""
    if request.param == "redis":
        return redis_url
    return f"memory://{uuid.uuid4().hex[:8]}" if request.param == "memory" else None


def _spaced(starts: list[float], interval: float) -> None:
    """No k+1 starts closer together than k intervals (less the measurement slack)."""
    for i in range(len(starts)):
        for j in range(i + 1, len(starts)):
            assert starts[j] - starts[i] >= (j - i) * interval - SLACK, (
                i,
                j,
                [round(s - starts[0], 3) for s in starts],
            )


def _due(t0: float, starts: list[float], interval: float, burst: int = 1) -> None:
    """Exact, no slack: the first grant came after ``t0``, and after the ``burst`` that started
    at once each next start is due one ``interval`` later; a start is measured after its grant."""
    for k in range(burst, len(starts)):
        assert starts[k] - t0 >= (k - burst + 1) * interval - CLOCK, (k, [round(s - t0, 3) for s in starts])


async def _run_all(scheduler: TaskScheduler, n: int, tokens: float = 0, hold: float = 0.0) -> tuple[float, list[float]]:
    """Start ``n`` tasks in order; return when the first was started and their measured starts, sorted."""
    t0 = time.monotonic()
    starts: list[float] = []

    async def call() -> None:
        starts.append(time.monotonic())
        await asyncio.sleep(hold)

    tasks = [await scheduler.start_task(call(), estimated_tokens=tokens) for _ in range(n)]
    await asyncio.gather(*tasks)
    return t0, sorted(starts)


# --------------------------------------------------------------------------------------------
# Timing: XtremeFlow's pacing and burst
# --------------------------------------------------------------------------------------------


async def test_burst_ratio_zero_paces_evenly(url: str | None, name: str) -> None:
    async with RequestRateScheduler(max_rps=20, max_concurrency=50, redis=url, name=name) as s:
        t0, starts = await _run_all(s, 11)
    _due(t0, starts, 1 / 20)
    _spaced(starts, 1 / 20)
    # XtremeFlow starts these at 0, 50 ms, ..., 500 ms; each grant here also waits out one round trip
    assert starts[-1] - starts[0] <= 0.5 * 1.5 + 0.3


async def test_tokens_pace_at_burst_ratio_zero(url: str | None, name: str) -> None:
    async with TokenRateScheduler(max_tps=1_000, max_concurrency=50, redis=url, name=name) as s:
        t0, starts = await _run_all(s, 6, tokens=100)  # 100 tokens at 1,000/s: one start every 0.1 s
    _due(t0, starts, 0.1)
    _spaced(starts, 0.1)
    assert starts[-1] - starts[0] <= 0.5 * 1.5 + 0.3


async def test_requests_and_tokens_are_reserved_jointly(url: str | None, name: str) -> None:
    # requests bind (5/s) although tokens would allow 10/s; neither is charged without the other
    async with TokenRateScheduler(max_tps=1_000, max_rps=5, redis=url, name=name) as s:
        t0, starts = await _run_all(s, 4, tokens=100)
        status = await s.limiter.status()
    _due(t0, starts, 0.2)
    _spaced(starts, 0.2)
    assert status.requests_available is not None and status.tokens_available is not None


async def test_burst_of_rate_times_burst_ratio_plus_one_after_idle(url: str | None, name: str) -> None:
    async with RequestRateScheduler(max_rps=10, burst_ratio=0.5, redis=url, name=name) as s:
        for _ in range(2):  # a fresh budget is full; after 0.7 s idle it is full again
            t0, starts = await _run_all(s, 8)
            # as XtremeFlow: rate x burst_ratio = 5 start at once and a sixth (a start is due while
            # the bucket is out of debt; paced, they would span 0.5 s), then one every 0.1 s
            assert starts[5] - starts[0] < 0.2, [round(t - t0, 3) for t in starts]
            _due(t0, starts, 0.1, burst=6)
            _spaced(starts[6:], 0.1)
            await asyncio.sleep(0.7)


async def test_an_estimate_larger_than_the_bucket_starts_when_it_is_full_and_delays_the_next(
    url: str | None, name: str
) -> None:
    """XtremeFlow admits it (its start is due) and the next start waits for the whole cost: the
    excess is debt. Here: a bucket of 1,000 tokens (1,000/s, burst_ratio 1), an estimate of 1,500."""
    async with TokenRateScheduler(max_tps=1_000, burst_ratio=1.0, redis=url, name=name) as s:
        t0, starts = await _run_all(s, 1, tokens=1_500)
        assert starts[0] - t0 < 0.3  # the full bucket admits it at once, as XtremeFlow did
        _, more = await _run_all(s, 1, tokens=100)
    # 500 tokens of debt at 1,000/s: the next start is due 0.5 s after the first
    assert more[0] - starts[0] >= 0.5 - SLACK, more[0] - starts[0]
    assert more[0] - starts[0] < 1.5


async def test_default_backend_is_private_memory_per_scheduler() -> None:
    # no redis=: two schedulers do not share (each XtremeFlow scheduler had its own state)
    a, b = RequestRateScheduler(max_rps=2), RequestRateScheduler(max_rps=2)
    assert a.budget.name == b.budget.name == "xtremeflow"
    async with a, b:
        t0 = time.monotonic()
        runs = await asyncio.gather(_run_all(a, 1), _run_all(b, 1))
    assert max(starts[0] for _, starts in runs) - t0 < 0.4  # a shared 2/s budget would make one wait 0.5 s


# --------------------------------------------------------------------------------------------
# Concurrency: start_task back-pressures the caller; the fleet never exceeds max_concurrency
# --------------------------------------------------------------------------------------------


async def test_start_task_back_pressures_the_caller(url: str | None, name: str) -> None:
    async with TaskScheduler(2, redis=url, name=name) as s:
        t0 = time.monotonic()
        returned = []
        for _ in range(3):
            await s.start_task(asyncio.sleep(0.3))
            returned.append(time.monotonic() - t0)
        assert returned[1] < 0.2 and returned[2] >= 0.25, returned
    assert (s.active_tasks, s.total_completed) == (0, 3)


async def test_concurrency_is_shared_by_schedulers_of_one_name(redis_url: str | None, name: str) -> None:
    inflight = peak = 0

    async def call() -> None:
        nonlocal inflight, peak
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(0.05)
        inflight -= 1

    async with TaskScheduler(3, redis=redis_url, name=name) as a, TaskScheduler(3, redis=redis_url, name=name) as b:

        async def feed(s: TaskScheduler) -> None:
            for _ in range(9):
                await s.start_task(call())

        await asyncio.gather(feed(a), feed(b))
        await asyncio.gather(a.wait_pending(), b.wait_pending())
    assert peak == 3  # each could hold 3 of its own: the budget holds the pair to 3


# --------------------------------------------------------------------------------------------
# report_token_usage: refund, idempotent, a clear error outside a task
# --------------------------------------------------------------------------------------------


async def _second_start(s: TaskScheduler, reports: list[float]) -> float:
    """A takes 100 tokens of a 100 tokens/s budget and reports ``reports``; when does B start?"""
    t: dict[str, float] = {}

    async def a() -> None:
        t["a"] = time.monotonic()
        for actual in reports:
            await report_token_usage(actual)

    async def b() -> None:
        t["b"] = time.monotonic()

    first = await s.start_task(a(), estimated_tokens=100)
    await first
    await (await s.start_task(b(), estimated_tokens=100))
    return t["b"] - t["a"]


async def test_report_token_usage_refunds_the_over_estimate(url: str | None, name: str) -> None:
    async with TokenRateScheduler(max_tps=100, redis=url, name=name) as s:
        assert await _second_start(s, [0]) < 0.3  # all 100 tokens back: B need not wait 1 s
    async with TokenRateScheduler(max_tps=100, redis=url, name=f"{name}-b") as s:
        assert await _second_start(s, []) >= 1.0 - SLACK  # settled at the estimate


async def test_report_token_usage_is_idempotent(url: str | None, name: str) -> None:
    async with TokenRateScheduler(max_tps=100, redis=url, name=name) as s:
        # the second report changes nothing (XtremeFlow refunded twice and B started at once)
        assert await _second_start(s, [50, 50]) >= 0.5 - SLACK


async def test_report_token_usage_outside_a_task_is_a_clear_error() -> None:
    with pytest.raises(OutsideTaskError, match="inside a task started by"):
        await report_token_usage(10)
    assert issubclass(OutsideTaskError, RuntimeError) and issubclass(OutsideTaskError, XflowError)
    assert get_context() is None


async def test_report_token_usage_refuses_a_bad_number() -> None:
    async def call() -> None:
        ctx = get_context()
        assert ctx is not None and ctx.extra == {"estimated_tokens": 10.0}
        await report_token_usage(-1)

    async with TokenRateScheduler(max_tps=100) as s:
        task = await s.start_task(call(), estimated_tokens=10)
        with pytest.raises(InvalidCostError):
            await task
        assert (await s.limiter.status()).in_flight == 0  # settled at the estimate on the way out


# --------------------------------------------------------------------------------------------
# auto_backoff: retries charged, the cooldown seen by siblings (and other processes) at once
# --------------------------------------------------------------------------------------------


async def test_every_retry_is_charged(url: str | None, name: str) -> None:
    attempts = 0

    @auto_backoff()
    async def flaky() -> str:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise RetryException("429", retry_after=0)  # 0: retry at once, as in XtremeFlow
        return "ok"

    async with RequestRateScheduler(max_rps=1, burst_ratio=10, redis=url, name=name) as s:
        assert await (await s.start_task(flaky())) == "ok"
        status = await s.limiter.status()
    assert attempts == 3
    assert status.requests_available == pytest.approx(10 - 3, abs=0.5)  # three attempts, three charges


async def test_a_429_pauses_queued_siblings_and_other_schedulers(redis_url: str | None, name: str) -> None:
    starts: dict[str, float] = {}
    failed_at: list[float] = []
    running, go = asyncio.Event(), asyncio.Event()

    @auto_backoff(base_retry_after=5.0)
    async def call(label: str) -> None:
        if label == "a" and not failed_at:
            running.set()
            await go.wait()
            failed_at.append(time.monotonic())
            raise RetryException("429 Too Many Requests", retry_after=0.8)
        starts.setdefault(label, time.monotonic())

    kw: dict[str, Any] = {"max_rps": 5, "max_concurrency": 10, "redis": redis_url, "name": name}
    async with RequestRateScheduler(**kw) as s, RequestRateScheduler(**kw) as other:
        tasks = [await s.start_task(call("a"))]
        await running.wait()
        tasks += [await s.start_task(call(label)) for label in ("b", "c")]
        while (st := await s.limiter.status()).queued + st.in_flight < 3:  # b, c wait for the rate (0.2, 0.4 s)
            await asyncio.sleep(0.005)
        go.set()
        while not (await s.limiter.status()).cooldown_remaining:
            await asyncio.sleep(0.005)
        tasks.append(await other.start_task(call("elsewhere")))  # another process, as far as Redis knows
        await asyncio.gather(*tasks)
    pause_end = failed_at[0] + 0.8
    assert all(t >= pause_end - SLACK for t in starts.values()), {k: v - failed_at[0] for k, v in starts.items()}
    # after the pause, dispatch resumes paced (burst 0: one every 0.2 s), not as a herd
    _spaced(sorted(starts.values()), 0.2)


async def test_a_retry_holds_back_a_sibling_started_after_it_before_redis_hears_of_it(
    url: str | None, name: str
) -> None:
    """XtremeFlow blocked a task started after a backoff at once, in-process; so does this, even
    when the fleet's cooldown is slow to reach Redis (here held back 1 s on purpose)."""
    failed_at: list[float] = []
    started: list[float] = []

    @auto_backoff(base_retry_after=5.0)
    async def call(fail: bool) -> None:
        if fail and not failed_at:
            failed_at.append(time.monotonic())
            raise RetryException("429 Too Many Requests", retry_after=0.6)
        started.append(time.monotonic())

    kw: dict[str, Any] = {"redis": url, "name": name}
    async with RequestRateScheduler(max_rps=100, max_concurrency=10, burst_ratio=1.0, **kw) as s:
        real = s.limiter.cooldown

        async def late_cooldown(retry_after: float | None = None) -> Any:
            await asyncio.sleep(1.0)  # the 429's word has not reached Redis yet
            return await real(retry_after=retry_after)

        s.limiter.cooldown = late_cooldown  # type: ignore[method-assign]
        first = await s.start_task(call(True))
        while not failed_at:
            await asyncio.sleep(0)
        sibling = await s.start_task(call(False))  # started right after the 429, same process
        await asyncio.gather(first, sibling)
        assert (await s.limiter.status()).queued == 0
    assert len(started) == 2
    assert min(started) >= failed_at[0] + 0.6 - SLACK, [round(t - failed_at[0], 3) for t in started]


async def test_notify_rate_limit_exceeded_holds_back_this_process_at_once(url: str | None, name: str) -> None:
    kw: dict[str, Any] = {"redis": url, "name": name}
    async with RequestRateScheduler(max_rps=100, max_concurrency=4, burst_ratio=1.0, **kw) as s:
        t0 = time.monotonic()
        await s.notify_rate_limit_exceeded(0.4)
        _, starts = await _run_all(s, 2)
    assert min(starts) - t0 >= 0.4 - SLACK


async def test_backoff_is_exponential_and_reads_retry_after_headers() -> None:
    class Response:
        headers: ClassVar[dict[str, str]] = {"retry-after-ms": "250"}

    class HTTPError(Exception):
        response = Response()

    seen: list[float] = []

    @auto_backoff(retry_for=[RetryException, HTTPError], max_retries=3, base_retry_after=0.1)
    async def call() -> None:
        seen.append(time.monotonic())
        if len(seen) == 1:
            raise RetryException()  # no retry_after: 0.1 s
        if len(seen) == 2:
            raise RetryException()  # 0.2 s
        if len(seen) == 3:
            raise HTTPError()  # the response's retry-after-ms: 0.25 s

    async with RequestRateScheduler(max_rps=100, burst_ratio=1, max_concurrency=4) as s:
        await (await s.start_task(call()))
    gaps = [b - a for a, b in itertools.pairwise(seen)]
    assert gaps[0] >= 0.1 - 0.01 and gaps[1] >= 0.2 - 0.01 and gaps[2] >= 0.25 - 0.01, gaps
    assert sum(gaps) < 0.55 * 1.1 + 0.5


async def test_retries_give_up_after_max_retries_and_never_outside_a_task() -> None:
    calls = 0

    @auto_backoff(max_retries=2, base_retry_after=0)
    async def always() -> None:
        nonlocal calls
        calls += 1
        raise RetryException("still 429", retry_after=0)

    async with RequestRateScheduler(max_rps=100, burst_ratio=1) as s:
        with pytest.raises(RetryException, match="still 429"):
            await (await s.start_task(always()))
    assert calls == 3
    calls = 0
    with pytest.raises(RetryException):
        await always()  # no scheduler, no budget to charge: not retried, as in XtremeFlow
    assert calls == 1


def test_auto_backoff_refuses_bad_arguments() -> None:
    with pytest.raises(ConfigurationError):
        auto_backoff(max_retries=-1)
    with pytest.raises(ConfigurationError):
        auto_backoff(base_retry_after=float("nan"))
    with pytest.raises(ConfigurationError):
        auto_backoff(retry_for=[str])  # type: ignore[list-item]
    assert RetryException("x", 2.0).retry_after == 2.0


# --------------------------------------------------------------------------------------------
# Cancellation: the reservation comes back, the coroutine that never ran is closed
# --------------------------------------------------------------------------------------------


async def test_cancelling_a_queued_task_gives_its_place_back_and_closes_the_coroutine(
    url: str | None, name: str
) -> None:
    starts: dict[str, float] = {}

    async def call(label: str) -> None:
        starts[label] = time.monotonic()

    async with RequestRateScheduler(max_rps=2, max_concurrency=5, redis=url, name=name) as s:
        await (await s.start_task(call("a")))  # fits at once; the next fits 0.5 s later
        never = call("b")
        b = await s.start_task(never)
        await asyncio.sleep(0.1)
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        assert inspect.getcoroutinestate(never) == inspect.CORO_CLOSED
        assert (await s.limiter.status()).queued == 0
        await (await s.start_task(call("c")))
    # c takes b's place at 0.5 s; XtremeFlow kept b's ticket and c started at 1.0 s
    assert starts["c"] - starts["a"] < 0.8
    assert "b" not in starts
    gc.collect()  # a "never awaited" warning would fail the test here


async def test_cancelled_before_it_ran_and_while_back_pressured() -> None:
    async with TaskScheduler(1) as s:
        first = asyncio.sleep(10)
        task = await s.start_task(first)
        task.cancel()  # before the task ever ran
        with pytest.raises(asyncio.CancelledError):
            await task
        assert inspect.getcoroutinestate(first) == inspect.CORO_CLOSED

        blocker = await s.start_task(asyncio.sleep(10))
        waiting = asyncio.sleep(0)
        caller = asyncio.create_task(s.start_task(waiting))  # waits for the one local slot
        await asyncio.sleep(0.05)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert inspect.getcoroutinestate(waiting) == inspect.CORO_CLOSED
        blocker.cancel()  # cancelled while running: its lease is settled
        with pytest.raises(asyncio.CancelledError):
            await blocker
        await asyncio.sleep(0.05)
        assert (await s.limiter.status()).in_flight == 0
        assert s.active_tasks == 0
    gc.collect()


async def test_leaving_the_block_on_an_error_cancels_its_tasks() -> None:
    never = asyncio.sleep(10)
    s = TaskScheduler(2)

    async def block() -> None:
        async with s:
            await s.start_task(never)
            raise KeyError("boom")

    with pytest.raises(KeyError):
        await block()
    assert not s.pending_tasks and s.total_completed == 1
    assert inspect.getcoroutinestate(never) == inspect.CORO_CLOSED


def _tokens_left(status: Any) -> float:
    assert status.in_flight == 0, "the slot is free again"
    assert status.tokens_available is not None
    return float(status.tokens_available)


def _shared(redis_url: str | None, name: str) -> TokenRateScheduler:
    """600 tokens of credit refilling 10 a second: a level near 400 means one 200-token estimate charged."""
    return TokenRateScheduler(max_tps=10, burst_ratio=60, max_concurrency=2, redis=redis_url, name=name)


async def test_a_task_raising_after_acquire_is_charged_its_estimate(url: str | None, name: str) -> None:
    async def call() -> None:
        raise ValueError("the provider call failed")

    async with _shared(url, name) as s:
        with pytest.raises(ValueError, match="provider"):
            await (await s.start_task(call(), estimated_tokens=200))
        assert 400 - 1 <= _tokens_left(await s.limiter.status()) <= 400 + 10


async def test_a_task_cancelled_mid_call_by_wait_for_is_charged_its_estimate(url: str | None, name: str) -> None:
    running = asyncio.Event()

    async def call() -> None:
        running.set()
        await asyncio.Event().wait()  # the provider never answers

    async with _shared(url, name) as s:
        task = await s.start_task(call(), estimated_tokens=200)
        await asyncio.wait_for(running.wait(), timeout=10)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(task, timeout=0.05)
        assert task.cancelled()
        assert 400 - 1 <= _tokens_left(await s.limiter.status()) <= 400 + 10


async def test_cancelled_while_auto_backoff_pauses_the_fleet_charges_the_failed_attempt(
    redis_url: str | None, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xflow_dist import AsyncLimiter

    pausing = asyncio.Event()

    async def cooldown(self: AsyncLimiter, retry_after: float | None = None) -> Any:
        pausing.set()
        await asyncio.Event().wait()  # the cooldown request hangs: cancelled there

    monkeypatch.setattr(AsyncLimiter, "cooldown", cooldown)

    @auto_backoff(max_retries=3)
    async def call() -> None:
        raise RetryException("429", retry_after=5)

    async with _shared(redis_url, name) as s:
        task = await s.start_task(call(), estimated_tokens=200)
        await asyncio.wait_for(pausing.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 400 - 1 <= _tokens_left(await s.limiter.status()) <= 400 + 10


async def test_cancelled_while_the_retry_waits_for_a_slot_leaves_nothing_held(url: str | None, name: str) -> None:
    """The failed attempt's slot went to a waiter queued before it; the retry queues for the next
    one and is cancelled there: it leaves the queue and is charged nothing."""
    go = asyncio.Event()

    @auto_backoff(max_retries=3)
    async def call() -> None:
        await go.wait()
        raise RetryException("429", retry_after=0)  # 0: no pause, acquire again at once

    async with _shared(url, name) as s:
        holder = await s.limiter.acquire()  # one of the two slots; the task takes the other
        task = await s.start_task(call(), estimated_tokens=200)
        while (await s.limiter.status()).in_flight < 2:
            await asyncio.sleep(0.01)
        waiter = asyncio.ensure_future(s.limiter.acquire())
        for _ in range(500):  # bounded: 5 s
            if (await s.limiter.status()).queued == 1:
                break
            await asyncio.sleep(0.01)
        go.set()  # the attempt fails: its slot goes to the waiter, the retry queues for a slot
        granted = await asyncio.wait_for(waiter, timeout=10)
        for _ in range(500):
            if (await s.limiter.status()).queued == 1:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the retry never queued")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        status = await s.limiter.status()
        assert (status.queued, status.in_flight) == (0, 2)
        await granted.cancel()
        await holder.cancel()
        assert 400 - 1 <= _tokens_left(await s.limiter.status()) <= 400 + 10, "the failed attempt's estimate only"


async def test_cancelled_while_report_token_usage_settles_the_settle_still_lands(
    redis_url: str | None, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xflow_dist import AsyncLimiter

    reporting = asyncio.Event()
    real_run = AsyncLimiter._run
    stalled: list[str] = []

    async def run(self: AsyncLimiter, op: str, argv: list[str]) -> Any:
        if op == "settle" and not stalled:  # the first settle hangs before it reaches Redis
            stalled.append(op)
            reporting.set()
            await asyncio.Event().wait()
        return await real_run(self, op, argv)

    monkeypatch.setattr(AsyncLimiter, "_run", run)

    async def call() -> None:
        await report_token_usage(50)

    async with _shared(redis_url, name) as s:
        task = await s.start_task(call(), estimated_tokens=200)
        await asyncio.wait_for(reporting.wait(), timeout=10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(500):  # bounded: the settle goes out again in the background
            status = await s.limiter.status()
            if status.in_flight == 0:
                break
            await asyncio.sleep(0.01)
        assert 550 - 1 <= _tokens_left(status) <= 550 + 10, "settled with the usage reported, not the estimate"


# --------------------------------------------------------------------------------------------
# Bad arguments raise before Redis is touched
# --------------------------------------------------------------------------------------------


async def test_bad_arguments_raise_before_redis_is_touched(redis_url: str | None, name: str) -> None:
    nowhere = "redis://127.0.0.1:1/0"  # nothing listens: any Redis call would be a BackendError
    for kwargs in (
        {"max_rps": -1},
        {"max_rps": 1, "max_rpm": 60},
        {"max_concurrency": 0},
        {"burst_ratio": float("nan")},
        {"redis": "http://localhost"},
        {"redis": redis.Redis.from_url(redis_url), "name": name},
        {"redis": nowhere},  # a shared budget needs a name
        {"name": "bad name!"},
    ):
        with pytest.raises(ConfigurationError):
            TokenRateScheduler(**kwargs)
    with pytest.raises(ValueError, match="max_concurrency"):
        TaskScheduler(0)
    s = TokenRateScheduler(max_tpm=6_000, redis=nowhere, name=name)
    coro = asyncio.sleep(0)
    with pytest.raises(InvalidCostError):
        await s.start_task(coro, estimated_tokens=-5)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    coro = asyncio.sleep(0)
    with pytest.raises(InvalidCostError):
        await s.start_task(coro, estimated_tokens=float("inf"))
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    with pytest.raises(InvalidTaskError):
        await s.start_task(lambda: None)  # type: ignore[arg-type]
    assert issubclass(InvalidTaskError, TypeError)
    await s.aclose()


# --------------------------------------------------------------------------------------------
# kv_batch and async_pipeline: XtremeFlow's semantics
# --------------------------------------------------------------------------------------------


class _Log:
    def __init__(self) -> None:
        self.events: list[str] = []
        self.running = self.peak = 0

    async def call(self, label: str, delay: float = 0.05, fail: bool = False) -> str:
        self.events.append(f"start {label}")
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(delay)
            if fail:
                raise RuntimeError(label)
        finally:
            self.running -= 1
        self.events.append(f"end {label}")
        return label


async def test_kv_batch_runs_the_first_alone_then_the_rest_together() -> None:
    log = _Log()
    assert await kv_batch(log.call(x) for x in "abcd") == ["a", "b", "c", "d"]
    assert log.events[:2] == ["start a", "end a"] and log.peak == 3

    async def source() -> Any:
        for x in "xyz":
            yield log.call(x)

    log = _Log()
    assert await kv_batch(source()) == ["x", "y", "z"]
    assert log.events[:2] == ["start x", "end x"] and log.peak == 2
    assert await kv_batch([]) == []


async def test_kv_batch_failures_close_or_cancel_the_rest() -> None:
    log = _Log()
    rest = [log.call("b"), log.call("c")]
    with pytest.raises(RuntimeError, match="a"):
        await kv_batch([log.call("a", fail=True), *rest])
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in rest)  # never "never awaited"

    log = _Log()
    with pytest.raises(RuntimeError, match="b"):
        await kv_batch([log.call("a"), log.call("b", delay=0.01, fail=True), log.call("c", delay=5)])
    assert "end c" not in log.events and log.running == 0  # c was cancelled, not orphaned

    coros = [log.call("a"), log.call("b")]
    with pytest.raises(InvalidTaskError, match="coroutines"):
        kv_batch([*coros, asyncio.sleep])  # type: ignore[list-item]
    assert all(inspect.getcoroutinestate(c) == inspect.CORO_CLOSED for c in coros)
    gc.collect()


async def test_kv_batch_errors_say_what_xtremeflow_said() -> None:
    async def ok() -> str:
        return "ok"

    with pytest.raises(TypeError, match=r"^kv_batch rest elements must be coroutines, got Task$"):
        await kv_batch([ok(), asyncio.ensure_future(ok())])

    async def source() -> Any:
        yield ok()
        yield asyncio.ensure_future(ok())

    with pytest.raises(TypeError, match=r"^a coroutine was expected, got <Task"):
        await kv_batch(source())
    with pytest.raises(TypeError, match=r"must be an iterable, not int$"):
        kv_batch(5)  # type: ignore[arg-type]
    gc.collect()


def test_a_concurrency_below_one_is_refused_in_xtremeflows_words() -> None:
    for bad in (0, -2):
        with pytest.raises(ValueError, match=f"^max_concurrency must be positive, got {bad}$"):
            TaskScheduler(bad)
        with pytest.raises(ConfigurationError, match="must be positive"):
            TokenRateScheduler(max_tps=10, max_concurrency=bad)


async def test_async_pipeline_one_worker_keeps_order() -> None:
    async def producer(q: asyncio.Queue[Any]) -> None:
        for i in range(5):
            await q.put(i)
        await q.put(None)  # an ordinary item here (XtremeFlow took None for the end)

    async def double(x: int | None) -> int | None:
        await asyncio.sleep(0.01 * (5 - (x or 0)))
        return None if x is None else x * 2

    assert [r async for r in async_pipeline(producer, double)] == [0, 2, 4, 6, 8, None]
    assert [r async for r in async_pipeline(producer)] == [0, 1, 2, 3, 4, None]


async def test_async_pipeline_workers_run_concurrently_and_scale_with_max_workers() -> None:
    log = _Log()

    async def producer(q: asyncio.Queue[Any]) -> None:
        for i in range(12):
            await q.put(str(i))

    async def process(label: str) -> str:
        return await log.call(label, delay=0.1)

    got = [r async for r in async_pipeline(producer, process, workers=3)]
    assert sorted(got, key=int) == [str(i) for i in range(12)] and log.peak == 3

    log = _Log()
    got = [
        r async for r in async_pipeline(producer, process, workers=1, max_workers=6, load_factor=2, check_interval=0.05)
    ]
    assert len(got) == 12 and 1 < log.peak <= 6


async def test_async_pipeline_errors_propagate_and_early_close_stops_everything() -> None:
    async def failing_producer(q: asyncio.Queue[Any]) -> None:
        await q.put(1)
        raise ValueError("producer broke")

    for workers in (1, 2):
        with pytest.raises(ValueError, match="producer broke"):
            [r async for r in async_pipeline(failing_producer, workers=workers)]

    async def endless(q: asyncio.Queue[Any]) -> None:
        i = 0
        while True:
            await q.put(i)
            i += 1
            await asyncio.sleep(0)

    async def picky(x: int) -> int:
        if x == 3:
            raise KeyError(x)
        return x

    for workers in (1, 3):
        with pytest.raises(KeyError):
            [r async for r in async_pipeline(endless, picky, workers=workers)]

    pipeline = async_pipeline(endless, workers=2)
    assert await anext(pipeline) == 0
    await pipeline.aclose()  # cancels the producer and the workers: nothing left running
    await asyncio.sleep(0.05)
    assert {t.get_coro().__name__ for t in asyncio.all_tasks()} <= {  # type: ignore[union-attr]
        "test_async_pipeline_errors_propagate_and_early_close_stops_everything"
    }

    with pytest.warns(UserWarning, match="Max workers"):
        assert sorted([r async for r in async_pipeline(_three, workers=2, max_workers=1)]) == [0, 1, 2]
    with pytest.raises(ConfigurationError):
        await anext(async_pipeline(_three, workers=0))


async def _three(q: asyncio.Queue[Any]) -> None:
    for i in range(3):
        await q.put(i)


# --------------------------------------------------------------------------------------------
# The README's example, in one process and in two sharing one budget on the real redis-server
# --------------------------------------------------------------------------------------------

_README_URL_LINE = 'redis="redis://localhost:6379/0", name="llm:team-a",'

# Runs a README block with report_token_usage wrapped to stamp each call (wall clock: the
# processes share the host's), after the parent says go, so that both processes start together.
_DRIVER = """
import json, sys, time
import xflow_dist.compat as compat

stamps = []
_report = compat.report_token_usage

async def report_token_usage(actual):
    stamps.append(time.time())
    await _report(actual)

compat.report_token_usage = report_token_usage
code = open(sys.argv[1]).read()
print("ready", flush=True)
sys.stdin.readline()
exec(compile(code, "README.md", "exec"), {"__name__": "__main__"})
with open(sys.argv[2], "w") as out:
    json.dump(stamps, out)
"""


def _readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Coming from XtremeFlow", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.DOTALL)
    assert len(blocks) == 1, "the XtremeFlow section has one example"
    assert _README_URL_LINE in blocks[0]
    return blocks[0]


def _run_example(code: str, processes: int, tmp_path: Path) -> list[float]:
    script = tmp_path / "example.py"
    script.write_text(code)
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    outs = [tmp_path / f"stamps-{i}.json" for i in range(processes)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(driver), str(script), str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for out in outs
    ]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            stdout, stderr = p.communicate(timeout=60)
            assert p.returncode == 0, stderr
            assert re.fullmatch(r"15 answers in [\d.]+s\n", stdout), stdout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return sorted(stamp for out in outs for stamp in json.loads(out.read_text()))


def _check_rate(stamps: list[float], calls: int) -> None:
    """10 calls a second in all: in any window of w seconds at most 10 * w + 1 (and slack)."""
    assert len(stamps) == calls
    assert stamps[-1] - stamps[0] >= (calls - 1) / 10 - SLACK
    _spaced(stamps, 1 / 10)


@pytest.mark.timeout(120)
def test_readme_example_in_one_process(redis_url: str | None, name: str, tmp_path: Path) -> None:
    code = _readme_example()
    shared = code.replace(_README_URL_LINE, f'redis="{redis_url}", name="{name}",')
    _check_rate(_run_example(shared, 1, tmp_path), 15)
    in_memory = "\n".join(line for line in code.splitlines() if _README_URL_LINE not in line)
    _check_rate(_run_example(in_memory, 1, tmp_path), 15)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_readme_example_in_two_processes_sharing_one_budget(
    redis_url: str, real_redis: bool, name: str, tmp_path: Path
) -> None:
    if not real_redis:
        pytest.skip("two processes need the real redis-server")
    code = _readme_example().replace(_README_URL_LINE, f'redis="{redis_url}", name="{name}",')
    _check_rate(_run_example(code, 2, tmp_path), 30)  # 10 a second between them, not each


async def test_hundreds_of_tasks_at_once_queue_for_redis_connections_instead_of_failing(
    redis_url: str | None, name: str
) -> None:
    # redis-py's default pool raises past 100 connections in use; the limiter's pool makes them wait
    async def job() -> None:
        await asyncio.sleep(0)

    async with RequestRateScheduler(max_rps=10_000, max_concurrency=1_000, redis=redis_url, name=name) as s:
        await (await s.start_task(job()))  # connected and listening: the next ones all run at once
        tasks = [await s.start_task(job()) for _ in range(300)]
        results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if r is not None] == []
    assert s.total_completed == 301
