"""Small helpers shared by tests (importable because pytest puts ``tests/`` on sys.path)."""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
import uuid
from collections import Counter
from typing import Any

import redis

from xflow_dist import AsyncLimiter, Budget, CooldownPolicy, Limiter
from xflow_dist._core import (
    acquire_args,
    budget_args,
    channel,
    cooldown_args,
    decode_acquire,
    decode_cooldown,
    decode_extend,
    decode_settle,
    decode_status,
    keys,
    settle_args,
)
from xflow_dist._scripts import register


def full_tokens(budget: Budget) -> float:
    """What a full token bucket holds: the rate times the credit (the burst less the dispatch margin)."""
    return (budget.token_rate or 0.0) * budget.credit


def until(predicate: Any, timeout: float = 10.0) -> None:
    """Wait for a condition on counts, bounded: raises AssertionError if it is not met in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def acquire_in_thread(limiter: Any, timeout: float) -> tuple[threading.Thread, dict[str, object]]:
    """Acquire on a thread of its own: its result (``lease`` and ``at``, or ``error``) lands in the dict."""
    out: dict[str, object] = {}

    def run() -> None:
        try:
            out["lease"] = limiter.acquire(timeout=timeout)
            out["at"] = time.monotonic()
        except Exception as exc:
            out["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def budget_keys(client: redis.Redis, budget_name: str) -> list[bytes]:
    """Every key of one budget that exists now."""
    return sorted(client.scan_iter(match=f"{{xflow:{budget_name}}}*"))


class Ops:
    """Direct calls of the Lua scripts for one budget, as the fronts make them."""

    def __init__(self, client: redis.Redis, budget: Budget) -> None:
        self.client = client
        self.budget = budget
        self.scripts = register(client)
        self.process = ""  # set (by watch()): the process new ids belong to, "<process>.<unique>"

    def run(self, op: str, argv: list[str]) -> Any:
        return self.scripts[op](keys=keys(self.budget), args=budget_args(self.budget) + argv)

    def acquire(
        self,
        tokens: float = 0,
        requests: float = 1,
        *,
        max_wait: float | None = None,
        queue: bool = True,
        lease_id: str | None = None,
        ticket_ttl: float = 30.0,
        overdraft: bool = False,
        lead: int = 0,
        tenant: str = "",
        weight: float = 0.0,
        reserve: bool = False,
    ) -> tuple[str, Any]:
        lid = lease_id or (f"{self.process}.{uuid.uuid4().hex}" if self.process else uuid.uuid4().hex)
        levels = self.budget.levels(tenant) if tenant else ()  # the caps its path passes, if any
        argv = acquire_args(
            lid, requests, tokens, max_wait, queue, ticket_ttl, self.budget.probe, overdraft, lead, tenant, weight,
            levels, reserve,
        )  # fmt: skip
        return lid, decode_acquire(self.run("acquire", argv))

    def settle(self, lid: str, actual: float | None = None, **facts: float) -> Any:
        """``facts``: remaining_requests, remaining_tokens, limit_requests, limit_tokens."""
        argv = settle_args(
            lid,
            actual,
            facts.get("remaining_requests"),
            facts.get("remaining_tokens"),
            facts.get("limit_requests"),
            facts.get("limit_tokens"),
        )
        return decode_settle(self.run("settle", argv))

    def cancel(self, lid: str) -> str:
        return str(self.run("cancel", [lid])[0].decode())

    def extend(self, lid: str) -> float | None:
        return decode_extend(self.run("extend", [lid]))

    def cooldown(self, retry_after: float | None, draw: float = 0.0, policy: CooldownPolicy | None = None) -> Any:
        return decode_cooldown(self.run("cooldown", cooldown_args(policy or CooldownPolicy(), retry_after, draw)))

    def status(self) -> Any:
        return decode_status(self.budget, self.run("status", []))

    def redis_now(self) -> float:
        sec, usec = self.client.time()
        return float(sec + usec / 1e6)

    def wait_redis_until(self, t: float) -> None:
        """Let Redis time pass ``t``, checking the server's own clock (bounded)."""
        for _ in range(2_000):
            if self.redis_now() > t:
                return
            time.sleep(0.005)
        raise AssertionError("Redis time did not advance")


def ops(rclient: redis.Redis, name: str, **limits: Any) -> Ops:
    return Ops(rclient, Budget(name, **limits))


def watch(o: Ops) -> Any:
    """A subscriber that hears what a process of ``o``'s budget hears: the budget's channel (pauses,
    a lost state) and a process's own channel, where the notices about its tickets go. ``o``'s new
    ids are made that process's, and it is connected while the subscriber holds its channel (grants
    to its tickets are firm). The subscriptions are confirmed before it is returned."""
    o.process = uuid.uuid4().hex[:12]
    pubsub = o.client.pubsub()
    pubsub.subscribe(channel(o.budget), f"{channel(o.budget)}:{o.process}")
    for _ in range(2):
        assert pubsub.get_message(timeout=2)["type"] == "subscribe"  # type: ignore[index]
    return pubsub


def exercise(limiter: Limiter) -> None:
    """Every operation of a ``Limiter`` once, asserting each worked: a grant, a waiter queued and
    woken by the release's notice, report, heartbeat, learn, cooldown and its clearing, status,
    try_acquire, cancel and reconfigure. The budget must be ``max_concurrency=1`` and otherwise free."""
    assert limiter.budget.max_concurrency == 1
    first = limiter.acquire(tokens=10)
    woken: dict[str, Any] = {}

    def wait() -> None:
        woken["lease"] = limiter.acquire(tokens=10, timeout=20)
        woken["at"] = time.monotonic()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    deadline = time.monotonic() + 10
    while limiter.status().queued != 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        time.sleep(0.01)
    released = time.monotonic()
    first.report(actual_tokens=5)
    waiter.join(timeout=10)
    # the waiter renews its ticket only every ticket_ttl / 2 (15 s): a quick wake-up is the notice's
    assert "lease" in woken and woken["at"] - released < 5, woken
    second = woken["lease"]
    assert limiter._extend(second)
    assert not limiter.try_acquire(tokens=10).granted
    second.release()
    decision = limiter.try_acquire(tokens=10)
    assert decision.granted and decision.lease is not None
    decision.lease.cancel()
    assert limiter.status().in_flight == 0
    limiter.learn(limit_requests=6_000, limit_tokens=600_000)
    assert limiter.cooldown(retry_after=30).until > 0
    assert limiter.status().cooldown_remaining > 0
    assert limiter.clear_cooldown().remaining > 0
    assert limiter.reconfigure(limiter.budget) is not None


async def exercise_async(limiter: AsyncLimiter) -> None:
    """``exercise`` for an ``AsyncLimiter``."""
    assert limiter.budget.max_concurrency == 1
    first = await limiter.acquire(tokens=10)
    waiter = asyncio.create_task(_acquire_at(limiter))
    deadline = time.monotonic() + 10
    while (await limiter.status()).queued != 1:
        assert time.monotonic() < deadline, "the waiter never queued"
        await asyncio.sleep(0.01)
    released = time.monotonic()
    await first.report(actual_tokens=5)
    async with asyncio.timeout(10):
        second, at = await waiter
    assert at - released < 5  # a renewal comes only after ticket_ttl / 2 (15 s): this was the notice
    assert decode_extend(await limiter._run("extend", [second.id])) is not None
    decision = await limiter.try_acquire(tokens=10)
    assert not decision.granted
    await second.release()
    decision = await limiter.try_acquire(tokens=10)
    assert decision.granted and decision.lease is not None
    await decision.lease.cancel()
    assert (await limiter.status()).in_flight == 0
    await limiter.learn(limit_requests=6_000, limit_tokens=600_000)
    assert (await limiter.cooldown(retry_after=30)).until > 0
    assert (await limiter.status()).cooldown_remaining > 0
    assert (await limiter.clear_cooldown()).remaining > 0
    assert await limiter.reconfigure(limiter.budget) is not None


async def _acquire_at(limiter: AsyncLimiter) -> tuple[Any, float]:
    lease = await limiter.acquire(tokens=10, timeout=20)
    return lease, time.monotonic()


async def until_queued(limiter: Any, n: int, timeout: float = 10.0) -> None:
    """Wait, bounded, until ``n`` waiters are queued on an async limiter's budget."""
    deadline = time.monotonic() + timeout
    while (await limiter.status()).queued != n:
        if time.monotonic() > deadline:
            raise AssertionError(f"the budget never had {n} waiters queued")
        await asyncio.sleep(0.005)


def mock_provider(seen: list[tuple[str, str | None]], header: str) -> Any:
    """An httpx transport answering every call with a reply of 1 token; ``seen`` gets each call's
    ``user`` (or its path) and the value of ``header`` it arrived with."""
    import json

    import httpx

    def reply(request: httpx.Request) -> httpx.Response:
        user = json.loads(request.content or b"{}").get("user", request.url.path)
        seen.append((user, request.headers.get(header)))
        return httpx.Response(200, json={"choices": [], "usage": {"total_tokens": 1}})

    return httpx.MockTransport(reply)


def counting_scripts(limiter: Any) -> Counter[str]:
    """Count the scripts ``limiter`` runs, by operation (sync or async: the wrapper passes on what
    the limiter's own ``_run`` returns, a coroutine included)."""
    counts: Counter[str] = Counter()
    run = limiter._run

    def counted(op: str, argv: list[str]) -> Any:
        counts[op] += 1
        return run(op, argv)

    limiter._run = counted
    return counts


def results_of_processes(target: Any, args: tuple[Any, ...], count: int, timeout: float) -> list[Any]:
    """Run ``count`` spawned processes of ``target(*args, out)`` and collect what each puts on
    ``out``, waiting up to ``timeout`` seconds for each; every process is joined (or killed) after."""
    spawn = multiprocessing.get_context("spawn")
    out: Any = spawn.Queue()
    procs = [spawn.Process(target=target, args=(*args, out)) for _ in range(count)]
    for p in procs:
        p.start()
    try:
        return [out.get(timeout=timeout) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


class Running:
    """Calls running at once across threads, and the most seen: a test's own count of concurrency."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self._lock = threading.Lock()

    def call(self, lease: Any, seconds: float) -> None:
        """A call that holds ``lease`` for ``seconds``, then releases it."""
        with self._lock:
            self.now += 1
            self.most = max(self.most, self.now)
        time.sleep(seconds)
        with self._lock:
            self.now -= 1
        lease.release()
