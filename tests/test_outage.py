"""Redis out or its state lost: the outage policy (closed, open, local) and lost-state recovery.

Each test runs a redis-server of its own that it kills and restarts on the same port; every wait is
bounded and asserts on counts.
"""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from _helpers import Running, until
from _servers import Server, in_flight

from xflow_dist import (
    AsyncLimiter,
    Budget,
    BudgetUnavailableError,
    ConfigurationError,
    Limiter,
    OutagePolicy,
    XflowError,
)

pytestmark = pytest.mark.timeout(90)


# --- the policy, checked before anything runs ---------------------------------------------------------


def test_a_bad_outage_policy_is_refused_before_redis_is_touched(name: str) -> None:
    with pytest.raises(ConfigurationError, match="outage mode"):
        Limiter(Budget(name, rps=1), "redis://127.0.0.1:1/0", outage="sometimes")
    with pytest.raises(ConfigurationError, match="fleet_size"):
        OutagePolicy(fleet_size=0)
    with pytest.raises(ConfigurationError, match="outage must be"):
        Limiter(Budget(name, rps=1), "redis://127.0.0.1:1/0", outage=3)  # type: ignore[arg-type]


# --- closed -------------------------------------------------------------------------------------------


def test_closed_refuses_within_the_io_bound_and_comes_back(server: Server, name: str) -> None:
    policy = OutagePolicy(mode="closed", probe_interval=0.05)
    with Limiter(Budget(name, rps=100, max_concurrency=4), server.url, outage=policy, io_timeout=0.5) as lim:
        lim.acquire().release()
        server.kill()
        t0 = time.monotonic()
        with pytest.raises(BudgetUnavailableError, match="closed"):
            lim.acquire(timeout=30)
        assert time.monotonic() - t0 < 2 * 0.5 + 0.5
        t1 = time.monotonic()
        with pytest.raises(BudgetUnavailableError):  # now at once: no Redis call while it is out
            lim.acquire(timeout=30)
        assert time.monotonic() - t1 < 0.1
        assert lim.status().mode == "closed"
        server.start()
        until(lambda: lim.status().mode == "shared")
        with lim.acquire(timeout=5):
            assert lim.status().in_flight == 1


# --- open ---------------------------------------------------------------------------------------------


def test_open_lets_calls_through_counts_them_and_registers_those_still_running(server: Server, name: str) -> None:
    policy = OutagePolicy(mode="open", probe_interval=0.05)
    with Limiter(Budget(name, rps=1, max_concurrency=1), server.url, outage=policy, io_timeout=0.5) as lim:
        lim.acquire().release()  # the only request of this second
        server.kill()
        leases = [lim.acquire(timeout=2) for _ in range(5)]  # far past rps and concurrency: unlimited
        status = lim.status()
        assert (status.mode, status.outage_grants, status.in_flight) == ("open", 5, 5)
        for lease in leases[:3]:
            lease.release()
        server.start()
        until(lambda: lim.status().mode == "shared")
        assert in_flight(server, name) == 2  # the two calls still running joined the shared budget
        for lease in leases[3:]:
            lease.release()
        assert in_flight(server, name) == 0


def test_open_charges_the_calls_it_let_through_on_the_way_back(server: Server, name: str) -> None:
    """The shared bucket refilled through a freeze; the calls open let through spent the provider's.
    Uncharged, the fleet would burst on top of them as Redis thaws (the chaos benchmark saw 6 429s
    at the thaw, then a cooldown of 8 s)."""
    policy = OutagePolicy(mode="open", probe_interval=0.05)
    with Limiter(Budget(name, rpm=60, burst=10), server.url, outage=policy, io_timeout=0.3) as lim:
        lim.acquire().release()  # 9 of 10 left, one more a second
        server.freeze()
        try:
            for _ in range(6):
                lim.acquire(timeout=2).release()
            assert (lim.status().mode, lim.status().outage_grants) == ("open", 6)
        finally:
            server.thaw()
        until(lambda: lim.status().mode == "shared")
        level = lim.status().requests_available
    assert level is not None and level <= 9 - 6 + 3, level  # uncharged, it would be full (10)


# --- local --------------------------------------------------------------------------------------------


def test_local_runs_on_an_empty_share_then_rejoins_without_over_admission(server: Server, name: str) -> None:
    """Two limiters (two subscribers: a fleet of two) with 4 slots and 20 requests a second; Redis is
    killed with one lease held by each. Each keeps half: 2 slots, one of them its held call's."""
    budget = Budget(name, rps=20, burst=1.0, max_concurrency=4)
    policy = OutagePolicy(probe_interval=0.05)
    a = Limiter(budget, server.url, outage=policy, io_timeout=0.5)
    b = Limiter(budget, server.url, outage=policy, io_timeout=0.5)
    try:
        held_a, held_b = a.acquire(timeout=5), b.acquire(timeout=5)
        until(lambda: a._fleet == 2 and b._fleet == 2)  # each counted both subscribers
        server.kill()
        t0 = time.monotonic()
        first = a.acquire(timeout=5)  # the share starts empty: 10 requests/s, so the first waits 0.1 s
        assert time.monotonic() - t0 < 0.5 + 0.5 + 0.5
        status = a.status()
        assert (status.mode, status.in_flight, status.rpm) == ("local", 2, 600)
        assert not a.try_acquire()  # 2 slots of 4: the held call and this one
        held_a.release()  # its settle waits for Redis; its slot in the share is free at once
        second = a.acquire(timeout=5)
        assert a.status().in_flight == 2
        server.start()  # empty: the state is lost as well
        until(lambda: a.status().mode == "shared")
        # a's two share leases are registered by its way back, b's held lease when b's events
        # connection returns; a's released one is settled (nothing left of it to settle)
        until(lambda: in_flight(server, name) == 3)
        assert not a.try_acquire()  # 3 in flight of 4: one free, but the rebuilt buckets hold nothing
        for lease in (first, second, held_b):
            lease.release()
        until(lambda: in_flight(server, name) == 0)
    finally:
        a.close()
        b.close()


def test_a_share_of_no_slot_waits_for_redis(server: Server, name: str) -> None:
    policy = OutagePolicy(probe_interval=0.05, fleet_size=3)
    with Limiter(Budget(name, max_concurrency=2), server.url, outage=policy, io_timeout=0.5) as lim:
        server.kill()  # never reached Redis: it assumes the policy's fleet of 3, more than 2 slots
        with pytest.raises(Exception, match="concurrency is none"):
            lim.acquire(timeout=1.5)
        got: list[object] = []
        thread = threading.Thread(target=lambda: got.append(lim.acquire(timeout=10)), daemon=True)
        thread.start()
        server.start()
        thread.join(timeout=10)
        assert len(got) == 1 and in_flight(server, name) == 1


async def test_async_local_share_and_the_way_back(server: Server, name: str) -> None:
    budget = Budget(name, rps=50, burst=0.2, max_concurrency=3)
    policy = OutagePolicy(probe_interval=0.05)
    async with AsyncLimiter(budget, server.url, outage=policy, io_timeout=0.5) as lim:
        held = await lim.acquire(timeout=5)
        server.kill()
        during = [await lim.acquire(timeout=5) for _ in range(2)]  # 3 slots: the held call and these
        status = await lim.status()
        assert (status.mode, status.in_flight, status.outage_grants) == ("local", 3, 2)
        assert not await lim.try_acquire()
        server.start()
        for _ in range(500):
            if (await lim.status()).mode == "shared":
                break
            await asyncio.sleep(0.01)
        assert (await lim.status()).in_flight == 3
        for lease in (held, *during):
            await lease.release()
        assert (await lim.status()).in_flight == 0


def test_the_way_back_charges_what_the_share_let_through_not_its_empty_start(server: Server, name: str) -> None:
    """Redis frozen while the shared bucket is spent: it keeps time meanwhile, so the way back charges
    it what the share granted, no more. (Charging the share's capacity less its level also charged
    the share's empty start: a debt of a whole burst, a minute's stall with burst=60.)"""
    budget = Budget(name, tps=1_000, burst=60.0)
    policy = OutagePolicy(probe_interval=0.05)
    with Limiter(budget, server.url, outage=policy, io_timeout=0.3) as lim:
        drained = time.monotonic()
        lim.acquire(tokens=60_000, timeout=5).release()  # the whole minute spent
        server.freeze()
        try:
            lim.acquire(tokens=100, timeout=5).release()  # on the share, empty at first: 0.1 s of its rate
            assert lim.status().mode == "local"
        finally:
            server.thaw()
        until(lambda: lim.status().mode == "shared")
        level = lim.status().tokens_available
        assert level is not None
        assert level <= 1_000 * (time.monotonic() - drained) - 100 + 1  # no credit the provider lacks
        assert level >= 0, "charged more than the share let through"
        with lim.acquire(tokens=100, timeout=2):
            pass


async def test_the_way_back_charges_what_the_share_let_through_async(server: Server, name: str) -> None:
    budget = Budget(name, tps=1_000, burst=60.0)
    policy = OutagePolicy(probe_interval=0.05)
    async with AsyncLimiter(budget, server.url, outage=policy, io_timeout=0.3) as lim:
        drained = time.monotonic()
        await (await lim.acquire(tokens=60_000, timeout=5)).release()
        server.freeze()
        try:
            await (await lim.acquire(tokens=100, timeout=5)).release()
            assert (await lim.status()).mode == "local"
        finally:
            server.thaw()
        for _ in range(500):
            if (await lim.status()).mode == "shared":
                break
            await asyncio.sleep(0.01)
        level = (await lim.status()).tokens_available
        assert level is not None
        assert 0 <= level <= 1_000 * (time.monotonic() - drained) - 100 + 1
        await (await lim.acquire(tokens=100, timeout=2)).release()


def test_a_freeze_lets_no_slot_out_twice(server: Server, name: str) -> None:
    """A holds every slot; B only waits in the queue (it makes no call: it never sees the outage).
    Redis freezes; A's calls end (their settles wait for Redis) and A runs on its share, 2 of 4 slots,
    with 2 new calls. Redis thaws: the fleet must not run more than 4 calls at once."""
    budget = Budget(name, max_concurrency=4)
    policy = OutagePolicy(probe_interval=2.0)  # the way back after the settles: the race made certain
    running = Running()

    with (
        Limiter(budget, server.url, outage=policy, io_timeout=0.3) as a,
        Limiter(budget, server.url, outage=policy, io_timeout=0.3) as b,
    ):
        held = [a.acquire(timeout=5) for _ in range(4)]
        assert not b.try_acquire()  # b subscribes too: the census counts two processes
        threads = [threading.Thread(target=lambda: running.call(b.acquire(timeout=20), 1.0)) for _ in range(4)]
        for t in threads:
            t.start()
        until(lambda: a._fleet == 2 and b.status().queued == 4)
        server.freeze()
        try:
            for lease in held:  # their settles fail and are retried in the background
                threads.append(threading.Thread(target=lease.release))
                threads[-1].start()
            time.sleep(0.6)
            for lease in [a.acquire(timeout=2) for _ in range(2)]:  # the share: 2 slots of 4
                threads.append(threading.Thread(target=running.call, args=(lease, 3.0)))
                threads[-1].start()
            assert a.status().mode == "local"
        finally:
            server.thaw()
        for t in threads:
            t.join(timeout=20)
        assert running.most <= 4, f"{running.most} calls at once for 4 slots"


# --- lost state -------------------------------------------------------------------------------------


def test_lost_keys_come_back_empty_with_the_leases_still_held(server: Server, name: str) -> None:
    """FLUSHALL while two calls run: the next script finds the keys gone, makes them empty with a
    hold, and announces it; the holders register their leases again; no fresh burst, no extra slot."""
    budget = Budget(name, rps=10, burst=2.0, max_concurrency=2)
    with Limiter(budget, server.url) as lim, Limiter(budget, server.url) as other:
        one, two = lim.acquire(timeout=5), other.acquire(timeout=5)
        c = server.client()
        c.flushall()
        assert not lim.try_acquire()  # it rebuilt the state: both slots are taken again, not free
        until(lambda: in_flight(server, name) == 2)  # lim's own lease and, on the notice, other's
        status = lim.status()
        assert status.requests_available is not None and status.requests_available < 1.0
        assert status.cooldown_remaining > 0  # the hold while holders come back
        one.release()
        two.release()
        until(lambda: in_flight(server, name) == 0)
        c.close()


def test_a_newcomer_finds_a_fresh_budget(server: Server, name: str) -> None:
    """Keys that expired (or never were) are not lost: a process that has not seen them starts full."""
    budget = Budget(name, rps=10, burst=2.0)
    with Limiter(budget, server.url) as lim:
        assert lim.status().requests_available == 20  # read-only: it makes no keys, and is no sighting
        for _ in range(20):
            assert lim.try_acquire(), "a fresh budget grants its whole burst"


async def test_a_status_first_is_no_sight_of_the_keys_async(server: Server, name: str) -> None:
    """status() makes no key: the first acquire after it makes a fresh, full budget, not a lost one."""
    budget = Budget(name, rps=10, burst=2.0)
    async with AsyncLimiter(budget, server.url) as lim:
        assert (await lim.status()).requests_available == 20
        for _ in range(20):
            assert await lim.try_acquire(), "a fresh budget grants its whole burst"


def test_a_heartbeat_registers_a_lease_redis_no_longer_holds(server: Server, name: str) -> None:
    budget = Budget(name, max_concurrency=1, lease_ttl=0.6)
    with Limiter(budget, server.url) as lim:
        lease = lim.acquire(timeout=5)
        c = server.client()
        c.delete(f"{{xflow:{name}}}:leases", f"{{xflow:{name}}}:lease_data")  # the lease alone is gone
        until(lambda: in_flight(server, name) == 1, timeout=5)  # the next heartbeat (0.2 s) adds it back
        assert not lease.lost
        lease.release()
        assert in_flight(server, name) == 0
        c.close()


def test_a_wrong_password_is_no_outage(redis_url: str, name: str) -> None:
    """A refusal that does not pass (a wrong password) raises whatever the policy: no local share
    would hide a misconfigured process."""
    url = redis_url.replace("redis://", "redis://nobody:wrong@")
    with Limiter(Budget(name, rps=10), url) as lim:
        with pytest.raises(XflowError) as caught:
            lim.acquire(timeout=1)
        assert not isinstance(caught.value, BudgetUnavailableError)
        assert lim._outage is None


# --- a fleet through a restart --------------------------------------------------------------------------


@pytest.mark.slow
def test_a_fleet_through_a_redis_restart_loses_no_job_and_keeps_its_slots(real_redis: bool, tmp_path: Path) -> None:
    """benchmarks/chaos.py, small: 2 processes x 6 workers share 8 slots; Redis is SIGKILLed mid-run and
    started again empty 3 s later (local policy). Every job completes, no process hangs or crashes, the
    provider never has more than 8 calls in flight, and the fleet is back on Redis within seconds."""
    if not real_redis:
        pytest.skip("needs a redis-server binary")
    out = tmp_path / "chaos.json"
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "chaos.py"
    args = ["--quick", "--scenario", "concurrency", "--fault", "redis-kill", "--policy", "local", "--no-baseline"]
    args += ["--processes", "2", "--concurrency", "6", "--json", str(out)]
    proc = subprocess.run([sys.executable, str(script), *args], timeout=60, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text(encoding="utf-8"))["runs"]
    assert run["fault"] == "redis-kill" and not run["fault_error"], run["fault_error"]
    assert run["redis_back_s"] is not None
    assert run["jobs_lost"] == 0 and run["jobs_done"] == run["jobs_handed"] > 0
    assert run["hangs"] == 0 and not run["crashed_processes"] and not run["failures"]
    assert run["peak_in_flight"] <= run["max_concurrency"] == 8
    assert run["over_admissions"] == 0
    assert math.isfinite(run["recovery_first_s"]) and run["recovery_first_s"] < 10, run["recovery_first_s"]
