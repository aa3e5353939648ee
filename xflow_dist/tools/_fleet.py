"""A fleet of worker processes working through one job list against an LLM endpoint.

Used by ``xflow demo`` and ``benchmarks/fleet.py``. Each process runs ``concurrency`` coroutines
that pop jobs from a Redis list and call the provider under one of three strategies:

- ``xflow``: one shared budget (``AsyncLimiter``), settling actual usage and the provider's rate-limit
  headers (remaining and limits: the fleet learns the provider's limits), fleet-wide cooldown on 429;
- ``retry``: no limiter, retry each 429 after an exponential backoff with full jitter (0.5 s
  doubling per attempt, capped at 8 s), as tenacity-style retry decorators do;
- ``split``: a static split, each process limiting itself in-process to 1/P of every limit
  (aiolimiter for rates, a semaphore for concurrency), retrying 429s like ``retry``;
- ``floor`` (benchmarks only, not a limiter): the concurrency slots as a Redis list of tokens, taken
  with ``BLPOP`` (Redis serves blocked clients first come, first served) and given back with
  ``RPUSH``: no rates, no leases, no crash safety. The least a slot hand-over through Redis can
  cost (one command to release, one reply to the waiter's blocked connection), as a baseline for
  the shared budget's.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .._backend import SyncClient
from .._budget import Budget
from .._headers import parse_limit_headers, parse_retry_after
from .._tokens import estimate_messages_tokens

Strategy = Literal["xflow", "retry", "split", "floor"]
#: What ``xflow demo`` and the fleet benchmark compare by default (``floor`` only on request).
STRATEGIES: tuple[Strategy, ...] = ("xflow", "retry", "split")

_WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet")


@dataclass(frozen=True, slots=True)
class Job:
    """One chat completion to make: a prompt of a known size and an output bound."""

    id: int
    prompt: str
    max_tokens: int

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    @property
    def estimate(self) -> int:
        """What the provider charges at admission: prompt tokens plus the output bound."""
        return estimate_messages_tokens(self.messages) + self.max_tokens


def make_jobs(
    count: int,
    *,
    seed: int = 0,
    prompt_tokens: tuple[int, int] = (50, 400),
    max_tokens: tuple[int, int] = (64, 384),
) -> list[Job]:
    """A deterministic job list: the same seed gives the same prompts and bounds."""
    rng = random.Random(seed)
    jobs = []
    for i in range(count):
        words = max(1, rng.randint(*prompt_tokens) * 4 // 6)  # ~6 bytes a word, 4 bytes a token
        prompt = " ".join(rng.choice(_WORDS) for _ in range(words))
        jobs.append(Job(i, prompt, rng.randint(*max_tokens)))
    return jobs


@dataclass(frozen=True, slots=True)
class Limits:
    """The provider's limits (and so the budget's): per minute, and concurrent requests."""

    rpm: float
    tpm: float
    max_concurrency: int | None = None


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """Everything a worker process needs; plain data so it crosses ``spawn``."""

    strategy: Strategy
    processes: int
    concurrency: int
    provider_url: str
    redis_url: str
    jobs_key: str
    limits: Limits
    budget_name: str = "demo"
    deadline: float = 600.0  # seconds a worker may run at most
    seed: int = 0
    budget_scale: float = 1.0  # the shared budget's rates against the provider's (1.3: set 30 % too high)
    budget_rates: bool = True  # False: the budget configures no rates and learns them from the headers
    probe: bool = False  # with budget_rates=False: one call at a time until the first reply teaches them
    report_limits: bool = True  # False: settle with the remaining counts only (as Azure sends no limits)
    uneven: bool = False  # True: process i runs workers_of(spec, i) workers, from a few to twice the mean
    # weights of tenants "tenant-1".. (none: one job list, no tenants): the budget is shared by them,
    # each has its own job list and its own workers (worker w of the fleet serves tenant w mod k)
    tenants: tuple[float, ...] = ()


def tenant_names(spec: FleetSpec) -> list[str]:
    """The fleet's tenants, in the order of their weights."""
    return [f"tenant-{i + 1}" for i in range(len(spec.tenants))]


def tenant_jobs(spec: FleetSpec, jobs: list[Job]) -> dict[str, list[Job]]:
    """Each tenant's job list: job i is tenant i mod k's."""
    names = tenant_names(spec)
    return {name: jobs[i :: len(names)] for i, name in enumerate(names)}


def jobs_key_of(spec: FleetSpec, tenant: str | None) -> str:
    """The job list a worker pops from: its tenant's, or the fleet's one list."""
    return spec.jobs_key if tenant is None else f"{spec.jobs_key}:{tenant}"


def tally_key(spec: FleetSpec) -> str:
    """Where the workers count each tenant's tokens and jobs done (``<tenant>`` and ``<tenant>:done``)."""
    return f"{spec.jobs_key}:tally"


def slots_key(spec: FleetSpec) -> str:
    """The ``floor`` strategy's slots: a list of ``max_concurrency`` tokens."""
    return f"{spec.jobs_key}:slots"


def workers_of(spec: FleetSpec, index: int) -> int:
    """Process ``index``'s workers: ``concurrency`` each, or (``uneven``) rising linearly from about
    2C/(P+1) to 2CP/(P+1), the same C on average, so that processes load the budget unevenly."""
    if not spec.uneven:
        return spec.concurrency
    return max(1, round(2 * spec.concurrency * (index + 1) / (spec.processes + 1)))


def fleet_budget(spec: FleetSpec) -> Budget:
    """The budget every xflow worker of the fleet shares (one set of limits under one name)."""
    limits = spec.limits
    shares = dict(zip(tenant_names(spec), spec.tenants, strict=True)) or None
    if spec.budget_rates:
        return Budget(
            spec.budget_name,
            rpm=limits.rpm * spec.budget_scale,
            tpm=limits.tpm * spec.budget_scale,
            max_concurrency=limits.max_concurrency,
            burst=60,
            tenants=shares,
        )
    # no rates: the provider's headers teach them (concurrency is in no header)
    return Budget(spec.budget_name, max_concurrency=limits.max_concurrency, burst=60, probe=spec.probe, tenants=shares)


@dataclass(slots=True)
class WorkerReport:
    """What one process did."""

    index: int
    done: int = 0
    sent: int = 0
    rejected: int = 0
    cooldowns: int = 0
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    # where slots bind (xflow, floor): when this process's settles (floor: RPUSH) began, and when its acquires that
    # waited returned (CLOCK_MONOTONIC, one clock for the machine), to pair into hand-overs
    releases: list[float] = field(default_factory=list)
    waited_grants: list[float] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def load_jobs(client: SyncClient, key: str, jobs: list[Job]) -> None:
    """Put the job list in Redis, where every process pops from."""
    client.delete(key)
    for start in range(0, len(jobs), 500):
        chunk = jobs[start : start + 500]
        client.rpush(key, *(json.dumps([j.id, j.prompt, j.max_tokens]) for j in chunk))


#: A grant whose acquire took longer than this waited for a slot; a settle more than this before the
#: next such grant let none in (the queue was empty, or a call that never waited took its slot).
HANDOVER_WINDOW = 0.05


def handovers(releases: list[float], grants: list[float], window: float = HANDOVER_WINDOW) -> list[float]:
    """Settle-to-start times of the limiter, from every process's settle starts and waited grants.

    A settle frees a slot and the queue's head, in any process, is granted: one settle, one waited
    grant, in order. So they are matched in time order, each grant to the oldest settle not matched
    yet within ``window`` before it; older settles let none in. Where two hand-overs overlap and the
    second waiter wakes first, the two times are swapped; their sum is right.
    """
    releases, grants = sorted(releases), sorted(grants)
    out = []
    i = 0
    for g in grants:
        while i < len(releases) and g - releases[i] > window:
            i += 1
        if i < len(releases) and releases[i] <= g:
            out.append(g - releases[i])
            i += 1
    return out


def backoff(attempt: int, rng: random.Random) -> float:
    """The baselines' wait after a 429: exponential with full jitter, not reading the provider."""
    return float(min(8.0, 0.5 * 2**attempt) * rng.random())


def worker_main(spec: FleetSpec, index: int, results: Any, ready: Any = None, start: Any = None) -> None:
    """Process entry point: get ready, wait for the start, work until the job list is empty, report.

    ``ready`` (a queue) and ``start`` (an event) line the fleet up, so that the run measures the
    strategies rather than how long each process takes to import and connect.
    """
    report = WorkerReport(index)
    try:
        asyncio.run(_work(spec, report, ready, start))
    except KeyboardInterrupt:
        report.errors.append("interrupted")
    except Exception as exc:  # reported to the parent rather than lost in a child's stderr
        report.errors.append(f"{type(exc).__name__}: {exc}")
    results.put(report.to_json())


async def _work(spec: FleetSpec, report: WorkerReport, ready: Any = None, start: Any = None) -> None:
    import httpx

    from .._async_limiter import AsyncLimiter
    from .._backend import async_client

    jobs, _ = async_client(spec.redis_url)  # any URL a limiter takes (redis+sentinel:// too)
    limits = spec.limits
    stop_at = time.monotonic() + spec.deadline
    rng = random.Random(spec.seed * 1000 + report.index)
    limiter: AsyncLimiter | None = None
    rate_req: Any = None
    rate_tok: Any = None
    slots: asyncio.Semaphore | None = None
    floor: Any = None
    if spec.strategy == "xflow":
        limiter = AsyncLimiter(fleet_budget(spec), spec.redis_url)
    elif spec.strategy == "split":
        from aiolimiter import AsyncLimiter as LocalLimiter

        rate_req = LocalLimiter(limits.rpm / spec.processes, 60)
        rate_tok = LocalLimiter(limits.tpm / spec.processes, 60)
        if limits.max_concurrency:
            slots = asyncio.Semaphore(max(1, limits.max_concurrency // spec.processes))
    elif spec.strategy == "floor":
        import redis.asyncio

        floor = redis.asyncio.Redis.from_url(spec.redis_url)  # no socket timeout: BLPOP blocks

    workers = workers_of(spec, report.index)
    limit = httpx.Limits(max_connections=workers + 4, max_keepalive_connections=workers + 4)
    async with httpx.AsyncClient(base_url=spec.provider_url, timeout=120, limits=limit) as http:
        await http.get("/stats")  # connected, and the HTTP stack warm
        await jobs.ping()
        if limiter is not None:
            await limiter.status()  # scripts loaded, connection open
        if floor is not None:
            await floor.ping()
        if ready is not None:
            ready.put(report.index)
        if start is not None:
            await asyncio.to_thread(start.wait, spec.deadline)

        async def call(job: Job) -> httpx.Response:
            report.sent += 1
            body = {"model": "sim", "messages": job.messages, "max_tokens": job.max_tokens}
            return await http.post("/v1/chat/completions", json=body)

        timed = (limiter is not None or floor is not None) and bool(limits.max_concurrency)

        async def run(job: Job, tenant: str | None) -> None:
            attempt = 0
            while time.monotonic() < stop_at:
                if limiter is not None:
                    asked = time.monotonic()
                    async with limiter.acquire(tokens=job.estimate, tenant=tenant) as lease:
                        granted = time.monotonic()
                        if timed and granted - asked > HANDOVER_WINDOW:
                            report.waited_grants.append(granted)
                        reply = await call(job)
                        seen = parse_limit_headers(reply.headers)
                        limit_requests = (seen.request_limit or None) if spec.report_limits else None
                        limit_tokens = (seen.token_limit or None) if spec.report_limits else None
                        if reply.status_code == 429:
                            # A rejected call uses no tokens; what remains is not this call's, its limits are.
                            await lease.report(0, limit_requests=limit_requests, limit_tokens=limit_tokens)
                            report.rejected += 1
                            report.cooldowns += 1
                            await limiter.cooldown(retry_after=parse_retry_after(reply.headers))
                            continue
                        reply.raise_for_status()
                        used = int(reply.json()["usage"]["total_tokens"])
                        if timed:
                            report.releases.append(time.monotonic())
                        await lease.report(
                            actual_tokens=used,
                            remaining_requests=seen.requests_remaining,
                            remaining_tokens=seen.tokens_remaining,
                            limit_requests=limit_requests,
                            limit_tokens=limit_tokens,
                        )
                elif floor is not None:
                    asked = time.monotonic()
                    while await floor.blpop([slots_key(spec)], timeout=1) is None:
                        if time.monotonic() >= stop_at:
                            return
                    granted = time.monotonic()
                    if timed and granted - asked > HANDOVER_WINDOW:
                        report.waited_grants.append(granted)
                    try:
                        reply = await call(job)
                        if reply.status_code != 429:
                            reply.raise_for_status()
                            used = int(reply.json()["usage"]["total_tokens"])
                    finally:
                        if timed:
                            report.releases.append(time.monotonic())
                        await floor.rpush(slots_key(spec), "1")
                    if reply.status_code == 429:
                        report.rejected += 1
                        await asyncio.sleep(backoff(attempt, rng))
                        attempt += 1
                        continue
                else:
                    if rate_req is not None:
                        await rate_req.acquire(1)
                        await rate_tok.acquire(min(job.estimate, limits.tpm / spec.processes))
                    if slots is not None:
                        async with slots:
                            reply = await call(job)
                    else:
                        reply = await call(job)
                    if reply.status_code == 429:
                        report.rejected += 1
                        await asyncio.sleep(backoff(attempt, rng))
                        attempt += 1
                        continue
                    reply.raise_for_status()
                    used = int(reply.json()["usage"]["total_tokens"])
                report.done += 1
                report.tokens += used
                if tenant is not None:  # counted for the tenants' shares (xflow demo --tenants)
                    await jobs.hincrby(tally_key(spec), tenant, used)
                    await jobs.hincrby(tally_key(spec), f"{tenant}:done", 1)
                return

        async def loop(tenant: str | None) -> None:
            while time.monotonic() < stop_at:
                raw = await jobs.lpop(jobs_key_of(spec, tenant))
                if raw is None:
                    return
                job_id, prompt, max_tokens = json.loads(raw)  # type: ignore[arg-type]
                await run(Job(job_id, prompt, max_tokens), tenant)

        names = tenant_names(spec)
        first = sum(workers_of(spec, i) for i in range(report.index))  # this process's first worker in the fleet
        try:
            await asyncio.gather(*(loop(names[(first + w) % len(names)] if names else None) for w in range(workers)))
        finally:
            if limiter is not None:
                await limiter.aclose()
            if floor is not None:
                await floor.aclose()
            await jobs.aclose()
