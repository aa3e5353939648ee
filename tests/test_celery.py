"""``xflow_dist.celery``: the task decorator, unit by unit (eager and an in-process worker), then a
real fleet (prefork ``celery worker`` nodes of ``workers.app``) against the simulated provider.

The broker and result backend are the suite's own redis-server (database 1; budgets live in 0).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from _helpers import until

from xflow_dist import AcquireTimeout, Budget, ConfigurationError, CooldownPolicy, Lease, Limiter
from xflow_dist._core import keys

celery = pytest.importorskip("celery")
from celery import Celery  # noqa: E402
from celery.contrib.testing.worker import start_worker  # noqa: E402
from celery.exceptions import SoftTimeLimitExceeded  # noqa: E402

from xflow_dist.celery import (  # noqa: E402
    RateLimitedTask,
    TaskPolicy,
    _close_all,
    _held,
    _on_process_init,
    _throttled,
    limiter_for,
    openai_usage,
    rate_limited_task,
)

ROOT = Path(__file__).resolve().parent.parent

# Tasks are defined with shared=False: each test's app knows its own tasks only.
pytestmark = [
    # celery's Redis result backend calls redis-py's deprecated setex (redis-py >= 6 warns)
    pytest.mark.filterwarnings("ignore:Call to deprecated setex:DeprecationWarning"),
]

# Small and fast: no jitter, so that cooldowns are exact.
POLICY = CooldownPolicy(base=0.2, max_backoff=2.0, quiet=1.0, jitter=0.0)


@pytest.fixture(autouse=True)
def _close_limiters() -> Iterator[None]:
    """The per-process limiters the tasks made stop their threads after each test."""
    yield
    _close_all()


def _broker(redis_url: str) -> str:
    return redis_url.rsplit("/", 1)[0] + "/1"


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    """A Celery app of this test's own: its own queue on the suite's Redis."""
    queue = f"q-{uuid.uuid4().hex[:10]}"
    broker = _broker(redis_url)
    application = Celery(f"test-{queue}", broker=broker, backend=broker, set_as_current=False)
    application.conf.update(
        task_default_queue=queue,
        broker_connection_retry_on_startup=True,
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        result_expires=300,
        broker_transport_options={"visibility_timeout": 60},
        xflow_redis_url=redis_url,
    )
    yield application
    _close_app(application)


def _close_app(application: Celery) -> None:
    """Close what an app opened, and collect what its worker threads left, here: an unclosed
    socket found by the garbage collector later would fail whichever test runs then."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        try:
            backend = application.backend
            consumer = getattr(backend, "result_consumer", None)
            if consumer is not None:
                consumer.stop()
            client = getattr(backend, "client", None)
            if client is not None:
                client.connection_pool.disconnect()
        finally:
            application.close()
            gc.collect()


def _level(limiter: Limiter) -> float:
    tokens = limiter.status().tokens_available
    assert tokens is not None
    return tokens


# ------------------------------------------------------------------------------------------
# Units: eager ``apply`` (no broker), where a task's lease is taken and settled in place.


def test_success_settles_with_the_returned_usage(app: Celery, name: str, redis_url: str) -> None:
    budget = Budget(name, tps=100, burst=10)  # 1,000 tokens of credit, 100 a second

    @rate_limited_task(app, shared=False, budget=budget, cost=lambda n: n, policy=TaskPolicy(cooldown=POLICY))
    def work(self: Any, n: int) -> dict[str, Any]:
        assert self.lease is not None and not self.lease.closed and self.lease.tokens == n
        return {"usage": {"total_tokens": 100}}

    assert work.apply(args=(600,)).get() == {"usage": {"total_tokens": 100}}
    limiter = work.limiter
    assert limiter is limiter_for(budget, redis_url, POLICY)  # one per process and budget
    status = limiter.status()
    assert status.in_flight == 0
    assert 900 - 1 <= _level(limiter) <= 1000  # charged 600, refunded 500 on settling at 100
    assert work.lease is None  # outside the body


def test_body_reports_through_its_lease(app: Celery, name: str) -> None:
    @rate_limited_task(app, shared=False, budget=Budget(name, tps=100, burst=10), cost=500, usage=None)
    def work(self: Any) -> str:
        self.lease.report(actual_tokens=50)
        return "done"

    assert work.apply().get() == "done"
    assert _level(work.limiter) >= 950 - 1


@pytest.mark.parametrize("error", [ValueError("boom"), SoftTimeLimitExceeded()])
def test_failure_settles_at_the_estimate(app: Celery, name: str, error: BaseException) -> None:
    @rate_limited_task(app, shared=False, budget=Budget(name, tps=100, burst=10, max_concurrency=1), cost=400)
    def work(self: Any) -> None:
        raise error

    result = work.apply()
    assert result.failed() and isinstance(result.result, type(error))
    status = work.limiter.status()
    assert status.in_flight == 0, "the slot is free again"
    assert _level(work.limiter) <= 600 + 5  # the estimate stands charged: the call may have been made


def test_retry_from_the_body_settles_each_attempt_at_the_estimate(app: Celery, name: str) -> None:
    attempts: list[int] = []

    @rate_limited_task(
        app,
        shared=False,
        budget=Budget(name, tps=10, burst=100, max_concurrency=1, dispatch_margin=0),
        cost=300,
        usage=None,
    )
    def work(self: Any) -> int:
        attempts.append(self.request.retries)
        if len(attempts) == 1:
            raise self.retry(countdown=0, max_retries=1)
        return len(attempts)

    assert work.apply().get() == 2
    assert attempts == [0, 1]
    assert work.limiter.status().in_flight == 0, "the retried attempt gave its slot back"
    assert 400 - 1 <= _level(work.limiter) <= 400 + 10, "each attempt charged its estimate"


@pytest.mark.parametrize("module", ["httpx", "httpx2"])
@pytest.mark.parametrize("error", ["ReadTimeout", "SoftTimeLimitExceeded"])
def test_a_later_call_failing_mid_read_gives_its_own_lease_back(
    app: Celery, name: str, module: str, error: str
) -> None:
    """The task's lease pays the first call; a second call acquires its own, which a read error
    (or the soft time limit striking while the body streams in) must give back, not leave held."""
    http_lib = pytest.importorskip(module)
    failure = SoftTimeLimitExceeded() if error == "SoftTimeLimitExceeded" else http_lib.ReadTimeout("slow")

    class Broken(http_lib.SyncByteStream):  # type: ignore[misc,name-defined]
        def __iter__(self) -> Iterator[bytes]:
            yield b'{"choices": ['
            raise failure

    replies = iter(
        [http_lib.Response(200, json={"usage": {"total_tokens": 20}}), http_lib.Response(200, stream=Broken())]
    )
    inner = http_lib.MockTransport(lambda request: next(replies))
    body = {"model": "m", "messages": [], "max_tokens": 93}  # estimate: 3 + 4 + 93 = 100 tokens

    @rate_limited_task(
        app,
        shared=False,
        budget=Budget(name, tps=10, burst=100, max_concurrency=2, dispatch_margin=0),
        cost=100,
        max_retries=0,
    )
    def work(self: Any) -> None:
        transport = self.transport(inner, http=module, tokenizer=lambda text: 1)
        with http_lib.Client(base_url="https://api.example/v1", transport=transport) as http:
            assert http.post("/chat/completions", json=body).status_code == 200
            http.post("/chat/completions", json=body)

    result = work.apply()
    assert result.failed()
    assert work.limiter.status().in_flight == 0, "the second call's lease was left held"
    assert 1000 - 120 - 1 <= _level(work.limiter) <= 1000 - 120 + 10, "20 used, then 100 at the estimate"


def test_called_as_a_function_acquires_too(app: Celery, name: str) -> None:
    @rate_limited_task(app, shared=False, budget=Budget(name, tps=100, burst=10), cost=lambda n: n)
    def work(self: Any, n: int) -> int:
        assert self.lease is not None
        return n

    assert work(300) == 300
    assert _level(work.limiter) <= 700 + 5


def _httpx_429(retry_ms: int) -> BaseException:
    request = httpx.Request("POST", "https://api.example/v1/chat/completions")
    response = httpx.Response(429, headers={"retry-after-ms": str(retry_ms)}, request=request)
    return httpx.HTTPStatusError("429", request=request, response=response)


def _httpx2_429(retry_ms: int) -> BaseException:
    httpx2 = pytest.importorskip("httpx2")
    request = httpx2.Request("POST", "https://api.example/v1/chat/completions")
    response = httpx2.Response(429, headers={"retry-after-ms": str(retry_ms)}, request=request)
    return httpx2.HTTPStatusError("429", request=request, response=response)


def _openai_429(retry_ms: int) -> BaseException:
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")
    request = httpx2.Request("POST", "https://api.example/v1/chat/completions")
    response = httpx2.Response(429, headers={"retry-after-ms": str(retry_ms)}, request=request)
    return openai.RateLimitError("rate limited", response=response, body=None)


class Throttled(Exception):
    """A user's own 429 exception, with a hint."""

    def __init__(self, retry_after: float) -> None:
        super().__init__("throttled")
        self.retry_after = retry_after


def _own_429(retry_ms: int) -> BaseException:
    return Throttled(retry_ms / 1000)


@pytest.mark.parametrize("make", [_httpx_429, _httpx2_429, _openai_429, _own_429])
def test_a_429_cools_the_fleet_down_and_retries_after_it(app: Celery, name: str, make: Any) -> None:
    attempts: list[float] = []
    policy = TaskPolicy(rate_limit_errors=(Throttled,), cooldown=POLICY)

    @rate_limited_task(app, shared=False, budget=Budget(name, rps=100, burst=1), policy=policy, max_retries=3)
    def work(self: Any) -> int:
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise make(600)
        return self.request.retries

    started = time.monotonic()
    result = work.apply()
    assert result.get() == 1, "the 429 retry counts as a retry"
    assert len(attempts) == 2
    waited = attempts[1] - started
    assert waited >= 0.6 - 0.02, f"retried {waited:.3f}s after the 429, before the provider's 0.6 s"
    assert work.limiter.status().in_flight == 0


def test_429_retries_count_against_max_retries(app: Celery, name: str) -> None:
    calls: list[int] = []

    @rate_limited_task(
        app, shared=False, budget=Budget(name, rps=100, burst=1), max_retries=1, policy=TaskPolicy(cooldown=POLICY)
    )
    def work(self: Any) -> None:
        calls.append(self.request.retries)
        raise _httpx_429(50)

    result = work.apply()
    assert result.failed() and isinstance(result.result, httpx.HTTPError)  # celery rebuilds it as its base
    assert calls == [0, 1]
    assert work.limiter.status().in_flight == 0


def test_a_429_pauses_the_whole_budget(app: Celery, name: str) -> None:
    @rate_limited_task(app, shared=False, budget=Budget(name, tps=100, burst=10), cost=800, max_retries=0)
    def work(self: Any) -> None:
        raise _httpx_429(2000)

    assert work.apply().failed()  # out of retries: the 429 itself
    status = work.limiter.status()
    assert status.in_flight == 0
    assert 1.5 <= status.cooldown_remaining <= 2.5, "every process of the fleet now waits for the provider"


@pytest.mark.parametrize("module", ["httpx", "httpx2"])
def test_transport_pays_the_first_call_with_the_task_lease(
    app: Celery, name: str, monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    """The transport settles the task's lease with the reply's usage; its 429 cools down once."""
    http_lib = pytest.importorskip(module)
    replies = iter(
        [
            http_lib.Response(429, headers={"retry-after-ms": "300"}, json={"error": {"code": "rate_limit_exceeded"}}),
            http_lib.Response(200, json={"choices": [], "usage": {"total_tokens": 40}}),
        ]
    )
    inner = http_lib.MockTransport(lambda request: next(replies))
    cooldowns: list[float | None] = []
    real_cooldown = Limiter.cooldown

    def counted(self: Limiter, retry_after: float | None = None) -> Any:
        cooldowns.append(retry_after)
        return real_cooldown(self, retry_after)

    monkeypatch.setattr(Limiter, "cooldown", counted)
    settled: list[float] = []
    real_report = Lease.report

    def recorded(self: Lease, actual_tokens: float, **kwargs: Any) -> Any:
        if not self.closed:
            settled.append(actual_tokens)
        return real_report(self, actual_tokens, **kwargs)

    monkeypatch.setattr(Lease, "report", recorded)

    @rate_limited_task(app, shared=False, budget=Budget(name, tps=100, burst=10), cost=50, max_retries=2)
    def work(self: Any) -> int:
        transport = self.transport(inner, http=module, tokenizer=lambda text: max(1, len(text) // 4))
        with http_lib.Client(base_url="https://api.example/v1", transport=transport) as http:
            reply = http.post("/chat/completions", json={"model": "m", "messages": [], "max_tokens": 8})
            reply.raise_for_status()
        assert self.lease.closed, "the transport settled the task's own lease"
        return int(reply.json()["usage"]["total_tokens"])

    started = time.monotonic()
    assert work.apply().get() == 40
    assert time.monotonic() - started >= 0.3 - 0.02
    assert cooldowns == [pytest.approx(0.3)], "one cooldown for one 429: the task did not start a second"
    assert settled == [0, 40], "the 429 settled at zero, the reply at its usage"


def test_options_are_checked() -> None:
    with pytest.raises(ConfigurationError):
        TaskPolicy(max_wait=-1)
    with pytest.raises(ConfigurationError):
        TaskPolicy(max_countdown=0)
    with pytest.raises(ConfigurationError):
        TaskPolicy(rate_limit_errors=(int,))  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="outage mode"):
        TaskPolicy(outage="sometimes")


def test_the_outage_policy_reaches_the_tasks_limiter(name: str) -> None:
    from xflow_dist.celery import limiter_for

    closed = limiter_for(Budget(name, rps=1), "redis://127.0.0.1:1/0", None, "closed")
    local = limiter_for(Budget(name, rps=1), "redis://127.0.0.1:1/0")
    assert (closed.outage_policy.mode, local.outage_policy.mode) == ("closed", "local")
    assert closed is not local


def test_no_budget_is_a_configuration_error(app: Celery) -> None:
    @app.task(bind=True, base=RateLimitedTask, shared=False)
    def work(self: Any) -> None:
        return None

    result = work.apply()
    assert result.failed() and isinstance(result.result, ConfigurationError)


def test_lazy_budget_and_redis(app: Celery, name: str, redis_url: str) -> None:
    made: list[str] = []

    def budget() -> Budget:
        made.append("budget")
        return Budget(name, tps=100, burst=10)

    @rate_limited_task(app, shared=False, budget=budget, redis=lambda: redis_url, cost=lambda: 100)
    def work(self: Any) -> str:
        return self.limiter.budget.name  # type: ignore[no-any-return]

    assert made == []  # nothing at definition time
    assert work.apply().get() == name


def test_throttled_and_usage_readers() -> None:
    assert _throttled(ValueError(), ()) is None
    found = _throttled(_httpx_429(1500), ())
    assert found is not None and found.retry_after == pytest.approx(1.5)
    own = _throttled(Throttled(2.0), (Throttled,))
    assert own is not None and own.retry_after == 2.0
    assert _throttled(Throttled(2.0), ()) is None
    assert openai_usage({"usage": {"total_tokens": 12}}) == 12
    assert openai_usage({"usage": None}) is None
    assert openai_usage("text") is None


# ------------------------------------------------------------------------------------------
# A worker in this process (solo and threads pools): waits, re-queues, retries as Celery does.


@pytest.fixture
def retries() -> Iterator[dict[str, int]]:
    """Retry signals seen, by task id."""
    from celery.signals import task_retry

    seen: dict[str, int] = {}

    def count(request: Any = None, **_: Any) -> None:
        seen[request.id] = seen.get(request.id, 0) + 1

    task_retry.connect(count, weak=False)
    yield seen
    task_retry.disconnect(count)


@pytest.mark.parametrize("pool", ["solo", "threads"])
@pytest.mark.timeout(60)
def test_a_long_wait_requeues_and_frees_the_worker(
    app: Celery, name: str, redis_url: str, pool: str, retries: dict[str, int]
) -> None:
    """With the budget paused for 3 s, a limited task (max_retries=0) re-queues itself instead of
    sleeping: on a one-slot worker, plain tasks sent after it finish long before it does."""
    policy = TaskPolicy(max_wait=0.5, cooldown=POLICY)
    budget = Budget(name, rps=100, burst=1)

    @rate_limited_task(app, shared=False, budget=budget, policy=policy, max_retries=0)
    def limited(self: Any) -> dict[str, Any]:
        return {"at": time.time(), "retries": self.request.retries}

    @app.task(shared=False)
    def plain(i: int) -> float:
        return time.time()

    with Limiter(budget, redis_url, cooldown_policy=POLICY) as limiter:
        pause = limiter.cooldown(retry_after=3.0).remaining
    with start_worker(app, pool=pool, concurrency=1, perform_ping_check=False, loglevel="WARNING", shutdown_timeout=20):
        sent = time.time()
        waiting = limited.delay()
        others = [plain.delay(i) for i in range(5)]
        done = [r.get(timeout=20) for r in others]
        outcome = waiting.get(timeout=20)
    # Slept in place, the limited task would hold the only slot for the whole pause: the plain
    # tasks behind it would finish after it, at least `pause` after they were sent.
    assert max(done) < outcome["at"], "plain tasks waited behind the limited one"
    assert max(done) - sent < pause - 0.5
    assert outcome["at"] - sent >= pause - 0.3, "the limited task ran before the pause ended"
    assert outcome["retries"] == 0, "a wait for budget is not a retry"
    assert retries.get(waiting.id, 0) >= 1, "it was re-queued, not slept"


@pytest.mark.timeout(60)
def test_a_task_requeued_after_its_in_place_wait_comes_back_when_it_fits(
    app: Celery, name: str, redis_url: str, retries: dict[str, int]
) -> None:
    """Waiting for a slot, the budget cannot say when it frees: the task waits its max_wait in place,
    re-queues with no floor (the slot may free any moment) and waits in place again, so it runs
    within a moment of the release, not a max_wait later."""
    budget = Budget(name, max_concurrency=1)

    @rate_limited_task(app, shared=False, budget=budget, policy=TaskPolicy(max_wait=1.0), usage=None)
    def limited(self: Any) -> float:
        return time.time()

    with (
        Limiter(budget, redis_url) as holder,
        start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=20),
    ):
        lease = holder.acquire()
        waiting = limited.delay()
        until(lambda: retries.get(waiting.id, 0) >= 1, timeout=10)  # timed out in place: re-queued
        time.sleep(0.3)  # it is back, waiting in place again
        released = time.time()
        lease.release()
        ran = waiting.get(timeout=20)
    assert ran - released < 0.5, f"ran {ran - released:.2f}s after the slot was freed"


@pytest.mark.timeout(60)
def test_a_short_wait_sleeps_in_place(app: Celery, name: str, retries: dict[str, int]) -> None:
    budget = Budget(name, tps=100, burst=1)  # 100 tokens of credit: a second task waits 1 s

    @rate_limited_task(app, shared=False, budget=budget, cost=100, policy=TaskPolicy(max_wait=3.0), usage=None)
    def limited(self: Any) -> float:
        return time.time()

    with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=20):
        results = [limited.delay() for _ in range(2)]
        first, second = (r.get(timeout=20) for r in results)
    assert second - first >= 1.0 - 0.05
    assert retries == {}, "waits under max_wait are slept in place"


@pytest.mark.timeout(60)
def test_a_requeued_task_keeps_its_place_and_later_tasks_never_pass_it(
    app: Celery, name: str, redis_url: str, retries: dict[str, int]
) -> None:
    """A large task waits longer than max_wait and re-queues; small tasks sent after it would each
    fit long before it on their own, yet it runs first: its ticket kept its place in the fleet's
    queue across the countdown, and it came back to it (without this, the small tasks take the
    refill as it comes and the large one starves). Its ticket is gone once it ran.

    Each task returns its grant's time as Redis wrote it in the lease record (the third word), so
    the order compared is the order the budget granted in, not the order threads ran bodies in."""
    budget = Budget(name, tps=100, burst=1)  # 100 tokens of credit, refilling at 100 a second
    lease_data = keys(budget)[2]
    reader = redis.Redis.from_url(redis_url)

    @rate_limited_task(
        app, shared=False, budget=budget, cost=lambda n: n, policy=TaskPolicy(max_wait=0.3), usage=None
    )
    def limited(self: Any, n: int) -> float:
        return float(reader.hget(lease_data, self.lease.id).split()[2])  # type: ignore[union-attr]

    with (
        Limiter(budget, redis_url) as holder,
        start_worker(app, pool="threads", concurrency=4, perform_ping_check=False, loglevel="WARNING",
                     shutdown_timeout=20),
    ):  # fmt: skip
        holder.acquire(tokens=100).release()  # empty: 100 tokens fit in 1 s, 10 in 0.1 s
        big = limited.delay(100)
        until(lambda: retries.get(big.id, 0) >= 1, timeout=10)  # re-queued, its ticket kept
        small = [limited.delay(10) for _ in range(6)]
        big_at = big.get(timeout=30)
        small_at = [r.get(timeout=30) for r in small]
        status = holder.status()
    reader.close()
    assert big_at < min(small_at), "a task sent after the re-queued one was granted before it"
    assert status.queued == 0 and status.in_flight == 0


# ------------------------------------------------------------------------------------------
# A prefork child terminated by SIGTERM gives its leases back at once.

_FORK = mp.get_context("fork")


def _holder(redis_url: str, budget: Budget, ready: Any) -> None:
    limiter = limiter_for(budget, redis_url)
    lease = limiter.acquire(timeout=10)
    _held.add(lease)
    _on_process_init()  # what Celery's worker_process_init does in a prefork child
    ready.put(os.getpid())
    time.sleep(60)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_sigterm_in_a_prefork_child_releases_its_leases(redis_url: str, name: str) -> None:
    budget = Budget(name, max_concurrency=1, lease_ttl=30.0)  # expiry would take 30 s
    with Limiter(budget, redis_url) as limiter:
        parent_limiter = limiter_for(budget, redis_url)
        ready = _FORK.Queue()
        child = _FORK.Process(target=_holder, args=(redis_url, budget, ready))
        child.start()
        try:
            ready.get(timeout=20)
            assert limiter.status().in_flight == 1
            assert child.pid is not None
            os.kill(child.pid, signal.SIGTERM)
            child.join(timeout=10)
            assert child.exitcode == -signal.SIGTERM, "the child still dies of the signal"
            assert limiter.status().in_flight == 0, "released at once, not after the 30 s TTL"
            assert limiter_for(budget, redis_url) is parent_limiter, "the child's limiter was its own"
        finally:
            if child.is_alive():
                child.kill()
                child.join()


def _holder_with_the_lock(redis_url: str, budget: Budget, ready: Any) -> None:
    import xflow_dist.celery as xcelery

    limiter = limiter_for(budget, redis_url)
    _held.add(limiter.acquire(tokens=100, timeout=10))
    _on_process_init()
    with xcelery._lock:  # the main thread is inside limiter_for, say, when the signal comes
        ready.put(os.getpid())
        time.sleep(60)


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_sigterm_while_the_main_thread_holds_the_lock_cannot_deadlock(redis_url: str, name: str) -> None:
    budget = Budget(name, tps=10, burst=100, max_concurrency=1, lease_ttl=30.0, dispatch_margin=0)
    with Limiter(budget, redis_url) as limiter:
        ready = _FORK.Queue()
        child = _FORK.Process(target=_holder_with_the_lock, args=(redis_url, budget, ready))
        child.start()
        try:
            ready.get(timeout=20)
            assert limiter.status().in_flight == 1
            assert child.pid is not None
            os.kill(child.pid, signal.SIGTERM)
            child.join(timeout=10)  # the handler waits at most 2 s for the release
            assert child.exitcode == -signal.SIGTERM, "the handler deadlocked on the lock the main thread holds"
            assert limiter.status().in_flight == 0, "released at once, not after the 30 s TTL"
            assert 900 - 1 <= _level(limiter) <= 900 + 10, "released at the estimate"
        finally:
            if child.is_alive():
                child.kill()
                child.join()


# ------------------------------------------------------------------------------------------
# A real fleet: two prefork nodes of workers.app, one killed mid-run.

sys.path.insert(0, str(ROOT))

RPM = 240  # 4 a second beyond the initial minute
MAX_CONC = 4
JOBS = 300


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_fleet_of_prefork_workers_shares_the_budget_and_survives_a_kill(
    redis_url: str, real_redis: bool, name: str
) -> None:
    if not real_redis:
        pytest.skip("a fleet of worker processes needs a real redis-server")
    from workers.fleet import start_nodes, stop_nodes
    from workers.producer import load_jobs
    from xflow_dist.tools._demo import Latency, fetch_stats, reset_provider, simulator_process
    from xflow_dist.tools._fleet import Limits

    queue = f"fleet-{uuid.uuid4().hex[:8]}"
    broker = _broker(redis_url)
    env = {
        "XFLOW_REDIS_URL": redis_url,
        "XFLOW_BROKER_URL": broker,
        "XFLOW_QUEUE": queue,
        "XFLOW_BUDGET__NAME": name,
        "XFLOW_BUDGET__RPM": str(RPM),
        "XFLOW_BUDGET__TPM": "1000000",
        "XFLOW_BUDGET__MAX_CONCURRENCY": str(MAX_CONC),
        "XFLOW_BUDGET__BURST": "60",  # the provider's minute (the library keeps its dispatch margin back)
        "XFLOW_BUDGET__LEASE_TTL": "3",
        "XFLOW_VISIBILITY_TIMEOUT": "6",
        "XFLOW_CELERY__MAX_WAIT": "1",
        "XFLOW_MODEL": "sim",
    }
    limits = Limits(rpm=RPM, tpm=1_000_000, max_concurrency=MAX_CONC)
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    producer.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    nodes: list[Any] = []
    with simulator_process(limits, Latency(0.1, 0.0002)) as provider:
        env["XFLOW_PROVIDER_URL"] = f"{provider}/v1"
        try:
            nodes = start_nodes(2, concurrency=3, pool="prefork", loglevel="warning", env=env, quiet=True)
            deadline = time.monotonic() + 60
            while len(producer.control.ping(timeout=0.5)) < 2:
                assert time.monotonic() < deadline, "the worker nodes did not come up"
                assert all(n.poll() is None for n in nodes), "a worker node exited at start"
            reset_provider(provider)
            jobs = load_jobs(None, JOBS, seed=5)
            started = time.monotonic()
            results = [producer.send_task("workers.chat", args=[job]) for job in jobs]
            killed_at = None
            while True:
                done = sum(1 for r in results if r.ready())
                if killed_at is None and done >= JOBS * 0.4:
                    os.killpg(nodes[1].pid, signal.SIGKILL)  # the node and its pool, as a host dies
                    killed_at = time.monotonic() - started
                if done == JOBS:
                    break
                if time.monotonic() - started >= 90:
                    pytest.fail(f"only {done}/{JOBS} done after 90 s: {_stuck(results, broker, queue)}")
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            failed = [r.result for r in results if not r.successful()]
            assert not failed, f"{len(failed)} jobs failed: {failed[:3]}"
            assert sorted(r.result["id"] for r in results) == list(range(JOBS)), "a job was lost"
            stats = fetch_stats(provider)
            assert nodes[1].wait(timeout=10) == -signal.SIGKILL
        finally:
            stop_nodes(nodes, grace=20)
            _close_app(producer)
    assert stats["violations"] == 0, "the provider saw a window above its limits"
    rejected = stats["requests"]["rejected"]
    admitted = stats["requests"]["admitted"]
    assert admitted >= JOBS
    assert rejected <= 3, f"{rejected} requests answered 429"
    assert stats["peak_in_flight"] <= MAX_CONC
    fleet_budget = Budget(name, rpm=RPM, tpm=1_000_000, max_concurrency=MAX_CONC, burst=59.9, lease_ttl=3)
    with Limiter(fleet_budget, redis_url) as limiter:
        assert limiter.status().in_flight == 0, "the killed node's leases outlived their TTL"
    print(
        f"\ncelery fleet: {JOBS} jobs in {elapsed:.1f}s on 2 nodes x 3 (node 1 SIGKILLed at {killed_at:.1f}s), "
        f"{admitted} admitted ({admitted - JOBS} redelivered), {rejected} 429s, violations {stats['violations']}"
    )


def _stuck(results: list[Any], broker: str, queue: str) -> str:
    """What the unfinished jobs and the broker hold, so that a stall says where it stalled."""
    states = {r.id: r.state for r in results if not r.ready()}
    with redis.Redis.from_url(broker) as client:
        held = {
            "queued": client.llen(queue),
            "unacked": client.hlen("unacked"),
            "restore mutex held": bool(client.exists("unacked_mutex")),
        }
    return f"unfinished {states}, broker {held}"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_revoke_with_terminate_releases_the_lease_at_once(redis_url: str, real_redis: bool, name: str) -> None:
    """A prefork child terminated mid-call (``revoke(terminate=True)``) gives its slot back at once,
    not after its lease's TTL (its heartbeats would have kept it anyway)."""
    if not real_redis:
        pytest.skip("a worker node needs a real redis-server")
    from workers.fleet import start_nodes, stop_nodes
    from xflow_dist.tools._demo import Latency, simulator_process
    from xflow_dist.tools._fleet import Limits

    queue = f"revoke-{uuid.uuid4().hex[:8]}"
    broker = _broker(redis_url)
    budget = Budget(name, max_concurrency=1, lease_ttl=30.0)
    env = {
        "XFLOW_REDIS_URL": redis_url,
        "XFLOW_BROKER_URL": broker,
        "XFLOW_QUEUE": queue,
        "XFLOW_BUDGET__NAME": name,
        "XFLOW_BUDGET__MAX_CONCURRENCY": "1",
        "XFLOW_BUDGET__LEASE_TTL": "30",
        "XFLOW_MODEL": "sim",
    }
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    producer.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    nodes: list[Any] = []
    with (
        simulator_process(Limits(rpm=600, tpm=1_000_000), Latency(60.0, 0.0)) as provider,
        Limiter(budget, redis_url) as limiter,
    ):
        env["XFLOW_PROVIDER_URL"] = f"{provider}/v1"
        try:
            nodes = start_nodes(1, concurrency=1, pool="prefork", loglevel="warning", env=env, quiet=True)
            deadline = time.monotonic() + 60
            while len(producer.control.ping(timeout=0.5)) < 1:
                assert time.monotonic() < deadline, "the worker node did not come up"
            result = producer.send_task("workers.chat", args=[{"id": 1, "prompt": "hello", "max_tokens": 8}])
            while limiter.status().in_flight < 1:  # the call is out: a minute at the provider
                assert time.monotonic() < deadline, "the task never took its lease"
                time.sleep(0.05)
            producer.control.revoke(result.id, terminate=True, signal="SIGTERM")
            revoked = time.monotonic()
            while limiter.status().in_flight > 0:
                assert time.monotonic() - revoked < 10, "the terminated child kept its lease"
                time.sleep(0.05)
            released = time.monotonic() - revoked
            assert nodes[0].poll() is None, "the node itself lives on"
        finally:
            stop_nodes(nodes, grace=20)
            _close_app(producer)
    assert released < 5.0
    print(f"\nrevoke(terminate=True): lease released {released:.2f}s after the revoke (lease_ttl 30 s)")


def test_threads_share_one_limiter(redis_url: str, name: str) -> None:
    budget = Budget(name, rps=1000, burst=1)
    seen: list[Limiter] = []
    threads = [threading.Thread(target=lambda: seen.append(limiter_for(budget, redis_url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(x) for x in seen}) == 1


def test_acquire_timeout_carries_the_wait(redis_url: str, name: str) -> None:
    """What the task relies on: a new arrival's exact wait, when it is longer than max_wait."""
    with Limiter(Budget(name, tps=100, burst=1), redis_url) as limiter:
        limiter.acquire(tokens=100).release()
        with pytest.raises(AcquireTimeout) as caught:
            limiter.acquire(tokens=100, timeout=0.2)
        assert caught.value.retry_after is not None and 0.5 < caught.value.retry_after <= 1.0


def test_redis_is_needed(app: Celery, name: str) -> None:
    app.conf.xflow_redis_url = None

    @rate_limited_task(app, shared=False, budget=Budget(name, rps=1))
    def work(self: Any) -> None:
        return None

    result = work.apply()
    assert result.failed() and isinstance(result.result, ConfigurationError)


def test_celery_fleet_imports_cleanly() -> None:
    """The example app is importable with no environment beyond its defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("XFLOW_")}
    env["PYTHONPATH"] = str(ROOT)
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", "import workers.tasks as t; print(t.chat.name, t.chat_baseline.name)"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["workers.chat", "workers.chat_baseline"]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_prefork_node_serves_its_childrens_metrics(
    redis_url: str, real_redis: bool, name: str, tmp_path: Path
) -> None:
    """``XFLOW_METRICS_PORT``: the node's main process serves what its prefork children counted
    (prometheus multiprocess mode) and the budget's gauges; checked against the provider's ledger."""
    if not real_redis:
        pytest.skip("a worker node needs a real redis-server")
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from workers.fleet import start_nodes, stop_nodes
    from workers.producer import load_jobs
    from xflow_dist.tools._demo import Latency, fetch_stats, reset_provider, simulator_process
    from xflow_dist.tools._fleet import Limits

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    jobs_n = 12
    queue = f"metrics-{uuid.uuid4().hex[:8]}"
    broker = _broker(redis_url)
    env = {
        "XFLOW_REDIS_URL": redis_url, "XFLOW_BROKER_URL": broker, "XFLOW_QUEUE": queue,
        "XFLOW_BUDGET__NAME": name, "XFLOW_BUDGET__RPM": "600", "XFLOW_BUDGET__TPM": "1000000",
        "XFLOW_BUDGET__MAX_CONCURRENCY": "2", "XFLOW_BUDGET__BURST": "60", "XFLOW_MODEL": "sim",
        "XFLOW_METRICS_PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
    }  # fmt: skip
    producer = Celery("producer", broker=broker, backend=broker, set_as_current=False)
    producer.conf.update(task_default_queue=queue, broker_connection_retry_on_startup=True)
    nodes: list[Any] = []

    def scrape() -> dict[tuple[str, str], float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return {
            (s.name, s.labels.get("budget", "")): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if "le" not in s.labels
        }

    with simulator_process(Limits(rpm=600, tpm=1_000_000, max_concurrency=2), Latency(0.05, 0.0)) as provider:
        env["XFLOW_PROVIDER_URL"] = f"{provider}/v1"
        try:
            nodes = start_nodes(1, concurrency=2, pool="prefork", loglevel="warning", env=env, quiet=True)
            deadline = time.monotonic() + 60
            while len(producer.control.ping(timeout=0.5)) < 1:
                assert time.monotonic() < deadline, "the worker node did not come up"
                assert all(n.poll() is None for n in nodes), "the worker node exited at start"
            reset_provider(provider)
            results = [producer.send_task("workers.chat", args=[job]) for job in load_jobs(None, jobs_n, seed=3)]
            for r in results:
                r.get(timeout=60)
            got = scrape()
            stats = fetch_stats(provider)
        finally:
            stop_nodes(nodes, grace=20)
            _close_app(producer)
    assert got[("xflow_grants_total", name)] == stats["requests"]["admitted"] == jobs_n
    assert got[("xflow_tokens_charged_total", name)] == stats["tokens"]["settled"]
    assert got[("xflow_budget_in_flight", name)] == 0
    assert got[("xflow_budget_max_concurrency", name)] == 2
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".db")]) >= 1
