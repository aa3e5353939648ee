"""Run a fleet against the simulated provider and measure it: shared by ``xflow demo`` and
``benchmarks/fleet.py``.

The figures come from the provider's own ledger (``/stats``), not from the fleet's word.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import redis

from .._backend import sync_client
from .._limiter import Limiter
from ._fleet import (
    FleetSpec,
    Job,
    Limits,
    Strategy,
    WorkerReport,
    fleet_budget,
    handovers,
    jobs_key_of,
    load_jobs,
    slots_key,
    tally_key,
    tenant_jobs,
    tenant_names,
    worker_main,
    workers_of,
)


@dataclass(frozen=True, slots=True)
class Latency:
    """The simulated provider's latency model: seconds per reply plus seconds per output token."""

    base: float = 0.05
    per_token: float = 0.0002


@dataclass(slots=True)
class FleetResult:
    """What one run achieved, judged from the provider's ledger."""

    strategy: str
    processes: int
    concurrency: int
    jobs: int
    limits: dict[str, Any]
    workers: int = 0  # calls the fleet could make at once (uneven processes included)
    completed: int = 0
    sent: int = 0
    rejected: int = 0
    makespan: float = 0.0
    ideal: float = 0.0
    binding: str = ""
    utilisation: float | None = None  # of the binding limit; None where none bound the run
    utilisation_by: dict[str, float] = field(default_factory=dict)
    violations: int = 0
    # where a concurrency limit binds: the drain tail (last admission to last completion, seconds),
    # the slots' use before it, and the hand-over from a freed slot to the next start (seconds)
    tail: float | None = None
    before_tail: float | None = None
    handover_median: float | None = None
    handover_p90: float | None = None
    # the limiter's own part of it: from a settle's start to the start of the call it let in (seconds,
    # from the workers' clocks, settles and waited grants matched in order; see _fleet.handovers)
    limiter_handover_median: float | None = None
    limiter_handover_p90: float | None = None
    limiter_handover_pairs: int = 0
    shares: list[int] = field(default_factory=list)
    # per tenant (xflow demo --tenants): weight, jobs, done, tokens, goal (its weight's share) and
    # share (of the tokens, while every tenant had jobs left and the budget held calls back)
    tenants: dict[str, dict[str, Any]] = field(default_factory=dict)
    tenant_window: float = 0.0  # seconds of that window
    series: dict[str, list[int]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    @property
    def rejected_share(self) -> float:
        return self.rejected / self.sent if self.sent else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["rejected_share"] = self.rejected_share
        return data


NO_LIMIT = "none"


def judge(
    stats: dict[str, Any], limits: Limits, latency: Latency, workers: int | None = None
) -> tuple[float, float, str, dict[str, float]]:
    """Makespan, the ideal the provider's own limits allow, the binding limit and utilisations.

    The ideal counts the provider's initially full buckets (a minute of each limit): the work beyond
    one minute's worth, at the limit's rate, plus one reply's latency; for concurrency, the total
    time in flight spread over every slot, plus one reply's base latency; never less than the
    fleet's own ``workers`` (calls at once) allow.
    Utilisation of a rate is what was admitted over what the limit allowed in the makespan (the full
    bucket plus the refill); of concurrency, the ideal over the makespan, since calls of uneven
    lengths cannot keep every slot busy to the very end. A run that fits in the initial buckets and
    never fills the slots has no binding limit (``NO_LIMIT``): no limit's utilisation applies.
    """
    first = stats.get("first_admission")
    last = stats.get("last_completion")
    makespan = float(last - first) if first is not None and last is not None else 0.0
    completed = int(stats["requests"]["completed"])
    settled = float(stats["tokens"]["settled"])
    completion = float(stats["tokens"]["completion"])
    busy = completed * latency.base + completion * latency.per_token
    need = {
        "tokens": max(0.0, (settled - limits.tpm) / (limits.tpm / 60.0)),
        "requests": max(0.0, (completed - limits.rpm) / (limits.rpm / 60.0)),
    }
    use = {
        "tokens": settled / (limits.tpm + limits.tpm / 60.0 * makespan) if makespan else 0.0,
        "requests": completed / (limits.rpm + limits.rpm / 60.0 * makespan) if makespan else 0.0,
    }
    if limits.max_concurrency and (workers is None or limits.max_concurrency < workers):
        need["concurrency"] = busy / limits.max_concurrency - latency.base  # the base is added below
        use["concurrency"] = busy / (limits.max_concurrency * makespan) if makespan else 0.0
    binding = max(need, key=lambda k: need[k])
    own = busy / workers - latency.base if workers else 0.0  # the fleet's own calls at once
    if need[binding] <= 0.0 or need[binding] < own:
        binding = NO_LIMIT
    ideal = max(need.get(binding, 0.0), own, 0.0) + latency.base
    return makespan, ideal, binding, use


@contextlib.contextmanager
def simulator_process(
    limits: Limits, latency: Latency, *, seed: int = 0, headers: str = "openai", startup_timeout: float = 30.0
) -> Iterator[str]:
    """The simulated provider in a process of its own; yields its URL and stops it after."""
    cmd = [
        sys.executable, "-m", "xflow_dist.tools.simulator", "--port", "0",
        "--rpm", repr(limits.rpm), "--tpm", repr(limits.tpm),
        "--latency-base", repr(latency.base), "--latency-per-token", repr(latency.per_token),
        "--seed", str(seed), "--headers", headers,
    ]  # fmt: skip
    if limits.max_concurrency:
        cmd += ["--max-concurrency", str(limits.max_concurrency)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    try:
        try:
            line = lines.get(timeout=startup_timeout)
        except queue.Empty:
            line = ""
        if "listening on " not in line:
            proc.kill()
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"the simulated provider did not start: {err.strip() or line.strip()}")
        yield line.rsplit("listening on ", 1)[1].strip()
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def fetch_stats(provider_url: str) -> dict[str, Any]:
    import httpx

    reply = httpx.get(f"{provider_url}/stats", timeout=10)
    reply.raise_for_status()
    data: dict[str, Any] = reply.json()
    return data


def reset_provider(provider_url: str) -> None:
    import httpx

    httpx.post(f"{provider_url}/reset", timeout=10).raise_for_status()


@dataclass(frozen=True, slots=True)
class Tally:
    """The tenants' tokens and jobs done so far (from the workers' counts), at one moment."""

    at: float  # time.monotonic()
    tokens: dict[str, int]
    done: dict[str, int]
    queued: int  # calls the budget held back then

    def spent_since(self, earlier: Tally) -> dict[str, int]:
        """Each tenant's tokens used between ``earlier`` and this tally."""
        return {n: used - earlier.tokens[n] for n, used in self.tokens.items()}


def read_tally(client: Any, spec: FleetSpec, queued: int) -> Tally:
    raw = {k.decode() if isinstance(k, bytes) else k: int(v) for k, v in client.hgetall(tally_key(spec)).items()}
    names = tenant_names(spec)
    tokens, done = {n: raw.get(n, 0) for n in names}, {n: raw.get(f"{n}:done", 0) for n in names}
    return Tally(time.monotonic(), tokens, done, queued)


def tenant_shares(totals: dict[str, int], history: list[Tally]) -> tuple[dict[str, float], float]:
    """Each tenant's share of the tokens while every tenant still had jobs left and the budget held
    calls back (the window in which weighted shares apply), and that window's length."""
    contended = [t for t in history if t.queued > 0 and all(t.done[n] < totals[n] for n in totals)]
    if len(contended) < 2:
        return {}, 0.0
    first, last = contended[0], contended[-1]
    spent = last.spent_since(first)
    total = sum(spent.values())
    return ({n: v / total for n, v in spent.items()} if total else {}), last.at - first.at


def _stop(procs: list[Any], grace: float = 5.0) -> None:
    """Stop the workers still running: SIGTERM, then SIGKILL after ``grace``; each one is reaped, so
    that nothing is left for multiprocessing's exit hook, which joins its children with no timeout."""
    for p in procs:
        if p.is_alive():
            p.terminate()
    by = time.monotonic() + grace
    for p in procs:
        p.join(timeout=max(0.0, by - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=grace)


def run_fleet(
    spec: FleetSpec,
    jobs: list[Job],
    latency: Latency,
    *,
    on_tick: Callable[[dict[str, Any], float | None, Tally | None], None] | None = None,
    tick: float = 0.5,
) -> FleetResult:
    """Run ``spec.processes`` worker processes over ``jobs`` and judge the run from the provider.

    ``on_tick`` is called every ``tick`` seconds with the provider's stats, for the shared budget the
    seconds left of its fleet-wide pause (None for the other strategies), and with tenants their tally.
    """
    run_id = uuid.uuid4().hex[:8]
    spec = replace(spec, jobs_key=f"xflow-fleet:{run_id}:jobs", budget_name=f"{spec.budget_name}-{run_id}")
    client, _ = sync_client(spec.redis_url)  # any URL a limiter takes (redis+sentinel:// too)
    reset_provider(spec.provider_url)
    names = tenant_names(spec)
    by_tenant = tenant_jobs(spec, jobs)
    totals = {name: len(own) for name, own in by_tenant.items()}
    for name, own in by_tenant.items():  # each tenant its own list
        load_jobs(client, jobs_key_of(spec, name), own)
    if not names:
        load_jobs(client, spec.jobs_key, jobs)
    if spec.strategy == "floor":
        client.delete(slots_key(spec))
        client.rpush(slots_key(spec), *["1"] * max(1, spec.limits.max_concurrency or len(jobs)))
    history: list[Tally] = []
    ctx = multiprocessing.get_context("spawn")
    results: Any = ctx.Queue()
    ready: Any = ctx.Queue()
    start = ctx.Event()
    procs = [
        ctx.Process(target=worker_main, args=(spec, i, results, ready, start), daemon=True)
        for i in range(spec.processes)
    ]
    reports: list[WorkerReport] = []
    watch = _watch(spec) if (on_tick is not None or names) and spec.strategy == "xflow" else None
    try:
        for p in procs:
            p.start()
        lined_up = 0
        ready_by = time.monotonic() + 120
        while lined_up < len(procs) and time.monotonic() < ready_by:
            with contextlib.suppress(queue.Empty):
                ready.get(timeout=tick)
                lined_up += 1
            if not any(p.is_alive() for p in procs):
                break
        reset_provider(spec.provider_url)  # a fresh provider, full buckets, for the run itself
        start.set()
        deadline = time.monotonic() + spec.deadline + 30
        while len(reports) < len(procs) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                reports.append(WorkerReport(**json.loads(results.get(timeout=tick))))
            status = watch.status() if watch is not None else None
            tally = read_tally(client, spec, status.queued if status else 0) if names else None
            if tally is not None:
                history.append(tally)
            if on_tick is not None:
                on_tick(fetch_stats(spec.provider_url), status.cooldown_remaining if status else None, tally)
        for p in procs:
            p.join(timeout=10)
    finally:
        _stop(procs)
        final = read_tally(client, spec, 0) if names else None
        with contextlib.suppress(redis.RedisError):
            client.delete(spec.jobs_key, tally_key(spec), slots_key(spec), *(jobs_key_of(spec, n) for n in names))
        client.close()
        if watch is not None:
            watch.close()
    stats = fetch_stats(spec.provider_url)
    workers = sum(workers_of(spec, i) for i in range(spec.processes))
    makespan, ideal, binding, use = judge(stats, spec.limits, latency, workers)
    reports.sort(key=lambda r: r.index)
    result = FleetResult(
        strategy=spec.strategy,
        processes=spec.processes,
        concurrency=spec.concurrency,
        jobs=len(jobs),
        limits=asdict(spec.limits),
        workers=workers,
        completed=int(stats["requests"]["completed"]),
        sent=sum(r.sent for r in reports),
        rejected=int(stats["requests"]["rejected"]),
        makespan=makespan,
        ideal=ideal,
        binding=binding,
        utilisation=use.get(binding),
        utilisation_by=use,
        violations=int(stats["violations"]),
        shares=[r.done for r in reports],
        series=stats.get("series", {}),
        errors=[e for r in reports for e in r.errors],
    )
    # the same median and p90 as the provider's ledger takes of its own hand-overs (simulator's
    # _summary, not imported: that package needs aiohttp, which only the demo extra installs)
    releases = [t for r in reports for t in r.releases]
    paired = sorted(handovers(releases, [t for r in reports for t in r.waited_grants]))
    if paired:
        result.limiter_handover_median = paired[len(paired) // 2]
        result.limiter_handover_p90 = paired[min(len(paired) - 1, int(len(paired) * 0.9))]
        result.limiter_handover_pairs = len(paired)
    for key, value in {**_drain(stats, spec.limits), **_tenants(spec, totals, history, final)}.items():
        setattr(result, key, value)
    return result


def _tenants(spec: FleetSpec, totals: dict[str, int], history: list[Tally], final: Tally | None) -> dict[str, Any]:
    if final is None:
        return {}
    shares, window = tenant_shares(totals, history)
    weights = dict(zip(tenant_names(spec), spec.tenants, strict=True))
    out = {
        n: {"weight": weights[n], "jobs": totals[n], "done": final.done[n], "tokens": final.tokens[n],
            "goal": weights[n] / sum(weights.values()), "share": shares.get(n)}
        for n in totals
    }  # fmt: skip
    return {"tenants": out, "tenant_window": window}


def _drain(stats: dict[str, Any], limits: Limits) -> dict[str, float | None]:
    """The concurrency's drain tail, its use before it and the hand-overs, from the provider's books."""
    first, last_in, last_out = stats.get("first_admission"), stats.get("last_admission"), stats.get("last_completion")
    if not limits.max_concurrency or first is None or last_in is None or last_out is None:
        return {}
    span = last_in - first
    busy = stats.get("busy_before_last_admission")
    handovers = stats.get("handovers") or {}
    return {
        "tail": last_out - last_in,
        "before_tail": busy / (limits.max_concurrency * span) if busy is not None and span > 0 else None,
        "handover_median": handovers.get("median"),
        "handover_p90": handovers.get("p90"),
    }


def _watch(spec: FleetSpec) -> Limiter:
    """A limiter on the fleet's budget, only to read its status (it never acquires)."""
    return Limiter(fleet_budget(spec), spec.redis_url)  # the workers' limits: other ones would be refused


def fleet_spec(
    strategy: Strategy,
    *,
    processes: int,
    concurrency: int,
    provider_url: str,
    redis_url: str,
    limits: Limits,
    deadline: float = 600.0,
    seed: int = 0,
    budget_scale: float = 1.0,
    budget_rates: bool = True,
    probe: bool = False,
    report_limits: bool = True,
    uneven: bool = False,
    tenants: tuple[float, ...] = (),
) -> FleetSpec:
    return FleetSpec(
        strategy=strategy,
        processes=processes,
        concurrency=concurrency,
        provider_url=provider_url,
        redis_url=redis_url,
        jobs_key="",
        limits=limits,
        deadline=deadline,
        seed=seed,
        budget_scale=budget_scale,
        budget_rates=budget_rates,
        probe=probe,
        report_limits=report_limits,
        uneven=uneven,
        tenants=tenants,
    )
