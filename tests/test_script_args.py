"""The scripts refuse bad arguments and other limits before they write anything.

A property test throws garbage (NaN and infinity spelt every way, negatives, huge values, empty and
non-numeric strings, wrong flags, bad ids, missing and extra arguments, other limits) at every
script on a budget with live state (leases, a queue, a cooldown, learned limits) and checks the
reply is the error and every key of the budget is byte-identical (DUMP) afterwards. Then one
regression test per case of issue 9, the Python mapping of the error replies, and the limits
fingerprint: two configurations on one name, ``reconfigure()`` and expiry.
"""

from __future__ import annotations

import asyncio
import math
import uuid

import pytest
import redis
from _helpers import Ops, budget_keys
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xflow_dist import (
    AsyncLimiter,
    Budget,
    BudgetConflictError,
    ConfigurationError,
    InvalidCostError,
    Limiter,
    ScriptArgumentError,
)
from xflow_dist._budget import CooldownPolicy
from xflow_dist._core import acquire_args, budget_args, cooldown_args, keys, settle_args

# The kinds of every argument (lua/_prelude.lua), budget block first; "opt": may be left out.
BLOCK = ["rate", "seconds", "rate", "seconds", "count", "positive", "seconds", "text", "positive", "flag", "units"]
OPS: dict[str, list[str]] = {
    "acquire": [
        "text",
        "units",
        "units",
        "seconds_or_unset",
        "flag",
        "positive",
        "flag_opt",
        "flag_opt",
        "count_opt",
        "text_or_empty_opt",
        "rate_opt",
    ],
    "settle": [
        "text_or_empty",
        "units_or_unset",
        "units_or_unset",
        "units_or_unset",
        "limit",
        "limit",
        "seconds",
        "text_or_empty_opt",
        "flag_opt",
        "positive_opt",
        "text_opt",
    ],
    "cancel": ["text"],
    "extend": ["text"],
    "renew": ["positive", "text"],
    "cooldown": ["seconds_or_unset", "positive", "positive", "seconds", "factor", "draw", "positive"],
    "status": [],
    "configure": [],
}

NOT_NUMBERS = [
    "nan",
    "NaN",
    "-nan",
    "inf",
    "-inf",
    "Infinity",
    "1e309",
    "-1e309",
    "",
    " ",
    "abc",
    "0x10",
    "0X1p4",
    " 5",
    "5 ",
    "1_0",
    "5abc",
    "--1",
    "1e",
    ".",
    "-",
    "+5",
    "1,5",
    "\u0661",
    "1e5\n",
    "\x00",
]
#: a value refused for every numeric kind: too large for all, or negative and not the -1 sentinel
OUT_OF_RANGE = st.one_of(
    st.floats(min_value=1e16, max_value=1e300).map(repr),
    st.floats(min_value=-1e300, max_value=-1.000001).map(repr),
    st.floats(min_value=-0.999999, max_value=-1e-9).map(repr),
)
BAD_TEXT = ["", "a b", "a\nb", "\t", "x" * 257, "id\x7f", "é " * 3]
BAD_FLAG = ["", "2", "-1", "true", "yes", " 1", "01", "1.0", "0.0", "nan"]


def garbage(kind: str) -> st.SearchStrategy[str]:
    kind = kind.removesuffix("_opt")
    if kind.startswith("text"):
        return st.sampled_from([t for t in BAD_TEXT if t or kind == "text"])
    if kind == "flag":
        return st.sampled_from(BAD_FLAG)
    extra: list[str] = []
    if kind == "count":
        extra = ["1.5", "0.001"]
    if kind == "positive":
        extra = ["0", "0.0"]
    if kind in ("rate", "limit"):
        extra = ["1e-7", "0.0000009"] + (["0"] if kind == "limit" else [])
    if kind == "draw":
        extra = ["1", "1.0", "2"]
    return st.one_of(st.sampled_from(NOT_NUMBERS + extra), OUT_OF_RANGE)


BUDGET = dict(rpm=600, tpm=60_000, max_concurrency=2, burst=1.0, lease_ttl=30.0)


def valid_args(op: str, budget: Budget, lease: str, ticket: str) -> list[str]:
    ops: dict[str, list[str]] = {
        "acquire": acquire_args(ticket, 1, 10, 5.0, True, 30.0, True, False, 3, "team-a", 2.0),
        "settle": [*settle_args(lease, 20, 5, 100, 600, 60_000), "1", "30", ticket],  # census, a renewal
        "cancel": [lease],
        "extend": [lease],
        "renew": ["30", ticket],
        "cooldown": cooldown_args(CooldownPolicy(), 1.0, 0.5),
        "status": [],
        "configure": [],
    }
    return budget_args(budget) + ops[op]


@st.composite
def bad_call(draw: st.DrawFn, budget: Budget, lease: str, ticket: str) -> tuple[str, list[str]]:
    op = draw(st.sampled_from(sorted(OPS)))
    argv = valid_args(op, budget, lease, ticket)
    kinds = BLOCK + OPS[op]
    how = draw(st.sampled_from(["garbage", "garbage", "garbage", "missing", "extra", "limits"]))
    if how == "limits" and op != "configure":  # another deployment's limits (configure replaces them)
        argv[0] = repr(float(draw(st.sampled_from([1.0, 20.0, 1000.0]))))
        return op, argv
    if how == "missing":
        required = len([k for k in kinds if not k.endswith("_opt")])
        return op, argv[: draw(st.integers(0, required - 1))]
    if how == "extra":
        if op in ("renew", "settle"):  # any number of ids: an empty one, or past the 1,000th, is extra
            return op, argv + draw(st.sampled_from([[""], ["x"] * 1000]))
        return op, argv + draw(st.lists(st.sampled_from(["1", "", "x"]), min_size=1, max_size=2))
    for i in draw(st.lists(st.integers(0, len(kinds) - 1), min_size=1, max_size=3, unique=True)):
        argv[i] = draw(garbage(kinds[i]))
    return op, argv


def dump(client: redis.Redis, name: str) -> dict[bytes, bytes | None]:
    return {k: client.dump(k) for k in budget_keys(client, name)}


def live_budget(client: redis.Redis, name: str) -> tuple[Ops, str, str]:
    """A budget remembering something of every kind: leases, a queued ticket, a cooldown, learned limits."""
    ops = Ops(client, Budget(name, **BUDGET))  # type: ignore[arg-type]
    lease, first = ops.acquire(10)
    _, second = ops.acquire(10)
    ticket, third = ops.acquire(10)
    assert (first.kind, second.kind, third.kind) == ("granted", "granted", "queued")
    ops.settle("", None, limit_requests=1200, remaining_tokens=50_000)
    ops.cooldown(60.0)
    assert len(budget_keys(client, name)) == 6  # learned limits included (no tenants: not shared by tenant)
    return ops, lease, ticket


def test_garbage_arguments_change_nothing(rclient: redis.Redis, name: str) -> None:
    ops, lease, ticket = live_budget(rclient, name)
    before = dump(rclient, name)

    @settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(call=bad_call(ops.budget, lease, ticket))
    def check(call: tuple[str, list[str]]) -> None:
        op, argv = call
        with pytest.raises(redis.ResponseError) as refused:
            ops.scripts[op](keys=keys(ops.budget), args=argv)
        assert str(refused.value).startswith(("XFLOW_BADARG", "XFLOW_CONFLICT")), str(refused.value)
        assert "\n" not in str(refused.value)
        assert dump(rclient, name) == before, (op, argv)

    check()
    assert ops.status().in_flight == 2  # and the state still reads well


# --- the cases of issue 9, each granted or broken by the scripts before they checked ---------------


def refused(ops: Ops, op: str, argv: list[str], code: str = "XFLOW_BADARG") -> str:
    before = dump(ops.client, ops.budget.name)
    with pytest.raises(redis.ResponseError) as err:
        ops.run(op, argv)
    assert str(err.value).startswith(code), str(err.value)
    assert dump(ops.client, ops.budget.name) == before
    return str(err.value)


def test_a_nan_token_cost_is_refused_and_the_limit_holds(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, tpm=600, burst=1.0))  # 10 tokens a second, 10 of credit
    ops.acquire(10)  # keys exist, the bucket is empty
    message = refused(ops, "acquire", ["a", "1", "nan", "-1", "1", "30", "0"])
    assert "ARGV[14] tokens" in message and '"nan"' in message
    assert ops.acquire(10, queue=False)[1].kind == "refused"


def test_a_negative_cost_refills_nothing(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, tpm=600, burst=1.0))
    ops.acquire(10)
    for cost in ("-1000", "-1e9", "-0.5"):
        refused(ops, "acquire", ["a", "1", cost, "-1", "1", "30", "0"])
    assert ops.status().tokens_available is not None and ops.status().tokens_available < 5  # a refund would leave 1000s


def test_an_infinite_actual_is_refused_and_the_budget_still_works(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, tpm=600, burst=1.0))
    lid, _ = ops.acquire(5)
    refused(ops, "settle", [lid, "1e309", "-1", "-1", "-1", "-1", "3600"])
    refused(ops, "settle", [lid, "-1e9", "-1", "-1", "-1", "-1", "3600"])
    assert ops.settle(lid, 5).settled
    assert math.isfinite(ops.status().tokens_available)


def test_a_non_number_does_not_grant_the_head_halfway(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, rps=20))  # burst 0: one request every 50 ms
    ops.acquire()
    head, reply = ops.acquire()
    assert reply.kind == "queued"
    ops.wait_redis_until(ops.redis_now() + 0.1)  # the head fits now: any script's advance() would grant it
    refused(ops, "acquire", ["b", "abc", "0", "-1", "1", "30", "0"])
    refused(ops, "cooldown", ["1", "1", "60", "10", "0.1", "x"])
    assert ops.status().queued == 1  # still queued: nothing ran before the check
    assert ops.acquire(lease_id=head)[1].kind == "granted"


def test_the_same_limits_spelt_otherwise_are_no_conflict(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, rpm=60, max_concurrency=2))
    lid, _ = ops.acquire()
    block = budget_args(ops.budget)
    assert block[0] == "1.0" and block[4] == "2"
    respelt = ["1", *block[1:4], "2.0", *block[5:]]
    reply = ops.scripts["extend"](keys=keys(ops.budget), args=[*respelt, lid])
    assert reply[0] == b"extended"
    other = ["1.5", *block[1:]]
    with pytest.raises(redis.ResponseError, match=r"XFLOW_CONFLICT stored 1 .*; given 1\.5 "):
        ops.scripts["extend"](keys=keys(ops.budget), args=[*other, lid])


def test_a_script_refuses_arguments_it_does_not_take(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, rpm=60))
    ops.acquire()
    refused(ops, "cancel", ["x", "extra"])
    refused(ops, "status", ["x"])
    refused(ops, "acquire", ["a", "1"])  # missing arguments


# --- the Python side: the same bounds first, and the error replies mapped --------------------------


def test_python_refuses_what_the_scripts_refuse(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, tpm=6_000_000, burst=60), redis_url) as limiter:
        with pytest.raises(InvalidCostError):
            limiter.acquire(1e16)
        with limiter.acquire(10) as lease:
            with pytest.raises(InvalidCostError):
                lease.report(1e16)
            with pytest.raises(InvalidCostError):
                lease.report(10, limit_tokens=1e-7)
            lease.report(10)
        assert limiter.acquire(10, timeout=1e12).release() is not None  # a wait beyond the bound is any wait
        assert limiter.cooldown(retry_after=1e12).remaining <= 1.1e9 + 1  # the bound, jitter included
    for bad in ({"rps": 1e-7}, {"tps": 2e15}, {"burst": 2e9}, {"lease_ttl": 1e10}, {"max_concurrency": 10**16}):
        with pytest.raises(ConfigurationError):
            Budget(name, **bad)  # type: ignore[arg-type]


def test_a_refused_argument_raises_script_argument_error(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rpm=60), redis_url) as limiter:
        with pytest.raises(ScriptArgumentError, match=r"ARGV\[13\] requests.*'nan'|ARGV\[13\] requests.*\"nan\""):
            limiter._run("acquire", ["a", "nan", "0", "-1", "1", "30", "0"])
        assert isinstance(ScriptArgumentError("x"), ValueError)


# --- the limits fingerprint ----------------------------------------------------------------------


def test_two_configurations_on_one_name_are_refused(url: str, name: str) -> None:
    first = Limiter(Budget(name, rpm=60, max_concurrency=4), url)
    second = Limiter(Budget(name, rpm=120, max_concurrency=4), url)
    try:
        lease = first.acquire()
        client = first._client
        before = dump(client, name)  # type: ignore[arg-type]
        for call in (second.acquire, second.try_acquire, second.status, second.cooldown):
            with pytest.raises(BudgetConflictError) as err:
                call()
            assert err.value.budget == name
            assert "rpm=60" in err.value.stored and "rpm=120" in err.value.given
            assert name in str(err.value) and "reconfigure" in str(err.value)
        assert dump(client, name) == before  # type: ignore[arg-type]
        assert isinstance(err.value, ConfigurationError)
        lease.release()
        assert first.status().in_flight == 0
    finally:
        first.close()
        second.close()


def test_other_limits_may_start_once_the_keys_expired(redis_url: str, name: str, client: redis.Redis) -> None:
    with (
        Limiter(Budget(name, rpm=60, lease_ttl=1), redis_url) as first,
        Limiter(Budget(name, rpm=6, lease_ttl=1), redis_url) as second,
    ):
        first.acquire().release()
        with pytest.raises(BudgetConflictError):
            second.status()
        ttls = [client.pttl(k) for k in budget_keys(client, name)]
        assert ttls and all(0 < t <= 17_000 for t in ttls)  # the keys do expire once idle
        for k in budget_keys(client, name):
            client.pexpire(k, 1)  # as Redis would, later
        Ops(client, second.budget).wait_redis_until(Ops(client, second.budget).redis_now() + 0.01)
        second.acquire().release()  # the fresh keys take the second limits
        assert second.status().rpm == 6
        with pytest.raises(BudgetConflictError):
            first.status()


def test_reconfigure_changes_the_limits_for_everyone_without_inventing_credit(url: str, name: str) -> None:
    old = Budget(name, rpm=60, burst=60)  # 60 of credit, refills 1 a second
    with Limiter(old, url) as a, Limiter(old, url) as b:
        a.acquire(requests=30).release()
        assert (
            b.reconfigure(Budget(name, rpm=30, burst=60)) == "rpm=60, tpm=None, credit=59.75s, max_concurrency=None, "
            "lease_ttl=30, claim_window=0.5"
        )
        tight = b.status()
        assert tight.rpm == 30 and tight.requests_available is not None
        assert tight.requests_available < 1  # 30 used of a capacity now 30: the debt stayed
        with pytest.raises(BudgetConflictError):
            a.acquire()
        b.reconfigure(Budget(name, rpm=120, burst=60))
        loose = b.status()
        assert loose.rpm == 120 and loose.requests_available is not None
        assert loose.requests_available < tight.requests_available + 2  # the level stays; it refills faster
        b.reconfigure(Budget(name, rpm=120, burst=1))  # a smaller burst caps the level at its capacity
        assert b.status().requests_available <= 2  # type: ignore[operator]
        b.reconfigure(Budget(name, rpm=120, burst=60))  # and a larger one invents none
        assert b.status().requests_available <= 2.5  # type: ignore[operator]
        again = b.reconfigure(Budget(name, rpm=120, burst=60))
        assert again is not None and "rpm=120" in again and "credit=59.75s" in again
        with pytest.raises(ConfigurationError):
            b.reconfigure(Budget(f"{name}-other", rpm=1))


def test_reconfigure_serves_the_queue_at_once(rclient: redis.Redis, name: str) -> None:
    ops = Ops(rclient, Budget(name, max_concurrency=1))
    ops.acquire()
    waiter, reply = ops.acquire()
    assert reply.kind == "queued"
    pubsub = rclient.pubsub()
    pubsub.subscribe(f"{{xflow:{name}}}:events")
    assert pubsub.get_message(timeout=5)["type"] == "subscribe"  # type: ignore[index]
    ops.budget = Budget(name, max_concurrency=2)
    assert ops.run("configure", [])[0] == b"configured"
    message = pubsub.get_message(timeout=5)
    pubsub.close()
    assert message is not None and message["data"].startswith(f"g {waiter} ".encode())
    assert ops.status().in_flight == 2


async def test_async_limiters_refuse_other_limits_and_reconfigure(redis_url: str, name: str) -> None:
    async with (
        AsyncLimiter(Budget(name, rpm=60), redis_url) as first,
        AsyncLimiter(Budget(name, rpm=90), redis_url) as second,
    ):
        lease = await first.acquire()
        with pytest.raises(BudgetConflictError, match="rpm=90"):
            await second.acquire(timeout=1)
        assert await second.reconfigure(second.budget) is not None
        assert (await second.status()).in_flight == 1
        with pytest.raises(BudgetConflictError):
            await lease.release()
        await first.reconfigure(Budget(name, rpm=60))
        assert (await asyncio.wait_for(first.status(), 5)).rpm == 60


def test_status_of_a_budget_without_keys_is_never_refused(redis_url: str) -> None:
    name = f"test-{uuid.uuid4().hex[:12]}"
    with Limiter(Budget(name, rpm=1), redis_url) as a, Limiter(Budget(name, rpm=2), redis_url) as b:
        assert a.status().rpm == 1 and b.status().rpm == 2  # status writes nothing: no limits stored
