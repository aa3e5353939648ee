"""What one cut of every Redis socket costs a fleet: the longest pause in grants around it.

P worker processes x W threads share a budget of ``max_concurrency`` slots; each thread loops
acquire, a call of ``--call-ms``, release. At ``--cut-at`` seconds the parent kills every client
connection of the budget's Redis (``CLIENT KILL TYPE normal`` and ``TYPE pubsub``): pooled command
connections and the subscribers of the events channel, with waiters queued on both. Every grant is
stamped with ``time.monotonic()`` (one clock for every process of a Linux machine).

Reported: grants per second before the cut; the longest gap between two grants before the cut
(the baseline, measured in the same run) and from the cut on; the time from the cut to the first
grant after it; and leases still in flight at the end (must be 0).

  python benchmarks/socket_cut.py                      # 4 processes x 16 threads, 4 slots, 100 ms calls
  python benchmarks/socket_cut.py --json out.json
"""

from __future__ import annotations

import argparse
import itertools
import threading
import time
import uuid
from typing import Any

import _common as c
import redis

from xflow_dist import Budget, Limiter


def make_budget(name: str, slots: int) -> Budget:
    return Budget(name, max_concurrency=slots)


def worker(conn: Any, url: str, name: str, slots: int, threads: int, call: float, until: float) -> None:
    try:
        stamps: list[float] = []
        lock = threading.Lock()
        with Limiter(make_budget(name, slots), url) as limiter:

            def loop() -> None:
                while time.monotonic() < until:
                    try:
                        with limiter.acquire(timeout=max(0.1, until - time.monotonic())):
                            with lock:
                                stamps.append(time.monotonic())
                            time.sleep(call)
                    except Exception:  # a timeout at the end of the run, or Redis away for a moment
                        time.sleep(0.01)

            pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join(timeout=until - time.monotonic() + 30)
        conn.send(("done", stamps))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def run(
    url: str, processes: int, threads: int, slots: int, call: float, seconds: float, cut_at: float
) -> dict[str, Any]:
    ctx = c.spawn_context()
    name = f"bench-cut-{uuid.uuid4().hex[:8]}"
    start = time.monotonic() + 2.0  # the processes start within this
    until = start + seconds
    pipes, procs = [], []
    for _ in range(processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, url, name, slots, threads, call, until))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    admin = redis.Redis.from_url(url)
    time.sleep(max(0.0, start + cut_at - time.monotonic()))
    cut = time.monotonic()
    killed = admin.client_kill_filter(_type="normal", skipme=True) + admin.client_kill_filter(_type="pubsub")
    try:
        replies = c.wait_all(pipes, seconds + 60, "socket-cut workers")
    finally:
        c.stop_workers(procs)
    stamps = sorted(t for reply in replies for t in reply[1])
    with Limiter(make_budget(name, slots), url) as limiter:
        in_flight = limiter.status().in_flight
    admin.close()
    before = [t for t in stamps if t < cut]
    after = [t for t in stamps if t >= cut]

    def longest_gap(ts: list[float]) -> float:
        return max((b - a for a, b in itertools.pairwise(ts)), default=float("nan"))

    steady = [t for t in before if t >= start + 0.5]  # past the start-up
    return {
        "processes": processes,
        "threads": threads,
        "slots": slots,
        "call_s": call,
        "connections_killed": killed,
        "grants": len(stamps),
        "grants_per_s_before": len(steady) / max(1e-9, cut - (start + 0.5)),
        "longest_gap_before_s": longest_gap(steady),
        "longest_gap_from_cut_s": longest_gap([cut, *after]),
        "first_grant_after_cut_s": (after[0] - cut) if after else float("nan"),
        "in_flight_at_end": in_flight,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", help="a Redis to use (default: start a redis-server of its own)")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--call-ms", type=float, default=100.0)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--cut-at", type=float, default=4.0)
    ap.add_argument("--json")
    args = ap.parse_args()
    server = None if args.redis_url else c.start_redis()
    url = args.redis_url or server.url  # type: ignore[union-attr]
    try:
        env = c.environment(url)
        c.print_environment(env)
        result = run(url, args.processes, args.threads, args.slots, args.call_ms / 1000, args.seconds, args.cut_at)
    finally:
        if server is not None:
            server.stop()
    print(c.table(["figure", "value"], [[k, v] for k, v in result.items()]))
    c.write_json(args.json, {"environment": env, "result": result})


if __name__ == "__main__":
    main()
