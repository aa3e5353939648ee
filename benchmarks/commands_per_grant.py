"""Redis commands per granted request when waiters must wait: 200 waiters across 4 processes.

Each of ``--procs`` worker processes runs ``--waiters / --procs`` waiters (asyncio tasks on one
AsyncLimiter, or threads on one Limiter with ``--front sync``) that all want the same budget at
once; each holds its lease ``--hold-ms`` and releases it. Scenarios:

  concurrency       max_concurrency 8: most waiters queue for a slot and are woken by a grant notice
  concurrency+rate  max_concurrency 8 and 200 requests/s with no burst: both limits bind
  rate              200 requests/s with no burst, no concurrency limit
  deep-queue        50 requests/s, no burst, lease (and so ticket) TTL 3 s: 200 waiters make a 4 s queue,
                    longer than the 1.5 s after which a queued ticket comes back to renew itself

Counting. ``CONFIG RESETSTAT`` before the waiters start, ``INFO commandstats`` after the last one
finishes. commandstats counts every command Redis executed, including the ones a Lua script runs
through ``redis.call`` (TIME, HMGET, ZADD, PUBLISH, ...). A ``MONITOR`` connection opened by this
benchmark tags each command with its source (a client address, or ``lua``), which splits the
counts exactly: top-level = sent by a client over the network; script-internal = run by a script.
Without MONITOR (``--no-monitor``) the split falls back to command names (EVALSHA, SUBSCRIBE, BLPOP,
HELLO, ... can only come from clients; everything else is counted as script-internal).

Before the count starts each worker opens one pooled connection per waiter and makes one acquire +
release (which subscribes it to the budget's events), and this benchmark loads the scripts once, as
a running fleet has them; that one-off setup is counted in a separate window, reported on its own.

  python benchmarks/commands_per_grant.py
  python benchmarks/commands_per_grant.py --front sync --scenarios concurrency --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import _common as c
import redis
import redis.asyncio

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._scripts import OPS, source

SCENARIOS = ("concurrency", "concurrency+rate", "rate", "deep-queue")
#: deep-queue: a rate of DEEP_RATE with tickets of DEEP_TTL s, so most waiters wait longer than the
#: half ticket TTL after which a queued ticket comes back to renew itself.
DEEP_RATE = 50.0
DEEP_TTL = 3.0
MARK_START = "xflow-bench-start"
MARK_END = "xflow-bench-end"
SHAS = {hashlib.sha1(source(op).encode()).hexdigest(): op for op in OPS}
SUBCOMMANDS = ("client", "script", "config", "command", "cluster", "object", "memory", "function", "pubsub")


def make_budget(scenario: str, name: str, concurrency: int, rate: float) -> Budget:
    if scenario == "concurrency":
        return Budget(name, max_concurrency=concurrency)
    if scenario == "concurrency+rate":
        return Budget(name, max_concurrency=concurrency, rps=rate, burst=0.0)
    if scenario == "deep-queue":
        return Budget(name, rps=DEEP_RATE, burst=0.0, lease_ttl=DEEP_TTL)
    return Budget(name, rps=rate, burst=0.0)


# ---------------------------------------------------------------- worker process


def worker(conn: Any, url: str, front: str, spec: dict[str, Any]) -> None:
    try:
        budget = make_budget(spec["scenario"], spec["budget"], spec["concurrency"], spec["rate"])
        if front == "async":
            asyncio.run(_async_worker(conn, url, budget, spec["waiters"], spec["hold"]))
        else:
            _sync_worker(conn, url, budget, spec["waiters"], spec["hold"])
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


async def _async_worker(conn: Any, url: str, budget: Budget, n: int, hold: float) -> None:
    client = redis.asyncio.Redis.from_url(url)
    limiter = AsyncLimiter(budget, client)
    async with limiter.acquire(timeout=30.0):  # a first acquire: subscribed to the budget's events
        pass
    pool = client.connection_pool  # then one pooled connection per waiter (the subscriber keeps its own)
    opened = [await pool.get_connection() for _ in range(n)]
    for connection in opened:
        await pool.release(connection)
    conn.send(("ready",))
    start_at = (await asyncio.to_thread(conn.recv))[1]
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    waits: list[float] = []

    async def one() -> None:
        t0 = time.monotonic()
        async with limiter.acquire():
            waits.append(time.monotonic() - t0)
            await asyncio.sleep(hold)

    t0 = time.monotonic()
    await asyncio.gather(*(one() for _ in range(n)))
    conn.send(("done", len(waits), time.monotonic() - t0, waits))
    await asyncio.to_thread(conn.recv)  # stop: only after the parent has read the stats
    await limiter.aclose()
    await client.aclose()
    conn.send(("closed",))


def _sync_worker(conn: Any, url: str, budget: Budget, n: int, hold: float) -> None:
    client = redis.Redis.from_url(url)
    limiter = Limiter(budget, client)
    with limiter.acquire(timeout=30.0):  # a first acquire: subscribed to the budget's events
        pass
    pool = client.connection_pool  # then one pooled connection per waiter (the subscriber keeps its own)
    opened = [pool.get_connection() for _ in range(n)]
    for connection in opened:
        pool.release(connection)
    conn.send(("ready",))
    start_at = conn.recv()[1]
    waits: list[float] = []
    lock = threading.Lock()

    def one(_: int) -> None:
        t0 = time.monotonic()
        with limiter.acquire():
            with lock:
                waits.append(time.monotonic() - t0)
            time.sleep(hold)

    with ThreadPoolExecutor(n) as threads:
        time.sleep(max(0.0, start_at - time.monotonic()))
        t0 = time.monotonic()
        list(threads.map(one, range(n)))
        elapsed = time.monotonic() - t0
    conn.send(("done", len(waits), elapsed, waits))
    conn.recv()
    limiter.close()
    client.close()
    conn.send(("closed",))


# ---------------------------------------------------------------- parent


class MonitorTally:
    """Counts every command Redis executes between two ECHO markers, by name and by source."""

    def __init__(self, url: str) -> None:
        self._client = redis.Redis.from_url(url)
        self.top: Counter[str] = Counter()
        self.lua: Counter[str] = Counter()
        self.scripts: Counter[str] = Counter()  # EVALSHA by script sha
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monitor", daemon=True)
        self._thread.start()
        if not self._ready.wait(10.0):
            raise SystemExit("benchmark: MONITOR did not start")

    def _run(self) -> None:
        counting = False
        with self._client.monitor() as m:
            self._ready.set()
            for cmd in m.listen():
                words = cmd["command"].split(" ")
                name = words[0].lower()
                if name in SUBCOMMANDS and len(words) > 1:
                    name = f"{name}|{words[1].lower()}"
                if name == "echo" and len(words) > 1:
                    if words[1] == MARK_START:
                        counting = True
                        continue
                    if words[1] == MARK_END:
                        return
                if counting:
                    (self.lua if cmd["client_type"] == "lua" else self.top)[name] += 1
                    if name == "evalsha" and len(words) > 1 and cmd["client_type"] != "lua":
                        self.scripts[words[1].lower()] += 1

    def join(self) -> None:
        self._thread.join(30.0)
        self._client.close()


def split(stats: dict[str, dict[str, float]], mon: MonitorTally | None) -> tuple[dict[str, int], dict[str, int]]:
    """commandstats calls as (top-level by command, script-internal by command), harness excluded."""
    top: dict[str, int] = {}
    lua: dict[str, int] = {}
    for name, fields in stats.items():
        if name in c.HARNESS_COMMANDS:
            continue
        calls = int(fields.get("calls", 0) + fields.get("rejected_calls", 0))
        by_names = 0 if name in c.CLIENT_ONLY else calls
        from_lua = by_names if mon is None else min(calls, mon.lua.get(name, 0))
        if calls - from_lua:
            top[name] = calls - from_lua
        if from_lua:
            lua[name] = from_lua
    return top, lua


def run_scenario(url: str, admin: redis.Redis, args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    ctx = c.spawn_context()
    budget_name = f"bench-cpg-{uuid.uuid4().hex[:8]}"
    per = args.waiters // args.procs
    spec = {
        "scenario": scenario,
        "budget": budget_name,
        "waiters": per,
        "hold": args.hold_ms / 1000.0,
        "concurrency": args.concurrency,
        "rate": args.rate,
    }
    pipes, procs = [], []
    c.reset_stats(admin)
    err0 = c.errorstats(admin)
    for _ in range(args.procs):
        parent, child = ctx.Pipe()
        p = ctx.Process(
            target=worker,
            args=(child, url, args.front, spec),
            daemon=True,
        )
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        c.wait_all(pipes, 120.0, "start")
        setup_top, _ = split(c.commandstats(admin), None)
        setup_rejected = sum(c.errorstats(admin).values()) - sum(err0.values())

        mon = MonitorTally(url) if args.monitor else None
        c.reset_stats(admin)
        err1 = c.errorstats(admin)
        admin.echo(MARK_START)
        start_at = time.monotonic() + 0.05
        for conn in pipes:
            conn.send(("go", start_at))
        replies = c.wait_all(pipes, 300.0, "finish waiting")
        admin.echo(MARK_END)
        stats = c.commandstats(admin)
        rejected = sum(c.errorstats(admin).values()) - sum(err1.values())
        if mon is not None:
            mon.join()
        for conn in pipes:
            conn.send(("stop",))
        c.wait_all(pipes, 30.0, "stop")
    finally:
        c.stop_workers(procs)

    grants = sum(r[1] for r in replies)
    waits = [w for r in replies for w in r[3]]
    top, lua = split(stats, mon)
    if rejected:
        top["(rejected, errorstats)"] = rejected
    setup_total = sum(setup_top.values()) + setup_rejected
    top_total = sum(top.values())
    lua_total = sum(lua.values())
    return {
        "scenario": scenario,
        "grants": grants,
        "expected_grants": per * args.procs,
        "elapsed": max(r[2] for r in replies),
        "wait_median_ms": c.median(waits) * 1000,
        "wait_max_ms": max(waits) * 1000,
        "top_level": top,
        "script_internal": lua,
        "top_level_total": top_total,
        "script_internal_total": lua_total,
        "top_level_per_grant": top_total / grants,
        "total_per_grant": (top_total + lua_total) / grants,
        "setup_top_level": setup_top,
        "setup_rejected": setup_rejected,
        "setup_total": setup_total,
        "cold_top_level_per_grant": (top_total + setup_total) / grants,
        "split_by": "monitor" if mon is not None else "command names",
        "evalsha_by_script": {SHAS.get(sha, sha): n for sha, n in mon.scripts.items()} if mon is not None else {},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--waiters", type=int, default=200, help="waiters in all (default 200)")
    ap.add_argument("--procs", type=int, default=4, help="worker processes sharing them (default 4)")
    ap.add_argument("--front", choices=("async", "sync"), default="async", help="AsyncLimiter tasks or Limiter threads")
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"subset of {','.join(SCENARIOS)}")
    ap.add_argument("--concurrency", type=int, default=8, help="max_concurrency of the budget (default 8)")
    ap.add_argument("--rate", type=float, default=200.0, help="requests/s where a rate binds (default 200)")
    ap.add_argument("--hold-ms", type=float, default=5.0, help="how long each waiter holds its lease (default 5)")
    ap.add_argument("--no-monitor", dest="monitor", action="store_false", help="split by command names only")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if any(s not in SCENARIOS for s in scenarios):
        ap.error(f"--scenarios: choose from {','.join(SCENARIOS)}")
    if not 1 <= args.procs <= 32 or not args.procs <= args.waiters <= 2000 or args.waiters % args.procs:
        ap.error("--waiters must be a multiple of --procs, 1..2000, with 1..32 processes")
    if not 0 <= args.hold_ms <= 1000 or not args.rate > 0 or args.concurrency < 1:
        ap.error("--hold-ms 0..1000, --rate > 0, --concurrency >= 1")

    server = c.start_redis()
    try:
        admin = redis.Redis.from_url(server.url)
        env = c.environment(server.url)
        c.print_environment(env)
        for op in OPS:  # a running fleet has the scripts loaded: no NOSCRIPT round trips in the count
            admin.script_load(source(op))
        print(
            f"# {args.waiters} waiters = {args.procs} processes x {args.waiters // args.procs} "
            f"({'AsyncLimiter tasks' if args.front == 'async' else 'Limiter threads'}), hold {args.hold_ms:g} ms, "
            f"max_concurrency {args.concurrency}, rate {args.rate:g}/s where it binds; "
            f"split by {'MONITOR' if args.monitor else 'command names'}"
        )
        results = [run_scenario(server.url, admin, args, s) for s in scenarios]
        admin.close()
    finally:
        server.stop()

    print()
    rows = []
    for r in results:
        rows.append(
            [
                r["scenario"],
                f"{r['grants']}/{r['expected_grants']}",
                r["elapsed"],
                r["wait_median_ms"],
                r["top_level_total"],
                r["script_internal_total"],
                r["top_level_per_grant"],
                r["total_per_grant"],
                r["cold_top_level_per_grant"],
            ]
        )
    print(
        c.table(
            [
                "scenario",
                "grants",
                "seconds",
                "median wait ms",
                "top-level",
                "in scripts",
                "top-level/grant",
                "total/grant",
                "incl. setup/grant",
            ],
            rows,
        )
    )
    for r in results:
        print()
        print(f"{r['scenario']}: top-level (client) commands by name")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(r["top_level"].items(), key=lambda kv: -kv[1])))
        if r["evalsha_by_script"]:
            per = ", ".join(
                f"{op} {n} ({n / r['grants']:.2f}/grant)"
                for op, n in sorted(r["evalsha_by_script"].items(), key=lambda kv: -kv[1])
            )
            print(f"{r['scenario']}: EVALSHA by script: {per}")
        print(f"{r['scenario']}: script-internal commands by name")
        print("  " + ", ".join(f"{k} {v}" for k, v in sorted(r["script_internal"].items(), key=lambda kv: -kv[1])))
        setup = ", ".join(f"{k} {v}" for k, v in sorted(r["setup_top_level"].items(), key=lambda kv: -kv[1]))
        print(
            f"{r['scenario']}: one-off setup of {args.procs} processes, not in top-level/grant: {setup}"
            + (f", rejected {r['setup_rejected']}" if r["setup_rejected"] else "")
        )
    print()
    print("# goal: at most 2 top-level commands per request (one grant) on average, waits of any length;")
    print("# script calls are the acquire, the settle and the batched renewals, the rest is the census")
    rows = []
    for r in results:
        scripts = sum(r["evalsha_by_script"].values()) / r["grants"] if r["evalsha_by_script"] else float("nan")
        top = r["top_level_per_grant"]
        rows.append([r["scenario"], top, scripts, "met" if top <= 2 else "MISSED"])
    print(c.table(["scenario", "top-level/grant", "script calls/grant", "goal"], rows))
    c.write_json(
        args.json,
        {"benchmark": "commands_per_grant", "environment": env, "arguments": vars(args), "results": results},
    )


if __name__ == "__main__":
    main()
