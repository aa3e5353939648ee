"""Cooldowns are capped (``CooldownPolicy.max_pause``) and can be cleared (``clear_cooldown``)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import pytest
import redis
from _helpers import Ops, ops

from xflow_dist import AsyncLimiter, Budget, ConfigurationError, CooldownPolicy, CooldownReply, Limiter
from xflow_dist._core import cooldown_args, decode_clear_cooldown


@pytest.mark.parametrize(
    "kwargs",
    [{"max_pause": 0}, {"max_pause": -1}, {"max_pause": math.inf}, {"max_pause": math.nan}, {"max_pause": 30}],
)
def test_a_bad_max_pause_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError, match="max_pause"):
        CooldownPolicy(**kwargs)  # 30 s is below the default max_backoff (60 s)


def test_the_default_cap_is_five_minutes() -> None:
    assert CooldownPolicy().max_pause == 300.0
    assert CooldownPolicy(max_backoff=10, max_pause=10).max_pause == 10


def test_the_script_caps_a_long_retry_after(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10)
    policy = CooldownPolicy(max_backoff=2.0, max_pause=5.0, jitter=0.5)
    c = o.cooldown(3600.0, draw=0.99, policy=policy)  # jitter would lengthen it past the cap too
    assert c.remaining == pytest.approx(5.0, abs=0.01)
    assert o.status().cooldown_remaining <= 5.0


def test_the_script_still_honours_a_retry_after_below_the_cap(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10)
    c = o.cooldown(120.0, draw=0.0, policy=CooldownPolicy(jitter=0.0))
    assert c.remaining == pytest.approx(120.0, abs=0.01)  # above max_backoff (60 s): still in full


@pytest.mark.parametrize("bad", ["0", "-1", "inf", "nan", "x"])
def test_the_script_refuses_a_bad_max_pause_and_writes_nothing(rclient: redis.Redis, name: str, bad: str) -> None:
    o = ops(rclient, name, rps=10)
    argv = cooldown_args(CooldownPolicy(), 10.0, 0.0)
    argv[6] = bad
    with pytest.raises(redis.ResponseError, match="max pause"):
        o.run("cooldown", argv)
    assert list(rclient.scan_iter(match=f"{{xflow:{name}}}*")) == []


def test_the_limiter_caps_and_warns_once(redis_url: str, name: str, caplog: pytest.LogCaptureFixture) -> None:
    policy = CooldownPolicy(max_pause=120.0, jitter=0.0)
    with Limiter(Budget(name, rps=10), redis_url, cooldown_policy=policy) as lim, caplog.at_level(logging.DEBUG):
        first = lim.cooldown(retry_after=86_400)
        lim.cooldown(retry_after=7_200)
    assert first.remaining == pytest.approx(120.0, abs=0.01)
    capped = [r for r in caplog.records if "max_pause" in r.getMessage()]
    assert [r.levelno for r in capped] == [logging.WARNING, logging.DEBUG]
    assert "86400" in capped[0].getMessage()


async def test_the_async_limiter_caps_too(redis_url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, rps=10), redis_url, cooldown_policy=CooldownPolicy(jitter=0.0)) as lim:
        reply = await lim.cooldown(retry_after=3_600)
    assert reply.remaining == pytest.approx(300.0, abs=0.01)


def _clear(o: Ops) -> CooldownReply:
    return decode_clear_cooldown(o.run("clear_cooldown", []))


def test_clearing_ends_the_pause_and_resets_the_backoff_but_not_the_buckets(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, burst=10)  # a full bucket holds 100 requests
    policy = CooldownPolicy(base=0.2, max_backoff=5.0, quiet=60.0, jitter=0.0)
    first = o.cooldown(0.2, policy=policy)
    o.wait_redis_until(first.until)
    second = o.cooldown(None, policy=policy)  # a repeat within the quiet period: level 1
    assert second.level == 1
    cleared = _clear(o)
    assert cleared.until == pytest.approx(second.until) and cleared.level == 1
    s = o.status()
    assert s.cooldown_remaining == 0 and s.backoff_level == 0
    assert s.requests_available is not None and s.requests_available < 10  # the 429 emptied it: still so
    third = o.cooldown(None, policy=policy)  # a first 429 again: the quiet period was reset too
    assert third.level == 0
    assert third.remaining == pytest.approx(0.2, abs=0.01)


def test_clearing_without_a_pause_is_harmless(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10)
    cleared = _clear(o)
    assert cleared.remaining == 0
    assert o.acquire()[1].kind == "granted"


def test_clearing_tells_the_head_and_announces_the_end(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100, burst=1)
    pubsub = rclient.pubsub()
    pubsub.subscribe(f"{{xflow:{name}}}:events")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    c = o.cooldown(60.0)
    waiting, q = o.acquire()
    assert q.kind == "queued" and q.now + q.wait == pytest.approx(c.until, abs=0.01)
    seen = [pubsub.get_message(timeout=2)["data"].decode().split() for _ in range(2)]
    assert seen[0][0] == "c" and seen[1][:2] == ["h", waiting]
    cleared = _clear(o)
    told = pubsub.get_message(timeout=2)["data"].decode().split()
    assert told[:2] == ["h", waiting]  # its fit is the refill of one request, not the old deadline
    assert float(told[2]) - float(told[3]) < 0.1
    end = pubsub.get_message(timeout=2)["data"].decode().split()
    assert end == ["c", f"{cleared.now:.6f}", f"{cleared.now:.6f}"]
    pubsub.close()


def test_a_waiter_comes_back_when_another_process_clears_the_cooldown(redis_url: str, name: str) -> None:
    budget = Budget(name, rps=100, burst=1)
    with Limiter(budget, redis_url) as waiter, Limiter(budget, redis_url) as operator:
        operator.cooldown(retry_after=60)
        got: list[float] = []

        def wait() -> None:
            started = time.monotonic()
            waiter.acquire(timeout=90).release()  # queued: the pause ends within the timeout
            got.append(time.monotonic() - started)

        t = threading.Thread(target=wait, daemon=True)
        t.start()
        for _ in range(200):  # bounded: until the waiter is queued
            if operator.status().queued == 1:
                break
            time.sleep(0.01)
        assert operator.status().queued == 1
        cleared = operator.clear_cooldown()
        t.join(timeout=20)
        assert cleared.remaining > 50
        assert got and got[0] < 5.0  # not the 60 s pause
        assert operator.status().cooldown_remaining == 0


async def test_the_async_limiter_clears_too(redis_url: str, name: str) -> None:
    budget = Budget(name, rps=100, burst=1)
    async with AsyncLimiter(budget, redis_url) as waiter, AsyncLimiter(budget, redis_url) as operator:
        await operator.cooldown(retry_after=60)
        started = time.monotonic()

        async def wait() -> object:
            return await waiter.acquire(timeout=90)

        task = asyncio.create_task(wait())
        for _ in range(200):
            if (await operator.status()).queued == 1:
                break
            await asyncio.sleep(0.01)
        cleared = await operator.clear_cooldown()
        lease = await asyncio.wait_for(task, 20)
        await lease.release()
    assert cleared.remaining > 50 and cleared.level == 0
    assert time.monotonic() - started < 5.0
