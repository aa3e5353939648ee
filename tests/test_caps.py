"""Caps: a hierarchy under one budget (a team, then its users). A grant fits the budget and every cap
its tenant path passes, atomically; it is charged, settled, refunded and released at each; calls held
back only by their caps do not hold the others back. On both backends, through the fronts and across
OS processes.
"""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import redis
from _helpers import Ops, budget_keys

from xflow_dist import Budget, Cap, ConfigurationError, CostTooLargeError, Limiter
from xflow_dist._base import LimiterBase
from xflow_dist._budget import Level
from xflow_dist._core import acquire_args, place_of

_SPAWN = mp.get_context("spawn")

TEAMS = {"team-a": Cap(max_concurrency=3), "team-a/*": Cap(max_concurrency=1), "team-b": Cap(max_concurrency=4)}


def slots(rclient: redis.Redis, name: str, caps: dict[str, Cap] = TEAMS, max_concurrency: int = 8) -> Ops:
    return Ops(rclient, Budget(name, max_concurrency=max_concurrency, caps=caps))


def take(ops: Ops, tenant: str, queue: bool = False, **kw: object) -> tuple[str, str]:
    lid, reply = ops.acquire(tenant=tenant, queue=queue, **kw)  # type: ignore[arg-type]
    return lid, reply.kind


def test_a_call_passes_its_path_s_caps_from_the_top(name: str) -> None:
    budget = Budget(name, rpm=600, burst=1, caps={"a": Cap(tpm=6000), "a/*": Cap(rpm=60, max_concurrency=2),
                                                  "a/bob": Cap(max_concurrency=5)})  # fmt: skip
    assert budget.levels("a/alice") == (Level("a", 0.0, budget.credit, 100.0, budget.credit, 0),
                                        Level("a/alice", 1.0, budget.credit, 0.0, budget.credit, 2))  # fmt: skip
    # a path's own cap wins over its parent's "*"; a part without either passes nothing there
    assert [lv.node for lv in budget.levels("a/bob")] == ["a", "a/bob"]
    assert budget.levels("a/bob")[1].max_concurrency == 5
    assert [lv.node for lv in budget.levels("z/alice")] == []
    assert budget.levels(None) == () and place_of(budget, None, None).levels == ()
    assert Budget(name, caps={"*": Cap(rps=1, burst=3)}).levels("x")[0].request_burst == 3


def test_every_cap_on_the_path_and_the_budget_must_allow_a_grant(rclient: redis.Redis, name: str) -> None:
    ops = slots(rclient, name)
    assert take(ops, "team-a/alice")[1] == "granted"
    assert take(ops, "team-a/alice")[1] == "refused"  # alice's own cap (1)
    assert take(ops, "team-a/bob")[1] == "granted"
    assert take(ops, "team-a/carol")[1] == "granted"
    assert take(ops, "team-a/dave")[1] == "refused"  # the team's cap (3), though dave's is free
    assert [take(ops, "team-b")[1] for _ in range(5)] == ["granted"] * 4 + ["refused"]
    assert take(ops, "team-c")[1] == "granted"  # no cap on its path: the budget alone
    assert take(ops, "team-c")[1] == "refused"  # the budget's 8 slots are all held
    assert ops.status().in_flight == 8


def test_a_slot_given_back_is_given_back_at_every_cap(rclient: redis.Redis, name: str) -> None:
    ops = slots(rclient, name)
    alice, _ = take(ops, "team-a/alice")
    bob, _ = take(ops, "team-a/bob")
    carol, _ = take(ops, "team-a/carol")
    assert ops.settle(alice).settled
    assert take(ops, "team-a/alice")[1] == "granted"  # its own cap and the team's both freed
    assert ops.cancel(bob) == "cancelled"
    assert take(ops, "team-a/dave")[1] == "granted"
    assert take(ops, "team-a/erin")[1] == "refused"
    del carol


def test_tokens_are_charged_refunded_and_settled_at_every_level(rclient: redis.Redis, name: str) -> None:
    # the team holds 100 tokens (100 a second, 1 s of credit), the budget 1,000
    ops = Ops(rclient, Budget(name, tps=1000, burst=1, caps={"t": Cap(tps=100, burst=1)}))
    big, reply = ops.acquire(80, tenant="t", queue=False)
    assert reply.kind == "granted"
    _, reply = ops.acquire(30, tenant="t", queue=False)
    assert reply.kind == "refused" and reply.retry_after == pytest.approx(0.1, abs=0.02)  # the cap's 10 short
    assert ops.acquire(500, tenant="u", queue=False)[1].kind == "granted"  # another tenant: the budget only
    assert ops.settle(big, 20).settled  # 60 refunded at the budget and at the cap
    small, reply = ops.acquire(30, tenant="t", queue=False)
    assert reply.kind == "granted"  # 80 back in the cap: 30 fits again
    assert ops.settle(small, 130).settled  # 100 more than estimated: debt at the cap, as at the budget
    _, reply = ops.acquire(1, tenant="t", queue=False)
    # 51 tokens short at 100/s: 0.51 s less the time the calls above took (without the debt, 0)
    assert reply.kind == "refused" and reply.retry_after is not None and reply.retry_after > 0.4


def test_a_cancelled_grant_gives_its_whole_charge_back_at_the_caps(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, rps=100, burst=1, caps={"t": Cap(rps=2, burst=1)}))
    first, reply = ops.acquire(tenant="t", queue=False)
    assert reply.kind == "granted"
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"
    assert ops.acquire(tenant="t", queue=False)[1].kind == "refused"  # the cap's 2 spent
    assert ops.cancel(first) == "cancelled"
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"


def test_a_ticket_its_caps_hold_does_not_hold_the_others(rclient: redis.Redis, name: str) -> None:
    ops = slots(rclient, name, max_concurrency=3)
    alice, _ = take(ops, "team-a/alice")
    waiting, kind = take(ops, "team-a/alice", queue=True, lease_id="w.alice2")
    assert kind == "queued"  # alice's cap is full
    # bob comes after alice's ticket, which only its cap holds: bob is granted now, in one call
    assert take(ops, "team-a/bob", queue=True)[1] == "granted"
    assert take(ops, "team-b", queue=True)[1] == "granted"
    # the budget is full now (3): a later call waits behind alice's ticket, in turn
    later, kind = take(ops, "team-b", queue=True, lease_id="w.b2")
    assert kind == "queued"
    assert ops.settle(alice).settled  # alice's slot frees her cap and the budget: her ticket first
    assert ops.acquire(lease_id=waiting, tenant="team-a/alice")[1].kind == "granted"
    assert ops.acquire(lease_id=later, tenant="team-b")[1].kind == "queued"


def test_tickets_of_one_cap_keep_their_order(rclient: redis.Redis, name: str) -> None:
    ops = slots(rclient, name)
    alice, _ = take(ops, "team-a/alice")
    first, _ = take(ops, "team-a/alice", queue=True, lease_id="w.a2")
    second, _ = take(ops, "team-a/alice", queue=True, lease_id="w.a3")
    assert ops.settle(alice).settled
    assert ops.acquire(lease_id=first, tenant="team-a/alice")[1].kind == "granted"
    assert ops.acquire(lease_id=second, tenant="team-a/alice")[1].kind == "queued"


def test_a_ticket_its_cap_s_rate_holds_is_told_when_it_fits(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, rps=1000, burst=1, caps={"t": Cap(rps=5, burst=0)}))
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"
    lid, reply = ops.acquire(tenant="t", lease_id="w.t2")
    assert reply.kind == "queued" and reply.wait == pytest.approx(0.2, abs=0.02)  # the cap's 1/5 s, not a TTL
    assert ops.acquire(tenant="u", queue=False)[1].kind == "granted"  # the budget serves the others meanwhile
    ops.wait_redis_until(ops.redis_now() + reply.wait)
    assert ops.acquire(lease_id=lid, tenant="t")[1].kind == "granted"


def test_a_user_s_own_cap_does_not_hold_back_the_rest_of_its_team(rclient: redis.Redis, name: str) -> None:
    """alice's second call waits for alice's cap (10 s); the team's bucket is only a moment behind, so
    bob, of the same team, is told when the team fits (0.1 s) rather than passed over with alice."""
    caps = {"team-a": Cap(rps=10, burst=0), "team-a/*": Cap(rpm=6, burst=0)}
    ops = Ops(rclient, Budget(name, rps=1000, burst=1, caps=caps))
    assert ops.acquire(tenant="team-a/alice", queue=False)[1].kind == "granted"
    _, reply = ops.acquire(tenant="team-a/alice", lease_id="w.alice2")
    assert reply.kind == "queued" and reply.wait > 5  # alice's own cap: one call in 10 s
    bob, reply = ops.acquire(tenant="team-a/bob", lease_id="w.bob")
    assert reply.kind == "queued" and reply.wait <= 0.15, reply  # the team's next tenth of a second
    ops.wait_redis_until(ops.redis_now() + reply.wait)
    assert ops.acquire(lease_id=bob, tenant="team-a/bob")[1].kind == "granted"


def test_a_ticket_held_by_a_cap_s_unclaimed_grant_is_told_when_its_claim_window_ends(
    rclient: redis.Redis, name: str
) -> None:
    caps = {"t": Cap(max_concurrency=1), "u": Cap(max_concurrency=1)}
    ops = Ops(rclient, Budget(name, max_concurrency=4, claim_window=0.3, caps=caps))
    assert ops.acquire(tenant="u", queue=False)[1].kind == "granted"
    ops.acquire(tenant="u", lease_id="w.u")  # the head of the queue, held by u's slot for a lease TTL
    first, _ = ops.acquire(tenant="t", queue=False)
    ops.acquire(tenant="t", lease_id="w.1")  # waits for t's slot
    assert ops.settle(first).settled  # the slot goes to w.1, provisionally; w.1's process is gone
    _, reply = ops.acquire(tenant="t", lease_id="w.2")  # second in the queue
    assert reply.kind == "queued" and reply.wait <= 0.35, reply  # the claim window, not a renewal interval
    ops.wait_redis_until(ops.redis_now() + reply.wait)
    assert ops.acquire(lease_id="w.2", tenant="t")[1].kind == "granted"


def test_an_arrival_granted_by_its_own_call_behind_a_capped_ticket_is_claimed_at_once(
    rclient: redis.Redis, name: str
) -> None:
    """The queue: a ticket its cap holds, then one that waits for the budget's tokens. A small call of
    a class that goes between them fits now: it is granted in the same call, not told to claim."""
    budget = Budget(name, tps=100, burst=1, max_concurrency=8, priorities={"hi": 1, "lo": 0},
                    caps={"t": Cap(max_concurrency=1)})  # fmt: skip
    ops = Ops(rclient, budget)
    assert ops.acquire(90, queue=False)[1].kind == "granted"  # 10 tokens left
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"  # t's one slot
    assert ops.acquire(tenant="t", lease_id="w.t")[1].kind == "queued"  # held by its cap
    assert ops.acquire(100, lease_id="w.big")[1].kind == "queued"  # waits for a full bucket
    _, reply = ops.acquire(5, lead=1, lease_id="w.small")  # one arrival ahead: between the two
    assert reply.kind == "granted", reply


def test_an_expired_lease_frees_its_cap_s_slot(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, max_concurrency=4, lease_ttl=0.2, caps={"t": Cap(max_concurrency=1)}))
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"  # its holder dies
    assert ops.acquire(tenant="t", queue=False)[1].kind == "refused"
    ops.wait_redis_until(ops.redis_now() + 0.25)
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"


def test_a_lease_registered_again_takes_its_slot_at_its_caps(rclient: redis.Redis, name: str) -> None:
    """A process cut off from Redis longer than the lease TTL: its lease was reaped (its cap's slot
    given back) while its call ran; registered again, it takes that slot again."""
    budget = Budget(name, max_concurrency=4, lease_ttl=0.2, caps={"t": Cap(max_concurrency=1)})
    ops = Ops(rclient, budget)
    lid, _ = ops.acquire(tenant="t", queue=False)
    ops.wait_redis_until(ops.redis_now() + 0.25)
    assert ops.acquire(tenant="u", queue=False)[1].kind == "granted"  # reaps it
    levels = budget.levels("t")
    assert ops.run("rejoin", LimiterBase._rejoin_args(lid, 1, 0, levels=levels))[0] == b"adopted"
    assert ops.acquire(tenant="t", queue=False)[1].kind == "refused"  # its slot is held again
    assert ops.settle(lid).settled
    assert ops.acquire(tenant="t", queue=False)[1].kind == "granted"


def test_the_limiters_register_a_lease_again_with_its_caps(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=4, caps={"t": Cap(max_concurrency=1)})
    with Limiter(budget, url) as limiter:
        lease = limiter.acquire(tenant="t/x")
        assert lease.levels == budget.levels("t/x")
        assert limiter.try_acquire(tenant="u").granted and not limiter.try_acquire(tenant="t/y").granted


def test_the_caps_key_expires_with_the_others_and_a_budget_without_caps_never_makes_it(
    client: redis.Redis, name: str
) -> None:
    ops = slots(client, name)
    lid, _ = take(ops, "team-a/alice")
    assert f"{{xflow:{name}}}:caps".encode() in budget_keys(client, name)
    expiries = {client.pexpiretime(k) for k in budget_keys(client, name)}
    assert len(expiries) == 1 and expiries.pop() > 0
    plain = Ops(client, Budget(name + "-plain", max_concurrency=1))
    plain.acquire()
    assert not any(k.endswith(b":caps") for k in budget_keys(client, name + "-plain"))
    # a cap full and unused is forgotten: nothing of it stays once its lease is settled
    assert ops.settle(lid).settled
    assert client.hlen(f"{{xflow:{name}}}:caps") == 0


def test_bad_caps_are_refused_before_redis_is_touched(client: redis.Redis, redis_url: str, name: str) -> None:
    for caps in ({}, {"a": 1}, {"a//b": Cap(rps=1)}, {"*/a": Cap(rps=1)}, {"a b": Cap(rps=1)},
                 {"/".join("abcdefghi"): Cap(rps=1)}, {"a,b": Cap(rps=1)}):  # fmt: skip
        with pytest.raises(ConfigurationError):
            Budget(name, caps=caps)  # type: ignore[arg-type]
    for bad in ({}, {"rpm": 0}, {"rpm": 1, "rps": 1}, {"max_concurrency": 0}, {"burst": -1, "rps": 1}):
        with pytest.raises(ConfigurationError):
            Cap(**bad)  # type: ignore[arg-type]
    budget = Budget(name, tpm=60_000, max_concurrency=2, caps={"t": Cap(tpm=600)})
    with Limiter(budget, redis_url) as limiter:
        for tenant in ("t//x", "a/" * 8 + "z", "t x"):
            with pytest.raises(ConfigurationError):
                limiter.try_acquire(1, tenant=tenant)
        with pytest.raises(CostTooLargeError, match="cap of 't'"):
            limiter.try_acquire(601, tenant="t")  # more than the cap can ever hold
    assert budget_keys(client, name) == []
    with pytest.raises(ConfigurationError, match="tenants= or caps="):
        Budget(name).weight("t")


def test_the_scripts_refuse_bad_levels(client: redis.Redis, name: str) -> None:
    ops = Ops(client, Budget(name, max_concurrency=2))
    base = [*acquire_args("x", 1, 0, None, False, 30.0), "0", "t", "0"]  # ARGV[12..22]
    level = ["t", "1.0", "1.0", "0", "0", "1"]
    for argv, where in (
        ([*base, "9"], "ARGV[23] levels"),
        ([*base, "1", "t,u", *level[1:]], "ARGV[24] node of level 1"),
        ([*base, "1", *level[:5], "1.5"], "ARGV[29] max concurrency of level 1"),
        ([*base, "2", *level], "ARGV[30] node of level 2"),
        ([*base, "1", *level, "extra"], "ARGV[30] reserve"),
        ([*base, "1", *level, "0", "extra"], "ARGV[31] book"),
        ([*base, "1", *level, "0", "0", "extra"], "ARGV[32]: unexpected"),
    ):
        with pytest.raises(redis.ResponseError, match=where.replace("[", r"\[").replace("]", r"\]")):
            ops.run("acquire", argv)
    assert budget_keys(client, name) == []


def test_the_limiters_pass_the_tenant_s_caps(url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=4, caps={"t": Cap(max_concurrency=1)})
    with Limiter(budget, url) as limiter:
        lease = limiter.acquire(tenant="t/alice")
        assert not limiter.try_acquire(tenant="t/bob").granted  # the team's one slot is held
        assert limiter.try_acquire(tenant="u").granted
        lease.release()
        assert limiter.try_acquire(tenant="t/bob").granted


def _tenant_worker(url: str, name: str, tenant: str, until: float, out: mp.Queue) -> None:
    budget = Budget(name, rps=40, burst=0, caps={"slow": Cap(rps=10, burst=1)})
    grants = []
    with Limiter(budget, url) as limiter:
        while time.time() < until:
            try:
                limiter.acquire(tenant=tenant, timeout=max(0.05, until - time.time())).release()
            except Exception:  # the window closed while it waited
                break
            grants.append(time.time())
    out.put((tenant, grants))


def test_across_processes_a_capped_tenant_keeps_to_its_cap_and_the_rest_goes_to_the_others(
    redis_url: str, name: str
) -> None:
    """Two processes of a tenant capped at 10/s and one of another, all backlogged on a budget of 40/s:
    the capped one gets its 10/s and never more, the other the remaining 30/s (its cap's backlog does
    not hold the budget back). The cap has a second of credit, so that a capped call's return trip
    costs it nothing (caps take no late head's credit); the window opens after that credit is spent."""
    out: mp.Queue = _SPAWN.Queue()
    start = time.time() + 3.0  # the processes start meanwhile
    until = start + 3.0
    procs = [_SPAWN.Process(target=_tenant_worker, args=(redis_url, name, t, until, out))
             for t in ("slow", "slow", "fast")]  # fmt: skip
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    slow_grants = sorted(g for t, grants in results if t == "slow" for g in grants)
    opened = max(start + 0.5, slow_grants[10] if len(slow_grants) > 10 else start)  # after the cap's credit
    window = [(t, g) for t, grants in results for g in grants if opened <= g < until]
    seconds = until - opened
    assert seconds >= 2.0, seconds
    slow = sum(1 for t, _ in window if t == "slow") / seconds
    fast = sum(1 for t, _ in window if t == "fast") / seconds
    assert 9.0 <= slow <= 10.5, (slow, fast)
    assert fast >= 26, (slow, fast)
