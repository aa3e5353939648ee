"""Celery fleets against one provider: Celery's own per-worker ``rate_limit`` against the shared budget.

Same simulated provider (strict minute buckets), same job list, same worker nodes (``workers.app``,
prefork, Redis as broker); two strategies in turn:
  xflow       - ``workers.chat``: the ``xflow_dist.celery`` decorator, one budget in Redis shared by
                every node (waits over ``XFLOW_CELERY__MAX_WAIT`` re-queue the task)
  rate_limit  - ``workers.chat_baseline``: Celery's ``rate_limit`` on each node, set to the limit
                divided by the nodes (for tokens: TPM over the mean estimate of a job, in tasks);
                429s retried after an exponential backoff with full jitter

Scenarios: tokens bind (6,000 RPM, 120,000 TPM) and requests bind (600 RPM). Figures come from the
provider's own ledger (``/stats``), judged as in benchmarks/fleet.py: utilisation of the binding
limit counts the provider's initially full minute bucket. The nodes line up (every pool process
answers a no-op task) before the provider is reset and the jobs are sent.

    python benchmarks/celery_fleet.py [--nodes 2] [--concurrency 8] [--scenario tokens ...] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from pathlib import Path
from statistics import mean
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _common import Scenario, source_state  # noqa: E402  (benchmarks/, the script's own directory)
from celery import Celery  # type: ignore[import-untyped]  # noqa: E402

from workers.fleet import start_nodes, stop_nodes  # noqa: E402
from xflow_dist.tools._demo import Latency, fetch_stats, judge, reset_provider, simulator_process  # noqa: E402
from xflow_dist.tools._embedded import EmbeddedRedis  # noqa: E402
from xflow_dist.tools._fleet import Job, Limits, make_jobs  # noqa: E402

STRATEGIES = ("xflow", "rate_limit")


SCENARIOS = [
    # ~10 s beyond the provider's initially full minute bucket at 2,000 tokens/s (as benchmarks/fleet.py)
    Scenario("tokens", Limits(rpm=6_000, tpm=120_000), Latency(0.05, 0.0002), 370),
    # 10 requests/s: ~10 s beyond the initial minute of 600 requests
    Scenario(
        "requests", Limits(rpm=600, tpm=10_000_000), Latency(0.05, 0.0002), 700,
        prompt_tokens=(10, 40), max_tokens=(8, 32),
    ),
]  # fmt: skip


def _payload(job: Job) -> dict[str, Any]:
    return {"id": job.id, "prompt": job.prompt, "max_tokens": job.max_tokens}


def baseline_rate(scenario: Scenario, jobs: list[Job], nodes: int) -> str:
    """Celery's rate_limit for one node: the binding limit over the nodes, in tasks per minute."""
    per_minute = min(scenario.limits.rpm, scenario.limits.tpm / mean(j.estimate for j in jobs))
    return f"{per_minute / nodes:.3f}/m"


def run(
    strategy: str,
    scenario: Scenario,
    jobs: list[Job],
    *,
    redis_url: str,
    provider: str,
    nodes: int,
    concurrency: int,
    deadline: float,
    burst: float,
) -> dict[str, Any]:
    run_id = uuid.uuid4().hex[:8]
    broker = redis_url.rsplit("/", 1)[0] + "/1"
    queue = f"bench-{run_id}"
    limits = scenario.limits
    env = {
        "XFLOW_REDIS_URL": redis_url,
        "XFLOW_BROKER_URL": broker,
        "XFLOW_QUEUE": queue,
        "XFLOW_PROVIDER_URL": f"{provider}/v1",
        "XFLOW_MODEL": "sim",
        "XFLOW_BUDGET__NAME": f"bench-{run_id}",
        "XFLOW_BUDGET__RPM": repr(limits.rpm),
        "XFLOW_BUDGET__TPM": repr(limits.tpm),
        "XFLOW_BUDGET__BURST": repr(burst),
        "XFLOW_VISIBILITY_TIMEOUT": "300",
        "XFLOW_MAX_RETRIES": "20",
        "XFLOW_BASELINE_RATE_LIMIT": baseline_rate(scenario, jobs, nodes),
    }
    task = "workers.chat" if strategy == "xflow" else "workers.chat_baseline"
    app = Celery(f"bench-{run_id}", broker=broker, backend=broker, set_as_current=False)
    app.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    procs = start_nodes(nodes, concurrency=concurrency, pool="prefork", loglevel="error", env=env, quiet=True)
    try:
        up_by = time.monotonic() + 120
        while len(app.control.ping(timeout=0.5)) < nodes:
            if time.monotonic() > up_by or any(p.poll() is not None for p in procs):
                raise RuntimeError("the worker nodes did not come up")
        # Line up: every pool process has started (and loaded what it loads) before the run.
        warm = [app.send_task("workers.ready") for _ in range(nodes * concurrency * 3)]
        pids = {r.get(timeout=120) for r in warm}
        reset_provider(provider)
        started = time.monotonic()
        results = [app.send_task(task, args=[_payload(j)]) for j in jobs]
        stop_at = started + deadline
        pending = list(results)
        while pending and time.monotonic() < stop_at:
            pending = [r for r in pending if not r.ready()]
            time.sleep(0.25)
        wall = time.monotonic() - started
        stats = fetch_stats(provider)
        failed = sum(1 for r in results if r.ready() and not r.successful())
        shares: dict[str, int] = {}
        for r in results:
            if r.ready() and r.successful():
                node = str(r.result.get("node", "?")).split("@")[0]
                shares[node] = shares.get(node, 0) + 1
            r.forget()
    finally:
        stop_nodes(procs, grace=30)
        app.close()
    makespan, ideal, binding, use = judge(stats, limits, scenario.latency)
    finished = not pending
    configured: dict[str, float] = {}
    if strategy == "rate_limit":
        # What the per-node split would reach if Celery held the configured rate exactly.
        span = len(jobs) / (float(env["XFLOW_BASELINE_RATE_LIMIT"].split("/")[0]) * nodes / 60.0)
        used = float(stats["tokens"]["settled"]) if scenario.name == "tokens" else float(len(jobs))
        limit = limits.tpm if scenario.name == "tokens" else limits.rpm
        configured = {"makespan": span, "utilisation": used / (limit + limit / 60.0 * span)}
    admitted = int(stats["requests"]["admitted"])
    rejected = int(stats["requests"]["rejected"])
    sent = admitted + rejected
    return {
        "scenario": scenario.name,
        "strategy": strategy,
        "finished": finished,
        "at_configured_rate": configured or None,
        "nodes": nodes,
        "concurrency": concurrency,
        "processes_seen": len(pids),
        "shares": dict(sorted(shares.items())),
        "jobs": len(jobs),
        "completed": int(stats["requests"]["completed"]),
        "failed": failed,
        "pending": len(pending),
        "wall": wall,
        "makespan": makespan,
        "ideal": ideal,
        "binding": binding,
        "utilisation": use.get(binding),
        "sent": sent,
        "rejected": rejected,
        "rejected_share": rejected / sent if sent else 0.0,
        "violations": int(stats["violations"]),
        "rejected_by": {k: v for k, v in stats["requests"]["rejected_by"].items() if v},
        "rejected_at": [i for i, n in enumerate(stats["series"].get("rejected", [])) if n],
        "rate_limit": env["XFLOW_BASELINE_RATE_LIMIT"] if strategy == "rate_limit" else None,
    }


def _line(r: dict[str, Any]) -> str:
    if not r["finished"]:
        return (
            f"{r['scenario']:<9} {r['strategy']:<10} did not finish: {r['completed']}/{r['jobs']} in {r['wall']:.0f}s"
        )
    return (
        f"{r['scenario']:<9} {r['strategy']:<10} makespan {r['makespan']:6.2f}s ideal {r['ideal']:6.2f}s "
        f"util {r['utilisation']:6.1%} ({r['binding']}) 429s {r['rejected']:4d}/{r['sent']:<5d} "
        f"({r['rejected_share']:6.2%}) done {r['completed']}/{r['jobs']} failed {r['failed']} "
        f"violations {r['violations']} per node {list(r['shares'].values())}"
        + (f" 429s by {r['rejected_by']} in seconds {r['rejected_at']}" if r["rejected"] else "")
        + (f" rate_limit {r['rate_limit']} per node" if r["rate_limit"] else "")
        + (
            f" (at that rate exactly: makespan {r['at_configured_rate']['makespan']:.1f}s, "
            f"util {r['at_configured_rate']['utilisation']:.1%})"
            if r["at_configured_rate"]
            else ""
        )
    )


def _table(rows: list[dict[str, Any]]) -> str:
    out = [
        "| scenario | strategy | makespan s | ideal s | utilisation | 429s / sent | 429 share | done | per node |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["finished"]:
            out.append(f"| {r['scenario']} | {r['strategy']} | did not finish: {r['completed']}/{r['jobs']} "
                       f"in {r['wall']:.0f}s | | | | | | |")  # fmt: skip
            continue
        out.append(
            f"| {r['scenario']} | {r['strategy']} | {r['makespan']:.2f} | {r['ideal']:.2f} | {r['utilisation']:.1%} "
            f"| {r['rejected']} / {r['sent']} | {r['rejected_share']:.2%} | {r['completed']}/{r['jobs']} "
            f"| {' / '.join(str(n) for n in r['shares'].values())} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=2, help="celery worker nodes (default 2)")
    parser.add_argument("--concurrency", type=int, default=8, help="prefork processes per node (default 8)")
    parser.add_argument("--scenario", action="append", choices=[s.name for s in SCENARIOS])
    parser.add_argument("--strategy", action="append", choices=STRATEGIES)
    parser.add_argument("--deadline", type=float, default=420.0, help="seconds one run may take at most")
    parser.add_argument(
        "--burst",
        type=float,
        default=60.0,
        help="the budget's burst, seconds (the provider's minute; the library keeps its dispatch margin back)",
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    chosen = [s for s in SCENARIOS if not args.scenario or s.name in args.scenario]
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    load = os.getloadavg()
    with EmbeddedRedis(allow_fake=False) as redis_server:
        print(
            f"redis: {redis_server.kind} at {redis_server.url}; {args.nodes} nodes x {args.concurrency} prefork; "
            f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs; "
            f"source {source_state()}",
            flush=True,
        )
        for scenario in chosen:
            jobs = make_jobs(scenario.jobs, seed=7, prompt_tokens=scenario.prompt_tokens,
                             max_tokens=scenario.max_tokens)  # fmt: skip
            with simulator_process(scenario.limits, scenario.latency, seed=7) as provider:
                for strategy in args.strategy or STRATEGIES:
                    row = run(
                        strategy,
                        scenario,
                        jobs,
                        redis_url=redis_server.url,
                        provider=provider,
                        nodes=args.nodes,
                        concurrency=args.concurrency,
                        deadline=args.deadline,
                        burst=args.burst,
                    )
                    rows.append(row)
                    print(_line(row), flush=True)
    load = os.getloadavg()
    print(f"\ntotal {time.monotonic() - t0:.0f}s; load average after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n")
    print(_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
