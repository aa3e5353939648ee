"""How soon a process queued for a concurrency slot starts after another process releases it.

Two worker processes share a budget of ``max_concurrency=1``. Each round:

  1. the holder acquires the only slot;
  2. the waiter calls ``acquire()``, finds no slot and queues (its ticket waits in Redis; the
     process parks on the grant notice of the budget's events channel);
  3. the holder polls ``status()`` until it sees the ticket queued, lets ``--settle-ms`` pass so the
     waiter is parked, not mid-call, then stamps t0 = ``time.monotonic()`` and calls ``release()``;
  4. the waiter stamps t1 = ``time.monotonic()`` as soon as its ``acquire()`` returns, then releases.

The wake latency is t1 - t0: the holder's settle script, the grant it publishes, the notice's trip
to the waiter's subscriber and the waiter's own wake-up. ``time.monotonic()`` is CLOCK_MONOTONIC,
one clock for every process of a Linux machine, so stamps from two processes compare directly.
Also reported: how long the holder's ``release()`` call itself took (one round trip of settle.lua).

The baseline, in the same run: the floor of any hand-over through Redis, the same rounds with the
slot as a one-token Redis list instead of a budget (the waiter blocks in ``BLPOP``, the holder's
release is an ``RPUSH``, which Redis answers the blocked waiter with in the same event-loop turn),
with redis-py's sync and asyncio clients. No script, no notice to parse, no lease.

  python benchmarks/wake_latency.py                    # 200 rounds, Limiter, AsyncLimiter and the floor
  python benchmarks/wake_latency.py --front async --rounds 500 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from typing import Any

import _common as c
import redis
import redis.asyncio

from xflow_dist import AsyncLimiter, Budget, Limiter

LABELS = {
    "sync": "Limiter (sync)",
    "async": "AsyncLimiter",
    "floor-sync": "floor: BLPOP (sync)",
    "floor-async": "floor: BLPOP (async)",
}


def make_budget(name: str) -> Budget:
    return Budget(name, max_concurrency=1, lease_ttl=30.0)


# ---------------------------------------------------------------- worker processes


def worker(conn: Any, url: str, front: str, budget_name: str, settle: float) -> None:
    try:
        budget = make_budget(budget_name)
        if front == "sync":
            _sync(conn, url, budget, settle)
        elif front == "async":
            asyncio.run(_async(conn, url, budget, settle))
        elif front == "floor-sync":
            _floor_sync(conn, url, f"{budget_name}:slot", settle)
        else:
            asyncio.run(_floor_async(conn, url, f"{budget_name}:slot", settle))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def _sync(conn: Any, url: str, budget: Budget, settle: float) -> None:
    with Limiter(budget, url) as limiter:
        with limiter.acquire(timeout=30.0):  # subscribed before the first round, as a running process is
            pass
        conn.send(("ready",))
        lease = None
        while True:
            msg = conn.recv()
            if msg[0] == "stop":
                break
            if msg[0] == "hold":
                lease = limiter.acquire()
                conn.send(("held",))
            elif msg[0] == "wait":
                conn.send(("waiting",))
                got = limiter.acquire()
                t1 = time.monotonic()
                got.release()
                conn.send(("got", t1))
            elif msg[0] == "release":
                while limiter.status().queued < 1:
                    time.sleep(0.0005)
                time.sleep(settle)
                assert lease is not None
                t0 = time.monotonic()
                lease.release()
                conn.send(("released", t0, time.monotonic()))
    conn.send(("closed",))


async def _async(conn: Any, url: str, budget: Budget, settle: float) -> None:
    async with AsyncLimiter(budget, url) as limiter:
        async with limiter.acquire(timeout=30.0):
            pass
        conn.send(("ready",))
        lease = None
        while True:
            msg = await asyncio.to_thread(conn.recv)
            if msg[0] == "stop":
                break
            if msg[0] == "hold":
                lease = await limiter.acquire()
                conn.send(("held",))
            elif msg[0] == "wait":
                conn.send(("waiting",))
                got = await limiter.acquire()
                t1 = time.monotonic()
                await got.release()
                conn.send(("got", t1))
            elif msg[0] == "release":
                while (await limiter.status()).queued < 1:
                    await asyncio.sleep(0.0005)
                await asyncio.sleep(settle)
                assert lease is not None
                t0 = time.monotonic()
                await lease.release()
                conn.send(("released", t0, time.monotonic()))
    conn.send(("closed",))


def _blocked(info: dict[str, Any]) -> int:
    return int(info.get("blocked_clients", 0))


def _floor_sync(conn: Any, url: str, key: str, settle: float) -> None:
    r = redis.Redis.from_url(url)  # no socket timeout: BLPOP blocks
    r.ping()
    conn.send(("ready",))
    while True:
        msg = conn.recv()
        if msg[0] == "stop":
            break
        if msg[0] == "hold":
            assert r.blpop([key], timeout=30) is not None
            conn.send(("held",))
        elif msg[0] == "wait":
            conn.send(("waiting",))
            got = r.blpop([key], timeout=30)
            t1 = time.monotonic()
            assert got is not None
            r.rpush(key, "1")
            conn.send(("got", t1))
        elif msg[0] == "release":
            while _blocked(r.info("clients")) < 1:
                time.sleep(0.0005)
            time.sleep(settle)
            t0 = time.monotonic()
            r.rpush(key, "1")
            conn.send(("released", t0, time.monotonic()))
    r.close()
    conn.send(("closed",))


async def _floor_async(conn: Any, url: str, key: str, settle: float) -> None:
    r = redis.asyncio.Redis.from_url(url)
    await r.ping()
    conn.send(("ready",))
    while True:
        msg = await asyncio.to_thread(conn.recv)
        if msg[0] == "stop":
            break
        if msg[0] == "hold":
            assert await r.blpop([key], timeout=30) is not None
            conn.send(("held",))
        elif msg[0] == "wait":
            conn.send(("waiting",))
            got = await r.blpop([key], timeout=30)
            t1 = time.monotonic()
            assert got is not None
            await r.rpush(key, "1")
            conn.send(("got", t1))
        elif msg[0] == "release":
            while _blocked(await r.info("clients")) < 1:
                await asyncio.sleep(0.0005)
            await asyncio.sleep(settle)
            t0 = time.monotonic()
            await r.rpush(key, "1")
            conn.send(("released", t0, time.monotonic()))
    await r.aclose()
    conn.send(("closed",))


# ---------------------------------------------------------------- parent


def run_front(url: str, front: str, rounds: int, settle: float) -> dict[str, Any]:
    ctx = c.spawn_context()
    budget_name = f"bench-wake-{uuid.uuid4().hex[:8]}"
    if front.startswith("floor"):
        with redis.Redis.from_url(url) as admin:
            admin.rpush(f"{budget_name}:slot", "1")  # the floor's one slot
    pipes, procs = [], []
    for _role in ("holder", "waiter"):
        parent, child = ctx.Pipe()
        p = ctx.Process(target=worker, args=(child, url, front, budget_name, settle), daemon=True)
        p.start()
        pipes.append(parent)
        procs.append(p)
    holder, waiter = pipes
    latencies: list[float] = []
    release_calls: list[float] = []
    try:
        c.wait_all(pipes, 120.0, "start")
        for _ in range(rounds):
            holder.send(("hold",))
            c.wait_all([holder], 30.0, "hold the slot")
            waiter.send(("wait",))
            c.wait_all([waiter], 30.0, "start waiting")
            holder.send(("release",))
            (_, t0, t_done), (_, t1) = c.wait_all([holder, waiter], 60.0, "hand the slot over")
            latencies.append(t1 - t0)
            release_calls.append(t_done - t0)
        for conn in pipes:
            conn.send(("stop",))
        c.wait_all(pipes, 30.0, "stop")
    finally:
        c.stop_workers(procs)
    ms = [x * 1000 for x in latencies]
    rel = [x * 1000 for x in release_calls]
    return {
        "front": front,
        "rounds": rounds,
        "latency_ms": {
            "median": c.median(ms),
            "p90": c.percentile(ms, 90),
            "p99": c.percentile(ms, 99),
            "max": max(ms),
            "min": min(ms),
            "mean": sum(ms) / len(ms),
        },
        "release_call_ms": {"median": c.median(rel), "p90": c.percentile(rel, 90), "max": max(rel)},
        "samples_ms": [round(x, 4) for x in ms],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200, help="hand-overs measured per front (default 200)")
    ap.add_argument(
        "--front",
        choices=("sync", "async", "both", "floor-sync", "floor-async", "all"),
        default="all",
        help="Limiter, AsyncLimiter, both, a floor alone, or all four (default)",
    )
    ap.add_argument(
        "--settle-ms", type=float, default=5.0, help="pause after the waiter is seen queued, before release (default 5)"
    )
    ap.add_argument("--json", metavar="FILE", help="also write the figures (and every sample) as JSON")
    args = ap.parse_args()
    if not 1 <= args.rounds <= 5000 or not 0 <= args.settle_ms <= 1000:
        ap.error("--rounds 1..5000, --settle-ms 0..1000")
    fronts = {"both": ["sync", "async"], "all": list(LABELS)}.get(args.front, [args.front])

    server = c.start_redis()
    try:
        env = c.environment(server.url)
        c.print_environment(env)
        print(
            f"# {args.rounds} hand-overs per front between two processes, budget max_concurrency=1; "
            "latency = waiter's acquire() returned - holder about to call release() (CLOCK_MONOTONIC)"
        )
        results = [run_front(server.url, f, args.rounds, args.settle_ms / 1000.0) for f in fronts]
    finally:
        server.stop()

    print()
    rows = []
    for r in results:
        lat, rel = r["latency_ms"], r["release_call_ms"]
        label = LABELS[r["front"]]
        rows.append([label, r["rounds"], lat["median"], lat["p90"], lat["p99"], lat["max"], lat["min"], rel["median"]])
    print(
        c.table(
            ["front", "rounds", "median ms", "p90 ms", "p99 ms", "max ms", "min ms", "release() call median ms"], rows
        )
    )
    print()
    floors = {r["front"]: r["latency_ms"]["median"] for r in results if r["front"].startswith("floor")}

    def against_floor(r: dict[str, Any]) -> str:
        floor = floors.get("floor-" + r["front"])
        return f"{r['latency_ms']['median'] / floor:.2f}" if floor else "-"

    print("# goal: the waiter starts within 5 ms (median) of the other process's release")
    print(
        c.table(
            ["front", "median ms", "goal", "x the floor (same client)"],
            [
                [
                    LABELS[r["front"]],
                    r["latency_ms"]["median"],
                    "met" if r["latency_ms"]["median"] <= 5.0 else "MISSED",
                    against_floor(r),
                ]
                for r in results
                if not r["front"].startswith("floor")
            ],
        )
    )
    c.write_json(
        args.json, {"benchmark": "wake_latency", "environment": env, "arguments": vars(args), "results": results}
    )


if __name__ == "__main__":
    main()
