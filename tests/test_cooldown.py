"""Cooldowns are capped (``CooldownPolicy.max_pause``) and can be cleared (``clear_cooldown``)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time

import pytest
import redis

from _helpers import ops
from xflow_dist import AsyncLimiter, Budget, ConfigurationError, CooldownPolicy, Limiter
from xflow_dist._core import cooldown_args


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
    with Limiter(Budget(name, rps=10), redis_url, cooldown_policy=policy) as lim:
        with caplog.at_level(logging.DEBUG, logger="xflow_dist"):
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
