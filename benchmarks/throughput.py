"""Acquire + settle throughput against the floor of PING and a no-op Lua script.

Python clients. For each client count (default 1, 4 and 16 worker processes, one redis.asyncio
connection each; ``--layout task`` runs them as asyncio tasks of one process instead) the same
workers run four phases, interleaved over several short rounds (in alternating order) so drift and the load of
anything else on the machine hit every phase alike:

  ping     PING                                                                    1 call per op
  noop     EVALSHA of benchmarks/noop.lua with acquire's KEYS and ARGV, built per call
           exactly as an acquire builds them (fresh lease id, same encoding)       1 call per op
  raw      EVALSHA acquire.lua then EVALSHA settle.lua through the registered redis-py Scripts,
           as the limiter sends them, without the limiter's Python around them     2 calls per op
  limiter  ``lease = await AsyncLimiter.acquire(tokens=100); await lease.release()``  2 calls per op

The budget's limits are far above what the run can spend (10^7 requests and 10^10 tokens per
second, 60 s of burst, a million leases), so every acquire is granted at once: the figures measure
the cost of the operations, never a wait. Calls per second count every round trip; an acquire +
settle pair counts as two script calls. ``vs noop`` is script calls per second over the no-op
script's calls per second at the same client count, taken per round (the phases of a round run
back to back) and reported as the median of the rounds. The issue's goal: at least 0.7.

Server-bound. The same Redis is then driven by ``redis-benchmark`` (a C client, if installed) with
PING, the no-op script and acquire.lua alone (a fresh lease id per call; it cannot pair settles),
so that Redis rather than Python is the limit: that shows the scripts' own cost.

Per phase the parent also reads, from Redis itself, the server's CPU use and the microseconds per
call of the script (INFO commandstats), and from the workers the client CPU per call: where the
time goes.

  python benchmarks/throughput.py                      # 1, 4, 16 processes, then redis-benchmark
  python benchmarks/throughput.py --layout task        # 1 process with 1, 4, 16 asyncio tasks
  python benchmarks/throughput.py --clients 4 --duration 1 --rounds 1 --server-requests 0 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import shutil
import subprocess
import time
import uuid
from typing import Any

import _common as c
import redis
import redis.asyncio

from xflow_dist import AsyncLimiter, Budget
from xflow_dist._core import acquire_args, budget_args, keys, settle_args
from xflow_dist._scripts import register, source

MODES = ("ping", "noop", "raw", "limiter")
CALLS_PER_OP = {"ping": 1, "noop": 1, "raw": 2, "limiter": 2}
SERVER_MODES = ("ping", "noop", "acquire")
TOKENS = 100.0


def make_budget(name: str) -> Budget:
    return Budget(name, rps=1e7, tps=1e10, max_concurrency=1_000_000, burst=60.0, lease_ttl=30.0)


# ---------------------------------------------------------------- worker process


class _Client:
    """One worker's client, scripts and limiter; ``tasks`` asyncio tasks share them."""

    def __init__(self, url: str, budget: Budget, noop_src: str) -> None:
        self.client = redis.asyncio.Redis.from_url(url)
        self.budget = budget
        self.keys = keys(budget)
        self.bargs = budget_args(budget)
        self.ttl = budget.lease_ttl
        self.noop = self.client.register_script(noop_src)
        scripts = register(self.client)
        self.acq = scripts["acquire"]
        self.settle = scripts["settle"]
        self.limiter = AsyncLimiter(budget, self.client)
        self.ops = {"ping": self.op_ping, "noop": self.op_noop, "raw": self.op_raw, "limiter": self.op_limiter}

    async def op_ping(self) -> None:
        await self.client.ping()

    async def op_noop(self) -> None:
        lid = uuid.uuid4().hex
        await self.noop(keys=self.keys, args=self.bargs + acquire_args(lid, 1.0, TOKENS, None, True, self.ttl))

    async def op_raw(self) -> None:
        lid = uuid.uuid4().hex
        reply = await self.acq(keys=self.keys, args=self.bargs + acquire_args(lid, 1.0, TOKENS, None, True, self.ttl))
        if reply[0] != b"granted":
            raise RuntimeError(f"acquire was not granted at once: {reply!r}")
        await self.settle(keys=self.keys, args=self.bargs + settle_args(lid, None))

    async def op_limiter(self) -> None:
        lease = await self.limiter.acquire(tokens=TOKENS)
        await lease.release()

    async def run(self, mode: str, tasks: int, start_at: float, duration: float) -> tuple[int, float, float]:
        op = self.ops[mode]
        end = start_at + duration
        counts = [0] * tasks
        lasts = [start_at] * tasks

        async def loop(i: int) -> None:
            n = 0
            now = time.monotonic()
            while now < end:
                await op()
                n += 1
                now = time.monotonic()
            counts[i] = n
            lasts[i] = now

        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu0 = time.process_time()
        await asyncio.gather(*(loop(i) for i in range(tasks)))
        return sum(counts), max(lasts), time.process_time() - cpu0

    async def warm(self, tasks: int) -> None:
        await asyncio.gather(*(self.client.ping() for _ in range(tasks)))  # open one connection per task
        for mode in MODES:
            for _ in range(20):
                await self.ops[mode]()

    async def close(self) -> None:
        await self.limiter.aclose()
        await self.client.aclose()


def worker(conn: Any, url: str, budget_name: str, noop_src: str, tasks: int) -> None:
    try:
        asyncio.run(_worker(conn, url, budget_name, noop_src, tasks))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


async def _worker(conn: Any, url: str, budget_name: str, noop_src: str, tasks: int) -> None:
    cl = _Client(url, make_budget(budget_name), noop_src)
    await cl.warm(tasks)
    conn.send(("ready",))
    while True:
        msg = await asyncio.to_thread(conn.recv)
        if msg[0] == "stop":
            break
        _, mode, start_at, duration = msg
        count, last, cpu = await cl.run(mode, tasks, start_at, duration)
        conn.send(("done", count, last, cpu))
    await cl.close()
    conn.send(("closed",))


# ---------------------------------------------------------------- parent


def run_point(
    url: str, admin: redis.Redis, procs_n: int, tasks: int, modes: list[str], duration: float, rounds: int
) -> dict[str, Any]:
    """Start the workers for one client count, run every phase ``rounds`` times, interleaved."""
    ctx = c.spawn_context()
    budget_name = f"bench-tp-{uuid.uuid4().hex[:8]}"
    noop_src = c.lua_source(c.HERE / "noop.lua")
    pipes, procs = [], []
    for _ in range(procs_n):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, url, budget_name, noop_src, tasks), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    try:
        c.wait_all(pipes, 120.0, "start")
        phases: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
        for rnd in range(rounds):
            for mode in modes if rnd % 2 == 0 else modes[::-1]:  # alternate the order: no phase always last
                c.reset_stats(admin)
                cpu0 = c.redis_cpu(admin)
                start_at = time.monotonic() + 0.05
                for conn in pipes:
                    conn.send(("run", mode, start_at, duration))
                replies = c.wait_all(pipes, duration + 60.0, f"run {mode}")
                cpu1 = c.redis_cpu(admin)
                stats = c.commandstats(admin)
                ops = sum(r[1] for r in replies)
                wall = max(r[2] for r in replies) - start_at
                calls = ops * CALLS_PER_OP[mode]
                srv = stats.get("ping" if mode == "ping" else "evalsha", {})
                phases[mode].append(
                    {
                        "ops": ops,
                        "wall": wall,
                        "ops_per_s": ops / wall,
                        "calls_per_s": calls / wall,
                        "redis_cpu": (cpu1 - cpu0) / wall,
                        "server_usec_per_call": srv.get("usec_per_call", float("nan")),
                        "client_cpu_usec_per_call": sum(r[3] for r in replies) / calls * 1e6,
                    }
                )
        for conn in pipes:
            conn.send(("stop",))
        c.wait_all(pipes, 30.0, "stop")
    finally:
        c.stop_workers(procs)
    return summarize(phases)


def summarize(phases: dict[str, list[dict[str, float]]]) -> dict[str, Any]:
    """Medians over rounds; ``vs_noop`` is the median of each round's ratio to that round's noop."""
    summary: dict[str, Any] = {}
    for mode, runs in phases.items():
        summary[mode] = {key: c.median([r[key] for r in runs]) for key in runs[0]}
        summary[mode]["rounds_calls_per_s"] = [round(r["calls_per_s"], 1) for r in runs]
        if mode in ("raw", "limiter", "acquire") and "noop" in phases:
            ratios = [r["calls_per_s"] / n["calls_per_s"] for r, n in zip(runs, phases["noop"], strict=True)]
            summary[mode]["vs_noop"] = c.median(ratios)
            summary[mode]["rounds_vs_noop"] = [round(x, 3) for x in ratios]
    return summary


# ---------------------------------------------------------------- server-bound, with redis-benchmark


def server_bound(url: str, admin: redis.Redis, counts: list[int], requests: int, rounds: int) -> dict[str, Any]:
    """The same scripts driven by redis-benchmark, a C client fast enough to make Redis the limit.

    redis-benchmark cannot pair each acquire with the settle of its own lease, so this measures
    acquire alone: every call takes a fresh lease id (``__rand_int__``) and is granted at once; the
    leases stay until their TTL (a fresh budget per run keeps the lease set at ``requests`` at most).
    """
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {}
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    host, port = host_port.rsplit(":", 1)
    shas = {
        "noop": admin.script_load(c.lua_source(c.HERE / "noop.lua")),
        "acquire": admin.script_load(source("acquire")),
    }
    results: dict[str, Any] = {}
    for n in counts:
        phases: dict[str, list[dict[str, float]]] = {m: [] for m in SERVER_MODES}
        for rnd in range(rounds):
            for mode in SERVER_MODES if rnd % 2 == 0 else SERVER_MODES[::-1]:
                budget = make_budget(f"bench-sb-{uuid.uuid4().hex[:8]}")
                if mode == "ping":
                    command = ["PING"]
                else:
                    argv = acquire_args("L__rand_int__", 1.0, TOKENS, None, True, budget.lease_ttl)
                    names = keys(budget)
                    command = ["EVALSHA", shas[mode], str(len(names)), *names, *budget_args(budget), *argv]
                c.reset_stats(admin)
                cpu0 = c.redis_cpu(admin)
                t0 = time.monotonic()
                out = subprocess.run(
                    [
                        binary,
                        "-h",
                        host,
                        "-p",
                        port,
                        "-c",
                        str(n),
                        "-n",
                        str(requests),
                        "-r",
                        "1000000000",
                        "--csv",
                        *command,
                    ],
                    capture_output=True,
                    text=True,
                    timeout=300,
                    check=True,
                )
                wall = time.monotonic() - t0
                cpu1 = c.redis_cpu(admin)
                stats = c.commandstats(admin)
                row = list(csv.reader(io.StringIO(out.stdout)))[-1]
                srv = stats.get("ping" if mode == "ping" else "evalsha", {})
                if mode == "acquire" and admin.zcard(keys(budget)[1]) < requests * 0.99:
                    raise SystemExit("benchmark: redis-benchmark acquires were not all granted")
                phases[mode].append(
                    {
                        "calls_per_s": float(row[1]),
                        "p50_ms": float(row[4]),
                        "redis_cpu": (cpu1 - cpu0) / wall,
                        "redis_cpu_usec_per_call": (cpu1 - cpu0) / requests * 1e6,
                        "server_usec_per_call": srv.get("usec_per_call", float("nan")),
                    }
                )
        results[str(n)] = summarize(phases)
    return results


def fmt_ratio(x: float) -> str:
    return "-" if x != x else f"{x:.2f}x"


def iqr(r: dict[str, Any]) -> str:
    """The middle half of the per-round ratios: how much the machine moved under the figure."""
    rounds = r.get("rounds_vs_noop") or []
    if not rounds:
        return "-"
    return f"{c.percentile(rounds, 25):.2f}-{c.percentile(rounds, 75):.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16", help="comma-separated client counts (default 1,4,16)")
    ap.add_argument(
        "--layout",
        choices=("process", "task"),
        default="process",
        help="process: N worker processes with one connection each (default); "
        "task: one process running N asyncio tasks, one connection each",
    )
    ap.add_argument("--duration", type=float, default=0.3, help="seconds per phase (default 0.3)")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of every phase; medians are reported (default 20)")
    ap.add_argument("--modes", default=",".join(MODES), help=f"subset of {','.join(MODES)}")
    ap.add_argument(
        "--server-requests",
        type=int,
        default=5000,
        help="requests per redis-benchmark run in the server-bound section (default 5000; 0 skips it)",
    )
    ap.add_argument("--server-rounds", type=int, default=5, help="rounds of the server-bound section (default 5)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",") if x.strip()]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in modes) or not counts or min(counts) < 1 or max(counts) > 64:
        ap.error("bad --modes or --clients (1..64)")
    if (
        not 0.1 <= args.duration <= 30
        or not 1 <= args.rounds <= 50
        or not 1 <= args.server_rounds <= 50
        or not 0 <= args.server_requests <= 200_000
    ):
        ap.error("--duration must be 0.1..30 s, --rounds and --server-rounds 1..50, --server-requests 0..200000")

    server = c.start_redis()
    try:
        admin = redis.Redis.from_url(server.url)
        env = c.environment(server.url)
        c.print_environment(env)
        layout = "processes, 1 connection each" if args.layout == "process" else "asyncio tasks in 1 process"
        print(
            f"# Python clients (redis.asyncio): clients = {layout}; {args.rounds} rounds x {args.duration:g} s "
            "per phase, phases interleaved; medians of rounds"
        )
        results: dict[str, Any] = {}
        rows = []
        goal_rows = []
        for n in counts:
            procs_n, tasks = (n, 1) if args.layout == "process" else (1, n)
            res = run_point(server.url, admin, procs_n, tasks, modes, args.duration, args.rounds)
            results[str(n)] = res
            for mode in modes:
                r = res[mode]
                pairs = r["ops_per_s"] if CALLS_PER_OP[mode] == 2 else float("nan")
                ratio = r.get("vs_noop", float("nan"))
                rows.append(
                    [
                        n,
                        mode,
                        r["calls_per_s"],
                        pairs,
                        fmt_ratio(ratio),
                        f"{r['redis_cpu'] * 100:.0f}%",
                        r["server_usec_per_call"],
                        r["client_cpu_usec_per_call"],
                    ]
                )
                if ratio == ratio:
                    goal_rows.append(["python", n, f"{mode} (acquire+settle)", fmt_ratio(ratio), iqr(r), ratio >= 0.7])
        print()
        print(
            c.table(
                [
                    "clients",
                    "phase",
                    "calls/s",
                    "pairs/s",
                    "vs noop",
                    "redis CPU",
                    "server us/call",
                    "client CPU us/call",
                ],
                rows,
            )
        )

        sb: dict[str, Any] = {}
        if args.server_requests:
            sb = server_bound(server.url, admin, counts, args.server_requests, args.server_rounds)
            print()
            if not sb:
                print("# server-bound section skipped: no redis-benchmark binary")
            else:
                print(
                    f"# Server-bound: redis-benchmark (C client), -c clients, {args.server_requests} requests per run, "
                    f"{args.server_rounds} rounds interleaved; acquire alone, each with a fresh lease id"
                )
                print()
                sb_rows = []
                for n in counts:
                    for mode in SERVER_MODES:
                        r = sb[str(n)][mode]
                        ratio = r.get("vs_noop", float("nan"))
                        sb_rows.append(
                            [
                                n,
                                mode,
                                r["calls_per_s"],
                                fmt_ratio(ratio),
                                f"{r['redis_cpu'] * 100:.0f}%",
                                r["redis_cpu_usec_per_call"],
                                r["server_usec_per_call"],
                                r["p50_ms"],
                            ]
                        )
                        if ratio == ratio:
                            goal_rows.append(
                                ["redis-benchmark", n, "acquire alone", fmt_ratio(ratio), iqr(r), ratio >= 0.7]
                            )
                print(
                    c.table(
                        [
                            "clients",
                            "phase",
                            "calls/s",
                            "vs noop",
                            "redis CPU",
                            "redis CPU us/call",
                            "server us/call",
                            "p50 ms",
                        ],
                        sb_rows,
                    )
                )

        if goal_rows:
            print()
            print("# goal: acquire script calls/s >= 0.7x the no-op script's calls/s, same client count")
            print(
                c.table(
                    ["client", "clients", "measured", "vs noop", "rounds p25-p75", "goal"],
                    [[*row[:5], "met" if row[5] else "MISSED"] for row in goal_rows],
                )
            )
        c.write_json(
            args.json,
            {
                "benchmark": "throughput",
                "environment": env,
                "layout": args.layout,
                "duration": args.duration,
                "rounds": args.rounds,
                "python_clients": results,
                "server_bound": sb,
                "server_requests": args.server_requests,
            },
        )
        admin.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
