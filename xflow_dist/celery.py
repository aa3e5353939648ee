"""Celery tasks that share one budget across a whole worker fleet.

Celery's own ``rate_limit`` is per worker and counts tasks, not tokens; this makes every worker
on every host draw from one budget in Redis::

    from xflow_dist import Budget
    from xflow_dist.celery import rate_limited_task

    @rate_limited_task(app, budget=Budget("openai", rpm=10_000, tpm=2_000_000, burst=60),
                       redis="redis://redis:6379/0",
                       cost=lambda prompt, max_tokens: len(prompt) // 4 + max_tokens)
    def summarise(self, prompt, max_tokens):
        reply = call_the_model(prompt, max_tokens)
        self.lease.report(actual_tokens=reply["usage"]["total_tokens"])  # or just return the reply
        return reply

Before the body runs the task acquires its cost. A wait up to ``TaskPolicy.max_wait`` is slept in
place; a longer one re-queues the task with ``self.retry(countdown=<the wait>)`` without counting
it against ``max_retries``, so the worker slot serves other tasks meanwhile. The lease is settled
on every way out: with the usage the body reported or returned, else at the estimate (failure,
retry, ``soft_time_limit``); a prefork child terminated by SIGTERM (revocation with
``terminate=True``, a hard time limit, a cold shutdown) releases what it holds before it dies,
and a SIGKILLed one's leases expire within the budget's ``lease_ttl``. A provider 429 (an
exception with ``status_code`` 429 or a ``response`` whose ``status_code`` is 429, as openai's
``RateLimitError`` and httpx's / httpx2's ``HTTPStatusError`` have, or one of
``TaskPolicy.rate_limit_errors``) starts the fleet-wide cooldown and retries the task after it;
those retries do count against ``max_retries``. A 429 whose body says the account's quota is spent
(OpenAI's ``insufficient_quota``) neither pauses the fleet nor retries: the task fails with
``QuotaExhaustedError`` (its cause the provider's exception), its lease settled at zero tokens.

Limiters are made lazily, one per budget in each worker process (after the fork), and closed at
worker shutdown. Nothing here reads the environment: pass ``Settings`` values in (see
``xflow_dist.settings`` and ``workers/``).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import math
import os
import select
import signal
import sys
import tempfile
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Literal, cast

try:
    from celery import Task  # type: ignore[import-untyped]
    from celery import signals as celery_signals
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.celery needs celery: pip install 'xflow-dist[celery]'") from exc

from ._backend import RedisLike
from ._base import _TICKET as TICKET_ID
from ._budget import Budget, CooldownPolicy
from ._core import CooldownReply
from ._exceptions import AcquireTimeout, BudgetUnavailableError, ConfigurationError, QuotaExhaustedError, XflowError
from ._headers import parse_retry_after
from ._lease import Lease
from ._limiter import Limiter
from ._outage import OutagePolicy, outage_policy
from ._quota import quota_error, quota_in_exception

__all__ = ["RateLimitedTask", "TaskPolicy", "limiter_for", "openai_usage", "rate_limited_task", "serve_metrics"]

log = logging.getLogger("xflow_dist.celery")


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskPolicy:
    """How a rate-limited task waits, and what it takes for the provider's 429.

    ``max_wait``: seconds a task may sleep in its worker slot for the budget; a longer wait re-queues
    it (0: never sleep). ``max_countdown``: the longest re-queue delay (a task that comes back early
    simply re-queues again); None: half the broker's ``visibility_timeout`` when one is configured,
    so that a delayed message is never redelivered as if its worker had died. ``rate_limit_errors``:
    exception types that mean 429 besides the ones recognised by their status code (an optional
    ``retry_after`` attribute, in seconds, is honoured). ``cooldown``: the limiter's cooldown policy.
    ``outage``: what the tasks do while Redis does not answer (``OutagePolicy`` or its mode: "local",
    the default, runs each worker process on its share; "closed" re-queues every task until Redis
    answers; see docs/reliability.md).
    """

    max_wait: float = 2.0
    max_countdown: float | None = None
    rate_limit_errors: tuple[type[BaseException], ...] = ()
    cooldown: CooldownPolicy | None = field(default=None)
    outage: OutagePolicy | str | None = field(default=None)

    def __post_init__(self) -> None:
        for name in ("max_wait", "max_countdown"):
            value = getattr(self, name)
            if value is None and name == "max_countdown":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ConfigurationError(f"{name} must be finite seconds, zero or more, not {value!r}")
        if self.max_countdown == 0:
            raise ConfigurationError("max_countdown must be more than zero (or None)")
        if not isinstance(self.rate_limit_errors, tuple) or not all(
            isinstance(t, type) and issubclass(t, BaseException) for t in self.rate_limit_errors
        ):
            raise ConfigurationError(
                f"rate_limit_errors must be a tuple of exception types, not {self.rate_limit_errors!r}"
            )
        if self.cooldown is not None and not isinstance(self.cooldown, CooldownPolicy):
            raise ConfigurationError(f"cooldown must be a CooldownPolicy, not {self.cooldown!r}")
        outage_policy(self.outage)  # refused here, not at the first task


# ----------------------------------------------------------------------------------------------
# One limiter per budget per process, made after the fork; held leases known for the way out.

_lock = threading.Lock()
_limiters: dict[Hashable, Limiter] = {}
_held: set[Lease] = set()


def _after_fork_in_child() -> None:
    """A forked child inherits the parent's limiters without their threads: forget them."""
    global _lock, _exit_releaser
    _lock = threading.Lock()
    _limiters.clear()
    _held.clear()
    if _exit_releaser is not None:
        _exit_releaser.forget()
        _exit_releaser = None


def limiter_for(
    budget: Budget,
    redis: RedisLike,
    cooldown: CooldownPolicy | None = None,
    outage: OutagePolicy | str | None = None,
) -> Limiter:
    """This process's limiter for ``budget`` on ``redis``, made on first use and shared by its tasks."""
    policy = outage_policy(outage)
    key = (budget, redis if isinstance(redis, str) else id(redis), cooldown, policy)
    with _lock:
        limiter = _limiters.get(key)
        if limiter is None:
            limiter = _limiters[key] = Limiter(budget, redis, cooldown_policy=cooldown, outage=policy)
        return limiter


def _release(leases: list[Lease]) -> None:
    for lease in leases:
        try:
            lease.release()
        except XflowError as exc:
            log.warning("could not release lease %s at exit: %s", lease.id, exc)


def _release_held(timeout: float) -> None:
    """Settle every lease this process holds at its estimate, within ``timeout`` seconds.

    Takes no lock here (``set.copy`` is one step under the GIL) and releases from a thread of its
    own: if the Redis client is stuck or its locks are taken, the thread gives up at ``timeout``
    and the leases expire with their TTL.
    """
    leases = list(_held.copy())
    if leases:
        worker = threading.Thread(target=_release, args=(leases,), name="xflow-release", daemon=True)
        worker.start()
        worker.join(timeout)


class _ExitReleaser:
    """A thread, started before any signal can come, that releases the held leases when asked.

    A signal handler runs in the main thread between two of its bytecodes, perhaps while that
    thread holds a lock, ours or any other (``threading`` takes one to start a thread). So the
    handler takes none: it writes a byte to a pipe and polls another for the answer, system calls
    that lock nothing and that a second signal may interrupt and re-enter safely.
    """

    def __init__(self) -> None:
        self._ask_r, self._ask_w = os.pipe()
        self._done_r, self._done_w = os.pipe()
        for fd in (self._ask_w, self._done_r, self._done_w):
            os.set_blocking(fd, False)  # a write never blocks; an answer is polled for
        self._thread = threading.Thread(target=self._serve, name="xflow-exit-release", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while os.read(self._ask_r, 1):
            _release(list(_held.copy()))
            with contextlib.suppress(BlockingIOError):
                os.write(self._done_w, b"\0")

    def release(self, timeout: float) -> bool:
        """From a signal handler: have the held leases released; True if done within ``timeout``."""
        with contextlib.suppress(BlockingIOError):
            os.write(self._ask_w, b"\0")
        poller = select.poll()
        poller.register(self._done_r, select.POLLIN)
        if not poller.poll(timeout * 1000):  # PEP 475: resumed, with the time left, after a signal
            return False
        with contextlib.suppress(BlockingIOError):
            os.read(self._done_r, 64)
        return True

    def forget(self) -> None:
        """In a forked child: the thread did not come along; close the inherited pipes."""
        for fd in (self._ask_r, self._ask_w, self._done_r, self._done_w):
            with contextlib.suppress(OSError):
                os.close(fd)


_exit_releaser: _ExitReleaser | None = None
os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_all() -> None:
    with _lock:
        limiters = list(_limiters.values())
        _limiters.clear()
    for limiter in limiters:
        try:
            limiter.close()
        except Exception as exc:  # shutting down: say so and go on
            log.warning("closing limiter of budget %s: %s", limiter.budget.name, exc)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    releaser = _exit_releaser
    if releaser is not None:
        releaser.release(timeout=2.0)
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # die of the signal, exactly as without this handler


def _on_process_init(**_: Any) -> None:
    # Prefork children only (this signal is sent nowhere else): Celery resets SIGTERM to its
    # default there, so a terminated child would die holding its leases.
    global _exit_releaser
    if _exit_releaser is None:
        _exit_releaser = _ExitReleaser()
    signal.signal(signal.SIGTERM, _on_sigterm)


def _on_shutdown(**_: Any) -> None:
    _release_held(timeout=5.0)
    _close_all()


def serve_metrics(
    port: int, *, redis: RedisLike | None = None, budgets: Sequence[str] | None = None, addr: str = "0.0.0.0"
) -> None:
    """Count this worker node's tasks in Prometheus and serve them on ``addr:port`` (``/metrics``).

    Call it where the app is defined, before the worker starts. Prefork children count into
    ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory when unset); the node's main process
    serves their sum from ``worker_init`` on, with the budgets' gauges read from ``redis``
    (default: the app's ``xflow_redis_url``); a child that exits is marked dead so that its
    live-only values drop out. Needs the ``metrics`` extra.
    """
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        if "prometheus_client" in sys.modules:
            raise ConfigurationError(
                "serve_metrics needs PROMETHEUS_MULTIPROC_DIR set before prometheus_client is imported: "
                "set it in the worker's environment"
            )
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="xflow-metrics-")
    from . import metrics

    metrics.enable()  # before the pool forks: every child inherits the counting

    def start(sender: Any = None, **_: Any) -> None:
        url = redis
        if url is None and sender is not None:
            url = getattr(getattr(sender, "app", None), "conf", {}).get("xflow_redis_url")
        metrics.serve(port, redis=url, budgets=budgets, addr=addr)

    def child_gone(**_: Any) -> None:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]

    celery_signals.worker_init.connect(start, weak=False, dispatch_uid="xflow_dist.metrics_serve")
    celery_signals.worker_process_shutdown.connect(child_gone, weak=False, dispatch_uid="xflow_dist.metrics_dead")


celery_signals.worker_process_init.connect(_on_process_init, weak=False, dispatch_uid="xflow_dist.process_init")
celery_signals.worker_process_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="xflow_dist.process_down")
celery_signals.worker_shutdown.connect(_on_shutdown, weak=False, dispatch_uid="xflow_dist.worker_down")


# ----------------------------------------------------------------------------------------------
# Reading the provider's refusal and the body's usage.


@dataclass(frozen=True, slots=True)
class _Throttled:
    retry_after: float | None


def _throttled(exc: BaseException, types: tuple[type[BaseException], ...]) -> _Throttled | None:
    """None unless ``exc`` is a provider's 429: one of ``types``, anything with ``status_code``
    429 (openai's ``RateLimitError``) or a ``response`` with it (httpx's / httpx2's ``HTTPStatusError``)."""
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    if not (types and isinstance(exc, types)) and status != 429:
        return None
    hint = getattr(exc, "retry_after", None)
    if isinstance(hint, int | float) and not isinstance(hint, bool) and math.isfinite(hint) and hint >= 0:
        return _Throttled(float(hint))
    headers = getattr(response, "headers", None)
    if isinstance(headers, Mapping):
        with contextlib.suppress(Exception):  # a malformed header is no hint, not a second failure
            return _Throttled(parse_retry_after(headers))
    return _Throttled(None)


def openai_usage(result: Any) -> float | None:
    """``usage.total_tokens`` of an OpenAI-shaped reply (a dict, or an object such as the SDK's), or None."""
    usage = result.get("usage") if isinstance(result, Mapping) else getattr(result, "usage", None)
    total = usage.get("total_tokens") if isinstance(usage, Mapping) else getattr(usage, "total_tokens", None)
    if isinstance(total, int | float) and not isinstance(total, bool) and math.isfinite(total) and total >= 0:
        return float(total)
    return None


# ----------------------------------------------------------------------------------------------
# The task.


@dataclass(slots=True)
class _Run:
    """One execution's state; the request context and its copies share it by reference."""

    limiter: Limiter
    lease: Lease
    cooldown: CooldownReply | None = None
    priority: str | None = None  # the task's class: its transport's later calls take it too
    tenant: str | None = None  # whose task it is: likewise


class _LeaseFirst:
    """The limiter a task's transport sees: its first call is paid by the task's lease, later calls
    acquire as usual, and a cooldown it starts is remembered so the task does not start another."""

    def __init__(self, run: _Run) -> None:
        self._run = run
        self._first: Lease | None = run.lease

    def acquire(
        self,
        tokens: float = 0,
        *,
        requests: float = 1,
        timeout: float | None = None,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> Lease:
        lease, self._first = self._first, None
        if lease is not None and not lease.closed:
            return lease
        run = self._run
        priority = run.priority if priority is None else priority
        tenant = run.tenant if tenant is None else tenant
        return run.limiter.acquire(tokens, requests=requests, timeout=timeout, priority=priority, tenant=tenant)

    def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        reply = self._run.limiter.cooldown(retry_after)
        self._run.cooldown = reply
        return reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run.limiter, name)


def _static(task: Any, name: str) -> Any:
    """A task option as given: Celery makes options class attributes, where a plain function
    would turn into a method."""
    value = inspect.getattr_static(task, name)
    return value.__func__ if isinstance(value, staticmethod) else value


class RateLimitedTask(Task):  # type: ignore[misc]
    """A Celery task that acquires its cost from a shared budget before its body runs.

    Options (class attributes, or keywords of ``app.task(base=RateLimitedTask, ...)``):
    ``budget`` (a ``Budget``, or a callable returning one), ``redis`` (URL or client, or a
    callable; default the app's ``xflow_redis_url`` setting), ``cost`` (tokens: a number or a
    callable of the task's arguments), ``requests`` (likewise, default 1), ``policy``
    (``TaskPolicy``), ``usage`` (reads the tokens used from the body's return value; default
    ``openai_usage``; None to settle at the estimate unless the body reports),
    ``priority_class`` (the budget's priority class of the task: a name or a callable of the task's
    arguments; Celery's own ``priority`` is the broker's, which this does not touch), ``tenant``
    (whose task it is, on a budget shared by tenant: a name or a callable of the task's arguments).
    """

    budget: Budget | Callable[[], Budget] | None = None
    redis: RedisLike | Callable[[], RedisLike] | None = None
    cost: float | Callable[..., float] = 0
    requests: float | Callable[..., float] = 1
    policy: TaskPolicy = TaskPolicy()
    usage: Callable[[Any], float | None] | None = staticmethod(openai_usage)
    priority_class: str | Callable[..., str | None] | None = None
    tenant: str | Callable[..., str | None] | None = None

    # -- what the body uses ---------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        """The lease this execution holds (None outside the body): ``self.lease.report(...)``."""
        run = getattr(self.request, "xflow_run", None)
        return run.lease if isinstance(run, _Run) else None

    @property
    def limiter(self) -> Limiter:
        """This process's limiter for the task's budget."""
        budget = _static(self, "budget")
        if budget is not None and not isinstance(budget, Budget):
            budget = budget()
        if not isinstance(budget, Budget):
            raise ConfigurationError(f"task {self.name} needs a budget (a Budget or a callable returning one)")
        where = _static(self, "redis")
        if where is not None and not isinstance(where, str) and callable(where):
            where = where()
        if where is None:
            where = self.app.conf.get("xflow_redis_url")
        if where is None:
            raise ConfigurationError(f"task {self.name} needs redis= (or the app setting xflow_redis_url)")
        policy = self._policy()
        return limiter_for(budget, where, policy.cooldown, policy.outage)

    def transport(self, inner: Any = None, *, http: Literal["httpx", "httpx2"] = "httpx", **options: Any) -> Any:
        """A ``RateLimitedTransport`` whose first call is paid by this task's lease.

        It settles the lease with the reply's usage and the provider's headers, and returns a 429
        to the body (``max_retries=0``): ``raise_for_status()`` then retries the task after the
        fleet-wide cooldown the transport started. ``inner`` stays the caller's: closing the
        client does not close it, so one per process can keep its connections. ``http="httpx2"``
        gives the transport for httpx2 (the openai SDK 3.x).
        """
        run = getattr(self.request, "xflow_run", None)
        if not isinstance(run, _Run):
            raise RuntimeError("transport() is for the body of a rate-limited task")
        module = importlib.import_module(f"xflow_dist.{http}")
        base = module.RateLimitedTransport
        if inner is None:
            return base(cast(Limiter, _LeaseFirst(run)), None, max_retries=0, **options)
        return _keeping(base)(cast(Limiter, _LeaseFirst(run)), inner, max_retries=0, **options)

    # -- the wrapper ----------------------------------------------------------------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.request_stack.top is None:  # called as a function: give it a context of its own
            self.push_request(args=args, kwargs=kwargs)
            try:
                return self.__call__(*args, **kwargs)
            finally:
                self.pop_request()
        limiter = self.limiter
        request = self.request
        lease: Lease | None = None
        run: _Run | None = None
        try:
            priority, tenant = self._named("priority_class", args, kwargs), self._named("tenant", args, kwargs)
            lease = self._admit(
                limiter, self._price("cost", args, kwargs), self._price("requests", args, kwargs), priority, tenant
            )
            run = _Run(limiter, lease, priority=priority, tenant=tenant)
            _held.add(lease)  # one step under the GIL: no lock, which a signal handler could find taken
            request.xflow_run = run  # the body's context is a copy of this one: it sees the same run
            result = super().__call__(*args, **kwargs)
        except BaseException as exc:
            quota = quota_in_exception(exc)
            if quota is not None and run is not None:
                self._after_quota(run, quota, exc)  # raises QuotaExhaustedError: no pause, no retry
            found = _throttled(exc, self._policy().rate_limit_errors) if run is not None else None
            if run is not None and found is not None:
                self._after_429(run, found, exc)  # raises Retry, or exc itself once out of retries
            raise
        else:
            self._settle(run.lease, result)
            return result
        finally:
            if lease is not None:
                _held.discard(lease)
                try:
                    lease.release()  # at the estimate, unless the body or _settle settled it already
                except XflowError as exc:
                    log.warning("could not release lease %s (it expires with its TTL): %s", lease.id, exc)
            request.xflow_run = None

    def _policy(self) -> TaskPolicy:
        policy = _static(self, "policy")
        if not isinstance(policy, TaskPolicy):
            raise ConfigurationError(f"task {self.name}: policy must be a TaskPolicy, not {policy!r}")
        return policy

    def _price(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        value = _static(self, name)
        return cast(float, value(*args, **kwargs) if callable(value) else value)  # the limiter validates it

    def _named(self, option: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        """A priority class or tenant: the option, or its callable's answer for these arguments."""
        value = _static(self, option)
        return cast(str | None, value(*args, **kwargs) if callable(value) else value)  # the limiter validates it

    def _admit(
        self, limiter: Limiter, tokens: float, requests: float, priority: str | None = None, tenant: str | None = None
    ) -> Lease:
        request = self.request
        if request.called_directly or request.is_eager:
            # No worker slot to free, and eager retries ignore their countdown: wait here.
            return limiter.acquire(tokens, requests=requests, priority=priority, tenant=tenant)
        policy = self._policy()
        wait: float | None
        ticket: str | None = None
        try:
            # The task keeps its place in the fleet's queue while it is re-queued: it comes back to
            # the same ticket (a header of the re-sent message), so later tasks never pass it.
            try:
                return limiter.acquire(
                    tokens, requests=requests, timeout=max(policy.max_wait, KEEP_PLACE_WAIT), keep_place=True,
                    ticket=_ticket_of(request), priority=priority, tenant=tenant,
                )  # fmt: skip
            except AcquireTimeout as exc:
                wait, ticket = exc.retry_after, exc.ticket
        except BudgetUnavailableError:  # the "closed" outage policy: come back once Redis may answer
            wait = max(policy.max_wait, limiter.outage_policy.probe_interval, 1.0)
        if wait is None:  # queued behind others, or waiting for a slot: no exact answer
            # The estimate (the queue, this ticket included, at this task's cost) can run long, and
            # a task back after its turn leaves the budget idle for a claim window; back early, it
            # only re-parks (its place kept). So it comes back at half the estimate, less half its
            # max_wait, and waits in place for the rest (no floor); without an in-place wait, at
            # half the estimate, at least a short floor.
            queued = 0 if ticket is not None else 1
            estimate = _estimate_wait(limiter, tokens, requests, 0.0, queued, limiter.budget.lead(priority))
            if policy.max_wait > 0:
                wait = max(0.0, estimate / 2 - policy.max_wait / 2)
            else:
                wait = max(REQUEUE_FLOOR, estimate / 2)
        countdown = self._countdown(wait, policy)
        if ticket is not None:
            try:  # the ticket outlives the countdown; granted meanwhile, the task runs now
                lease = limiter.park(ticket, countdown, tokens, requests=requests, priority=priority, tenant=tenant)
            except XflowError as exc:
                log.warning("could not keep ticket %s in the queue (%s): the task comes back to a new one", ticket, exc)
                lease, ticket = None, None
            if lease is not None:
                return lease
        raise self._requeue(limiter, wait, countdown, ticket)

    def _countdown(self, wait: float, policy: TaskPolicy) -> float:
        """``wait``, capped below the broker's visibility timeout (or ``max_countdown``)."""
        countdown = max(0.0, wait)
        cap = policy.max_countdown
        if cap is None:
            visibility = (self.app.conf.broker_transport_options or {}).get("visibility_timeout")
            cap = visibility / 2.0 if isinstance(visibility, int | float) and visibility > 0 else None
        return countdown if cap is None else min(countdown, cap)

    def _requeue(self, limiter: Limiter, wait: float, countdown: float, ticket: str | None) -> BaseException:
        """Re-send this task to run after ``countdown`` seconds, keeping its retry count and its ticket."""
        name = limiter.budget.name
        reason = AcquireTimeout(
            f"budget {name!r} can grant this task in about {wait:.3f}s: re-queued", budget=name, retry_after=wait
        )
        request = self.request
        request.retries -= 1  # retry() sends retries + 1: the re-sent task keeps this count
        try:
            headers = {TICKET_HEADER: ticket} if ticket is not None else {}
            retry: BaseException = self.retry(countdown=countdown, exc=reason, throw=False, headers=headers)
        finally:
            request.retries += 1
        return retry

    def _after_quota(self, run: _Run, message: str, exc: BaseException) -> None:
        """Charge the refused call nothing and fail the task: waiting cannot buy quota back."""
        try:
            run.lease.report(actual_tokens=0)  # no-op if the transport settled it already
        except XflowError as err:
            log.warning("could not settle lease %s (it expires with its TTL): %s", run.lease.id, err)
        if isinstance(exc, QuotaExhaustedError):
            raise exc
        raise quota_error(run.limiter.budget.name, message) from exc

    def _after_429(self, run: _Run, found: _Throttled, exc: BaseException) -> None:
        """Charge the refused call nothing, pause the fleet, and retry after the pause (counted)."""
        try:
            run.lease.report(actual_tokens=0)  # a rejected call uses no tokens (no-op if settled)
            reply = run.cooldown or run.limiter.cooldown(found.retry_after)
            countdown = reply.remaining
        except XflowError as err:
            log.warning("429 seen but the cooldown could not be recorded: %s", err)
            countdown = found.retry_after if found.retry_after is not None else 1.0
        self.retry(exc=exc, countdown=countdown)

    def _settle(self, lease: Lease, result: Any) -> None:
        reader = _static(self, "usage")
        if lease.closed or reader is None:
            return
        try:
            used = reader(result)
            if used is not None:
                lease.report(actual_tokens=used)
        except XflowError as exc:
            log.warning("could not settle lease %s with its usage: %s", lease.id, exc)


_keepers: dict[type, type] = {}


def _keeping(base: type) -> type:
    """``base`` with a ``close`` that leaves the inner transport open (it belongs to the caller)."""
    with _lock:
        found = _keepers.get(base)
        if found is None:
            found = _keepers[base] = type(f"Task{base.__name__}", (base,), {"close": lambda self: None})
        return found


#: The shortest re-queue of a task that never waits in place (``max_wait=0``) and whose wait the
#: budget cannot tell: without it, a task behind a queue would bounce through the broker at once.
REQUEUE_FLOOR = 0.1


#: The message header that carries a re-queued task's ticket (its place in the fleet's queue).
TICKET_HEADER = "xflow_ticket"

#: The shortest in-place wait: a task with ``max_wait=0`` still joins the queue (and keeps its place).
KEEP_PLACE_WAIT = 0.001


def _ticket_of(request: Any) -> str | None:
    """The ticket a re-queued task left in the queue, from its message's headers."""
    found = getattr(request, TICKET_HEADER, None)
    if found is None and isinstance(getattr(request, "headers", None), Mapping):
        found = request.headers.get(TICKET_HEADER)
    return found if isinstance(found, str) and TICKET_ID.fullmatch(found) else None  # else: a new ticket


def _estimate_wait(
    limiter: Limiter, tokens: float, requests: float, floor: float, newcomer: int = 1, lead: int = 0
) -> float:
    """How long until this task fits, when the budget cannot say (a queue ahead, or a slot): the
    queue taken to cost what this task costs, plus ``newcomer`` (1: the task is not in the queue
    yet; 0: its kept ticket is, as its last), less what its class's ``lead`` put it ahead of (the
    queue's last arrivals, taken to be its waiters). At least ``floor``."""
    try:
        status = limiter.status()
    except XflowError:
        return floor
    budget = limiter.budget
    ahead = max(1, max(0, status.queued - lead) + newcomer)
    waits = [floor, status.cooldown_remaining]
    if budget.token_rate and status.tokens_available is not None:
        waits.append((ahead * tokens - status.tokens_available) / budget.token_rate)
    if budget.request_rate and status.requests_available is not None:
        waits.append((ahead * requests - status.requests_available) / budget.request_rate)
    return max(waits)


def rate_limited_task(
    app: Any,
    *,
    budget: Budget | Callable[[], Budget],
    cost: float | Callable[..., float] = 0,
    requests: float | Callable[..., float] = 1,
    redis: RedisLike | Callable[[], RedisLike] | None = None,
    policy: TaskPolicy | None = None,
    usage: Callable[[Any], float | None] | None = openai_usage,
    priority_class: str | Callable[..., str | None] | None = None,
    tenant: str | Callable[..., str | None] | None = None,
    **options: Any,
) -> Callable[[Callable[..., Any]], Any]:
    """``@app.task(bind=True, base=RateLimitedTask, ...)`` with a budget, a cost and a policy.

    ``options`` go to ``app.task`` as they are (``name``, ``max_retries``, ``acks_late``, ...).
    """
    options.setdefault("bind", True)
    options.setdefault("base", RateLimitedTask)
    return cast(
        Callable[[Callable[..., Any]], Any],
        app.task(
            budget=staticmethod(budget) if callable(budget) and not isinstance(budget, Budget) else budget,
            cost=staticmethod(cost) if callable(cost) else cost,
            requests=staticmethod(requests) if callable(requests) else requests,
            redis=staticmethod(redis) if callable(redis) and not isinstance(redis, str) else redis,
            policy=policy or TaskPolicy(),
            usage=staticmethod(usage) if usage is not None else None,
            priority_class=staticmethod(priority_class) if callable(priority_class) else priority_class,
            tenant=staticmethod(tenant) if callable(tenant) else tenant,
            **options,
        ),
    )
