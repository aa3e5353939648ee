"""What a Sentinel failover costs a fleet: the master SIGKILLed under load, until grants resume.

Starts a master, one replica and three sentinels (``down-after-milliseconds`` 1000,
``failover-timeout`` 2000, quorum 2; ``tests/_servers.SentinelGroup``), all on loopback. P worker
processes x W threads share a budget of ``--slots`` concurrency slots over its
``redis+sentinel://`` URL; each thread loops acquire (timeout 2 s), a call of ``--call-ms``,
release. A ``BackendError`` (no master to talk to) is counted and retried after 50 ms. At
``--kill-at`` seconds the parent SIGKILLs the master; a subscriber on every sentinel stamps the
first ``+switch-master``. Every grant is stamped with ``time.monotonic()`` (one clock for every
process of a Linux machine); the workers count the leases they hold in one shared counter.

Reported per run: the time from the kill to the promotion (the first ``+switch-master``), from
the promotion to the first grant after it, and to the first grant in every process; grants
stamped while there was no master; over-admission (grants that found ``--slots`` leases already
held, counted by the workers, which count a lease from after its grant until before its release);
BackendErrors; releases that Redis no longer knew (state the replica had not received); leases
still in flight once every worker has stopped; and, among those, the ones whose release a worker
had seen answered "settled" (a settle the old master acknowledged and the replica never received:
asynchronous replication, not a leak; the slot comes back at the lease TTL).

  python benchmarks/sentinel_failover.py                 # 3 processes x 4 threads, 4 slots, 5 runs
  python benchmarks/sentinel_failover.py --runs 1 --json out.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
import uuid
from typing import Any

import _common as c

sys.path.insert(0, str(c.HERE.parent / "tests"))

from _servers import SentinelGroup

from xflow_dist import AcquireTimeout, BackendError, Budget, Limiter
from xflow_dist._core import keys

RETRY_PAUSE = 0.05


def worker(
    conn: Any,
    url: str,
    name: str,
    slots: int,
    threads: int,
    call: float,
    until: float,
    held: Any,
    over: Any,
    outage: str = "local",
) -> None:
    try:
        stamps: list[float] = []
        settled: dict[str, float] = {}  # lease id -> when its release was answered "settled"
        counts = {"errors": 0, "timeouts": 0, "lost": 0}
        lock = threading.Lock()
        with Limiter(Budget(name, max_concurrency=slots), url, outage=outage) as limiter:

            def loop() -> None:
                while time.monotonic() < until:
                    try:
                        lease = limiter.acquire(timeout=min(2.0, max(0.1, until - time.monotonic())))
                    except BackendError:
                        with lock:
                            counts["errors"] += 1
                        time.sleep(RETRY_PAUSE)
                        continue
                    except AcquireTimeout:
                        with lock:
                            counts["timeouts"] += 1
                        continue
                    with held.get_lock():
                        held.value += 1
                        if held.value > slots:
                            over.value += 1
                    with lock:
                        stamps.append(time.monotonic())
                    time.sleep(call)
                    with held.get_lock():
                        held.value -= 1
                    try:
                        reply = lease.release()  # on a connection error: retried in the background
                    except BackendError:
                        reply = None
                    with lock:
                        if reply is not None and reply.settled:
                            settled[lease.id] = time.monotonic()
                        elif reply is not None:
                            counts["lost"] += 1

            pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
            for t in pool:
                t.start()
            for t in pool:
                t.join(timeout=until - time.monotonic() + 30)
        conn.send(("done", stamps, counts, settled))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def run_once(
    processes: int, threads: int, slots: int, call: float, seconds: float, kill_at: float, outage: str = "local"
) -> dict[str, Any]:
    ctx = c.spawn_context()
    with SentinelGroup() as group:
        name = f"bench-failover-{uuid.uuid4().hex[:8]}"
        held, over = ctx.Value("i", 0), ctx.Value("i", 0)
        start = time.monotonic() + 2.5  # the processes start within this
        until = start + seconds
        pipes, procs = [], []
        for _ in range(processes):
            parent, child = ctx.Pipe()
            args = (child, group.url, name, slots, threads, call, until, held, over, outage)
            proc = ctx.Process(target=worker, args=args)
            proc.start()
            pipes.append(parent)
            procs.append(proc)
        try:
            with group.switches() as watcher:
                time.sleep(max(0.0, start + kill_at - time.monotonic()))
                _, killed = group.kill_master()
                switched, _ = watcher.wait(30.0)
                replies = c.wait_all(pipes, seconds + 60, "finish")
        finally:
            c.stop_workers(procs)
        with Limiter(Budget(name, max_concurrency=slots), group.url) as limiter:
            in_flight = limiter.status().in_flight
            left = [i.decode() for i in limiter._client.zrange(keys(limiter.budget)[1], 0, -1)]
    stamps = sorted(t for reply in replies for t in reply[1])
    after = [t for t in stamps if t >= switched]
    firsts = [min((t for t in reply[1] if t >= switched), default=float("nan")) for reply in replies]
    total = {key: sum(reply[2][key] for reply in replies) for key in ("errors", "timeouts", "lost")}
    settled = {lid: at for reply in replies for lid, at in reply[3].items()}
    # a lease still held in Redis that its worker had released with a "settled" reply: the settle
    # was acknowledged by the old master and never reached the replica
    undone = sorted(settled[lid] - killed for lid in left if lid in settled)
    return {
        "processes": processes,
        "threads": threads,
        "slots": slots,
        "call_s": call,
        "grants": len(stamps),
        "kill_to_promotion_s": switched - killed,
        "promotion_to_first_grant_s": (after[0] - switched) if after else float("nan"),
        "kill_to_first_grant_s": (after[0] - killed) if after else float("nan"),
        "promotion_to_every_process_granted_s": max(firsts) - switched,
        # stamps just after the kill may be grants received before it; later ones cannot be
        "grants_without_master": sum(1 for t in stamps if killed + 0.1 <= t < switched),
        "over_admitted": over.value,
        "backend_errors": total["errors"],
        "acquire_timeouts": total["timeouts"],
        "releases_unknown_to_redis": total["lost"],
        "in_flight_at_end": in_flight,
        "settles_lost_in_failover": len(undone),
        "lost_settles_answered_s_before_kill": [round(-t, 4) for t in undone],
    }


SUMMARISED = (
    "kill_to_promotion_s",
    "promotion_to_first_grant_s",
    "kill_to_first_grant_s",
    "promotion_to_every_process_granted_s",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=3)
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--slots", type=int, default=4)
    ap.add_argument("--call-ms", type=float, default=50.0)
    ap.add_argument("--seconds", type=float, default=9.0)
    ap.add_argument("--kill-at", type=float, default=2.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument(
        "--outage",
        choices=("local", "open", "closed"),
        default="local",
        help="the workers' outage policy (default local, the library's); closed: the shared budget's own recovery",
    )
    ap.add_argument("--json")
    args = ap.parse_args()
    env: dict[str, Any] = {}
    with SentinelGroup() as probe:  # only to describe the machine and the redis-server measured
        env = c.environment(f"redis://127.0.0.1:{probe.data_ports[0]}/0")
    c.print_environment(env)
    results = []
    for _ in range(args.runs):
        result = run_once(
            args.processes, args.threads, args.slots, args.call_ms / 1000, args.seconds, args.kill_at, args.outage
        )
        results.append(result)
        print(c.table(["figure", "value"], [[k, v] for k, v in result.items()]))
    summary: dict[str, Any] = {}
    for key in SUMMARISED:
        values = [r[key] for r in results]
        summary[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    totals = ("over_admitted", "grants_without_master", "releases_unknown_to_redis", "in_flight_at_end")
    for key in (*totals, "settles_lost_in_failover"):
        summary[key] = {"total": sum(r[key] for r in results)}
    if len(results) > 1:
        rows = [[k, *(v.get(s, "") for s in ("min", "median", "max", "total"))] for k, v in summary.items()]
        print(f"# {len(results)} runs")
        print(c.table(["figure", "min", "median", "max", "total"], rows))
    c.write_json(args.json, {"environment": env, "runs": results, "summary": summary})


if __name__ == "__main__":
    main()
