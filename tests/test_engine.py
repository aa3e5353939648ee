"""``memory://``'s engine against the Lua off the grid: any rates, costs and clock steps.

test_model.py proves the engine and the Lua agree step for step on a grid where every sum is exact
(so that a model in Fractions can follow). Here the numbers are arbitrary: rates like 7.3/s, costs
like 123.457 tokens, the clock moving by odd microseconds. Each call runs on fakeredis (the very Lua,
through lupa) and on the engine at the same clock (``Twin``); replies, events, keys and expiry must
be identical, rounding included. Bad arguments must be refused with the same message.
"""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_model import CLOCK, FakeClock, Twin, fake_clock, listen, routed  # noqa: F401  (the fixture)

from xflow_dist import Budget, CooldownPolicy
from xflow_dist._base import LimiterBase
from xflow_dist._core import acquire_args, budget_args, channel, cooldown_args, keys, settle_args
from xflow_dist._scripts import register

RATES = st.sampled_from([0.0, 0.7, 3.0, 7.3, 100.0, 1234.5])
BURSTS = st.sampled_from([0.0, 0.37, 1.0, 2.5, 60.0])
COST = st.sampled_from([0.0, 1.0, 2.0, 0.3]) | st.floats(0, 500, allow_nan=False).map(lambda x: round(x, 3))
STEP = st.integers(0, 400_000)  # microseconds

OP = st.one_of(
    st.tuples(
        st.just("acquire"),
        st.integers(0, 5),
        COST,
        COST,
        st.sampled_from([None, 0.0, 0.5, 5.0]),
        st.booleans(),
        st.booleans(),
        st.sampled_from([0, 0, 1, 3]),
    ),
    st.tuples(
        st.just("settle"),
        st.integers(0, 5),
        st.none() | COST,
        st.none() | st.integers(0, 50),
        st.none() | st.integers(0, 500),
        st.none() | st.sampled_from([60.0, 90.0, 6000.0]),
        st.booleans(),  # count the processes (a census)
        st.lists(st.integers(0, 5), max_size=3),  # queued tickets it renews on its way
    ),
    st.tuples(st.just("cancel"), st.integers(0, 5)),
    st.tuples(st.just("extend"), st.integers(0, 5)),
    st.tuples(st.just("renew"), st.lists(st.integers(0, 5), max_size=4)),  # no id at all: refused alike
    st.tuples(st.just("rejoin"), st.integers(0, 5), COST, COST),
    st.tuples(st.just("cooldown"), st.none() | st.sampled_from([0.0, 0.3, 1.7]), st.sampled_from([0.0, 0.42])),
    st.tuples(st.just("clear_cooldown")),
    st.tuples(st.just("status")),
    st.tuples(st.just("flush")),
    st.tuples(st.just("bad"), st.integers(10, 18), st.sampled_from(["", "nan", "1e400", "+1", "0x10", "a b", "-2"])),
)


class _Deaf:
    """A subscriber of ``memory://`` that hears nothing: it is only counted."""

    def deliver(self, msg: dict[str, Any]) -> None:
        pass


def _argv(op: tuple[Any, ...], ids: list[str]) -> tuple[str, list[str]]:
    kind = op[0]
    if kind == "acquire":
        _, i, req, tok, max_wait, may_queue, overdraft, lead = op
        return kind, acquire_args(ids[i], req, tok, max_wait, may_queue, 1.5, False, overdraft, lead)
    if kind == "settle":
        _, i, actual, seen_req, seen_tok, limit, census, renews = op
        argv = settle_args(ids[i], actual, seen_req, seen_tok, limit, limit and limit * 10)
        if renews:
            return kind, [*argv, "1" if census else "0", "1.5", *(ids[j] for j in renews)]
        return kind, argv + ["1"] * census
    if kind in ("cancel", "extend"):
        return kind, [ids[op[1]]]
    if kind == "renew":
        return kind, ["1.5", *(ids[i] for i in op[1])]
    if kind == "rejoin":
        return kind, LimiterBase._rejoin_args(ids[op[1]], 1, op[2], (op[2], op[3]))
    if kind == "cooldown":
        return kind, cooldown_args(CooldownPolicy(base=0.3, jitter=0.5, quiet=1.1), op[1], op[2])
    return kind, []


@pytest.mark.usefixtures("fake_clock")
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(
    rps=RATES,
    tps=RATES,
    burst=BURSTS,
    max_concurrency=st.sampled_from([0, 1, 3]),
    grace=st.sampled_from([0.5, 10.0]),
    # a give-up moment: none, or just before or after the call runs (Late calls)
    steps=st.lists(
        st.tuples(STEP, OP, st.booleans(), st.sampled_from([None, None, -1e-3, 1e-3])), min_size=1, max_size=40
    ),
)
def test_the_engine_is_the_lua_off_the_grid(
    rps: float,
    tps: float,
    burst: float,
    max_concurrency: int,
    grace: float,
    steps: list[tuple[int, tuple[Any, ...], bool, float | None]],
) -> None:
    budget = Budget(
        "engine",
        rps=rps or None,
        tps=tps or None,
        burst=burst,
        max_concurrency=max_concurrency or None,
        lease_ttl=2.0,
        claim_window=0.5,
    )
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    scripts = register(client)
    pubsub = listen(client, budget)  # the budget's channel and the processes' own (p0, p1)
    twin = Twin(client)
    fleet = [client.pubsub() for _ in range(2)]  # two processes on the budget's channel: a census counts them
    for sub in fleet:
        sub.subscribe(channel(budget))
        twin.server.subscribe(channel(budget), _Deaf())  # type: ignore[arg-type]
    ks = keys(budget)
    ids = [f"p{i % 2}.{i}" for i in range(6)]
    CLOCK.ticks = 0
    base_us = 0
    for step_us, op, seen, late in steps:
        base_us += step_us
        CLOCK.ticks = base_us / 1_000_000 * 64  # the fake clock counts 1/64 s; any float will do
        if op[0] == "flush":
            client.flushall()
            twin.server.flush()
            continue
        block = budget_args(budget, seen, 0.0 if late is None else CLOCK.time() + late)
        block[6] = repr(grace)
        if op[0] == "bad":
            kind, argv = "acquire", acquire_args(ids[0], 1, 1, None, True, 1.5, False, False)
            argv.append("0")
            argv[op[1] - 10] = op[2]  # ARGV[12..20]: one of them bad
        else:
            kind, argv = _argv(op, ids)
        try:
            lua: Any = scripts[kind](keys=ks, args=[*block, *argv])
        except redis.ResponseError as exc:
            lua = exc
        twin.run(kind, ks, [*block, *argv], lua)
        got = []
        while (msg := pubsub.get_message(timeout=0)) is not None:
            got.append(routed(budget, msg))
        assert [routed(budget, m) for m in twin.take_events()] == got, (kind, argv)
    for sub in [pubsub, *fleet]:
        sub.close()
    client.close()


@pytest.mark.usefixtures("fake_clock")
def test_a_settle_renews_its_tickets_after_it_served_the_queue() -> None:
    """The tickets a settle renews are answered after its release has served the queue: the head it
    freed a slot for is "g" (granted), the next the new head; on the engine exactly as in the Lua."""
    budget = Budget("engine", max_concurrency=1, lease_ttl=2.0)
    client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    scripts, twin, ks = register(client), Twin(client), keys(budget)
    CLOCK.ticks = 64

    def both(op: str, argv: list[str]) -> list[str]:
        args = [*budget_args(budget, False, 0.0), *argv]
        lua = scripts[op](keys=ks, args=args)
        twin.run(op, ks, args, lua)
        return [x.decode() for x in lua]

    for lid, kind in (("p0.a", "granted"), ("p0.b", "queued"), ("p1.c", "queued")):
        assert both("acquire", acquire_args(lid, 1, 0, None, True, 1.5, False, False))[0] == kind
    reply = both("settle", [*settle_args("p0.a", None, None, None, None, None), "0", "1.5", "p0.b", "p1.c", "p0.x"])
    # settled; no census asked ("0"); b granted by this very release, c the head now (told to come
    # back when b's grant lapses unclaimed: the claim window, no process being connected), x never queued
    assert reply[0] == "settled" and reply[5:] == ["0", "g", "h0.500000", "-"], reply
