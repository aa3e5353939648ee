"""XtremeFlow's schedulers over a shared budget: the same calls, one budget for the whole fleet.

A task started by ``start_task`` acquires requests, tokens and a concurrency slot jointly from an
``AsyncLimiter`` before its coroutine runs; ``report_token_usage`` settles that lease, found
through a context variable; ``auto_backoff`` cools the whole fleet down on a retryable error and
acquires again for every retry. Locally, ``start_task`` keeps XtremeFlow's back-pressure: it
waits while ``max_concurrency`` tasks of this scheduler are alive.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

import redis.asyncio
import redis.asyncio.cluster

from .._async_limiter import AsyncLimiter
from .._backend import RedisLike, _check_url
from .._budget import MAX_UNITS, Budget, CooldownPolicy
from .._core import place_of, validate_cost, validate_retry_after
from .._exceptions import (
    BackendError,
    ConfigurationError,
    InvalidTaskError,
    OutsideTaskError,
    QuotaExhaustedError,
    RetryException,
)
from .._headers import parse_retry_after
from .._lease import AsyncLease
from .._local import Waiting
from .._quota import quota_error, quota_in_exception
from ._inprocess import LocalLease, LocalLimiter

__all__ = [
    "ExecutionContext",
    "RequestRateScheduler",
    "TaskScheduler",
    "TokenRateScheduler",
    "auto_backoff",
    "get_context",
    "report_token_usage",
]

log = logging.getLogger("xflow_dist")

T = TypeVar("T")
P = ParamSpec("P")

#: The name given to a scheduler's own budget when no Redis is named: it is private anyway.
_MEMORY_NAME = "xtremeflow"

#: The pause is exactly what ``auto_backoff`` asks for: its own per-attempt doubling is the backoff.
_EXACT_PAUSE = CooldownPolicy(quiet=0.0, jitter=0.0)


class ExecutionContext:
    """What a task started by ``start_task`` carries (XtremeFlow's name): its scheduler, its
    estimate (``extra["estimated_tokens"]``, as XtremeFlow kept it) and the lease it holds."""

    __slots__ = ("_coro", "_dispatched", "_limiter", "_priority", "_slots", "_tenant", "extra", "lease", "scheduler")

    def __init__(
        self,
        scheduler: TaskScheduler,
        limiter: AsyncLimiter | LocalLimiter,
        estimated_tokens: float,
        coro: Coroutine[Any, Any, Any] | None = None,
        slots: asyncio.Semaphore | None = None,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.extra: dict[str, Any] = {"estimated_tokens": estimated_tokens}
        #: The lease of the current attempt; a retry replaces it. None until the first grant.
        self.lease: AsyncLease | LocalLease | None = None
        self._limiter = limiter
        self._dispatched = False
        self._coro = coro  # closed if the task ends before it ran
        self._slots = slots  # the scheduler's max_concurrency, released when the task ends
        self._priority = priority  # its class, for every attempt (None: the budget's default)
        self._tenant = tenant  # whose task it is, for every attempt (None: untagged)

    @property
    def estimated_tokens(self) -> float:
        return float(self.extra["estimated_tokens"])

    async def _acquire(self, lease: AsyncLease | LocalLease | None = None) -> AsyncLease | LocalLease:
        """The lease of the next attempt (``lease``: one granted already), never while this
        process's backoff is in force: a grant that came during it (Redis had not heard of the 429
        yet) is given back, and asked for again once the backoff is over, as XtremeFlow's tasks
        waited out its backoff after their turn."""
        scheduler, limiter = self.scheduler, self._limiter
        while True:
            if lease is None:
                if scheduler._backoff_until:
                    await scheduler._backoff_over()
                lease = await limiter.acquire(
                    tokens=self.estimated_tokens, priority=self._priority, tenant=self._tenant
                )
            if not scheduler._backoff_until or scheduler._backoff_left() <= 0:
                return lease
            await lease.cancel()
            lease = None

    def _done(self, task: asyncio.Task[Any]) -> None:
        """The task is over: its slot of the scheduler's ``max_concurrency`` is free."""
        if not self._dispatched and self._coro is not None:
            self._coro.close()  # cancelled or failed before it ran: no "never awaited" warning
        scheduler = self.scheduler
        scheduler.pending_tasks.discard(task)
        scheduler.active_tasks -= 1
        scheduler.total_completed += 1
        if self._slots is not None:
            self._slots.release()

    async def _retry(self, wait: float) -> None:
        """Pause this process at once and the fleet for ``wait`` seconds, settle the failed
        attempt, acquire the next one."""
        self.scheduler._back_off(wait)
        if wait > 0:
            await self._limiter.cooldown(retry_after=wait)
        await _release_quietly(self.lease)
        self.lease = await self._acquire()


_current: contextvars.ContextVar[ExecutionContext | None] = contextvars.ContextVar(
    "xflow_dist_compat_task", default=None
)


def get_context() -> ExecutionContext | None:
    """The context of the task started by ``start_task`` that is running now, or None."""
    return _current.get()


async def _release_quietly(lease: AsyncLease | LocalLease | None) -> None:
    """Settle at the estimate; if Redis fails, the lease expires with its TTL, charged as it was."""
    if lease is None:
        return
    try:
        await lease.release()
    except BackendError as exc:
        log.warning("could not settle lease %s: %s; it expires with its TTL", lease.id, exc)


@dataclass(slots=True)
class _Runtime:
    """What belongs to one event loop: the limiter (its connections and tasks) and the local slots."""

    loop: asyncio.AbstractEventLoop
    limiter: AsyncLimiter | LocalLimiter
    slots: asyncio.Semaphore | None


def _check_redis(target: RedisLike | None) -> None:
    if target is None or isinstance(target, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        return
    if isinstance(target, str):
        _check_url(target)
        return
    raise ConfigurationError(f"redis must be a URL or a redis.asyncio.Redis client, not {target!r}")


class TaskScheduler:
    """XtremeFlow's ``TaskScheduler``: at most ``max_concurrency`` calls in flight, fleet-wide.

    ``redis`` (a URL or a ``redis.asyncio.Redis``) and ``name`` make the budget shared by every
    scheduler of the same name; without them the budget lives in this process's memory, as
    XtremeFlow's did. ``await start_task(coro)`` waits while ``max_concurrency`` tasks of this
    scheduler are alive, then returns the ``asyncio.Task`` that acquires and runs ``coro``.
    A 429 pauses the fleet exactly as long as ``auto_backoff`` asks, as XtremeFlow paused;
    ``cooldown_policy`` adds the budget's own escalation and jitter instead.
    """

    def __init__(
        self,
        max_concurrency: int | None,
        *,
        redis: RedisLike | None = None,
        name: str | None = None,
        cooldown_policy: CooldownPolicy | None = None,
        priorities: Mapping[str, int] | None = None,
        default_priority: str | None = None,
        tenants: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
    ) -> None:
        self._setup(
            max_concurrency=max_concurrency,
            redis=redis,
            name=name,
            cooldown_policy=cooldown_policy,
            priorities=priorities,
            default_priority=default_priority,
            tenants=tenants,
            default_weight=default_weight,
        )

    def _setup(
        self,
        *,
        max_concurrency: int | None,
        redis: RedisLike | None,
        name: str | None,
        cooldown_policy: CooldownPolicy | None,
        rps: float | None = None,
        rpm: float | None = None,
        tps: float | None = None,
        tpm: float | None = None,
        burst_ratio: float = 0.0,
        priorities: Mapping[str, int] | None = None,
        default_priority: str | None = None,
        tenants: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
    ) -> None:
        _check_redis(redis)
        if isinstance(max_concurrency, int | float) and not isinstance(max_concurrency, bool) and max_concurrency <= 0:
            # XtremeFlow's words (the Budget would say "a whole number from 1 to ...")
            raise ConfigurationError(f"max_concurrency must be positive, got {max_concurrency}")
        if redis is not None and name is None:
            raise ConfigurationError("a shared budget needs a name=: schedulers of the same name share it")
        if cooldown_policy is not None and not isinstance(cooldown_policy, CooldownPolicy):
            raise ConfigurationError(f"cooldown_policy must be a CooldownPolicy, not {cooldown_policy!r}")
        self.budget = Budget(
            name or _MEMORY_NAME,
            rps=rps,
            rpm=rpm,
            tps=tps,
            tpm=tpm,
            max_concurrency=max_concurrency,
            burst=burst_ratio,
            overdraft=True,  # XtremeFlow's admission: a start is due once no debt is left, whatever its cost
            dispatch_margin=0.0,  # burst_ratio is all of the credit, as in XtremeFlow
            priorities=priorities,
            default_priority=default_priority,
            tenants=tenants,
            default_weight=default_weight,
        )
        # Without a Redis the budget is this scheduler's own, in its loop: independent, like XtremeFlow's.
        self._redis = redis
        self._local: LocalLimiter | None = None
        self._cooldown_policy = cooldown_policy or _EXACT_PAUSE
        self._rt: _Runtime | None = None
        self._backoff_until = 0.0  # loop.time() before which no task of this process starts
        self.active_tasks = 0
        self.total_completed = 0
        self.pending_tasks: set[asyncio.Task[Any]] = set()

    def _runtime(self) -> _Runtime:
        """The limiter and local slots of the running loop, made on first use in that loop."""
        loop = asyncio.get_running_loop()
        if self._rt is None or self._rt.loop is not loop:
            limit = self.budget.max_concurrency
            limiter: AsyncLimiter | LocalLimiter
            if self._redis is None:  # one budget for the scheduler's life, whichever loop runs it
                if self._local is None:
                    self._local = LocalLimiter(self.budget, self._cooldown_policy)
                else:
                    self._local._rebind()
                limiter = self._local
            else:
                limiter = AsyncLimiter(self.budget, self._redis, cooldown_policy=self._cooldown_policy)
            self._rt = _Runtime(loop, limiter, asyncio.Semaphore(limit) if limit is not None else None)
        return self._rt

    @property
    def limiter(self) -> AsyncLimiter | LocalLimiter:
        """The limiter this scheduler uses in the running loop (for ``status()``, ``cooldown()``): an
        ``AsyncLimiter`` over Redis, a ``LocalLimiter`` (the same calls) without."""
        return self._runtime().limiter

    async def start_task(
        self,
        coro: Coroutine[Any, Any, T],
        estimated_tokens: float = 0,
        *,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> asyncio.Task[T]:
        """Wait for a local slot, then return the task that acquires and runs ``coro``.

        The task acquires one request, ``estimated_tokens`` and a fleet-wide concurrency slot in
        one step, runs ``coro`` with the lease in its context, and settles at the estimate unless
        ``report_token_usage`` settled first. Cancelled before it ran, it gives the reservation
        back and closes ``coro``. ``priority`` and ``tenant``: the task's class among the
        scheduler's ``priorities`` and whose task it is among its ``tenants``, for every attempt
        (extensions of XtremeFlow's API). Bad input raises here, before Redis is touched.
        """
        if not asyncio.iscoroutine(coro):
            raise InvalidTaskError(f"start_task needs a coroutine, not {coro!r}", budget=self.budget.name)
        try:
            if priority is not None or tenant is not None:
                place_of(self.budget, priority, tenant)  # an unknown class or a bad tenant raises here
            t = estimated_tokens
            if not ((type(t) is int or type(t) is float) and 0 <= t <= MAX_UNITS):  # else it is fine as it is
                validate_cost(self.budget, 1, t)
            rt = self._rt
            if rt is None or rt.loop is not asyncio.get_running_loop():
                rt = self._runtime()
            if rt.slots is not None:
                await rt.slots.acquire()
        except BaseException:
            coro.close()
            raise
        ctx = ExecutionContext(self, rt.limiter, float(estimated_tokens), coro, rt.slots, priority, tenant)
        task = asyncio.create_task(self._execute(coro, ctx))
        self.active_tasks += 1
        self.pending_tasks.add(task)
        task.add_done_callback(ctx._done)
        return task

    def _back_off(self, wait: float) -> None:
        """Hold back every task of this process that starts from now on, at once: the fleet's
        cooldown follows one Redis round trip later."""
        wait = min(wait, self._cooldown_policy.max_pause)  # as the fleet's pause is capped
        if wait > 0:
            self._backoff_until = max(self._backoff_until, asyncio.get_running_loop().time() + wait)

    def _backoff_left(self) -> float:
        return self._backoff_until - asyncio.get_running_loop().time()

    async def _backoff_over(self) -> None:
        while (left := self._backoff_left()) > 0:
            await asyncio.sleep(left)

    @staticmethod
    async def _execute(coro: Coroutine[Any, Any, T], ctx: ExecutionContext) -> T:
        _current.set(ctx)  # in the task's own copy of the context
        limiter = ctx._limiter
        if type(limiter) is LocalLimiter and not ctx.scheduler._backoff_until:
            # the budget in this loop: a start that fits is granted without an await
            place = place_of(ctx.scheduler.budget, ctx._priority, ctx._tenant)
            got = limiter._enter(1.0, ctx.extra["estimated_tokens"], None, place)
            if isinstance(got, LocalLease):
                ctx.lease = got
            else:
                assert isinstance(got, Waiting)  # no max_wait: queued, never refused
                ctx.lease = await ctx._acquire(await limiter._wait(got))
        else:
            ctx.lease = await ctx._acquire()
        ctx._dispatched = True
        try:
            return await coro
        finally:
            lease = ctx.lease  # settled already when report_token_usage settled it
            if isinstance(lease, LocalLease):
                lease._release_now()
            else:
                await _release_quietly(lease)

    async def wait_pending(self) -> None:
        """Wait for every task started so far (their errors are left in the tasks)."""
        while self.pending_tasks:  # including any started meanwhile
            await asyncio.gather(*self.pending_tasks, return_exceptions=True)

    async def notify_rate_limit_exceeded(self, retry_after: float) -> None:
        """Pause the whole fleet for ``retry_after`` seconds (XtremeFlow's name; a coroutine here):
        this process's tasks at once, the others when the cooldown reaches Redis."""
        limiter = self._runtime().limiter
        self._back_off(validate_retry_after(self.budget, retry_after) or 0.0)
        await limiter.cooldown(retry_after=retry_after)

    async def aclose(self) -> None:
        """Wait for the pending tasks, then close this loop's limiter (and its connections).

        ``async with scheduler:`` does this on the way out, cancelling the tasks if the block failed.
        """
        await self.wait_pending()
        rt, self._rt = self._rt, None
        if rt is not None:
            await rt.limiter.aclose()

    async def __aenter__(self) -> TaskScheduler:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is not None:  # the block failed: its tasks are not waited for, as in a TaskGroup
            for task in self.pending_tasks:
                task.cancel()
        await self.aclose()


class RequestRateScheduler(TaskScheduler):
    """XtremeFlow's ``RequestRateScheduler``: ``max_rps`` (or ``max_rpm``) and concurrency, jointly.

    ``burst_ratio`` is seconds of credit: 0 paces one start every 1/rate; after idle,
    rate x burst_ratio + 1 start at once (a start is due once the budget is out of debt, as in
    XtremeFlow: the budget is made with ``overdraft=True``).
    """

    def __init__(
        self,
        max_rps: float | None = None,
        max_concurrency: int | None = None,
        burst_ratio: float = 0.0,
        *,
        max_rpm: float | None = None,
        redis: RedisLike | None = None,
        name: str | None = None,
        cooldown_policy: CooldownPolicy | None = None,
        priorities: Mapping[str, int] | None = None,
        default_priority: str | None = None,
        tenants: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
    ) -> None:
        self._setup(
            max_concurrency=max_concurrency,
            redis=redis,
            name=name,
            cooldown_policy=cooldown_policy,
            priorities=priorities,
            default_priority=default_priority,
            tenants=tenants,
            default_weight=default_weight,
            rps=max_rps,
            rpm=max_rpm,
            burst_ratio=burst_ratio,
        )


class TokenRateScheduler(RequestRateScheduler):
    """XtremeFlow's ``TokenRateScheduler``: tokens, requests and concurrency, reserved jointly.

    ``start_task(coro, estimated_tokens=n)`` reserves ``n`` tokens (more than the bucket holds:
    granted when it is full, the excess charged as debt); ``report_token_usage(actual)`` inside the
    task refunds an over-estimate or charges the rest.
    """

    def __init__(
        self,
        max_tps: float | None = None,
        max_rps: float | None = None,
        max_concurrency: int | None = None,
        burst_ratio: float = 0.0,
        *,
        max_tpm: float | None = None,
        max_rpm: float | None = None,
        redis: RedisLike | None = None,
        name: str | None = None,
        cooldown_policy: CooldownPolicy | None = None,
        priorities: Mapping[str, int] | None = None,
        default_priority: str | None = None,
        tenants: Mapping[str, float] | None = None,
        default_weight: float = 1.0,
    ) -> None:
        self._setup(
            max_concurrency=max_concurrency,
            redis=redis,
            name=name,
            cooldown_policy=cooldown_policy,
            priorities=priorities,
            default_priority=default_priority,
            tenants=tenants,
            default_weight=default_weight,
            rps=max_rps,
            rpm=max_rpm,
            tps=max_tps,
            tpm=max_tpm,
            burst_ratio=burst_ratio,
        )


async def report_token_usage(actual: float) -> None:
    """Settle the running task's lease with the tokens really used: refund or debt; once only.

    A second call in the same attempt changes nothing. Outside a task started by ``start_task``
    it raises ``OutsideTaskError``.
    """
    ctx = _current.get()
    if ctx is None:
        raise OutsideTaskError("report_token_usage must be called inside a task started by a scheduler's start_task")
    if ctx.lease is None:
        raise OutsideTaskError("report_token_usage was called before the task's lease was granted")
    await ctx.lease.report(actual_tokens=actual)  # validates, then a no-op if already settled


def _wait_of(exc: BaseException) -> float | None:
    """The provider's wait carried by an exception: ``retry_after``, else its response's headers."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) and value >= 0 else None
    headers = getattr(getattr(exc, "response", None), "headers", None)
    if isinstance(headers, Mapping):
        return parse_retry_after(headers)
    return None


def auto_backoff(
    retry_for: type[Exception] | Sequence[type[Exception]] | None = None,
    max_retries: int = 3,
    base_retry_after: float = 2.0,
    exponential: bool = True,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Coroutine[Any, Any, T]]]:
    """Retry a call that raises ``retry_for`` (default ``RetryException``) up to ``max_retries`` times.

    Each retry pauses the whole fleet (``limiter.cooldown``) for the exception's ``retry_after``
    (or its response's ``retry-after``), else ``base_retry_after`` doubled per attempt when
    ``exponential``; then the failed attempt is settled at its estimate and the retry acquires
    again, so every attempt is charged. Outside a task started by ``start_task`` it does not
    retry, as in XtremeFlow: there is no budget to charge. A 429 whose body says the quota is
    spent (OpenAI's ``insufficient_quota``) is never retried and pauses nothing: it raises
    ``QuotaExhaustedError`` from the call's exception.
    """
    types: tuple[type[Exception], ...]
    if retry_for is None:
        types = (RetryException,)
    elif isinstance(retry_for, type):
        types = (retry_for,)
    else:
        types = tuple(retry_for)
    if not types or not all(isinstance(t, type) and issubclass(t, Exception) for t in types):
        raise ConfigurationError(f"retry_for must be exception classes, not {retry_for!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ConfigurationError(f"max_retries must be a whole number, zero or more, not {max_retries!r}")
    if (
        isinstance(base_retry_after, bool)
        or not isinstance(base_retry_after, int | float)
        or not math.isfinite(base_retry_after)
        or base_retry_after < 0
    ):
        raise ConfigurationError(f"base_retry_after must be finite seconds, zero or more, not {base_retry_after!r}")

    def decorator(func: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        @functools.wraps(func)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            attempt = 0
            while True:
                try:
                    return await func(*args, **kwargs)
                except types as exc:
                    ctx = _current.get()
                    quota = quota_in_exception(exc)
                    if isinstance(exc, QuotaExhaustedError):
                        raise
                    if quota is not None:
                        budget = ctx.scheduler.budget.name if ctx is not None else None
                        raise quota_error(budget, quota) from exc
                    if attempt >= max_retries or ctx is None:
                        raise
                    wait = _wait_of(exc)
                    if wait is None:
                        wait = base_retry_after * (2**attempt if exponential else 1)
                    attempt += 1
                    log.warning("Retrying in %.1fs (attempt %d/%d): %s", wait, attempt, max_retries, exc)
                    await ctx._retry(wait)

        return wrapper

    return decorator
