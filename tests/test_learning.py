"""Learning from the provider: limits shared by the fleet, rescaled buckets, the probe, corrections.

On the spawned redis-server and on ``memory://`` (``url``), and across real processes where the
claim is about sharing.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import redis
from _helpers import Ops, ops

from xflow_dist import (
    AsyncLimiter,
    Budget,
    CostTooLargeError,
    InvalidCostError,
    Limiter,
)
from xflow_dist._core import (
    LEARN_MEMORY,
    channel,
    decode_settle,
    keys,
    settle_args,
)
from xflow_dist._headers import parse_limit_headers

# ---- sharing -----------------------------------------------------------------------------------


def test_a_second_limiter_uses_what_the_first_learned(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=8, burst=60)
    with Limiter(budget, url) as first, Limiter(budget, url) as second:
        assert second.status().rpm is None and second.status().tpm is None  # nothing known: not limited
        with first.acquire(tokens=100) as lease:
            reply = lease.report(actual_tokens=100, limit_requests=600, limit_tokens=6_000)
        assert reply is not None and (reply.rpm, reply.tpm) == (600, 6_000)
        s = second.status()
        assert (s.rpm, s.tpm, s.learned_rpm, s.learned_tpm) == (600, 6_000, 600, 6_000)
        # the second limiter draws on the learned bucket: a minute of 100 tokens/s, less the 100 granted
        assert s.tokens_available == pytest.approx(6_000 - 100, abs=30)
        assert not second.try_acquire(tokens=6_000)  # more than is left
        assert second.try_acquire(tokens=5_000)


def test_limits_learned_in_another_process_apply_here(redis_url: str, name: str) -> None:
    code = (
        "import sys\n"
        "from xflow_dist import Budget, Limiter\n"
        "with Limiter(Budget(sys.argv[1], rpm=6_000, tpm=600_000), sys.argv[2]) as lim:\n"
        "    with lim.acquire(tokens=10) as lease:\n"
        "        lease.report(actual_tokens=10, limit_requests=120, limit_tokens=6000)\n"
    )
    subprocess.run([sys.executable, "-c", code, name, redis_url], check=True, timeout=60)
    with Limiter(Budget(name, rpm=6_000, tpm=600_000), redis_url) as here:
        s = here.status()
        assert (s.rpm, s.tpm) == (120, 6_000)  # min(configured, learned)
        # this process (same limits: other ones are refused), configured 50x higher than the provider's,
        # is held to the learned pace of one request per 0.5 s
        here.acquire(timeout=5).release()  # (after the debt the other process's grant left at that pace)
        refused = here.try_acquire()
        assert not refused and refused.retry_after == pytest.approx(0.5, abs=0.1)


# ---- min(configured, learned), tightening and relaxing ---------------------------------------------


def test_limits_in_force_are_the_configured_ones_lowered_to_the_learned(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rpm=600, tpm=60_000, burst=1)
    lid, _ = o.acquire(tokens=10)
    reply = o.settle(lid, 10, limit_requests=1_200, limit_tokens=30_000)
    assert (reply.rpm, reply.tpm) == (600, 30_000)  # never above the budget's own; lowered to the provider's
    s = o.status()
    assert (s.rpm, s.tpm, s.learned_rpm, s.learned_tpm) == (600, 30_000, 1_200, 30_000)
    lid, _ = o.acquire()
    reply = o.settle(lid, None, limit_requests=300)
    assert (reply.rpm, reply.tpm) == (300, 30_000)  # one dimension reported: the other is kept
    lid, _ = o.acquire()
    assert o.settle(lid, None, limit_requests=6_000, limit_tokens=120_000).rpm == 600  # relaxed to the budget's


def test_tightening_keeps_the_debt_and_relaxing_keeps_the_level(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=10, burst=100)  # 1,000 tokens of credit
    a, _ = o.acquire(tokens=400)  # level 600: a debt of 400 tokens
    b, _ = o.acquire(tokens=100)  # level 500
    # 5 tokens/s: the capacity is 500 and the debt of 500 stays, so the bucket is empty
    assert o.settle(a, 400, limit_tokens=300).tpm == 300
    assert o.status().tokens_available == pytest.approx(0, abs=3)
    # 20 tokens/s reported: relaxed only up to the budget's own 10/s. The level stays where it was
    # (no credit from the larger capacity) and refills twice as fast as at 5/s.
    relaxed = o.settle(b, 100, limit_tokens=1_200)
    assert relaxed.tpm == 600
    first = o.status()
    assert first.tokens_available == pytest.approx(0, abs=5)
    time.sleep(0.3)
    then = o.status()
    assert then.tokens_available - first.tokens_available == pytest.approx(10 * (then.now - first.now), abs=0.1)


def test_learning_from_nothing_counts_what_was_granted(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, burst=100)  # no rates at all
    a, r1 = o.acquire(tokens=300)
    b, r2 = o.acquire(tokens=300)
    assert (r1.kind, r2.kind) == ("granted", "granted")
    # learned 10 tokens/s, capacity 1,000: the 600 granted while nothing was known are spent
    o.settle(a, 300, limit_tokens=600)
    assert o.status().tokens_available == pytest.approx(400, abs=3)
    # b was granted with no rate known: what the provider had left caps the level (plus one unit)
    o.settle(b, 300, remaining_tokens=150)
    assert o.status().tokens_available == pytest.approx(151, abs=3)


def test_a_stale_second_settle_teaches_limits_but_corrects_nothing(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=10, burst=100)
    a, _ = o.acquire(tokens=100)
    o.settle(a, 100)
    before = o.status().tokens_available
    again = o.settle(a, 100, remaining_tokens=0, limit_tokens=600)  # same rate: nothing to rescale
    assert not again.settled and again.tpm == 600
    assert o.status().tokens_available == pytest.approx(before, abs=3)
    assert o.status().learned_tpm == 600


# ---- never over-admit after a rate change ------------------------------------------------------------


def _grant_times(o: Ops, seconds: float) -> list[float]:
    """Take every request the budget grants for ``seconds`` (Redis time of each grant)."""
    times: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        lid, r = o.acquire(queue=False)
        if r.kind == "granted":
            times.append(r.start)
            o.settle(lid)
        else:
            time.sleep(0.003)
    return times


def _most_in_any_window(times: list[float], rate: float, capacity: float) -> float:
    """The largest excess over rate * w + capacity of the grants in any window (a, b] of them."""
    worst = -math.inf
    for i, a in enumerate(times):
        for j in range(i, len(times)):
            worst = max(worst, (j - i + 1) - (rate * (times[j] - a) + capacity))
    return worst


@pytest.mark.parametrize(("learned_rpm", "rate"), [(600, 10.0), (1_800, 30.0)])
def test_no_over_admission_after_a_rate_change(rclient: redis.Redis, name: str, learned_rpm: int, rate: float) -> None:
    o = ops(rclient, name, rps=20, burst=1)  # 20 requests of credit
    lid, _ = o.acquire()
    o.settle(lid, None, limit_requests=600)  # tighter: 10/s, capacity 10
    before = _grant_times(o, 0.4)
    lid, r = o.acquire(queue=False)
    while r.kind != "granted":
        time.sleep(0.01)
        lid, r = o.acquire(queue=False)
    changed = r.start
    o.settle(lid, None, limit_requests=learned_rpm)  # 10/s again, or looser: 30/s (capped by the 20 configured)
    after = _grant_times(o, 0.8)
    in_force = min(20.0, rate)
    assert after, "nothing granted after the change"
    # Everything granted since the change fits the capacity at the change plus the new rate...
    span = after[-1] - changed
    assert len(after) + 1 <= 10 + in_force * span + 1
    # ...and every window of grants fits the limits in force, before and after.
    assert _most_in_any_window(before, 10.0, 10.0) <= 1e-6
    assert _most_in_any_window([changed, *after], in_force, in_force * 1.0) <= 1e-6


# ---- the probe -----------------------------------------------------------------------------------------


def test_the_probe_grants_one_call_until_the_first_reply_teaches_the_limits(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=4, burst=60, probe=True)
    with Limiter(budget, url) as lim:
        probe = lim.acquire(tokens=100)
        assert lim.status().probing
        assert not lim.try_acquire(tokens=1)  # refused: the probe is in flight (a slot, no retry_after)
        got: list[float] = []

        def wait() -> None:
            lease = lim.acquire(tokens=100)
            got.append(time.monotonic())
            lease.release()

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.3)
        assert got == []  # still waiting for the probe's reply
        t0 = time.monotonic()
        probe.report(
            actual_tokens=80, remaining_requests=59, remaining_tokens=5_900, limit_requests=60, limit_tokens=6_000
        )
        waiter.join(timeout=5)
        assert got and got[0] - t0 < 0.5  # woken by the settle, not by a poll
        s = lim.status()
        assert not s.probing and (s.rpm, s.tpm) == (60, 6_000)
        leases = [lim.acquire(tokens=10) for _ in range(3)]  # the slots are open again
        assert lim.status().in_flight == 3
        for lease in leases:
            lease.release()


def test_a_probe_settled_without_limits_ends_the_probe(url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=4, probe=True), url) as lim:
        lim.acquire().release()
        leases = [lim.acquire() for _ in range(4)]
        s = lim.status()
        assert not s.probing and s.in_flight == 4 and s.rpm is None
        for lease in leases:
            lease.release()


def test_no_probe_once_limits_are_known(url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=4), url) as learner:
        learner.learn(limit_requests=600)
    with Limiter(Budget(name, max_concurrency=4, probe=True), url) as lim:
        leases = [lim.acquire() for _ in range(2)]
        assert not lim.status().probing
        for lease in leases:
            lease.release()


# ---- the queue after a rate change --------------------------------------------------------------------


def _head_notices(pubsub: Any, lease_id: str, seconds: float) -> list[float]:
    found: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        msg = pubsub.get_message(timeout=0.05)
        if msg and msg["type"] == "message":
            words = msg["data"].decode().split()
            if words[:2] == ["h", lease_id]:
                found.append(float(words[2]))
    return found


def test_a_rate_change_tells_the_head_its_new_fit_time(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, burst=1)
    decode_settle(o.run("settle", settle_args("", None, None, None, None, 6_000)))  # learned: 100/s, 100 of credit
    pubsub = rclient.pubsub()
    pubsub.subscribe(channel(o.budget))
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    try:
        holder, _ = o.acquire(tokens=100)
        head, q = o.acquire(tokens=100)
        tat = q.now + q.wait  # the head needs a full bucket: it fits when the bucket's debt is paid
        assert q.kind == "queued" and q.wait == pytest.approx(1.0, abs=0.05)
        assert _head_notices(pubsub, head, 0.2) == [pytest.approx(tat, abs=1e-5)]
        # tighter, 50 tokens/s: the capacity is 50 (the head needs a full bucket) and the debt left,
        # in tokens, refills at half the speed: the head is told its later fit at once
        learned = o.settle(holder, 100, limit_tokens=3_000)
        assert learned.tpm == 3_000
        (fit,) = _head_notices(pubsub, head, 0.3)
        assert fit == pytest.approx(learned.now + 2 * (tat - learned.now), abs=1e-4)
        assert o.acquire(tokens=100, lease_id=head)[1].kind == "queued"  # not before its new time
        # looser again, 200 tokens/s: the level stays and refills 4x as fast; told at once again
        relaxed = decode_settle(o.run("settle", settle_args("", None, None, None, None, 12_000)))
        assert relaxed.tpm == 12_000
        (sooner,) = _head_notices(pubsub, head, 0.3)
        level = 50 - 50 * (fit - relaxed.now)  # at the moment of the change, at 50/s
        assert sooner == pytest.approx(relaxed.now + (100 - level) / 200, abs=1e-4)
        while o.acquire(tokens=100, lease_id=head)[1].kind != "granted":  # granted when it comes back then
            assert time.time() < sooner + 1.0
            time.sleep(0.02)
    finally:
        pubsub.close()


@pytest.mark.parametrize(("learned_tpm", "earliest", "latest"), [(24_000, 0.25, 0.7), (3_000, 1.6, 3.0)])
def test_a_sleeping_waiter_follows_its_new_fit_time(
    url: str, name: str, learned_tpm: int, earliest: float, latest: float
) -> None:
    with Limiter(Budget(name, burst=1), url) as lim:
        lim.learn(limit_tokens=6_000)  # 100 tokens/s, 100 of credit
        lim.acquire(tokens=100).release()  # empty: 100 more fit in 1 s
        done: list[float] = []
        t0 = time.monotonic()
        thread = threading.Thread(target=lambda: (lim.acquire(tokens=100).release(), done.append(time.monotonic())))
        thread.start()
        time.sleep(0.15)
        # 400/s: the ~15 there are kept and the rest refills in ~0.2 s; 50/s: the debt takes ~1.7 s
        # more and the head needs only a full bucket of 50. Either way the waiter is told and follows.
        lim.learn(limit_tokens=learned_tpm)
        thread.join(timeout=5)
        assert done and earliest <= done[0] - t0 < latest


# ---- guarantees at the edges ------------------------------------------------------------------------------


def test_a_cost_the_learned_limits_can_never_grant_is_refused(url: str, name: str) -> None:
    with Limiter(Budget(name, burst=1), url) as lim:
        lim.learn(limit_tokens=600)  # 10 tokens/s: at most a minute's 600 tokens at once
        with pytest.raises(CostTooLargeError) as info:
            lim.acquire(tokens=601)
        assert "600" in str(info.value) and info.value.budget == name
        with pytest.raises(CostTooLargeError):
            lim.try_acquire(tokens=601)
        assert lim.status().in_flight == 0 and lim.status().queued == 0
        lim.acquire(tokens=600).release()  # a full minute still fits (after its wait, none here)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"limit_requests": 0},
        {"limit_tokens": -1},
        {"limit_tokens": math.nan},
        {"limit_requests": math.inf},
        {"limit_tokens": True},
        {"limit_tokens": "600"},
        {"remaining_tokens": -1},
    ],
)
def test_bad_facts_are_refused_before_redis(client: redis.Redis, redis_url: str, name: str, kwargs: dict) -> None:
    with Limiter(Budget(name), redis_url) as lim:
        lease = lim.acquire()
        with pytest.raises(InvalidCostError):
            lease.report(1, **kwargs)
        with pytest.raises(InvalidCostError):
            lease.release(**kwargs)
        assert not lease.closed  # still held: nothing was sent
        lease.release()
    with Limiter(Budget(f"{name}-b"), redis_url) as lim:
        with pytest.raises(InvalidCostError):
            lim.learn(**kwargs)
        with pytest.raises(InvalidCostError):
            lim.learn("x-ratelimit-limit-tokens: 6000")  # type: ignore[arg-type]
    assert list(client.scan_iter(match=f"{{xflow:{name}-b}}*")) == []


def test_learned_limits_outlive_the_idle_grace(client: redis.Redis, redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rps=10, lease_ttl=2), redis_url) as lim:
        lim.acquire().release()
        # the lease's 2 s, then the idle grace of 10 s and at most half a grace more
        assert 0 < client.pttl(keys(lim.budget)[0]) <= 17_000
        lim.learn(limit_requests=300)
        assert LEARN_MEMORY * 1000 - 5_000 < client.pttl(keys(lim.budget)[0]) <= (LEARN_MEMORY + 15) * 1000 + 2


def test_learn_takes_parsed_headers(url: str, name: str) -> None:
    facts = parse_limit_headers(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-limit-tokens": "0",  # an odd header is no fact
            "x-ratelimit-remaining-requests": "5",
        }
    )
    with Limiter(Budget(name, burst=60), url) as lim:
        reply = lim.learn(facts)
        assert not reply.settled and (reply.rpm, reply.tpm) == (60, None)
        assert lim.status().requests_available == pytest.approx(6, abs=0.5)  # capped at 5 left, plus a unit
        assert lim.learn(facts, limit_requests=120).rpm == 120  # a keyword overrides the headers


OPENAI_REPLY = {
    "X-RateLimit-Limit-Requests": "600",
    "X-RateLimit-Limit-Tokens": "60000",
    "X-RateLimit-Remaining-Requests": "599",
    "X-RateLimit-Remaining-Tokens": "30000",
    "X-RateLimit-Reset-Tokens": "30s",
}


def test_report_takes_the_replys_headers_in_one_step(url: str, name: str) -> None:
    with Limiter(Budget(name, burst=60), url) as lim:
        with lim.acquire(tokens=100) as lease:
            reply = lease.report(100, headers=OPENAI_REPLY)
        assert reply is not None and (reply.rpm, reply.tpm) == (600, 60_000)
        s = lim.status()
        assert (s.learned_rpm, s.learned_tpm) == (600, 60_000)
        # the level is corrected down to what the provider had left (30,000), not a full minute
        assert s.tokens_available == pytest.approx(30_000, abs=50)


def test_release_takes_anthropic_headers_and_a_keyword_overrides_them(url: str, name: str) -> None:
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-tokens-limit": "40000"}
    with Limiter(Budget(name, burst=60), url) as lim:
        reply = lim.acquire(tokens=10).release(headers=headers, limit_tokens=20_000)
        assert reply is not None and (reply.rpm, reply.tpm) == (50, 20_000)
        assert lim.learn(headers={"x-ratelimit-limit-requests": "40"}).rpm == 40  # no lease: the same word


def test_a_nonsense_header_teaches_nothing(url: str, name: str) -> None:
    with Limiter(Budget(name, burst=60), url) as lim:
        odd = {"x-ratelimit-limit-tokens": "-5", "x-ratelimit-limit-requests": "nan"}
        odd["x-ratelimit-remaining-tokens"] = "x"
        reply = lim.acquire().report(1, headers=odd)  # a provider's odd reply must not fail the caller's call
        assert reply is not None and (reply.rpm, reply.tpm) == (None, None)


def test_headers_not_a_mapping_are_refused_before_redis(client: redis.Redis, redis_url: str, name: str) -> None:
    headers: Any = "x-ratelimit-limit-tokens: 6000"
    with Limiter(Budget(name), redis_url) as lim:
        lease = lim.acquire()
        with pytest.raises(InvalidCostError):
            lease.report(1, headers=headers)
        assert not lease.closed  # still held: nothing was sent
        lease.release()
    with Limiter(Budget(f"{name}-b"), redis_url) as lim:
        with pytest.raises(InvalidCostError):
            lim.learn(headers=headers)
        with pytest.raises(InvalidCostError):
            lim.learn(parse_limit_headers(OPENAI_REPLY), headers=OPENAI_REPLY)  # one or the other
    assert list(client.scan_iter(match=f"{{xflow:{name}-b}}*")) == []


# ---- the remaining-correction alongside learning ------------------------------------------------------------


def test_the_correction_counts_a_tighter_rates_drop(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=10, burst=100)  # 1,000 tokens of credit
    a, _ = o.acquire(tokens=100)  # level 900 after a
    b, _ = o.acquire(tokens=100)  # level 800
    # 5/s: capacity 500, the level drops by 500 to 300. The provider had 400 left after a, and b
    # may have reached it first: our 300 is not ahead of it, nothing more is taken off.
    o.settle(a, 100, remaining_tokens=400, limit_tokens=300)
    assert o.status().tokens_available == pytest.approx(300, abs=3)
    # b: the provider had 250 left after it; 300 - 250 - 1 = 49 is a lead
    o.settle(b, 100, remaining_tokens=250)
    assert o.status().tokens_available == pytest.approx(251, abs=3)


# ---- the async front ----------------------------------------------------------------------------------------


async def test_async_report_and_learn(url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=2, burst=60, probe=True), url) as lim:
        async with lim.acquire(tokens=50) as lease:
            assert (await lim.status()).probing
            waiter = asyncio.ensure_future(lim.acquire(tokens=50))
            await asyncio.sleep(0.2)
            assert not waiter.done()
            reply = await lease.report(actual_tokens=50, limit_requests=600, limit_tokens=60_000)
            assert reply is not None and reply.tpm == 60_000
            second = await asyncio.wait_for(waiter, 2)
            await second.release(limit_tokens=30_000)
        s = await lim.status()
        assert (s.rpm, s.tpm, s.probing) == (600, 30_000, False)
        assert (await lim.learn(limit_tokens=90_000)).tpm == 90_000
        async with lim.acquire(tokens=50) as lease:
            reply = await lease.report(50, headers={"x-ratelimit-limit-tokens": "80000"})
            assert reply is not None and reply.tpm == 80_000
        assert (await lim.learn(headers={"x-ratelimit-limit-tokens": "70000"})).tpm == 70_000


# ---- forgetting, and one learned limit per model -------------------------------------------------------------


def _learn(o: Ops, memory: float, model: str = "", **limits: float) -> Any:
    argv = settle_args("", None, None, None, limits.get("rpm"), limits.get("tpm"), memory, model=model)
    return decode_settle(o.run("settle", argv))


def test_a_learned_limit_is_forgotten_while_the_budget_is_in_use(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100, burst=1)
    learned = _learn(o, 0.5, rpm=600)  # 10/s, remembered 0.5 s
    assert learned.rpm == 600
    held, _ = o.acquire()  # the budget stays in use: its keys live on
    while o.acquire(queue=False)[1].kind == "granted":  # empty at 10/s
        pass
    empty = o.status()
    assert empty.requests_available < 1.5
    o.wait_redis_until(learned.now + 0.6)
    assert o.extend(held) is not None  # a script ran after the expiry
    s = o.status()
    assert (s.rpm, s.learned_rpm) == (6_000, None)  # back to the configured 100/s
    # The level kept at the expiry, refilled at 10/s until then: nothing from the larger capacity
    assert s.requests_available <= empty.requests_available + 10 * (s.now - empty.now) + 0.5
    assert s.requests_available < 20


def test_a_report_of_one_limit_does_not_renew_the_other(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100, tps=10_000, burst=1)
    first = _learn(o, 0.4, rpm=600, tpm=60_000)
    assert (first.rpm, first.tpm) == (600, 60_000)
    o.wait_redis_until(first.now + 0.2)
    _learn(o, 30.0, tpm=60_000)  # the token limit again: renewed; the request limit is not
    o.wait_redis_until(first.now + 0.5)
    s = o.status()
    assert (s.learned_rpm, s.learned_tpm) == (None, 60_000)
    assert (s.rpm, s.tpm) == (6_000, 60_000)


def test_two_models_on_one_budget_keep_the_tightest_limit(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, burst=1)
    for _ in range(3):  # replies of both models interleave: the budget must not flip between them
        assert _learn(o, 0.6, "small", tpm=6_000).tpm == 6_000
        assert _learn(o, 30.0, "large", tpm=60_000).tpm == 6_000
    assert o.status().learned_tpm == 6_000
    # each model relaxes or tightens only its own limit
    assert _learn(o, 30.0, "large", tpm=3_000).tpm == 3_000
    changed = _learn(o, 30.0, "large", tpm=60_000)
    assert changed.tpm == 6_000
    # the small model's limit, not reported again, is forgotten: the large one's is in force
    o.wait_redis_until(changed.now + 0.7)
    s = o.status()
    assert (s.tpm, s.learned_tpm) == (60_000, 60_000)
    assert set(rclient.hkeys(keys(o.budget)[5])) == {b"large", b"small"}  # expired, not yet dropped
    _learn(o, 30.0, "large", tpm=60_000)  # a report drops the expired entries
    assert rclient.hkeys(keys(o.budget)[5]) == [b"large"]


def test_the_learned_limits_key_shares_the_tag_and_lives_as_long_as_they_are_remembered(
    rclient: redis.Redis, name: str
) -> None:
    o = ops(rclient, name, rps=10)
    _learn(o, 120.0, "gpt-x", rpm=300)
    learned = keys(o.budget)[5]
    assert learned.startswith(f"{{xflow:{name}}}")
    assert 115_000 < rclient.pttl(learned) <= 135_002  # 120 s, the idle grace, at most half a grace more (+ rounding)
    assert rclient.pttl(keys(o.budget)[0]) == pytest.approx(rclient.pttl(learned), abs=1_000)


def test_the_model_name_is_checked_and_sent_last(name: str) -> None:
    from xflow_dist._base import LimiterBase

    base = LimiterBase(Budget(name))
    assert base._learn_args(None, 600, None, None, None, model="gpt-x")[-1] == "gpt-x"
    assert base._settle_args("id", 10, model="gpt-x")[-1] == "gpt-x"
    assert base._settle_args("id", 10)[-1] == ""
    with pytest.raises(InvalidCostError):
        base._settle_args("id", 10, model=3)  # type: ignore[arg-type]


def test_leases_and_the_transport_learn_per_model(redis_url: str, name: str) -> None:
    """Two models behind one budget, each reported with its own limits on every reply: the budget
    keeps the tighter one however the replies alternate (it flipped with each reply before)."""
    import httpx

    from xflow_dist.httpx import RateLimitedTransport

    limits = {"small": "60000", "large": "600000"}

    def provider(request: httpx.Request) -> httpx.Response:
        model = json.loads(request.content)["model"]
        headers = {"x-ratelimit-limit-tokens": limits[model], "x-ratelimit-limit-requests": "1000"}
        return httpx.Response(200, json={"usage": {"total_tokens": 10}}, headers=headers)

    with Limiter(Budget(name, tpm=1_000_000, burst=1), redis_url) as limiter:
        client = httpx.Client(transport=RateLimitedTransport(limiter, httpx.MockTransport(provider)))
        seen = []
        for model in ("small", "large", "small", "large"):
            client.post("https://api.example.test/v1/chat/completions", json={"model": model, "max_tokens": 5})
            seen.append(limiter.status().tpm)
        client.close()
        assert seen == [60_000, 60_000, 60_000, 60_000]
        with limiter.acquire(tokens=1) as lease:
            lease.report(1, limit_tokens=30_000, model="large")  # the large model tightened: it binds now
        assert limiter.status().tpm == 30_000
