"""``AsyncLimiter``: the asyncio twin of ``Limiter``, over the same core and the same scripts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import Awaitable, Generator
from types import TracebackType
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster

from ._backend import IO_TIMEOUT, AsyncClient, RedisLike, async_client
from ._base import _INHERITED, _LIVE, RETRY_FIRST, RETRY_MAX, Decision, LimiterBase, transient
from ._budget import Budget, CooldownPolicy
from ._cluster import subscriber
from ._core import (
    CooldownReply,
    SettleReply,
    Status,
    channel,
    decode_acquire,
    decode_configure,
    decode_cooldown,
    decode_extend,
    decode_settle,
    decode_status,
    script_error,
)
from ._events import Mailroom, Notice
from ._exceptions import AcquireTimeout, BackendError, BudgetConflictError, CostTooLargeError, XflowError
from ._flow import GiveBack, RunScript, acquire_flow
from ._headers import LimitFacts
from ._lease import AsyncLease
from ._scripts import register

log = logging.getLogger("xflow_dist")


class _Events:
    """One reader task per limiter: hands each queued acquirer the notices about its ticket."""

    def __init__(self, pubsub: Any) -> None:
        self._pubsub = pubsub
        self.mail: Mailroom[asyncio.Queue[Notice]] = Mailroom(asyncio.Queue)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, client: AsyncClient, name: str) -> _Events:
        pubsub = subscriber(client)  # on a cluster, one that moves to a live node after a failure
        await pubsub.subscribe(name)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the subscription is live before anyone relies on it
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "subscribe":
                break
        events = cls(pubsub)
        events._task = asyncio.create_task(events._read(), name="xflow-events")
        return events

    async def _read(self) -> None:
        delay = RETRY_FIRST
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=1.0)
            except (redis.RedisError, OSError, ValueError) as exc:
                if delay == RETRY_FIRST:
                    log.warning("xflow_dist events subscriber: %s; reconnecting", exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_FIRST
            if msg is None:
                continue
            for inbox, notice in self.mail.deliver(msg):
                inbox.put_nowait(notice)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._pubsub.aclose()


class _Acquiring:
    """What ``AsyncLimiter.acquire`` returns: await it for a lease, or use it with ``async with``."""

    def __init__(self, pending: Awaitable[AsyncLease]) -> None:
        self._pending = pending
        self._lease: AsyncLease | None = None

    def __await__(self) -> Generator[Any, None, AsyncLease]:
        return self._pending.__await__()

    async def __aenter__(self) -> AsyncLease:
        self._lease = await self._pending
        return self._lease

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lease is not None:
            await self._lease.release()


class AsyncLimiter(LimiterBase):
    """A budget shared through Redis, for asyncio code.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``), a ``redis.asyncio.Redis``
    client, or ``memory://`` for an in-process budget. Use one per event loop. Every call to a
    Redis made from a URL gives up after ``io_timeout`` seconds; a client passed in keeps its own
    timeouts. In a forked child it starts afresh (its own connections, no parent's leases).
    """

    def __init__(
        self,
        budget: Budget,
        redis: RedisLike,
        *,
        cooldown_policy: CooldownPolicy | None = None,
        ticket_ttl: float | None = None,
        io_timeout: float = IO_TIMEOUT,
    ) -> None:
        super().__init__(budget, cooldown_policy=cooldown_policy, ticket_ttl=ticket_ttl, io_timeout=io_timeout)
        self._target = redis
        self._client, self._owns = async_client(redis, self.io_timeout)
        self._scripts = register(self._client, self.io_timeout)
        self._events: _Events | None = None
        self._events_lock: asyncio.Lock | None = None
        self._held: dict[str, float] = {}  # lease id -> when its next heartbeat is due
        self._leases: weakref.WeakValueDictionary[str, AsyncLease] = weakref.WeakValueDictionary()
        self._finalizers: dict[str, weakref.finalize[Any, Any]] = {}
        self._retries: dict[str, asyncio.Task[None]] = {}
        self._beater: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        _LIVE.add(self)

    async def _run(self, op: str, argv: list[str]) -> Any:
        for attempt in (1, 2):
            try:
                return await self._scripts[op](keys=self._keys, args=self._argv(argv))
            except redis.ConnectionError as exc:  # a dead pooled connection fails at once: try a fresh one
                if attempt == 2:
                    raise script_error(self.budget, op, exc) from exc
            except redis.RedisError as exc:
                raise script_error(self.budget, op, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _hub(self) -> _Events:
        if self._events_lock is None:
            self._events_lock = asyncio.Lock()
        async with self._events_lock:
            if self._events is None:
                try:
                    self._events = await _Events.start(self._client, channel(self.budget))
                except redis.RedisError as exc:
                    raise BackendError(f"cannot subscribe to budget events: {exc}", budget=self.budget.name) from exc
            return self._events

    def acquire(self, tokens: float = 0, *, requests: float = 1, timeout: float | None = None) -> _Acquiring:
        """Wait for ``requests`` and ``tokens`` and a concurrency slot, all together.

        ``async with limiter.acquire(tokens=n) as lease:`` or ``lease = await limiter.acquire(...)``.
        Waits in first-come-first-served order across the fleet; raises ``AcquireTimeout`` at
        once when the budget can tell the start would come after ``timeout``, or at the deadline.
        Bad input raises here, before anything is awaited.
        """
        lease_id, requests, tokens = self._prepare(requests, tokens, timeout)
        return _Acquiring(self._acquire(lease_id, requests, tokens, timeout))

    async def _acquire(self, lease_id: str, requests: float, tokens: float, timeout: float | None) -> AsyncLease:
        hub = await self._hub()
        inbox = hub.mail.expect(lease_id)
        flow = acquire_flow(self.budget, lease_id, requests, tokens, timeout, self.ticket_ttl)
        try:
            step = next(flow)
            while True:
                if isinstance(step, RunScript):
                    step = flow.send(await self._run(step.op, step.argv))
                elif isinstance(step, GiveBack):
                    await self._give_back(step.lease_id, now=True)
                    step = flow.send(None)
                else:
                    notice = None
                    # not asyncio.wait_for: on 3.11 it can swallow a cancel that meets a notice
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step.timeout):
                            notice = await inbox.get()
                    step = flow.send(notice)
        except StopIteration:
            pass
        except (AcquireTimeout, CostTooLargeError, BudgetConflictError):
            raise
        except BackendError as exc:
            await self._give_back(lease_id, now=not transient(exc))
            raise
        except BaseException:
            await self._give_back(lease_id, now=True)
            raise
        finally:
            hub.mail.forget(lease_id)
        return self._hold(lease_id, requests, tokens)

    async def try_acquire(self, tokens: float = 0, *, requests: float = 1) -> Decision[AsyncLease]:
        """Take a grant only if it fits now with nobody queued ahead; never waits, never queues."""
        lease_id, requests, tokens = self._prepare(requests, tokens, None)
        try:
            reply = decode_acquire(await self._run("acquire", self._try_args(lease_id, requests, tokens)))
        except BackendError as exc:
            if transient(exc):  # the grant may have happened with its reply lost
                await self._give_back(lease_id, now=False)
            raise
        if reply.kind != "granted":
            return self._refused(reply, requests, tokens)
        return Decision(True, self._hold(lease_id, requests, tokens))

    def _hold(self, lease_id: str, requests: float, tokens: float) -> AsyncLease:
        lease = AsyncLease(self, lease_id, requests, tokens)
        self._held[lease_id] = time.monotonic() + self.heartbeat_interval
        self._leases[lease_id] = lease
        # dropped without being settled: settle at the estimate (the call may have gone out), on this loop
        loop = asyncio.get_running_loop()
        self._finalizers[lease_id] = fin = weakref.finalize(lease, self._dropped, loop, lease_id)
        fin.atexit = False  # no loop runs at exit: what is held then expires with its TTL
        if self._beater is None or self._beater.done():
            self._beater = asyncio.create_task(self._beat(), name="xflow-heartbeat")
        return lease

    def _dropped(self, loop: asyncio.AbstractEventLoop, lease_id: str) -> None:
        self._finalizers.pop(lease_id, None)
        self._held.pop(lease_id, None)
        if not loop.is_closed():
            argv = self._settle_args(lease_id, None)
            loop.call_soon_threadsafe(self._later, "settle", argv, lease_id)

    async def _beat(self) -> None:
        """One task per limiter extends every held lease each third of its TTL."""
        while self._held:
            now = time.monotonic()
            due = [lid for lid, at in self._held.items() if at <= now]
            if not due:
                await asyncio.sleep(min(self._held.values()) - now)
                continue
            for lid in due:
                self._held[lid] = now + self.heartbeat_interval
            for lid in due:
                lease = self._leases.get(lid)
                if lease is None or lease.closed:
                    self._held.pop(lid, None)
                    continue
                try:
                    expiry = decode_extend(await self._run("extend", [lid]))
                except XflowError as exc:  # a backend failure, or limits reconfigured meanwhile
                    log.warning("heartbeat of lease %s failed: %s", lid, exc)
                    continue
                if expiry is None:
                    lease.lost = True
                    self._held.pop(lid, None)
                    log.warning("lease %s of budget %s expired before it was settled", lid, self.budget.name)

    def _later(self, op: str, argv: list[str], key: str) -> None:
        """Retry ``op`` in the background until it lands or the lease or ticket is gone anyway."""
        self._held.pop(key, None)
        old = self._retries.pop(key, None)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(self._retry(op, argv, time.monotonic() + self.retry_window))
        self._retries[key] = task
        task.add_done_callback(lambda t: self._retries.pop(key, None) if self._retries.get(key) is t else None)

    async def _retry(self, op: str, argv: list[str], give_up: float) -> None:
        delay = RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            try:
                await self._run(op, argv)
                return
            except BackendError as exc:
                if not transient(exc) or time.monotonic() >= give_up:
                    log.warning("gave up retrying %s: %s", op, exc)
                    return
            delay = min(RETRY_MAX, delay * 2)

    async def _finish(self, lease: AsyncLease, op: str, argv: list[str]) -> SettleReply | None:
        """Settle or cancel; on a transient failure it is retried in the background and None returned."""
        self._held.pop(lease.id, None)
        fin = self._finalizers.pop(lease.id, None)
        if fin is not None:
            fin.detach()
        try:
            raw = await self._run(op, argv)
        except asyncio.CancelledError:
            # The caller is being cancelled: the settle still goes out, in the background.
            self._later(op, argv, lease.id)
            raise
        except BackendError as exc:
            if not transient(exc):
                raise
            log.warning("%s of lease %s failed (%s); retrying in the background", op, lease.id, exc)
            self._later(op, argv, lease.id)
            return None
        return decode_settle(raw) if op == "settle" else None

    async def _give_back(self, lease_id: str, *, now: bool) -> None:
        """Cancel a ticket or a grant not handed out; once now if ``now``, else (and on failure) later."""
        if now:
            try:
                await asyncio.shield(self._run("cancel", [lease_id]))
                return
            except BackendError as exc:
                log.warning("could not give back reservation %s: %s; retrying in the background", lease_id, exc)
            except asyncio.CancelledError:
                self._later("cancel", [lease_id], lease_id)
                raise
        self._later("cancel", [lease_id], lease_id)

    async def learn(
        self,
        facts: LimitFacts | None = None,
        *,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        model: str = "",
    ) -> SettleReply:
        """Learn from a provider's reply that holds no lease (a call made outside the budget).

        ``facts`` are its parsed headers (``parse_limit_headers``); keywords override them. Limits are
        per minute, learned for ``model`` (each model its own); what remains caps the shared levels.
        Returns the limits in force after it.
        """
        argv = self._learn_args(facts, limit_requests, limit_tokens, remaining_requests, remaining_tokens, model)
        return decode_settle(await self._run("settle", argv))

    async def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause the whole fleet (honouring ``retry_after`` seconds if given)."""
        return decode_cooldown(await self._run("cooldown", self._cooldown_args(retry_after)))

    async def reconfigure(self, budget: Budget) -> str | None:
        """Change this budget's limits for the whole fleet, live, to ``budget``'s (the same name).

        Redis stores the new limits and rescales the buckets without inventing credit; from then on
        every process still using the old limits is refused with ``BudgetConflictError``. Returns the
        limits stored before (described), or None where none were.
        """
        old = self._adopt(budget)
        try:
            return decode_configure(await self._run("configure", []))
        except BaseException:
            self._adopt(old)
            raise
    async def clear_cooldown(self) -> CooldownReply:
        """End the fleet-wide pause now and reset its backoff; the buckets stay as the 429 left them,
        so dispatch resumes paced. Returns the pause that was ended (``remaining`` 0: none)."""
        return self._cleared(await self._run("clear_cooldown", []))

    async def status(self) -> Status:
        """A read-only snapshot: levels, leases in flight, queue, cooldown."""
        return decode_status(self.budget, await self._run("status", []))

    async def aclose(self) -> None:
        """Give back the leases still held (settled at their estimate), wait for the settles still
        being retried (one more try each), stop the background tasks; close the client if this
        limiter made it."""
        _LIVE.discard(self)
        held = [lease for lid in list(self._held) if (lease := self._leases.get(lid)) is not None]
        self._held.clear()
        if self._beater is not None:
            self._beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beater
        for lease in held:
            if lease._close():
                with contextlib.suppress(BackendError):
                    await self._finish(lease, "settle", self._settle_args(lease.id, None))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._retries:
            await asyncio.wait(list(self._retries.values()), timeout=self.io_timeout * 2)
            for task in list(self._retries.values()):
                task.cancel()
        if self._events is not None:
            await self._events.aclose()
            self._events = None
        if self._owns:
            await self._client.aclose()

    def _after_fork(self) -> None:
        # The parent's loop, tasks and sockets are not ours: drop them unclosed, start afresh on first use.
        for fin in self._finalizers.values():
            fin.detach()
        self._finalizers = {}
        self._held = {}
        self._leases = weakref.WeakValueDictionary()
        self._retries = {}
        self._background = set()
        self._beater = None
        self._events = None
        self._events_lock = None
        if self._owns:
            _INHERITED.append(self._client)  # never closed here: its sockets are the parent's
            self._client, _ = async_client(self._target, self.io_timeout)
            self._scripts = register(self._client, self.io_timeout)

    async def __aenter__(self) -> AsyncLimiter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
