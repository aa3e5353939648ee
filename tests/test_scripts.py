"""Behaviour of every Lua operation, on the spawned redis-server and on ``memory://``."""

from __future__ import annotations

import pytest
import redis
from _helpers import Ops, ops

from xflow_dist import CooldownPolicy
from xflow_dist._core import (
    settle_args,
)


def test_grant_within_burst_starts_now(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, tps=1_000, burst=1)
    for _ in range(10):
        _, r = o.acquire(tokens=10)
        assert r.kind == "granted"
        assert r.start == r.now


def test_overdraft_grants_once_out_of_debt_and_charges_the_whole_cost(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=100, burst=1)  # a bucket of 100 tokens
    _, r = o.acquire(tokens=7_000)  # more than a minute of the rate: never granted by default
    assert r.kind == "too_large"
    _, r = o.acquire(tokens=250, overdraft=True)  # the full bucket admits it; 150 tokens of debt
    assert r.kind == "granted"
    assert o.status().tokens_available == pytest.approx(-150, abs=2)
    _, r = o.acquire(tokens=1, overdraft=True, queue=False)  # in debt: not even one token
    assert r.kind == "refused" and r.retry_after == pytest.approx(1.5, abs=0.02)
    _, r = o.acquire(tokens=1, queue=False)  # nor by the default rule
    assert r.kind == "refused"
    ticket, r = o.acquire(tokens=7_000, overdraft=True)  # queued: out of debt in 1.5 s, then granted
    assert r.kind == "queued" and r.wait == pytest.approx(1.5, abs=0.02)
    o.wait_redis_until(r.now + r.wait)
    _, r = o.acquire(lease_id=ticket, tokens=7_000, overdraft=True)
    assert r.kind == "granted"
    assert o.status().tokens_available == pytest.approx(-7_000, abs=5)  # granted at 0 (out of debt)


def test_overdraft_lets_one_more_through_after_idle(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, burst=0.5)  # 5 requests of credit
    granted = [o.acquire(overdraft=True, queue=False)[1].kind for _ in range(7)]
    assert granted == ["granted"] * 6 + ["refused"]  # XtremeFlow's rate x burst_ratio + 1


def test_even_pacing_at_burst_zero_queues_the_next_for_one_interval(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10)
    assert o.acquire()[1].kind == "granted"
    ticket, r = o.acquire()
    # one request every 1/rate: the head of the queue is told exactly when it fits
    assert r.kind == "queued"
    assert r.wait == pytest.approx(0.1, abs=0.01)
    o.wait_redis_until(r.now + r.wait)
    again = o.acquire(lease_id=ticket)[1]
    assert again.kind == "granted"
    assert again.start >= r.now + r.wait - 1e-6  # never before the exact fit time


def test_a_head_granted_late_is_charged_as_of_its_fit_time(rclient: redis.Redis, name: str) -> None:
    # burst 0: no credit to absorb the head's round trip, so charging from "now" would lose it
    o = ops(rclient, name, rps=10)
    assert o.acquire()[1].kind == "granted"
    ticket, r = o.acquire()
    fit = r.now + r.wait
    o.wait_redis_until(fit + 0.03)  # the head comes back at least 30 ms late
    late = o.acquire(lease_id=ticket)[1]
    assert late.kind == "granted"
    _, nxt = o.acquire(max_wait=0, queue=False)
    assert nxt.kind == "refused"
    # the queue stays on its schedule: the next fits at fit + 1/rate (or the credit's bound), not
    # at the late grant + 1/rate
    assert nxt.now + nxt.retry_after == pytest.approx(max(fit, late.now - 0.0625) + 0.1, abs=0.002)
    assert nxt.now + nxt.retry_after < late.now + 0.1 - 0.02


def test_refusal_is_exact_and_charges_nothing(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100, tps=100, burst=1)
    assert o.acquire(tokens=100)[1].kind == "granted"
    before = o.status()
    _, r = o.acquire(tokens=50, max_wait=0, queue=False)
    assert r.kind == "refused"
    assert r.retry_after == pytest.approx(0.5, abs=0.02)
    after = o.status()
    # all or nothing: the request dimension, which had room, was not charged either (it only refilled)
    assert after.requests_available >= before.requests_available - 0.001
    assert after.in_flight == before.in_flight


def test_joint_wait_is_the_slowest_dimension(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=1_000, tps=100, burst=1)
    o.acquire(tokens=100)
    _, r = o.acquire(tokens=100)
    assert r.kind == "queued"
    assert r.wait == pytest.approx(1.0, abs=0.02)


def test_large_request_keeps_its_place_before_later_small_ones(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=100, burst=1)
    o.acquire(tokens=60)
    big, b = o.acquire(tokens=100)
    small, s = o.acquire(tokens=10)  # 40 tokens are there, but the big request came first
    assert (b.kind, s.kind) == ("queued", "queued")
    assert b.wait == pytest.approx(0.6, abs=0.02)
    o.wait_redis_until(b.now + b.wait)
    assert o.acquire(lease_id=big)[1].kind == "granted"
    assert o.acquire(lease_id=small)[1].kind == "queued"


def test_settle_refunds_never_above_capacity_and_charges_debt(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=100, burst=1)
    a, _ = o.acquire(tokens=50)
    refund = o.settle(a, actual=0)
    assert refund.settled and refund.refunded == pytest.approx(50)
    assert o.status().tokens_available == pytest.approx(100, abs=1)  # full again, not 150
    b, granted = o.acquire(tokens=10)
    debt = o.settle(b, actual=110)
    assert debt.refunded == pytest.approx(-100)

    def level_at(t: float) -> float:
        """90 left at b's grant, refilling at 100 a second up to 100, then 100 owed from the settle
        on: by Redis's own clock, whatever a loaded machine takes between the calls."""
        return min(100.0, min(0.0, -10 + 100 * (debt.now - granted.now)) + 100 * (t - debt.now))

    seen = o.status()
    assert seen.tokens_available == pytest.approx(level_at(seen.now), abs=1)
    assert not o.settle(b, actual=0).settled  # idempotent: a second settle changes nothing
    seen = o.status()
    assert seen.tokens_available == pytest.approx(level_at(seen.now), abs=1)


def test_cancel_gives_everything_back(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, tps=100, burst=1, max_concurrency=1)
    a, _ = o.acquire(tokens=80)
    assert o.status().in_flight == 1
    assert o.cancel(a) == "cancelled"
    s = o.status()
    assert s.in_flight == 0
    assert s.tokens_available == pytest.approx(100, abs=1)
    assert s.requests_available == pytest.approx(10, abs=0.1)
    assert o.cancel(a) == "unknown"


def test_queue_is_fifo_and_release_hands_the_slot_over(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, max_concurrency=1)
    pubsub = rclient.pubsub()
    pubsub.subscribe(f"{{xflow:{name}}}:events")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    holder, r = o.acquire()
    assert r.kind == "granted"
    first, q1 = o.acquire()
    second, q2 = o.acquire()
    assert (q1.kind, q2.kind) == ("queued", "queued")
    assert o.status().queued == 2
    o.settle(holder)
    msg = pubsub.get_message(timeout=2)
    assert msg["data"].decode().split()[:2] == ["g", first]  # granted by the release itself
    # a re-poll of the woken ticket finds its grant; the second keeps waiting
    assert o.acquire(lease_id=first)[1].kind == "granted"
    assert o.acquire(lease_id=second)[1].kind == "queued"
    assert o.cancel(second) == "dequeued"
    assert o.status().queued == 0
    pubsub.close()


def test_try_mode_refuses_instead_of_queueing(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, max_concurrency=1)
    o.acquire()
    _, r = o.acquire(queue=False)
    assert r.kind == "refused"
    assert r.retry_after is None
    assert o.status().queued == 0


def test_expired_lease_frees_its_slot_and_is_lost(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, max_concurrency=1, lease_ttl=0.3)
    a, r = o.acquire()
    assert o.extend(a) is not None
    o.wait_redis_until(r.now + 1.0)
    assert o.extend(a) is None
    assert o.acquire()[1].kind == "granted"


def test_abandoned_ticket_is_dropped(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, max_concurrency=1)
    holder, _ = o.acquire()
    _ghost, q = o.acquire(ticket_ttl=0.2)
    live, _ = o.acquire()
    o.wait_redis_until(q.now + 0.5)
    o.settle(holder)
    # the ghost's ticket lapsed: the slot went to the live ticket behind it
    assert o.acquire(lease_id=live)[1].kind == "granted"


def test_cooldown_honours_retry_after_then_backs_off(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100, burst=1)
    policy = CooldownPolicy(base=0.2, max_backoff=1.0, quiet=5.0, jitter=0.5)
    first = o.cooldown(0.3, draw=0.0, policy=policy)
    assert first.level == 0
    assert first.remaining == pytest.approx(0.3, abs=0.01)
    ticket, r = o.acquire()
    assert r.kind == "queued"
    assert r.now + r.wait >= first.until - 1e-6
    o.cancel(ticket)
    o.wait_redis_until(first.until)
    again = o.cooldown(None, draw=0.0, policy=policy)  # a repeat within the quiet period
    assert again.level == 1
    assert again.remaining == pytest.approx(0.4, abs=0.01)
    o.wait_redis_until(again.until)
    capped = o.cooldown(None, draw=0.0, policy=policy)
    assert capped.level == 2
    assert capped.remaining == pytest.approx(0.8, abs=0.01)
    o.wait_redis_until(capped.until)
    assert o.cooldown(None, draw=0.0, policy=policy).remaining == pytest.approx(1.0, abs=0.01)


def test_cooldown_jitter_only_lengthens_and_never_shortens(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100)
    policy = CooldownPolicy(jitter=0.5)
    long = o.cooldown(2.0, draw=0.99, policy=policy)
    assert 2.0 <= long.remaining <= 3.0
    short = o.cooldown(0.1, draw=0.0, policy=policy)
    assert short.until == pytest.approx(long.until)
    assert short.level == long.level  # the same episode: calls sent before the pause


def test_cooldown_drains_credit_so_dispatch_resumes_paced(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, burst=10)  # a full bucket holds 100 requests
    c = o.cooldown(0.5, draw=0.0)
    o.wait_redis_until(c.until + 0.01)
    kinds = [o.acquire()[1].kind for _ in range(7)]
    # 0.5 s of refill (5 requests) are there at the end of the pause, not the 100 of a full bucket
    assert kinds[:5] == ["granted"] * 5
    assert kinds[6] == "queued"


def test_status_writes_nothing(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=1, tps=10, max_concurrency=2)
    s = o.status()
    assert s.in_flight == 0 and s.queued == 0
    assert list(rclient.scan_iter(match=f"{{xflow:{name}}}*")) == []


def test_keys_share_one_hash_tag_and_expire_when_idle(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, tps=100, burst=1, max_concurrency=1, lease_ttl=5)
    lid, _ = o.acquire(tokens=10)
    found = list(rclient.scan_iter(match=f"{{xflow:{name}}}*"))
    assert found, "acquire wrote state"
    for key in found:
        assert key.startswith(f"{{xflow:{name}}}".encode())
        ttl = rclient.pttl(key)
        # the lease lives 5 s, then the 10 s idle grace and half a grace more (the expiry moves in steps)
        assert 15_000 < ttl <= 20_500
    expiry = [rclient.pexpiretime(key) for key in found]
    assert max(expiry) - min(expiry) <= 1, "the keys expire together"
    o.settle(lid, 10)  # the lease keys empty, so Redis deletes them
    o.acquire(tokens=10)  # and makes them anew, within the expiry already set: they must get it too
    again = list(rclient.scan_iter(match=f"{{xflow:{name}}}*"))
    assert len(again) == len(found)
    assert all(abs(rclient.pexpiretime(key) - expiry[0]) <= 1 for key in again)


def test_a_state_from_before_the_expiry_fields_gets_them_from_its_leases(client: redis.Redis, name: str) -> None:
    o = ops(client, name, rps=10, burst=1, lease_ttl=60)
    held, _ = o.acquire()
    state = f"{{xflow:{name}}}:state"
    client.hdel(state, "la", "xa")  # as an older version left it: no la, no xa,
    for key in client.scan_iter(match=f"{{xflow:{name}}}*"):
        client.pexpire(key, 20_000)  # and its own expiry: the grace past the lease's 60 s, say, later
    assert o.settle("not-held").settled is False  # a call that makes no lease: its horizon must count the one held
    lease_expiry = float(client.zscore(f"{{xflow:{name}}}:leases", held) or 0)
    assert float(client.hget(state, "la") or 0) >= lease_expiry > 0
    for key in client.scan_iter(match=f"{{xflow:{name}}}*"):
        assert client.pexpiretime(key) >= (lease_expiry + 10) * 1000, key  # the lease, then the grace


def test_scripts_survive_script_flush(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10, burst=1)
    assert o.acquire()[1].kind == "granted"
    rclient.script_flush()
    assert o.acquire()[1].kind == "granted"  # NOSCRIPT: redis-py loads it again


def test_a_refund_goes_to_the_head_of_the_queue_at_once(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=100, burst=1)
    pubsub = rclient.pubsub()
    pubsub.subscribe(f"{{xflow:{name}}}:events")
    assert pubsub.get_message(timeout=2)["type"] == "subscribe"
    first, _ = o.acquire(tokens=100)
    waiting, q = o.acquire(tokens=50)
    assert q.kind == "queued"
    assert q.wait == pytest.approx(0.5, abs=0.02)
    head = pubsub.get_message(timeout=2)["data"].decode().split()
    assert head[:2] == ["h", waiting]  # told exactly when it fits
    o.settle(first, actual=10)  # 90 tokens back: enough for the waiting 50, now
    assert pubsub.get_message(timeout=2)["data"].decode().split()[:2] == ["g", waiting]
    assert o.status().in_flight == 1
    pubsub.close()


def test_a_cooldown_tells_the_head_its_later_fit(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=10)
    o.acquire()
    waiting, q = o.acquire()
    assert q.wait == pytest.approx(0.1, abs=0.02)
    c = o.cooldown(1.0, draw=0.0)
    again = o.acquire(lease_id=waiting)[1]
    assert again.kind == "queued"
    assert again.now + again.wait == pytest.approx(c.until, abs=0.01)


def _settle_seen(o: Ops, lid: str, actual: float, tokens_left: float) -> None:
    o.run("settle", settle_args(lid, actual, None, tokens_left))


def test_the_providers_word_corrects_the_level_down_once(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=100, burst=10)  # 1,000 tokens of credit
    a, _ = o.acquire(tokens=100)  # our level just after: 900
    b, _ = o.acquire(tokens=100)  # our level just after: 800
    before = o.status().tokens_available
    # The provider had 600 left when it admitted a. It may have admitted b (granted later) first,
    # so only 900 - 100 - 600, less one unit of its rounding, is surely a lead: 199.
    _settle_seen(o, a, 100, 600)
    after_a = o.status().tokens_available
    assert after_a == pytest.approx(before - 199, abs=2)
    # b: the provider had 500 left after it; 800 - 500 - 1 = 299 in all, 199 of it already taken
    _settle_seen(o, b, 100, 500)
    assert o.status().tokens_available == pytest.approx(before - 299, abs=2)


def test_the_providers_word_never_raises_the_level(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, tps=100, burst=10)
    a, _ = o.acquire(tokens=100)
    before = o.status().tokens_available
    _settle_seen(o, a, 100, 999)  # the provider had more than we thought: we stay as we are
    assert o.status().tokens_available == pytest.approx(before, abs=1)


# ---- exactness: a late head of the queue and full buckets ------------------------------------------------------


def _drain(o: Ops, tokens: float = 0) -> list[float]:
    """Take every request the budget grants at once, one by one (Redis time of each grant); bounded."""
    starts: list[float] = []
    for _ in range(500):
        _, r = o.acquire(tokens=tokens, queue=False)
        if r.kind != "granted":
            return starts
        starts.append(r.start)
    raise AssertionError("the budget never ran out")


def _excess(grants: list[tuple[float, float]], rate: float, capacity: float) -> float:
    """How far the grants (time, cost) of any window [t_i, t_j] go above rate x (t_j - t_i) + capacity."""
    worst = -float("inf")
    for i, (ti, _) in enumerate(grants):
        total = 0.0
        for tj, cost in grants[i:]:
            total += cost
            worst = max(worst, total - (rate * (tj - ti) + capacity))
    return worst


def test_a_late_head_gets_no_credit_in_a_bucket_that_was_full(rclient: redis.Redis, name: str) -> None:
    # requests: 100/s, 100 of credit, never binding; tokens: the head waits for them
    o = ops(rclient, name, rps=100, tps=100, burst=1)
    assert o.acquire(tokens=100)[1].kind == "granted"  # the token bucket is empty
    head, q = o.acquire(tokens=100, requests=5)
    assert q.kind == "queued"
    fit = q.now + q.wait
    o.wait_redis_until(fit + 0.05)  # the head comes back 50 ms late
    late = o.acquire(tokens=100, requests=5, lease_id=head)[1]
    assert late.kind == "granted"
    # Its requests were full all along: charging them as of its fit time would give it 5 requests
    # of refill the full bucket could not hold. Counted by the grant times Redis records:
    grants = [(late.start, 5.0)] + [(t, 1.0) for t in _drain(o)]
    assert _excess(grants, 100.0, 100.0) <= 0.5  # the old rule: 5 over (5 requests for free)


def test_a_head_released_by_the_end_of_a_cooldown_is_charged_from_now(rclient: redis.Redis, name: str) -> None:
    o = ops(rclient, name, rps=100, burst=1)  # 100 requests of credit
    c = o.cooldown(1.2, draw=0.0)  # drained at the 429; full again 1 s later, before the pause ends
    head, q = o.acquire(requests=5)
    assert q.kind == "queued" and q.now + q.wait == pytest.approx(c.until, abs=1e-5)
    o.wait_redis_until(c.until + 0.05)
    late = o.acquire(requests=5, lease_id=head)[1]
    assert late.kind == "granted"
    grants = [(late.start, 5.0)] + [(t, 1.0) for t in _drain(o)]
    assert _excess(grants, 100.0, 100.0) <= 0.5  # the old rule: 5 over


def test_a_late_head_keeps_the_schedule_only_in_the_bucket_that_set_it(rclient: redis.Redis, name: str) -> None:
    # burst 0: one request every 10 ms. The late head is charged as of its fit time in the request
    # bucket (it set the fit time), so the next fits 10 ms after that fit, not after the late grant.
    o = ops(rclient, name, rps=100, tps=100_000)
    assert o.acquire(tokens=10)[1].kind == "granted"
    head, q = o.acquire(tokens=10)
    fit = q.now + q.wait
    o.wait_redis_until(fit + 0.005)
    late = o.acquire(tokens=10, lease_id=head)[1]
    assert late.kind == "granted"
    _, nxt = o.acquire(tokens=10, queue=False)
    if nxt.kind == "refused":  # the refill came first on a slow machine; else it is the schedule
        assert nxt.now + nxt.retry_after == pytest.approx(max(fit, late.now - 0.01) + 0.01, abs=0.002)
