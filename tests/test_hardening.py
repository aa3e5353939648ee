"""Ways a fleet meets production: dead waiters, lost notices, frozen Redis, cut sockets, fork, GC.

Each test runs against a real server, ``redis-server`` or ``valkey-server`` (the suite's, or one of
its own, of the same kind, where it freezes it) and bounds every wait; several use real OS processes.
"""

from __future__ import annotations

import asyncio
import gc
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from _helpers import acquire_in_thread as _acquire_in_thread
from _helpers import until as _until

from xflow_dist import AcquireTimeout, AsyncLimiter, BackendError, Budget, Limiter
from xflow_dist._events import Resubscribed
from xflow_dist.tools._embedded import EmbeddedRedis, free_port


@pytest.fixture
def redis_server(embedded: EmbeddedRedis) -> Iterator[EmbeddedRedis]:
    """A server of this test's own, of the suite's kind, which it may freeze or stop."""
    if embedded.kind == "fakeredis":
        pytest.skip("needs a redis-server or valkey-server binary")
    server = EmbeddedRedis(server=embedded.server, allow_fake=False).start()
    yield server
    if server._proc is not None:
        os.kill(server._proc.pid, signal.SIGCONT)
    server.stop()


def test_timeout_zero_tries_once(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rps=10, burst=1), redis_url) as lim:
        lease = lim.acquire(timeout=0)  # the bucket holds 10: granted at once
        lease.release()
        for _ in range(9):
            lim.acquire(timeout=0).release()
        with pytest.raises(AcquireTimeout) as caught:
            lim.acquire(timeout=0)
        assert caught.value.retry_after is not None and 0 < caught.value.retry_after <= 0.11
        assert lim.status().queued == 0


async def test_timeout_zero_tries_once_async(redis_url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), redis_url) as lim:
        lease = await lim.acquire(timeout=0)
        with pytest.raises(AcquireTimeout):
            await lim.acquire(timeout=0)
        assert (await lim.status()).queued == 0
        await lease.release()


_WAITERS = textwrap.dedent(
    """
    import sys, threading, time
    from xflow_dist import Budget, Limiter
    lim = Limiter(Budget(sys.argv[1], max_concurrency=1), sys.argv[2])
    for _ in range(2):
        threading.Thread(target=lim.acquire, kwargs={"timeout": 60}, daemon=True).start()
    time.sleep(60)
    """
)


def test_a_process_killed_while_queued_costs_a_claim_window_per_waiter(redis_url: str, name: str) -> None:
    """Two queued waiters of a SIGKILLed process reach the head in turn; each grant to them stays
    unclaimed and is taken back after the claim window (0.5 s), not held for a lease TTL (30 s)."""
    with Limiter(Budget(name, max_concurrency=1), redis_url) as lim:
        held = lim.acquire()
        child = subprocess.Popen([sys.executable, "-c", _WAITERS, name, redis_url])
        try:
            _until(lambda: lim.status().queued == 2)
        finally:
            child.kill()
            child.wait(timeout=10)
        thread, out = _acquire_in_thread(lim, timeout=10)
        _until(lambda: lim.status().queued == 3)
        released = time.monotonic()
        held.release()
        thread.join(timeout=15)
        assert "lease" in out, out.get("error")
        waited = float(out["at"]) - released  # type: ignore[arg-type]
        assert waited < 2 * 0.5 + 1.0, f"granted {waited:.2f}s after the release"
        out["lease"].release()  # type: ignore[attr-defined]
        s = lim.status()
        assert (s.in_flight, s.queued) == (0, 0)


_RATE_WAITER = textwrap.dedent(
    """
    import sys
    from xflow_dist import Budget, Limiter
    lim = Limiter(Budget(sys.argv[1], rps=2, burst=1), sys.argv[2])
    lim.status()  # connected and the scripts loaded: the acquire below is a round trip
    print("ready", flush=True)
    sys.stdin.readline()  # the parent has spent the bucket
    lim.acquire(timeout=60)
    """
)


def test_a_process_killed_at_the_head_of_a_rate_paced_queue_costs_a_claim_window(redis_url: str, name: str) -> None:
    """The rates' twin of the test above: the head of the queue, told when its rate fits, dies; the
    waiter behind it should be served about a claim window after that time, not at its renewal."""
    with Limiter(Budget(name, rps=2, burst=1), redis_url) as lim:
        child = subprocess.Popen(
            [sys.executable, "-c", _RATE_WAITER, name, redis_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline().strip() == "ready"  # (its start-up is no part of the 0.5 s)
            for _ in range(2):
                lim.acquire().release()  # the bucket (2 requests) is spent: the next waits 0.5 s
            child.stdin.write("go\n")
            child.stdin.flush()
            _until(lambda: lim.status().queued == 1)  # the child's ticket heads the queue
        finally:
            child.kill()
            child.communicate(timeout=10)  # (and its pipes closed)
        started = time.monotonic()
        with lim.acquire(timeout=3):  # AcquireTimeout today: the next renewal is 15 s away
            waited = time.monotonic() - started
        assert waited < 0.5 + 0.5 + 1.0, f"granted {waited:.2f}s after the head died"


_WAITER = textwrap.dedent(
    """
    import sys, time
    from xflow_dist import Budget, Limiter
    with Limiter(Budget(sys.argv[1], max_concurrency=1), sys.argv[2]) as lim:
        lease = lim.acquire(timeout=10)
        print(time.monotonic(), flush=True)  # CLOCK_MONOTONIC: one clock for the machine's processes
        lease.release()
    """
)


def test_a_waiter_whose_notice_was_lost_asks_again_when_the_events_connection_returns(
    redis_url: str, name: str, client: redis.Redis
) -> None:
    """The waiter is another process; the grant notice is published while its subscriber is cut off."""
    with Limiter(Budget(name, max_concurrency=1), redis_url) as holder:
        decision = holder.try_acquire()  # the holder never subscribes: only the waiter is cut off
        assert decision.lease is not None
        child = subprocess.Popen([sys.executable, "-c", _WAITER, name, redis_url], stdout=subprocess.PIPE, text=True)
        try:
            _until(lambda: holder.status().queued == 1)
            assert client.client_kill_filter(_type="pubsub") == 1  # the waiter's subscriber
            released = time.monotonic()
            decision.lease.release()  # its grant notice goes out while the waiter's subscriber is away
            out, _ = child.communicate(timeout=15)
        finally:
            child.kill()
        assert child.returncode == 0
        waited = float(out.strip()) - released
        assert waited < 1.5, f"granted {waited:.2f}s after the release"
        assert holder.status().in_flight == 0


def test_acquire_with_a_timeout_returns_in_bounded_time_while_redis_is_frozen(
    redis_server: EmbeddedRedis, name: str
) -> None:
    io_timeout = 0.5  # the "closed" outage policy fails; "local" and "open" are in test_outage.py
    with Limiter(Budget(name, max_concurrency=1), redis_server.url, io_timeout=io_timeout, outage="closed") as lim:
        held = lim.acquire()
        assert redis_server._proc is not None
        pid = redis_server._proc.pid
        freezer = threading.Timer(0.5, os.kill, (pid, signal.SIGSTOP))
        started = time.monotonic()
        freezer.start()
        with pytest.raises((AcquireTimeout, BackendError)):
            lim.acquire(timeout=2.0)  # queued, then Redis freezes under it
        took = time.monotonic() - started
        assert took < 2.0 + io_timeout + 0.5, f"acquire(timeout=2) took {took:.2f}s"
        started = time.monotonic()
        with pytest.raises(BackendError):
            lim.acquire(timeout=2.0)  # frozen from the start: the first call gives up
        took = time.monotonic() - started
        assert took < io_timeout + 0.5, f"took {took:.2f}s"
        os.kill(pid, signal.SIGCONT)
        # the give-backs are retried in the background once Redis answers again
        _until(lambda: lim._outage is None)
        _until(lambda: lim.status().queued == 0)
        held.release()
        assert lim.status().in_flight == 0


def test_reports_land_after_every_pooled_connection_was_cut(redis_url: str, name: str, client: redis.Redis) -> None:
    with Limiter(Budget(name, tps=1_000, burst=1, max_concurrency=4), redis_url) as lim:
        leases = [lim.acquire(tokens=100) for _ in range(4)]
        client.client_kill_filter(_type="normal", skipme=True)  # every pooled connection is dead
        for lease in leases:
            lease.report(actual_tokens=10)
        assert lim.status().in_flight == 0


def test_a_dropped_lease_is_settled_when_collected(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=2), redis_url) as lim:
        lease = lim.acquire()
        assert lim.status().in_flight == 1
        del lease
        gc.collect()
        _until(lambda: lim.status().in_flight == 0)


def test_close_gives_back_the_leases_still_held(redis_url: str, name: str) -> None:
    lim = Limiter(Budget(name, max_concurrency=2), redis_url)
    lim.acquire()
    lim.close()
    with Limiter(Budget(name, max_concurrency=2), redis_url) as other:
        assert other.status().in_flight == 0


def _child_after_fork(lim: Limiter, results: multiprocessing.Queue[str]) -> None:
    try:
        first = lim.acquire(timeout=5)
        time.sleep(2.5)  # longer than the 1 s lease TTL: only the child's own heartbeats keep it
        alive = lim.status().in_flight
        got: dict[str, object] = {}

        def second() -> None:
            got["lease"] = lim.acquire(timeout=5)

        thread = threading.Thread(target=second)
        thread.start()
        deadline = time.monotonic() + 5
        while lim.status().queued < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        first.release()  # the queued acquire is woken by the grant notice
        thread.join(timeout=5)
        ok = "lease" in got
        if ok:
            got["lease"].release()  # type: ignore[attr-defined]
        results.put(f"{alive} {ok}")
    except Exception as exc:
        results.put(f"error {exc!r}")


def _answer_from_forked_child(target: object, lim: object) -> str:
    """Run ``target(lim, results)`` in a child made by fork; its one answer."""
    ctx = multiprocessing.get_context("fork")
    results: multiprocessing.Queue[str] = ctx.Queue()
    child = ctx.Process(target=target, args=(lim, results))
    child.start()
    try:
        return results.get(timeout=20)
    finally:
        child.join(timeout=10)


def test_a_forked_child_runs_its_own_heartbeats_and_notices(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=3, lease_ttl=1.0), redis_url) as lim:
        parents = lim.acquire()  # the parent's threads run before the fork
        answer = _answer_from_forked_child(_child_after_fork, lim)
        # 2 in flight after 2.5 s: the child's lease and the parent's, each kept by its own process
        assert answer == "2 True", answer
        # the child never touched the parent's lease, and left none of its own: a lease of theirs
        # that a late heartbeat found expired (1 s TTL on a loaded machine) and registered again as
        # the child released it lives at most one more TTL (seen once in CI, on Valkey)
        _until(lambda: lim.status().in_flight == 1, timeout=5)
        with redis.Redis.from_url(redis_url) as client:
            assert client.zscore(f"{{xflow:{name}}}:leases", parents.id) is not None
        parents.release()
        assert lim.status().in_flight == 0


async def test_a_cancel_that_meets_a_notice_is_not_lost(redis_url: str, name: str) -> None:
    """On Python 3.11 ``asyncio.wait_for`` returns an item that arrives in the same loop turn as a
    cancel and drops the cancel; the waiter must still end cancelled and give its ticket back."""
    async with AsyncLimiter(Budget(name, max_concurrency=1), redis_url) as lim:
        held = await lim.acquire()

        async def wait() -> object:
            return await lim.acquire(timeout=30)

        waiter = asyncio.create_task(wait())
        for _ in range(500):
            if (await lim.status()).queued == 1:
                break
            await asyncio.sleep(0.01)
        assert lim._events is not None
        (inbox,) = lim._events.mail.everyone()
        inbox.put_nowait(Resubscribed())  # a notice and the cancel in the same turn of the loop
        waiter.cancel()
        done, _ = await asyncio.wait({waiter}, timeout=5)
        assert done and waiter.cancelled(), "the cancel was lost: the waiter went on waiting"
        for _ in range(500):
            if (await lim.status()).queued == 0:
                break
            await asyncio.sleep(0.01)
        assert (await lim.status()).queued == 0
        await held.release()


def test_a_settle_that_fails_is_retried_in_the_background(redis_server: EmbeddedRedis, name: str) -> None:
    with Limiter(Budget(name, max_concurrency=2), redis_server.url, io_timeout=0.5) as lim:
        lease = lim.acquire()
        assert redis_server._proc is not None
        pid = redis_server._proc.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            assert lease.report(actual_tokens=0) is None  # gave up after io_timeout: retried later
            assert time.monotonic() - started < 0.5 * 2 + 0.5
        finally:
            os.kill(pid, signal.SIGCONT)
        _until(lambda: lim.status().in_flight == 0)


def _redis_server_on(binary: str, port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = redis.Redis(port=port, socket_connect_timeout=0.2)
    _until(lambda: _answers(probe))
    probe.close()
    return proc


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_waiters_ask_again_after_a_redis_restart(embedded: EmbeddedRedis, name: str) -> None:
    """A restart loses the queue and every notice: the waiters learn it from their events connection
    coming back (or run on the outage policy's share meanwhile) and queue again at once, instead of
    sleeping toward a renewal 15 s away. The lease held across the restart is registered again, so
    they wait for its release, then for the lost state's hold (3 claim windows)."""
    if embedded.binary is None:
        pytest.skip("needs a redis-server or valkey-server binary")
    binary = embedded.binary
    port = free_port()
    proc = _redis_server_on(binary, port)
    grants: list[float] = []
    try:
        with Limiter(Budget(name, max_concurrency=1), f"redis://127.0.0.1:{port}/0") as lim:
            decision = lim.try_acquire()
            assert decision.lease is not None

            def wait_then_release() -> None:
                with lim.acquire(timeout=20):
                    grants.append(time.monotonic())

            threads = [threading.Thread(target=wait_then_release, daemon=True) for _ in range(4)]
            for thread in threads:
                thread.start()
            _until(lambda: lim.status().queued == 4)
            proc.kill()
            proc.wait(timeout=10)
            proc = _redis_server_on(binary, port)
            restarted = time.monotonic()
            _until(lambda: lim._outage is None and lim.status().in_flight == 1)  # registered again
            decision.lease.release()
            for thread in threads:
                thread.join(timeout=20)
            assert len(grants) == 4
            assert max(grants) - restarted < 3.0, f"last waiter granted {max(grants) - restarted:.2f}s after"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_one_cut_of_every_socket_costs_a_fleet_at_most_a_second(redis_url: str, tmp_path: object) -> None:
    """benchmarks/socket_cut.py, small: 2 processes x 4 threads, every connection killed mid-run."""
    out = f"{tmp_path}/cut.json"
    script = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "socket_cut.py")
    args = ["--redis-url", redis_url, "--processes", "2", "--threads", "4", "--slots", "2"]
    args += ["--seconds", "4", "--cut-at", "2", "--json", out]
    subprocess.run([sys.executable, script, *args], check=True, timeout=120, capture_output=True)
    with open(out, encoding="utf-8") as f:
        result = json.load(f)["result"]
    assert result["connections_killed"] >= 2
    assert result["longest_gap_from_cut_s"] < 1.0, result
    assert result["in_flight_at_end"] == 0


def _async_child_after_fork(lim: AsyncLimiter, results: multiprocessing.Queue[str]) -> None:
    async def main() -> str:
        first = await lim.acquire(timeout=5)
        await asyncio.sleep(2.5)  # longer than the 1 s lease TTL: only the child's heartbeats keep it
        alive = (await lim.status()).in_flight

        async def second() -> object:
            return await lim.acquire(timeout=5)

        waiter = asyncio.create_task(second())
        for _ in range(500):
            if (await lim.status()).queued == 1:
                break
            await asyncio.sleep(0.01)
        await first.release()  # the queued acquire is woken by the grant notice
        lease = await asyncio.wait_for(waiter, 5)
        await lease.release()  # type: ignore[attr-defined]
        await lim.aclose()
        return f"{alive} True"

    try:
        results.put(asyncio.run(main()))
    except Exception as exc:
        results.put(f"error {exc!r}")


#: The parent leaves its connections open on a loop that ends, so that a child which reused them
#: would fail; the limiter is kept here so that they are never collected (and reported) mid-session.
_KEPT: list[AsyncLimiter] = []


def test_an_async_limiter_works_in_a_forked_child(redis_url: str, name: str) -> None:
    """Made before the fork (gunicorn --preload) and used by the parent on its own loop first."""
    lim = AsyncLimiter(Budget(name, max_concurrency=3, lease_ttl=1.0), redis_url)
    _KEPT.append(lim)

    async def parent_use() -> None:
        async with lim.acquire():
            pass

    asyncio.run(parent_use())
    answer = _answer_from_forked_child(_async_child_after_fork, lim)
    assert answer == "1 True", answer
    with Limiter(Budget(name, max_concurrency=3, lease_ttl=1.0), redis_url) as check:
        assert check.status().in_flight == 0


async def test_a_thousand_callers_in_one_process_queue_before_the_pool_not_into_an_outage(
    redis_url: str, name: str
) -> None:
    """More callers than pooled connections: beyond the pool they would wait for a connection only
    the pool's timeout and fail as if Redis were down, so the limiter would run on its outage share
    while Redis answers. They queue before the pool instead; none sees an outage."""
    pool = redis.asyncio.BlockingConnectionPool.from_url(redis_url, max_connections=4, timeout=0.05)
    client = redis.asyncio.Redis.from_pool(pool)
    limiter = AsyncLimiter(Budget(name, rps=1e6, tps=1e9), client)
    try:

        async def one() -> None:
            lease = await limiter.acquire(tokens=10)
            await lease.release()

        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(1000))), timeout=60)
        status = await limiter.status()
        assert (status.mode, status.outage_grants) == ("shared", 0)
    finally:
        await limiter.aclose()
        await client.aclose()


def test_more_threads_than_pooled_connections_queue_before_the_pool(redis_url: str, name: str) -> None:
    pool = redis.BlockingConnectionPool.from_url(redis_url, max_connections=4, timeout=0.05)
    client = redis.Redis.from_pool(pool)
    limiter = Limiter(Budget(name, rps=1e6, tps=1e9), client)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(25):
                limiter.acquire(tokens=10).release()
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker) for _ in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        status = limiter.status()
        assert errors == [] and (status.mode, status.outage_grants) == ("shared", 0)
    finally:
        limiter.close()
        client.close()


def test_a_memory_budget_works_in_a_child_forked_while_a_thread_held_its_lock() -> None:
    """A fork copies a lock held by another thread as held, with no thread left to release it:
    the child's memory:// servers take fresh locks, or its first call would hang forever."""
    from xflow_dist import _memory

    server = _memory.server("fork-lock")
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with server.lock:
            held.set()
            done.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the budget answers
        try:
            with Limiter(Budget("fork-lock", rps=10), "memory://fork-lock") as limiter:
                limiter.acquire().release()
            os._exit(0)
        except BaseException:
            os._exit(1)
    done.set()
    holder.join(10)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        finished, status = os.waitpid(pid, os.WNOHANG)
        if finished:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung on the memory server's lock")
