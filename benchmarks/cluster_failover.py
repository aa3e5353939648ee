"""What a Redis Cluster failover costs a fleet: a master SIGKILLed while the fleet runs, its replica promoted.

The benchmark starts a cluster of its own (3 masters with a replica each, ``cluster-node-timeout``
``--node-timeout-ms``; ``tests/_servers.py``) and P worker processes, all on one
``redis+cluster://`` URL: half use ``Limiter`` with W threads, half ``AsyncLimiter`` with W tasks.
They share budget A (``--slots`` concurrency slots), whose slot the killed master serves; each
waiter loops acquire, a call of ``--call-ms``, release, and on a ``BackendError`` (the master is
gone) counts it and tries again after ``--pause-ms``. Calls in flight are counted across the
processes (a shared counter raised after a grant and lowered before the release); every grant is
stamped with ``time.monotonic()`` (one clock for all processes of a Linux machine). One more waiter
per process uses budget B, served by another master.

At ``--kill-at`` seconds the parent SIGKILLs A's master and polls its replica's ``ROLE`` every 10 ms.
With ``--full-coverage yes`` (Redis's default) the other masters answer CLUSTERDOWN from the moment
the dead one is marked failed until its replica takes over, which B shows; with ``no`` they go on.

Reported: kill -> promotion (the replica says it is a master) and kill -> ``cluster_state:ok`` on
every live node; promotion -> the first grant of A; the longest gap between grants of A and of B,
before the kill (the baseline) and from it on; grants of A per second before the kill and from
1 s after the promotion; the BackendErrors the waiters saw, acquires that timed out (5 s), and any
other error by type; the most calls of A in flight at once (at most ``--slots``); waiters still running
at the end (hung: 0); leases and tickets of A and B left in Redis at the end (0: no settle lost).

  python benchmarks/cluster_failover.py                  # 4 processes x 4 waiters, 3 slots, 50 ms calls
  python benchmarks/cluster_failover.py --full-coverage no
  python benchmarks/cluster_failover.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import threading
import time
import traceback
import uuid
from collections import Counter
from typing import Any

import _common as c
import redis.cluster

sys.path.insert(0, str(c.HERE.parent / "tests"))
from _servers import RedisClusterGroup, until

from xflow_dist import AcquireTimeout, AsyncLimiter, BackendError, Budget, Limiter
from xflow_dist._core import keys


def make_budget(name: str, slots: int) -> Budget:
    return Budget(name, max_concurrency=slots)


class Tally:
    """One process's counts; the in-flight counter is shared by every process."""

    def __init__(self, in_flight: Any) -> None:
        self.in_flight = in_flight  # multiprocessing Array('i', 2): now, most
        self.stamps: dict[str, list[float]] = {"a": [], "b": []}
        self.backend_errors = 0
        self.timeouts = 0
        self.other: Counter[str] = Counter()

    def granted(self, which: str) -> None:
        self.stamps[which].append(time.monotonic())
        if which == "a":
            with self.in_flight.get_lock():
                self.in_flight[0] += 1
                self.in_flight[1] = max(self.in_flight[1], self.in_flight[0])

    def ending(self, which: str) -> None:
        if which == "a":
            with self.in_flight.get_lock():
                self.in_flight[0] -= 1

    def failed(self, exc: BaseException) -> None:
        if isinstance(exc, AcquireTimeout):
            self.timeouts += 1
        elif isinstance(exc, BackendError):
            self.backend_errors += 1
        else:
            if not self.other[type(exc).__name__]:  # the first of a kind, for whoever reads stderr
                traceback.print_exception(exc)
            self.other[type(exc).__name__] += 1

    def reply(self, hung: int) -> tuple[str, dict[str, Any]]:
        return (
            "done",
            {
                "stamps": self.stamps,
                "backend_errors": self.backend_errors,
                "timeouts": self.timeouts,
                "other": dict(self.other),
                "hung": hung,
            },
        )


def sync_worker(conn: Any, url: str, names: dict[str, str], args: dict[str, Any], in_flight: Any) -> None:
    try:
        tally = Tally(in_flight)
        lock = threading.Lock()
        end = args["until"]
        with (
            Limiter(make_budget(names["a"], args["slots"]), url, outage=args["outage"]) as a,
            Limiter(make_budget(names["b"], args["slots"]), url, outage=args["outage"]) as b,
        ):

            def loop(limiter: Limiter, which: str) -> None:
                while time.monotonic() < end:
                    try:
                        lease = limiter.acquire(timeout=5.0)
                    except Exception as exc:
                        with lock:
                            tally.failed(exc)
                        time.sleep(args["pause"])
                        continue
                    with lock:
                        tally.granted(which)
                    time.sleep(args["call"])
                    tally.ending(which)
                    try:
                        lease.release()  # a settle that fails for a while is retried in the background
                    except Exception as exc:
                        with lock:
                            tally.failed(exc)

            time.sleep(max(0.0, args["start"] - time.monotonic()))
            pool = [threading.Thread(target=loop, args=(a, "a"), daemon=True) for _ in range(args["waiters"])]
            pool.append(threading.Thread(target=loop, args=(b, "b"), daemon=True))
            for t in pool:
                t.start()
            for t in pool:
                t.join(timeout=max(0.0, end + 20 - time.monotonic()))
            hung = sum(t.is_alive() for t in pool)
        conn.send(tally.reply(hung))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def async_worker(conn: Any, url: str, names: dict[str, str], args: dict[str, Any], in_flight: Any) -> None:
    async def main() -> tuple[str, dict[str, Any]]:
        tally = Tally(in_flight)
        end = args["until"]
        async with (
            AsyncLimiter(make_budget(names["a"], args["slots"]), url, outage=args["outage"]) as a,
            AsyncLimiter(make_budget(names["b"], args["slots"]), url, outage=args["outage"]) as b,
        ):

            async def loop(limiter: AsyncLimiter, which: str) -> None:
                while time.monotonic() < end:
                    try:
                        lease = await limiter.acquire(timeout=5.0)
                    except Exception as exc:
                        tally.failed(exc)
                        await asyncio.sleep(args["pause"])
                        continue
                    tally.granted(which)
                    await asyncio.sleep(args["call"])
                    tally.ending(which)
                    try:
                        await lease.release()
                    except Exception as exc:
                        tally.failed(exc)

            await asyncio.sleep(max(0.0, args["start"] - time.monotonic()))
            tasks = [asyncio.create_task(loop(a, "a")) for _ in range(args["waiters"])]
            tasks.append(asyncio.create_task(loop(b, "b")))
            _, pending = await asyncio.wait(tasks, timeout=max(0.0, end + 20 - time.monotonic()))
            for task in pending:
                task.cancel()
            return tally.reply(len(pending))

    try:
        conn.send(asyncio.run(main()))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def _slot(name: str) -> int:
    return int(redis.cluster.key_slot(keys(make_budget(name, 1))[0].encode()))


def longest_gap(ts: list[float]) -> float:
    return max((y - x for x, y in itertools.pairwise(ts)), default=float("nan"))


def run(
    processes: int, waiters: int, slots: int, call: float, pause: float, seconds: float, kill_at: float,
    node_timeout_ms: int, full_coverage: str = "yes", outage: str = "local",
) -> tuple[dict[str, Any], dict[str, Any]]:  # fmt: skip
    ctx = c.spawn_context()
    extra = ("--cluster-require-full-coverage", full_coverage)
    with RedisClusterGroup(node_timeout_ms=node_timeout_ms, extra_args=extra) as cluster:
        run_id = uuid.uuid4().hex[:8]
        a_name = f"bench-failover-{run_id}-a"
        master = cluster.master_of(_slot(a_name))
        replica = cluster.replica_of(master)
        b_name = next(
            n for i in range(1000) if cluster.master_of(_slot(n := f"bench-failover-{run_id}-b{i}")) is not master
        )
        env = c.environment(f"redis://127.0.0.1:{master.port}/0")
        env["cluster"] = {
            "masters": 3, "replicas_each": 1, "node_timeout_ms": node_timeout_ms, "require_full_coverage": full_coverage
        }  # fmt: skip
        url = cluster.url
        in_flight = ctx.Array("i", 2)
        start = time.monotonic() + 3.0  # the processes start within this
        args = {"slots": slots, "waiters": waiters, "call": call, "pause": pause, "start": start, "outage": outage}
        args["until"] = start + seconds
        pipes, procs = [], []
        for i in range(processes):
            parent, child = ctx.Pipe()
            target = sync_worker if i % 2 == 0 else async_worker
            proc = ctx.Process(target=target, args=(child, url, {"a": a_name, "b": b_name}, args, in_flight))
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        try:
            time.sleep(max(0.0, start + kill_at - time.monotonic()))
            killed = time.monotonic()
            cluster.kill(master)
            until("the replica is promoted", lambda: cluster.is_master(replica), 30.0, step=0.01)
            promoted = time.monotonic()
            cluster.wait_ok(30.0)
            settled = time.monotonic()
            replies = c.wait_all(pipes, seconds + 90, "finish the failover run")
        finally:
            c.stop_workers(procs)
        left = {**_left_over(url, a_name, slots, "a"), **_left_over(url, b_name, slots, "b")}
    end = args["until"]
    stamps = {w: sorted(t for _, r in replies for t in r["stamps"][w] if t < end) for w in ("a", "b")}
    other: Counter[str] = Counter()
    for _, r in replies:
        other.update(r["other"])
    a_after = [t for t in stamps["a"] if t >= promoted]
    steady = {w: [t for t in stamps[w] if start + 0.5 <= t < killed] for w in ("a", "b")}
    result = {
        "processes": processes,
        "waiters_per_process": waiters,
        "slots": slots,
        "call_s": call,
        "kill_to_promotion_s": promoted - killed,
        "kill_to_cluster_ok_s": settled - killed,
        "promotion_to_first_grant_a_s": (a_after[0] - promoted) if a_after else float("nan"),
        "grants_a": len(stamps["a"]),
        "grants_b": len(stamps["b"]),
        "grants_per_s_a_before": len(steady["a"]) / max(1e-9, killed - (start + 0.5)),
        "grants_per_s_a_after": len([t for t in a_after if t >= promoted + 1.0]) / max(1e-9, end - promoted - 1.0),
        "longest_gap_a_before_s": longest_gap(steady["a"]),
        "longest_gap_a_from_kill_s": longest_gap([killed, *(t for t in stamps["a"] if t >= killed)]),
        "longest_gap_b_before_s": longest_gap(steady["b"]),
        "longest_gap_b_from_kill_s": longest_gap([killed, *(t for t in stamps["b"] if t >= killed)]),
        "backend_errors": sum(r["backend_errors"] for _, r in replies),
        "acquire_timeouts": sum(r["timeouts"] for _, r in replies),
        "other_errors": dict(other),
        "most_in_flight_a": in_flight[1],
        "hung_waiters": sum(r["hung"] for _, r in replies),
        **left,
    }
    return env, result


def _left_over(url: str, name: str, slots: int, which: str) -> dict[str, int]:
    """Leases and tickets still in Redis once every worker closed (a grant left unclaimed by a
    waiter that gave up is taken back after the claim window: waited for, up to 5 s)."""
    with Limiter(make_budget(name, slots), url) as limiter:
        deadline = time.monotonic() + 5.0
        while True:
            status = limiter.status()
            if (status.in_flight, status.queued) == (0, 0) or time.monotonic() > deadline:
                return {f"in_flight_{which}_at_end": status.in_flight, f"queued_{which}_at_end": status.queued}
            time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=4, help="half sync (threads), half asyncio (tasks)")
    ap.add_argument("--waiters", type=int, default=4, help="threads or tasks per process on budget A")
    ap.add_argument("--slots", type=int, default=3)
    ap.add_argument("--call-ms", type=float, default=50.0)
    ap.add_argument("--pause-ms", type=float, default=50.0, help="after a BackendError, before trying again")
    ap.add_argument("--seconds", type=float, default=12.0)
    ap.add_argument("--kill-at", type=float, default=4.0)
    ap.add_argument("--node-timeout-ms", type=int, default=1000)
    ap.add_argument(
        "--full-coverage", choices=("yes", "no"), default="yes",
        help="cluster-require-full-coverage: yes (Redis's default) stops every shard while a master is down",
    )  # fmt: skip
    ap.add_argument(
        "--outage", choices=("local", "open", "closed"), default="local",
        help="the workers' outage policy (default local, the library's); closed: the shared budget's own recovery",
    )  # fmt: skip
    ap.add_argument("--json")
    args = ap.parse_args()
    env, result = run(
        args.processes, args.waiters, args.slots, args.call_ms / 1000, args.pause_ms / 1000, args.seconds,
        args.kill_at, args.node_timeout_ms, args.full_coverage, args.outage,
    )  # fmt: skip
    c.print_environment(env)
    print(f"# cluster: {env['cluster']}")
    print(c.table(["figure", "value"], [[k, v] for k, v in result.items()]))
    c.write_json(args.json, {"environment": env, "result": result})


if __name__ == "__main__":
    main()
