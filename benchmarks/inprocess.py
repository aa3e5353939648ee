"""The XtremeFlow API side by side: XtremeFlow 0.4.4 itself, ``xflow_dist.compat`` in-process, over Redis.

The same script drives each scheduler with the calls an XtremeFlow user makes
(``await scheduler.start_task(coro)`` in a loop, then ``await scheduler.wait_pending()``):

  throughput  N tasks of a coroutine that returns at once, no rate limit, ``max_concurrency=1000``:
              tasks completed per second, from the first start_task to the last task done
  pacing      ``max_rps`` of 10, 100 and 1,000 per second, ``burst_ratio=0`` (XtremeFlow's default),
              2 s worth of tasks started at once: the rate the tasks' starts achieved
              ((n - 1) / (last start - first start)) over the target, and the latest start
              against its ideal time (first start + k / rate)

The three runs of each phase are interleaved (XtremeFlow, in-process, Redis, then again) over
``--rounds`` rounds and the median is reported, with each ratio against XtremeFlow taken per round.
``in-process`` is the compat default (no ``redis=``: ``memory://``); ``redis`` passes the URL of a
private redis-server this script starts on a free loopback port. XtremeFlow is the PyPI release
(``pip install 'xflow-dist[bench]'`` installs it); where it is missing the script says so and stops.

  python benchmarks/inprocess.py
  python benchmarks/inprocess.py --tasks 5000 --rounds 3 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from _common import environment, median, print_environment, start_redis, table, write_json

RATES = (10, 100, 1000)


def _make(kind: str, url: str, **kw: Any) -> Any:
    if kind == "xtremeflow":
        token = importlib.import_module("xtremeflow.scheduler.token")
        return token.TokenRateScheduler(**kw)
    from xflow_dist.compat import TokenRateScheduler

    if kind == "redis":
        kw = {**kw, "redis": url, "name": f"bench-{uuid.uuid4().hex[:8]}"}
    return TokenRateScheduler(**kw)


async def _close(s: Any) -> None:
    close = getattr(s, "aclose", None)
    if close is not None:
        await close()


async def throughput(kind: str, url: str, tasks: int) -> float:
    s = _make(kind, url, max_concurrency=1000)

    async def noop() -> None:
        return None

    for _ in range(50):  # warm-up: connections, scripts, the events reader
        await s.start_task(noop())
    await s.wait_pending()
    t0 = time.perf_counter()
    for _ in range(tasks):
        await s.start_task(noop())
    await s.wait_pending()
    elapsed = time.perf_counter() - t0
    await _close(s)
    return tasks / elapsed


async def pacing(kind: str, url: str, rate: int) -> tuple[float, float]:
    """(achieved rate / target, latest start behind its ideal time in ms)."""
    s = _make(kind, url, max_rps=rate, max_concurrency=1000, burst_ratio=0.0)
    n = 2 * rate + 1
    starts: list[float] = []

    async def record() -> None:
        starts.append(time.perf_counter())

    for _ in range(n):
        await s.start_task(record())
    await s.wait_pending()
    await _close(s)
    span = starts[-1] - starts[0]
    behind = max(t - (starts[0] + k / rate) for k, t in enumerate(starts))
    return (n - 1) / span / rate, behind * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks of the throughput phase")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    try:
        importlib.import_module("xtremeflow")
    except ImportError:
        sys.exit("XtremeFlow is not installed: pip install 'xflow-dist[bench]' (it pins xtremeflow==0.4.4)")

    server = start_redis()
    try:
        env = environment(server.url)
        env["xtremeflow"] = importlib.metadata.version("xtremeflow")
        print_environment(env)
        kinds = ("xtremeflow", "in-process", "redis")
        tput: dict[str, list[float]] = {k: [] for k in kinds}
        pace: dict[tuple[str, int], list[tuple[float, float]]] = {(k, r): [] for k in kinds for r in RATES}
        for _ in range(args.rounds):
            for kind in kinds:
                tput[kind].append(asyncio.run(throughput(kind, server.url, args.tasks)))
            for rate in RATES:
                for kind in kinds:
                    pace[(kind, rate)].append(asyncio.run(pacing(kind, server.url, rate)))

        def ratio(kind: str) -> float:
            return median([a / b for a, b in zip(tput[kind], tput["xtremeflow"], strict=True)])

        rows = [[k, f"{median(tput[k]):,.0f}", f"{ratio(k):.2f}"] for k in kinds]
        print(
            f"\nthroughput: {args.tasks:,} tasks, no rate limit, max_concurrency=1000, median of {args.rounds} rounds"
        )
        print(table(["scheduler", "tasks/s", "vs XtremeFlow"], rows))
        prow = []
        for rate in RATES:
            for kind in kinds:
                got = pace[(kind, rate)]
                first: Callable[[tuple[float, float]], float] = lambda x: x[0]  # noqa: E731
                prow.append(
                    [rate, kind, f"{100 * median([first(g) for g in got]):.2f} %", f"{median([g[1] for g in got]):.1f}"]
                )
        print(f"\npacing: max_rps at burst_ratio=0, 2 s of tasks started at once, median of {args.rounds} rounds")
        print(table(["rate/s", "scheduler", "achieved / target", "latest start behind ideal (ms)"], prow))
        write_json(
            args.json,
            {
                "environment": env,
                "throughput": {k: tput[k] for k in kinds},
                "pacing": {f"{k}@{r}": pace[(k, r)] for k in kinds for r in RATES},
            },
        )
    finally:
        server.stop()


if __name__ == "__main__":
    import importlib.metadata

    main()
