"""What counting costs: acquire + release per second with metrics off, Prometheus on, and traces on.

One process, one limiter, a budget that never binds (so that only the library's own work is timed),
``--calls`` acquire/release pairs a round, the three settings interleaved over ``--rounds`` rounds on
both backends (``memory://`` and a private redis-server on a free loopback port); the median of each
and its ratio to "off" measured in the same round. Prometheus: ``xflow_dist.metrics.enable()`` on a
registry of its own; traces: ``xflow_dist.tracing.instrument()`` with the OpenTelemetry SDK and no
exporter (spans made and dropped).

  python benchmarks/metrics_overhead.py
  python benchmarks/metrics_overhead.py --calls 5000 --rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import time
import uuid

from _common import environment, median, print_environment, start_redis, table, write_json
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from xflow_dist import Budget, Limiter, metrics, tracing

SETTINGS = ("off", "prometheus", "traces")


def _switch(setting: str) -> None:
    metrics.disable()
    tracing.uninstrument()
    if setting == "prometheus":
        metrics.enable(CollectorRegistry())
    elif setting == "traces":
        tracing.instrument(TracerProvider())


def rate(url: str, calls: int) -> float:
    budget = Budget(f"overhead-{uuid.uuid4().hex[:8]}", rpm=1e9, tpm=1e12, max_concurrency=1_000_000)
    with Limiter(budget, url) as lim:
        for _ in range(200):  # warm-up: connections, scripts
            lim.acquire(tokens=10).release()
        started = time.perf_counter()
        for _ in range(calls):
            lim.acquire(tokens=10).release()
        return calls / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=5_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    server = start_redis()
    try:
        env = environment(server.url)
        print_environment(env)
        backends = {"memory": "memory://overhead", "redis": server.url}
        got: dict[tuple[str, str], list[float]] = {(b, s): [] for b in backends for s in SETTINGS}
        for _ in range(args.rounds):
            for backend, url in backends.items():
                for setting in SETTINGS:
                    _switch(setting)
                    got[(backend, setting)].append(rate(url, args.calls))
        _switch("off")
        rows = []
        for backend in backends:
            for setting in SETTINGS:
                ratios = [a / b for a, b in zip(got[(backend, setting)], got[(backend, "off")], strict=True)]
                rows.append([backend, setting, f"{median(got[(backend, setting)]):,.0f}", f"{median(ratios):.2f}"])
        print(f"\nacquire + release per second, {args.calls:,} a round, median of {args.rounds} rounds")
        print(table(["backend", "counting", "per second", "vs off"], rows))
        write_json(args.json, {"environment": env, "rates": {f"{b}/{s}": v for (b, s), v in got.items()}})
    finally:
        server.stop()


if __name__ == "__main__":
    main()
