"""A real fleet: several OS processes (spawned, not forked) share one budget through one Redis.

Every grant is written to a ledger kept apart from the limiter: the holder asks Redis ``TIME`` on
a plain client of its own right after ``acquire`` returns (the measured start) and right before
``release`` (the measured end). The parent then checks the ledger against the budget's promises:
rate in every window, concurrency at every instant, and that the binding limit is actually used.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import multiprocessing as mp
import os
import random
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._core import keys

pytestmark = [pytest.mark.slow]

# Children are spawned, never forked: each is a fresh interpreter, as on another machine.
_SPAWN = mp.get_context("spawn")


@pytest.fixture(autouse=True)
def _needs_real_redis(real_redis: bool) -> None:
    if not real_redis:
        pytest.skip("fleet tests time a real redis-server; fakeredis in the test process is no fleet")


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    """Processes a test starts; any still alive at the end are killed (by handle) and reaped."""
    started: list[Any] = []
    yield started
    for p in started:
        if p.is_alive():
            p.kill()
        p.join(timeout=10)


def _redis_time(client: redis.Redis) -> float:
    sec, usec = client.time()
    return sec + usec / 1_000_000


def _get(q: Any, timeout: float) -> Any:
    return q.get(timeout=timeout)


# --------------------------------------------------------------------------------------------
# Workers (module top level, so that the 'spawn' start method can import them by name).
# --------------------------------------------------------------------------------------------


def _hammer_worker(
    url: str,
    budget_kw: dict[str, Any],
    proc_id: int,
    coroutines: int,
    duration: float,
    out_path: str,
    ready: Any,
    go: Any,
) -> None:
    """Run ``coroutines`` acquirers on one AsyncLimiter until ``duration`` seconds after ``go``."""
    asyncio.run(_hammer_main(url, budget_kw, proc_id, coroutines, duration, out_path, ready, go))


async def _hammer_main(
    url: str,
    budget_kw: dict[str, Any],
    proc_id: int,
    coroutines: int,
    duration: float,
    out_path: str,
    ready: Any,
    go: Any,
) -> None:
    budget = Budget(**budget_kw)
    data_key = keys(budget)[2]
    clock = redis.Redis.from_url(url)  # the ledger's own client, never the limiter's
    ledger: list[tuple[int, float, float, float, float]] = []
    errors: list[str] = []
    async with AsyncLimiter(budget, url) as limiter:
        # Warm up before the start signal, so that start-up work does not delay the first grants
        # and with them their measured starts: one connection per acquirer, the events channel
        # subscribed (a zero-cost acquire charges nothing), the scripts loaded.
        await asyncio.gather(*(limiter.status() for _ in range(coroutines)))
        await (await limiter.acquire(tokens=0, requests=0, timeout=30.0)).release()
        clock.ping()
        ready.put(proc_id)
        if not go.wait(timeout=120):
            raise RuntimeError("never told to go")
        deadline = time.monotonic() + duration

        async def acquirer(k: int) -> None:
            rng = random.Random(proc_id * 1000 + k)
            # A ramp, not a stampede: 120 acquirers woken at once on two cores delay their own
            # first grants by up to ~200 ms of CPU, right where the window bound is tightest
            # (the first burst), and a measured start must not lag its charge by much.
            await asyncio.sleep(RAMP * k / coroutines)
            for _ in range(10_000):  # bounded in count as well as in time
                if time.monotonic() >= deadline:
                    return
                cost = rng.randint(50, 500)
                lease = await limiter.acquire(tokens=cost, timeout=30.0)
                start = _redis_time(clock)  # sync on purpose: no other coroutine runs in between
                held = clock.hget(data_key, lease.id)
                charged = float(held.split()[2]) if held is not None else float("nan")
                await asyncio.sleep(rng.uniform(0.0, 0.020))
                end = _redis_time(clock)
                await lease.release()
                ledger.append((proc_id, start, end, float(cost), charged))

        results = await asyncio.gather(*(acquirer(k) for k in range(coroutines)), return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
    clock.close()
    Path(out_path).write_text(json.dumps({"ledger": ledger, "errors": errors}))


def _holder_worker(url: str, budget_kw: dict[str, Any], leases: int, q: Any) -> None:
    """Take ``leases`` leases, say so, then block (heartbeats running) until killed."""
    limiter = Limiter(Budget(**budget_kw), url)
    held = [limiter.acquire(timeout=10.0) for _ in range(leases)]
    clock = redis.Redis.from_url(url)
    q.put(("ready", [lease.id for lease in held], _redis_time(clock)))
    for _ in range(600):  # "forever", but bounded: the parent kills us long before
        time.sleep(0.2)
    limiter.close()


def _stream_worker(
    url: str,
    budget_kw: dict[str, Any],
    proc_id: int,
    coroutines: int,
    cost: float,
    out_path: str,
    ready: Any,
    go: Any,
    stop: Any,
    max_seconds: float,
) -> None:
    """Stream small requests from ``coroutines`` acquirers until ``stop`` (or ``max_seconds``)."""
    asyncio.run(_stream_main(url, budget_kw, proc_id, coroutines, cost, out_path, ready, go, stop, max_seconds))


async def _stream_main(
    url: str,
    budget_kw: dict[str, Any],
    proc_id: int,
    coroutines: int,
    cost: float,
    out_path: str,
    ready: Any,
    go: Any,
    stop: Any,
    max_seconds: float,
) -> None:
    budget = Budget(**budget_kw)
    clock = redis.Redis.from_url(url)
    ledger: list[tuple[int, float, float]] = []
    async with AsyncLimiter(budget, url) as limiter:
        await limiter.status()
        clock.ping()
        ready.put(proc_id)
        if not go.wait(timeout=120):
            raise RuntimeError("never told to go")
        deadline = time.monotonic() + max_seconds

        async def acquirer() -> None:
            for _ in range(10_000):
                if stop.is_set() or time.monotonic() >= deadline:
                    return
                submitted = _redis_time(clock)
                lease = await limiter.acquire(tokens=cost, timeout=30.0)
                started = _redis_time(clock)
                await lease.release()
                ledger.append((proc_id, submitted, started))

        results = await asyncio.gather(*(acquirer() for _ in range(coroutines)), return_exceptions=True)
        errors = [repr(r) for r in results if isinstance(r, BaseException)]
    clock.close()
    Path(out_path).write_text(json.dumps({"ledger": ledger, "errors": errors}))


def _start_all(procs: list[Any], ready: Any, count: int, timeout: float = 60.0) -> None:
    for p in procs:
        p.start()
    seen = set()
    deadline = time.monotonic() + timeout
    while len(seen) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(seen)} of {count} workers became ready"
        try:
            seen.add(_get(ready, min(left, 1.0)))
        except Exception:
            dead = [p.exitcode for p in procs if not p.is_alive()]
            assert not dead, f"a worker died before it was ready: exit codes {dead}"


def _join_all(procs: list[Any], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(timeout=max(0.1, deadline - time.monotonic()))
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), f"worker exit codes {codes}"


# --------------------------------------------------------------------------------------------
# Ledger arithmetic.
# --------------------------------------------------------------------------------------------


def _worst_window(starts: list[float], amounts: list[float], w: float) -> tuple[float, float]:
    """The largest total whose start lies in some [t_i, t_i + w], t_i a start; and that t_i."""
    order = sorted(range(len(starts)), key=starts.__getitem__)
    ts = [starts[i] for i in order]
    prefix = [0.0]
    for i in order:
        prefix.append(prefix[-1] + amounts[i])
    best, at = 0.0, ts[0]
    for i, t in enumerate(ts):
        j = bisect.bisect_right(ts, t + w)
        total = prefix[j] - prefix[i]
        if total > best:
            best, at = total, t
    return best, at


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    """Most intervals alive at one instant; one ending exactly when another starts is not overlap."""
    events = [(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals]
    events.sort(key=lambda ev: (ev[0], ev[1]))  # ends (-1) before starts (+1) at equal times
    alive = best = 0
    for _, step in events:
        alive += step
        best = max(best, alive)
    return best


# --------------------------------------------------------------------------------------------
# 1. Many processes, one budget: never over, and close to the limit.
# --------------------------------------------------------------------------------------------

FLEET_PROCS = 6
FLEET_COROUTINES = 20
FLEET_SECONDS = 10.0
TPS = 20_000.0  # binds: the fleet could run ~2,000 grants/s of ~275 tokens, the budget allows ~73
RPS = 200.0  # does not bind (~73 requests/s), but is checked the same way
BURST = 1.0
MAX_CONC = 40
# The measured start lags the charged start by the wake-up plus one TIME round trip: ~4 ms
# typically. Allowing the rate times 20 ms for it is the intent; but on two busy cores (six
# workers, Redis, and whatever else the machine runs) one process can be descheduled for 50-200 ms
# while its grants come due, and then several grants are measured together, as if bunched. The
# lag is known per grant (each charged start is read back from Redis), so the measured windows
# allow max(LAG, the largest lag seen); the exact promise is checked on the charged starts.
LAG = 0.020
# Redis TIME is the wall clock, the client sleeps on the monotonic one: they may drift apart by
# slewing (<= 0.5 ms/s) over the <= 2 s a grant waits.
CLOCK_SLACK = 0.002
RAMP = 0.5  # seconds over which each process starts its acquirers


@pytest.mark.timeout(120)
def test_fleet_never_over_admits_and_saturates(redis_url: str, name: str, tmp_path: Path, procs: list[Any]) -> None:
    budget_kw = {"name": name, "rps": RPS, "tps": TPS, "burst": BURST, "max_concurrency": MAX_CONC}
    ready, go = _SPAWN.Queue(), _SPAWN.Event()
    outs = [tmp_path / f"fleet-{i}.json" for i in range(FLEET_PROCS)]
    procs.extend(
        _SPAWN.Process(
            target=_hammer_worker,
            args=(redis_url, budget_kw, i, FLEET_COROUTINES, FLEET_SECONDS, str(outs[i]), ready, go),
        )
        for i in range(FLEET_PROCS)
    )
    _start_all(procs, ready, FLEET_PROCS)
    go.set()
    _join_all(procs, timeout=FLEET_SECONDS + 60.0)

    ledger: list[list[float]] = []
    for i, out in enumerate(outs):
        data = json.loads(out.read_text())
        assert data["errors"] == [], f"worker {i} failed: {data['errors'][:3]}"
        ledger.extend(data["ledger"])
    assert ledger, "no grants at all"
    per_proc = [sum(1 for g in ledger if g[0] == i) for i in range(FLEET_PROCS)]
    # FIFO across the fleet: every process gets a fair part, not merely "some".
    fair = len(ledger) / FLEET_PROCS
    assert min(per_proc) >= fair / 4, f"grants per process {per_proc}"

    starts = [g[1] for g in ledger]
    ends = [g[2] for g in ledger]
    tokens = [g[3] for g in ledger]
    charged = [g[4] for g in ledger]
    ones = [1.0] * len(ledger)
    assert all(c == c for c in charged), "a lease vanished from Redis while its holder held it"
    assert all(e >= s for s, e in zip(starts, ends, strict=True))
    lags = [s - c for s, c in zip(starts, charged, strict=True)]
    # No holder starts before the start the budget charged it at (the client honours the delay).
    assert min(lags) >= -CLOCK_SLACK, f"a grant started {-min(lags) * 1000:.1f} ms before its charged start"
    allow = max(LAG, max(lags) + CLOCK_SLACK)
    cap_tok = TPS * BURST
    cap_req = RPS * BURST
    max_cost = max(tokens)

    # (a) rate in every window starting at a grant, for both dimensions: on the measured starts
    # (the independent ledger), allowing the lag; on the charged starts, exactly.
    worst = worst_lag_free = 0.0
    report: list[str] = []
    for w in (0.5, 1.0, 2.0, 5.0):
        for what, amounts, rate, cap, largest in (
            ("tokens", tokens, TPS, cap_tok, max_cost),
            ("requests", ones, RPS, cap_req, 1.0),
        ):
            promise = rate * w + max(cap, largest)
            got, at = _worst_window(starts, amounts, w)
            assert got <= promise + rate * allow, (
                f"{got:g} {what} started in [{at:.6f}, +{w}s], the bound is {promise:g} + {rate * allow:g} "
                f"(largest lag of a measured start {max(lags) * 1000:.1f} ms)"
            )
            exact, at = _worst_window(charged, amounts, w)
            # Starts are stored to the microsecond: allow the rate times a few microseconds.
            assert exact <= promise + rate * 1e-5, f"{exact:g} {what} charged in [{at:.6f}, +{w}s] > {promise:g}"
            if what == "tokens":
                worst = max(worst, got / promise)
                worst_lag_free = max(worst_lag_free, got / (promise + rate * LAG))
                report.append(f"w={w}: {got:g} measured, {exact:g} charged, of {promise:g}")

    # (b) concurrency: a measured interval lies inside its lease's life, so no tolerance at all.
    overlap = _max_overlap(list(zip(starts, ends, strict=True)))
    assert overlap <= MAX_CONC, f"{overlap} leases overlapped, max_concurrency is {MAX_CONC}"

    # (c) utilisation of the binding limit (tokens). Is the denominator fair? The budget is fresh,
    # so the bucket starts full (C tokens) and refills at the rate; every cost here is below C, so
    # a cost starts only when the bucket holds all of it and no start leaves the bucket below zero.
    # Hence no limiter, however perfect, can start more than C + rate * (last - first) tokens
    # between the first and the last start: this is the exact ceiling, not a loose one (the charged
    # starts must not exceed it at all). What a perfect limiter still leaves unused is the level at
    # the last start (under one cost, 500 tokens, against a ceiling of ~230,000) and the lag of the
    # first and last measured starts (each ~rate * 4 ms). It is fair only because the fleet keeps
    # the bucket busy from the first start to the last: the acquirers stop at a deadline, but the
    # tickets queued then are still granted back to back, so the last start closes a
    # saturated stretch, not an idle tail. Every grant is released at its estimate: no refunds.
    span = max(starts) - min(starts)
    utilisation = sum(tokens) / (TPS * span + cap_tok)
    exact_util = sum(tokens) / (TPS * (max(charged) - min(charged)) + cap_tok)
    assert span >= FLEET_SECONDS * 0.8, f"the fleet ran only {span:.2f}s"
    assert utilisation >= 0.95, f"utilisation {utilisation:.4f} over {span:.2f}s ({len(ledger)} grants)"
    assert exact_util <= 1.0 + 1e-6, f"{sum(tokens):g} tokens charged, above the ceiling ({exact_util:.6f})"

    print(
        f"\nfleet: {len(ledger)} grants {per_proc}, span {span:.2f}s, utilisation {utilisation:.4f}, "
        f"(charged {exact_util:.4f}), max overlap {overlap}/{MAX_CONC}, worst token window {worst:.4f} of "
        f"rate*w+C ({worst_lag_free:.4f} of it + rate*{LAG}s) ({'; '.join(report)}), start lag max "
        f"{max(lags) * 1000:.1f} ms, median {sorted(lags)[len(lags) // 2] * 1000:.1f} ms"
    )


# --------------------------------------------------------------------------------------------
# 2. A holder killed with SIGKILL: its leases come back within the lease TTL.
# --------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigkill_holder_loses_leases_within_ttl(
    redis_url: str, name: str, client: redis.Redis, procs: list[Any]
) -> None:
    ttl = 2.0
    budget_kw = {"name": name, "max_concurrency": 3, "lease_ttl": ttl}
    q = _SPAWN.Queue()
    child = _SPAWN.Process(target=_holder_worker, args=(redis_url, budget_kw, 3, q))
    procs.append(child)
    child.start()
    kind, lease_ids, _ = _get(q, 60.0)
    assert kind == "ready" and len(lease_ids) == 3

    with Limiter(Budget(**budget_kw), redis_url) as limiter:
        assert limiter.status().in_flight == 3
        assert not limiter.try_acquire(), "the budget is full: no fourth lease"
        # While the holder lives, its heartbeats keep the leases past their first TTL.
        ready_at = _redis_time(client)
        for _ in range(200):
            if _redis_time(client) >= ready_at + ttl + 0.5:
                break
            time.sleep(0.05)
        assert limiter.status().in_flight == 3, "a live holder lost its leases"
        assert not limiter.try_acquire()

        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGKILL
        assert limiter.status().in_flight == 3, "leases of a dead holder stand until their TTL"

        got = []
        try:
            for _ in range(3):
                got.append(limiter.acquire(timeout=ttl + 3.0))
            elapsed = time.monotonic() - killed
            assert elapsed <= ttl + 1.5, f"the dead holder's leases came back after {elapsed:.2f}s"
            # The last heartbeat came at most ttl/3 before the kill: the leases cannot have
            # expired much sooner than 2/3 of the TTL after it (a loose floor, ttl/4).
            assert elapsed >= ttl / 4, f"leases freed {elapsed:.2f}s after the kill, before their TTL"
            status = limiter.status()
            assert status.in_flight == 3 and status.queued == 0
            held = {k.decode() for k in client.zrange(keys(limiter.budget)[1], 0, -1)}
            assert held == {lease.id for lease in got}, "the slots belong to the new holder now"
            assert not held & set(lease_ids)
        finally:
            for lease in got:
                lease.release()
        assert limiter.status().in_flight == 0
    print(f"\nsigkill: 3 leases back {elapsed:.3f}s after the kill (lease_ttl {ttl}s)")


# --------------------------------------------------------------------------------------------
# 3. A bucket-sized request amid a stream of small ones: FIFO, so it is not starved.
# --------------------------------------------------------------------------------------------

STREAM_PROCS = 3
STREAM_COROUTINES = 4
SMALL = 20.0
BIG_TPS = 1000.0
BIG = 1000.0  # the whole bucket (tps * burst)


@pytest.mark.timeout(90)
def test_large_request_not_starved(
    redis_url: str, name: str, client: redis.Redis, tmp_path: Path, procs: list[Any]
) -> None:
    budget_kw = {"name": name, "tps": BIG_TPS, "burst": 1.0}
    ready, go, stop = _SPAWN.Queue(), _SPAWN.Event(), _SPAWN.Event()
    outs = [tmp_path / f"stream-{i}.json" for i in range(STREAM_PROCS)]
    procs.extend(
        _SPAWN.Process(
            target=_stream_worker,
            args=(redis_url, budget_kw, i, STREAM_COROUTINES, SMALL, str(outs[i]), ready, go, stop, 30.0),
        )
        for i in range(STREAM_PROCS)
    )
    _start_all(procs, ready, STREAM_PROCS)
    with Limiter(Budget(**budget_kw), redis_url) as limiter:
        go.set()
        try:
            # The stream has started when it has drained the initial burst and acquirers queue: the
            # bucket is never full again while it lasts, so a limiter that waits for a full bucket
            # (rather than serving the queue in order) would never start the big request.
            queued = 0
            for _ in range(300):
                queued = limiter.status().queued
                if queued > 0:
                    break
                time.sleep(0.05)
            assert queued > 0, "the stream never formed a queue"
            level_before = limiter.status().tokens_available or 0.0
            # The big request runs in a thread so that this one can see when its ticket (or lease)
            # exists in Redis: small requests submitted after that were surely queued behind it.
            big: dict[str, Any] = {}
            data_key = keys(limiter.budget)[2]
            tickets_key = keys(limiter.budget)[4]
            client_b = redis.Redis.from_url(redis_url)

            def ask() -> None:
                try:
                    lease = limiter.acquire(tokens=BIG, timeout=10.0)
                    big["start"] = _redis_time(client_b)
                    big["held"] = client_b.hget(data_key, lease.id)
                    lease.release()
                except Exception as exc:
                    big["error"] = repr(exc)

            asker = threading.Thread(target=ask, daemon=True)
            requested = _redis_time(client)
            asker.start()
            reserved_seen = None
            for _ in range(2000):  # <= ~10 s
                held = list(client.hvals(data_key)) + list(client.hvals(tickets_key))
                if any(v.split()[1] == b"1000" for v in held):
                    reserved_seen = _redis_time(client)
                    break
                if not asker.is_alive():
                    break
                time.sleep(0.005)
            asker.join(timeout=15.0)
            client_b.close()
            assert not asker.is_alive() and "held" in big, f"the big request was not granted: {big}"
            assert reserved_seen is not None, "the big request's ticket was never seen in Redis"
        finally:
            stop.set()
        _join_all(procs, timeout=40.0)

    ledger: list[list[float]] = []
    for i, out in enumerate(outs):
        data = json.loads(out.read_text())
        assert data["errors"] == [], f"worker {i} failed: {data['errors'][:3]}"
        ledger.extend(data["ledger"])

    big_start = big["start"]
    big_charged = float(big["held"].split()[2])  # the start the budget charged it at, Redis time
    assert big_charged <= big_start + CLOCK_SLACK
    waited = big_start - requested
    assert waited <= 3.0, f"the big request waited {waited:.3f}s"
    # FIFO bound. When the big request joins the queue (at some R <= reserved_seen), at most n small
    # tickets (one per acquirer) are ahead of it, and grants only happen when a cost fits, so the
    # bucket is never below zero: it is granted by R + (C + n * SMALL) / rate, the tickets ahead of it
    # plus a full bucket for itself, over the rate.
    n = STREAM_PROCS * STREAM_COROUTINES
    fifo_bound = (BIG_TPS * 1.0 + n * SMALL) / BIG_TPS
    assert big_charged - reserved_seen <= fifo_bound + 1e-3, (
        f"the big request was charged to start {big_charged - reserved_seen:.3f}s after its ticket "
        f"was seen, FIFO allows {fifo_bound:.3f}s"
    )

    before = [g for g in ledger if g[2] <= requested]
    assert len(before) >= STREAM_PROCS, "the small stream had not started"
    # Small requests submitted once the big one's ticket existed are queued behind it and granted
    # only after it, so no tolerance at all. An overtaking limiter would start them about a second
    # before it.
    later = [g for g in ledger if g[1] > reserved_seen]
    assert len(later) >= STREAM_PROCS, f"only {len(later)} small requests came after the big one"
    overtook = [g for g in later if g[2] <= big_charged]
    assert not overtook, (
        f"{len(overtook)} of {len(later)} small requests submitted after the big one started before it "
        f"(by up to {max(big_charged - g[2] for g in overtook):.3f}s)"
    )
    margin = min(g[2] for g in later) - big_start
    print(
        f"\nlarge request: waited {waited:.3f}s (charged {big_charged - requested:.3f}s after the request, "
        f"{big_charged - reserved_seen:.3f}s after its ticket was seen, FIFO bound {fifo_bound:.3f}s; "
        f"level at request {level_before:g}), "
        f"{len(later)} later small requests all started after it (first {margin * 1000:.1f} ms after its "
        f"measured start), {len(ledger)} small grants in all"
    )
