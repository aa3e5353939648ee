"""Side by side, one run: xflow-dist's shared budget against the alternatives a fleet would use.

Same simulated provider, same job list, same processes x workers; the strategies run in turn:
  xflow  - one shared budget in Redis (AsyncLimiter), fleet-wide cooldown on 429
  retry  - no limiter: retry each 429 after exponential backoff with full jitter
  split  - a static split: each process limits itself in-process to 1/P of every limit (aiolimiter)
  floor  - only on request (--strategy floor), not a limiter: the slots as a Redis list, BLPOP to take
           one, RPUSH to give it back; no rates, leases or crash safety. The least a slot hand-over
           through Redis costs, as a baseline for the shared budget's where concurrency binds

Scenarios: tokens bind, requests bind, concurrency binds; each at P = 4 and P = 8 (--processes 16 too).
--uneven gives the processes unequal worker counts (from about 2C/(P+1) to 2CP/(P+1), C on average).
Figures come from the provider's own ledger. Loopback only; every run is bounded by --deadline.

Redis's side of each xflow run, per grant (a call the provider admitted or refused; each was granted
first): ``cmds`` the limiter's top-level script calls (EVALSHA), ``in-script`` the commands those
scripts ran (INFO commandstats by name: every command but the ones only a client sends, the job
list's and the harness's), ``us in scripts`` the time Redis spent running those scripts
(commandstats' usec of EVALSHA, inner calls included), ``cpu`` the redis-server's whole CPU time
(user + sys) over the run, its idle housekeeping and the job list included, in microseconds. The
stats are reset before each run and read after it.

Where the concurrency limit binds, the provider's books also give the drain tail (from the last
admission to the last completion: calls of uneven lengths cannot keep every slot busy to the end),
the slots' use before it, and the hand-over: from a completion that freed a slot of the full limit
to the next admission, as the provider sees it (the release's settle, the notice, the waiter's
claim and its HTTP request), median and 90th percentile; and the limiter's own part of it, from the
start of a worker's settle to the start of the call it let in (``acquire`` returned, in any process;
CLOCK_MONOTONIC is one clock for the machine; settles and grants that waited matched in order, one
slot freed, one waiter let in), without the two HTTP legs and the reply's handling.

The shared budget (xflow) is, by default, configured with the provider's real limits. Learning:
  --budget-scale 1.3   configure it 30 % above them (the fleet learns the real ones from the headers)
  --learn              configure no rates at all (concurrency only): the headers teach them
  --probe              with --learn: the budget probes, one call at a time until the first reply
  --remaining-only     settle with x-ratelimit-remaining-* only, not the limits (as Azure sends them)

    python benchmarks/fleet.py [--quick] [--json FILE] [--scenario NAME ...] [--strategy NAME ...]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import redis
from _common import CLIENT_ONLY, HARNESS_COMMANDS, Scenario, commandstats, redis_cpu, reset_stats

from xflow_dist.tools._demo import FleetResult, Latency, fleet_spec, run_fleet, simulator_process
from xflow_dist.tools._embedded import EmbeddedRedis
from xflow_dist.tools._fleet import STRATEGIES, Limits, make_jobs


def scenarios(quick: bool) -> list[tuple[Scenario, int]]:
    scale = 0.5 if quick else 1.0
    base = [
        # ~10 s beyond the provider's initially full minute bucket at 2,000 tokens/s
        Scenario("tokens", Limits(rpm=6_000, tpm=120_000), Latency(0.05, 0.0002), 320 + int(50 * scale)),
        # 10 requests/s: ~10 s beyond the initial minute of 600 requests
        Scenario(
            "requests", Limits(rpm=600, tpm=10_000_000), Latency(0.05, 0.0002), int(100 * scale) + 600,
            prompt_tokens=(10, 40), max_tokens=(8, 32),
        ),
        # 8 slots, every call 0.8 s: the provider's concurrency limit binds (12 rounds of 8 calls)
        Scenario(
            "concurrency", Limits(rpm=60_000, tpm=10_000_000, max_concurrency=8), Latency(0.8, 0.0),
            96 if not quick else 48, max_tokens=(64, 384),
        ),
    ]  # fmt: skip
    return [(s, p) for s in base for p in (4, 8, 16)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter job lists")
    parser.add_argument("--concurrency", type=int, default=16, help="workers per process (default 16)")
    parser.add_argument("--scenario", action="append", choices=("tokens", "requests", "concurrency"))
    parser.add_argument("--processes", action="append", type=int, choices=(4, 8, 16), help="default: 4 and 8")
    parser.add_argument("--uneven", action="store_true", help="unequal worker counts across the processes")
    parser.add_argument("--strategy", action="append", choices=(*STRATEGIES, "floor"))
    parser.add_argument("--deadline", type=float, default=120.0, help="seconds one run may take at most")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="the shared budget's rates against the provider's (e.g. 1.3)"
    )
    parser.add_argument("--learn", action="store_true", help="the shared budget configures no rates: it learns them")
    parser.add_argument("--probe", action="store_true", help="with --learn: one call at a time until the first reply")
    parser.add_argument(
        "--remaining-only", action="store_true", help="settle with the remaining counts only, not the limits"
    )
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    chosen = [
        (s, p)
        for s, p in scenarios(args.quick)
        if (not args.scenario or s.name in args.scenario) and p in (args.processes or (4, 8))
    ]
    strategies = args.strategy or list(STRATEGIES)
    rows: list[tuple[str, int, FleetResult]] = []
    costs: dict[int, dict[str, float]] = {}
    t0 = time.monotonic()
    with EmbeddedRedis(allow_fake=False) as redis_server:
        each = "unequal worker counts, on average" if args.uneven else "workers per process"
        print(f"redis: {redis_server.kind} at {redis_server.url}; {args.concurrency} {each}")
        print(f"shared budget: {_budget_mode(args)}")
        for scenario, processes in chosen:
            jobs = make_jobs(scenario.jobs, seed=7, prompt_tokens=scenario.prompt_tokens,
                             max_tokens=scenario.max_tokens)  # fmt: skip
            with simulator_process(scenario.limits, scenario.latency, seed=7) as provider:
                for strategy in strategies:
                    spec = fleet_spec(
                        strategy,
                        processes=processes,
                        concurrency=args.concurrency,
                        provider_url=provider,
                        redis_url=redis_server.url,
                        limits=scenario.limits,
                        deadline=args.deadline,
                        budget_scale=args.budget_scale,
                        budget_rates=not args.learn,
                        probe=args.probe,
                        report_limits=not args.remaining_only,
                        uneven=args.uneven,
                    )
                    admin = redis.Redis.from_url(redis_server.url)
                    reset_stats(admin)
                    cpu0 = redis_cpu(admin)
                    result = run_fleet(spec, jobs, scenario.latency)
                    cost = _redis_cost(commandstats(admin), redis_cpu(admin) - cpu0, result.sent)
                    admin.close()
                    rows.append((scenario.name, processes, result))
                    costs[id(result)] = cost
                    extra = (_cost(cost) if strategy == "xflow" else "") + _drain_text(result)
                    print(_line(scenario.name, processes, result) + extra, flush=True)
    print(f"\ntotal {time.monotonic() - t0:.0f}s\n")
    print(_table(rows, costs))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump([{"scenario": s, **r.to_dict(), "redis": costs[id(r)]} for s, _, r in rows], fh, indent=2)
    return 0


def _budget_mode(args: argparse.Namespace) -> str:
    if args.learn:
        rates = "no rates configured, learned from the headers" + (", probing first" if args.probe else "")
    else:
        rates = f"rates configured at {args.budget_scale:g}x the provider's"
    told = "remaining only" if args.remaining_only else "remaining and limits"
    return f"{rates}; settles with the provider's {told}"


#: The job list's commands (top level, never in a script: a budget has no list).
JOB_LIST = frozenset({"rpush", "lpop", "del", "llen", "lrange"})


def _redis_cost(stats: dict[str, dict[str, float]], cpu: float, grants: int) -> dict[str, float]:
    """Top-level script calls, commands run inside scripts and Redis CPU, per grant."""
    top = sum(stats.get(name, {}).get("calls", 0.0) for name in ("evalsha", "eval"))
    # the probe's PING is the client's; PUBSUB NUMSUB is mostly the scripts' (is a waiter's process
    # connected?), with the census's few calls (one per process every CENSUS_INTERVAL) counted in
    outside = CLIENT_ONLY | HARNESS_COMMANDS | JOB_LIST | {"ping"}
    inside = sum(v["calls"] for name, v in stats.items() if name not in outside)
    script_us = sum(stats.get(name, {}).get("usec", 0.0) for name in ("evalsha", "eval"))
    n = max(1, grants)
    return {
        "grants": grants,
        "cmds": top / n,
        "in_script": inside / n,
        "script_us": script_us / n,
        "cpu_us": cpu * 1e6 / n,
    }


def _cost(c: dict[str, float]) -> str:
    return (
        f" | redis per grant: {c['cmds']:.2f} cmds, {c['in_script']:.1f} in-script, "
        f"{c['script_us']:.0f} us in scripts, {c['cpu_us']:.0f} us cpu"
    )


def _drain_text(r: FleetResult) -> str:
    """For a run where concurrency binds: the slots' use before the drain tail, the tail, the hand-over."""
    if r.binding != "concurrency" or r.before_tail is None or r.tail is None:
        return ""
    handover = (
        ""
        if r.handover_median is None
        else (f", hand-over median {r.handover_median * 1e3:.1f} ms (p90 {(r.handover_p90 or 0) * 1e3:.1f} ms)")
    )
    if r.limiter_handover_median is not None:
        handover += (
            f", the limiter's part (settle to next start) median {r.limiter_handover_median * 1e3:.2f} ms "
            f"(p90 {(r.limiter_handover_p90 or 0) * 1e3:.2f} ms, {r.limiter_handover_pairs} pairs)"
        )
    return f" | before the tail {r.before_tail:.1%}, tail {r.tail:.2f}s{handover}"


def _use(r: FleetResult) -> str:
    return "n/a" if r.utilisation is None else f"{r.utilisation:.1%}"


def _line(scenario: str, processes: int, r: FleetResult) -> str:
    return (
        f"{scenario:<12} P={processes} {r.strategy:<6} makespan {r.makespan:6.2f}s ideal {r.ideal:6.2f}s "
        f"util {_use(r):>6} ({r.binding}) 429s {r.rejected:5d}/{r.sent:<5d} ({r.rejected_share:6.2%}) "
        f"done {r.completed}/{r.jobs} violations {r.violations}" + (f" errors {len(r.errors)}" if r.errors else "")
    )


def _table(rows: list[tuple[str, int, FleetResult]], costs: dict[int, dict[str, float]]) -> str:
    head = (
        "| scenario | P | strategy | makespan s | ideal s | utilisation | 429s / sent | 429 share | done "
        "| cmds / grant | in-script / grant | µs in scripts / grant | Redis CPU µs / grant |"
    )
    out = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for scenario, processes, r in rows:
        c = costs[id(r)]
        redis_side = (
            f"{c['cmds']:.2f} | {c['in_script']:.1f} | {c['script_us']:.0f} | {c['cpu_us']:.0f}"
            if r.strategy == "xflow"
            else "- | - | - | -"
        )
        out.append(
            f"| {scenario} | {processes} | {r.strategy} | {r.makespan:.2f} | {r.ideal:.2f} | {_use(r)} "
            f"| {r.rejected} / {r.sent} | {r.rejected_share:.2%} | {r.completed}/{r.jobs} | {redis_side} |"
        )
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
