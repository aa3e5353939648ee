"""The blocking front: leases, waits, timeouts, cooldowns and cleanup."""

from __future__ import annotations

import threading
import time

import pytest
import redis
from _helpers import budget_keys

from xflow_dist import (
    AcquireTimeout,
    Budget,
    ConfigurationError,
    CostTooLargeError,
    InvalidCostError,
    Limiter,
)


def test_acquire_report_settles_and_frees_the_slot(url: str, name: str) -> None:
    with Limiter(Budget(name, tps=10, burst=100, max_concurrency=2), url) as lim:
        with lim.acquire(tokens=600) as lease:
            assert lim.status().in_flight == 1
            reply = lease.report(actual_tokens=100)
            assert reply is not None and reply.refunded == pytest.approx(500)
            assert lease.report(actual_tokens=50) is None  # once only
        s = lim.status()
        assert s.in_flight == 0
        assert s.tokens_available == pytest.approx(900, abs=20)


def test_leaving_on_an_exception_settles_at_the_estimate(url: str, name: str) -> None:
    # 10 tokens/s of refill: the assertion holds on a loaded machine (1 token per 100 ms)
    with Limiter(Budget(name, tps=10, burst=100, max_concurrency=1), url) as lim:
        with pytest.raises(RuntimeError), lim.acquire(tokens=400):
            raise RuntimeError("provider down")
        s = lim.status()
        assert s.in_flight == 0
        assert s.tokens_available == pytest.approx(600, abs=20)  # the attempt is charged


def test_rate_wait_sleeps_once_until_the_reserved_start(url: str, name: str) -> None:
    with Limiter(Budget(name, rps=5), url) as lim:
        t0 = time.monotonic()
        for _ in range(4):
            lim.acquire().release()
        # even pacing at burst 0: starts at 0, 0.2, 0.4, 0.6 s
        assert 0.55 <= time.monotonic() - t0 < 1.5


def test_timeout_raises_at_once_when_the_start_is_known_to_be_too_late(url: str, name: str) -> None:
    with Limiter(Budget(name, tps=100, burst=1), url) as lim:
        lim.acquire(tokens=100).release()
        before = lim.status().tokens_available
        t0 = time.monotonic()
        with pytest.raises(AcquireTimeout) as info:
            lim.acquire(tokens=100, timeout=0.2)
        assert time.monotonic() - t0 < 0.2
        assert info.value.retry_after == pytest.approx(1.0, abs=0.1)
        assert lim.status().tokens_available >= before  # nothing was charged


def test_timeout_while_queued_for_a_slot_leaves_no_ticket(url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=1), url) as lim:
        held = lim.acquire()
        t0 = time.monotonic()
        with pytest.raises(AcquireTimeout):
            lim.acquire(timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert lim.status().queued == 0
        held.release()
        assert lim.status().in_flight == 0


def test_waiter_is_woken_by_a_release_in_another_thread(url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=1), url) as lim:
        held = lim.acquire()
        got: list[float] = []

        def waiter() -> None:
            with lim.acquire(timeout=10):
                got.append(time.monotonic())

        t = threading.Thread(target=waiter)
        t.start()
        deadline = time.monotonic() + 5
        while lim.status().queued == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        released = time.monotonic()
        held.release()
        t.join(timeout=10)
        assert got and got[0] - released < 0.5


def test_try_acquire_returns_a_decision(url: str, name: str) -> None:
    with Limiter(Budget(name, rps=1, max_concurrency=5), url) as lim:
        first = lim.try_acquire()
        assert first and first.lease is not None
        second = lim.try_acquire()
        assert not second and second.lease is None
        assert second.retry_after == pytest.approx(1.0, abs=0.1)
        first.lease.release()


def test_cooldown_from_another_process_moves_a_pending_start(redis_url: str, name: str) -> None:
    budget = Budget(name, rps=10)
    with Limiter(budget, redis_url) as waiting, Limiter(budget, redis.Redis.from_url(redis_url)) as other:
        for _ in range(3):
            waiting.acquire().release()
        started: list[float] = []

        def late() -> None:  # reserved for ~0.3 s from now
            with waiting.acquire():
                started.append(time.monotonic())

        t = threading.Thread(target=late)
        t.start()
        time.sleep(0.05)
        pause = other.cooldown(retry_after=1.0)
        t0 = time.monotonic()
        t.join(timeout=10)
        assert started and started[0] - t0 >= pause.remaining - 0.05


def test_heartbeat_keeps_a_long_call_alive(url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=1, lease_ttl=0.6), url) as lim:
        with lim.acquire() as lease:
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.8:  # three TTLs
                assert lim.status().in_flight == 1
                assert not lim.try_acquire()
                time.sleep(0.1)
            assert not lease.lost
        assert lim.status().in_flight == 0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tokens": -1}, InvalidCostError),
        ({"tokens": float("nan")}, InvalidCostError),
        ({"tokens": float("inf")}, InvalidCostError),
        ({"tokens": 10_000_000}, CostTooLargeError),
        ({"tokens": 1, "timeout": -1}, ConfigurationError),
        ({"tokens": 1, "requests": -2}, InvalidCostError),
    ],
)
def test_bad_input_is_refused_before_redis_and_leaves_nothing(
    client: redis.Redis, redis_url: str, name: str, kwargs: dict[str, float], error: type[Exception]
) -> None:
    with Limiter(Budget(name, tpm=1_000, max_concurrency=1), redis_url) as lim:
        with pytest.raises(error):
            lim.acquire(**kwargs)
        if "timeout" not in kwargs:
            with pytest.raises(error):
                lim.try_acquire(**kwargs)
    assert budget_keys(client, name) == []


def test_bad_report_and_retry_after_are_refused(client: redis.Redis, redis_url: str, name: str) -> None:
    with Limiter(Budget(name, tpm=1_000), redis_url) as lim:
        lease = lim.acquire(tokens=10)
        with pytest.raises(InvalidCostError):
            lease.report(actual_tokens=-5)
        assert not lease.closed
        lease.report(actual_tokens=5)
        with pytest.raises(InvalidCostError):
            lim.cooldown(retry_after=float("nan"))


def test_wrong_client_kind_is_refused() -> None:
    import redis.asyncio

    with pytest.raises(ConfigurationError):
        Limiter(Budget("x"), redis.asyncio.Redis())
    with pytest.raises(ConfigurationError):
        Limiter(Budget("x"), "http://localhost")
    with pytest.raises(ConfigurationError):
        Limiter("x", "memory://")  # type: ignore[arg-type]


def test_a_client_passed_in_is_not_closed(redis_url: str, name: str) -> None:
    c = redis.Redis.from_url(redis_url)
    with Limiter(Budget(name, rps=100), c) as lim:
        lim.acquire().release()
    assert c.ping()
    c.close()


def test_a_per_minute_budget_keeps_its_dispatch_margin_back(url: str, name: str) -> None:
    """The README's configuration (the provider's limits, burst=60) holds 59.75 s of each rate: a
    quarter second stays back for the trip of a grant to the provider (docs/concepts/budgets-and-burst.md)."""
    with Limiter(Budget(name, rpm=600, tpm=60_000, burst=60), url) as lim:
        s = lim.status()
    assert s.requests_available == pytest.approx(597.5, abs=0.01)
    assert s.tokens_available == pytest.approx(59_750, abs=1)
    with Limiter(Budget(f"{name}-all", rpm=600, burst=60, dispatch_margin=0), url) as lim:
        assert lim.status().requests_available == pytest.approx(600, abs=0.01)
