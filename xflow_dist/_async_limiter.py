"""``AsyncLimiter``: the asyncio twin of ``Limiter``, over the same core and the same scripts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
import weakref
from collections.abc import Awaitable, Generator, Mapping
from types import TracebackType
from typing import Any, Generic, Protocol, TypeVar

import redis
import redis.asyncio
import redis.asyncio.cluster

from . import _observe as observe
from ._backend import IO_TIMEOUT, RedisLike, async_client
from ._base import (
    _INHERITED,
    _LIVE,
    RETRY_FIRST,
    RETRY_MAX,
    Decision,
    LimiterBase,
    _check_seconds,
    away_id,
    gate_size,
    left,
    new_id,
    own_channel,
    transient,
)
from ._budget import Budget, CooldownPolicy, Level
from ._cluster import async_subscribers, subscriber
from ._core import (
    ANYWHERE,
    CooldownReply,
    Place,
    SettleReply,
    Status,
    adopted,
    channel,
    decode_acquire,
    decode_configure,
    decode_cooldown,
    decode_extend,
    decode_settle,
    decode_status,
    late_error,
    place_of,
    queued,
    reserved,
    script_error,
)
from ._events import GrantNotice, Mailroom, Notice, Resubscribed
from ._exceptions import AcquireTimeout, BackendError, BudgetConflictError, CostTooLargeError, XflowError
from ._flow import GiveBack, RunScript, acquire_flow
from ._headers import LimitFacts
from ._lease import AsyncLease
from ._outage import SHARE_SLICE, Outage, OutagePolicy, diverted, emptying_cost, hold_after, no_slot, reason, share
from ._renewals import Renewals
from ._scripts import register

log = logging.getLogger("xflow_dist")


class _Events:
    """One reader task per limiter: hands each queued acquirer the notices about its ticket."""

    def __init__(self, pubsub: Any, limiter: AsyncLimiter, name: str) -> None:
        self._pubsub = pubsub
        self._limiter = limiter
        self._name = name
        self.mail: Mailroom[asyncio.Queue[Notice]] = Mailroom(asyncio.Queue, name)
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, limiter: AsyncLimiter, name: str) -> _Events:
        client = limiter._client
        pubsub = subscriber(client)  # on a cluster, one that moves to a live node after a failure
        await pubsub.subscribe(name, own_channel(name))  # the second: connected, and its tickets' notices
        confirmed, deadline = 0, time.monotonic() + 10.0
        while confirmed < 2 and time.monotonic() < deadline:  # live before anyone relies on them
            msg = await pubsub.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "subscribe":
                confirmed += 1
        events = cls(pubsub, limiter, name)
        # the loop's own create_task, here and for the heartbeat: these tasks are the limiter's, and code
        # that counts the application's tasks by wrapping asyncio.create_task (XtremeFlow's tests do) should
        # not see them
        events._task = asyncio.get_running_loop().create_task(events._read(), name="xflow-events")
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
            if self._limiter._census_overdue():
                await self._census()
            if msg is None:
                continue
            if self.mail.resets(msg):
                self._limiter._rejoin_soon()
                self._limiter._kick()
            for inbox, notice in self.mail.deliver(msg):
                inbox.put_nowait(notice)

    async def _census(self) -> None:
        """Count the processes using the budget (its channel's subscribers): an outage shares by it."""
        self._limiter._census_asked()
        # best effort, and never the end of the reader: on a failure the last count (or the policy's
        # fleet_size) stands
        with contextlib.suppress(Exception):
            self._limiter._counted(await async_subscribers(self._limiter._client, self._name))

    async def aclose(self) -> None:
        if self._task is not None:
            # redis-py's reconnecting get_message can swallow a cancel: ask again, never wait unbounded
            for _ in range(3):
                self._task.cancel()
                done, _ = await asyncio.wait({self._task}, timeout=1.0)
                if done:
                    break
        with contextlib.suppress(redis.RedisError, OSError):
            await self._pubsub.aclose()


class _Releasable(Protocol):
    async def release(self) -> Any: ...


_L = TypeVar("_L", bound=_Releasable)


class _Acquiring(Generic[_L]):
    """What ``AsyncLimiter.acquire`` returns: await it for a lease, or use it with ``async with``."""

    def __init__(self, pending: Awaitable[_L]) -> None:
        self._pending = pending
        self._lease: _L | None = None

    def __await__(self) -> Generator[Any, None, _L]:
        return self._pending.__await__()

    async def __aenter__(self) -> _L:
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
        outage: OutagePolicy | str | None = None,
    ) -> None:
        super().__init__(
            budget, cooldown_policy=cooldown_policy, ticket_ttl=ticket_ttl, io_timeout=io_timeout, outage=outage
        )
        self._target = redis
        self._bind(*async_client(redis, self.io_timeout))
        self._scripts = register(self._client, self.io_timeout)
        self._gate: asyncio.Semaphore | contextlib.nullcontext[None] | None = None  # made in the loop: gate_size()
        self._events: _Events | None = None
        self._events_lock: asyncio.Lock | None = None
        self._held: dict[str, float] = {}  # lease id -> when its next heartbeat is due
        self._leases: weakref.WeakValueDictionary[str, AsyncLease] = weakref.WeakValueDictionary()
        self._finalizers: dict[str, weakref.finalize[Any, Any]] = {}
        self._retries: dict[str, asyncio.Task[None]] = {}
        self._beater: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._queued: set[str] = set()  # tickets of this process now in the shared queue
        self._renewals = Renewals(self.ticket_ttl)
        self._renewer: asyncio.Task[None] | None = None
        self._kicked = asyncio.Event()  # set (and replaced) when Redis answers again: retry now
        self._closed = False
        _LIVE.add(self)

    def _holding(self) -> bool:
        return bool(self._held) or bool(self._queued) or self._outage is not None

    async def _run(self, op: str, argv: list[str]) -> Any:
        await self._rights.ensure_async(self._client)
        if self._gate is None:
            size = gate_size(self._client)
            self._gate = asyncio.Semaphore(size) if size is not None else contextlib.nullcontext()
        async with self._gate:
            return await self._call(op, argv)

    async def _call(self, op: str, argv: list[str]) -> Any:
        riders = self._riders(op)
        try:
            return await self._attempts(op, argv, riders)
        except BaseException:
            if riders:  # their waiters ask for themselves, as after a round that failed
                self._renewed(riders, None)
            raise

    async def _attempts(self, op: str, argv: list[str], riders: list[str]) -> Any:
        for attempt in (1, 2):
            try:
                reply = await self._scripts[op](keys=self._keys, args=self._argv(op, argv, riders))
                self._answered(op, reply, riders)
                return reply
            except redis.ConnectionError as exc:  # a dead pooled connection fails at once: try a fresh one
                if attempt == 2:
                    raise script_error(self.budget, op, exc) from exc
            except redis.ResponseError as exc:
                if not self._late(exc):
                    raise script_error(self.budget, op, exc) from exc
                if attempt == 2:  # late again: as good as a timeout
                    raise late_error(self.budget, op, exc) from redis.TimeoutError(str(exc))
            except redis.RedisError as exc:
                raise script_error(self.budget, op, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _hub(self) -> _Events:
        await self._rights.ensure_async(self._client)
        if self._events_lock is None:
            self._events_lock = asyncio.Lock()
        async with self._events_lock:
            if self._events is None:
                try:
                    self._events = await _Events.start(self, channel(self.budget))
                except redis.RedisError as exc:
                    raise BackendError(f"cannot subscribe to budget events: {exc}", budget=self.budget.name) from exc
            return self._events

    def acquire(
        self,
        tokens: float = 0,
        *,
        requests: float = 1,
        timeout: float | None = None,
        keep_place: bool = False,
        ticket: str | None = None,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> _Acquiring[AsyncLease]:
        """Wait for ``requests`` and ``tokens`` and a concurrency slot, all together.

        ``async with limiter.acquire(tokens=n) as lease:`` or ``lease = await limiter.acquire(...)``.
        Waits in first-come-first-served order across the fleet; raises ``AcquireTimeout`` at
        once when the budget can tell the start would come after ``timeout``, or at the deadline.
        When Redis does not answer the outage policy decides (see ``OutagePolicy``).
        Bad input raises here, before anything is awaited. ``keep_place``, ``ticket`` and
        ``priority``: as ``Limiter.acquire``'s.
        """
        place = place_of(self.budget, priority, tenant)
        lease_id, requests, tokens = self._prepare(requests, tokens, timeout, ticket, keep_place, place)
        if not observe.OBSERVERS or self._quiet:
            return _Acquiring(self._acquire(lease_id, requests, tokens, timeout, keep_place, place))
        return _Acquiring(self._observed(lease_id, requests, tokens, timeout, keep_place, place))

    async def _observed(
        self, lease_id: str, requests: float, tokens: float, timeout: float | None, keep_place: bool, place: Place
    ) -> AsyncLease:
        started = time.monotonic()
        try:
            lease = await self._acquire(lease_id, requests, tokens, timeout, keep_place, place)
        except AcquireTimeout:
            observe.timed_out(self.budget.name, started)
            raise
        observe.granted(self.budget.name, started, requests, tokens)
        return lease

    async def _acquire(
        self,
        lease_id: str,
        requests: float,
        tokens: float,
        timeout: float | None,
        keep_place: bool = False,
        place: Place = ANYWHERE,
    ) -> AsyncLease:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outage = self._outage
            if outage is not None:
                if not outage.ended:
                    lease = await self._acquire_in_outage(outage, requests, tokens, left(deadline))
                    if lease is not None:
                        return lease
                else:
                    await asyncio.sleep(0.01)  # the way back is being made: a moment
                continue
            try:
                return await self._acquire_shared(lease_id, requests, tokens, left(deadline), keep_place, place)
            except BackendError as exc:
                if not transient(exc):
                    raise
                await self._enter_outage(exc)
            # the failed id is given back in the background: never reuse it (a ticket that may leave
            # keeps an id of its own "process", as _prepare made it)
            lease_id = away_id() if keep_place else new_id()

    async def _acquire_shared(
        self,
        lease_id: str,
        requests: float,
        tokens: float,
        timeout: float | None,
        keep_place: bool = False,
        place: Place = ANYWHERE,
    ) -> AsyncLease:
        hub = await self._hub()
        inbox = hub.mail.expect(lease_id)
        flow = acquire_flow(self.budget, lease_id, requests, tokens, timeout, self.ticket_ttl, keep_place, place)
        try:
            step = next(flow)
            while True:
                if isinstance(step, RunScript):
                    if self._outage is not None:  # another call found Redis out: do not wait for it here
                        raise diverted(self.budget)
                    raw = await self._run(step.op, step.argv)
                    if queued(raw):  # the ticket keeps the keys alive: their absence now means loss
                        self._queued.add(lease_id)
                        self._renewals.queued(lease_id, time.monotonic())
                        if self._renewer is None or self._renewer.done():
                            self._renewer = asyncio.get_running_loop().create_task(self._renew(), name="xflow-renewals")
                    elif reserved(raw):  # so does a reservation waiting for its start
                        self._queued.add(lease_id)
                    step = flow.send(raw)
                elif isinstance(step, GiveBack):
                    await self._give_back(step.lease_id, now=True)
                    step = flow.send(None)
                else:
                    notice = None
                    # not asyncio.wait_for: on 3.11 it can swallow a cancel that meets a notice
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(step.timeout):
                            notice = await inbox.get()
                    if isinstance(notice, GrantNotice) and notice.firm:  # granted: its renewals end
                        self._renewals.discard(lease_id)
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
            self._queued.discard(lease_id)
            self._renewals.discard(lease_id)
        return self._hold(lease_id, requests, tokens, place.levels)

    async def park(
        self,
        ticket: str,
        seconds: float,
        tokens: float = 0,
        *,
        requests: float = 1,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> AsyncLease | None:
        """As ``Limiter.park``: keep ``ticket`` in the queue for ``seconds`` more; the lease if it was
        granted meanwhile, else None."""
        place = place_of(self.budget, priority, tenant)
        lease_id, requests, tokens = self._prepare(requests, tokens, None, ticket, place=place)
        _check_seconds("seconds", seconds)
        raw = await self._run("acquire", self._park_args(lease_id, requests, tokens, seconds, place))
        return self._hold(lease_id, requests, tokens, place.levels) if self._parked(raw, requests, tokens) else None

    async def try_acquire(
        self, tokens: float = 0, *, requests: float = 1, priority: str | None = None, tenant: str | None = None
    ) -> Decision[AsyncLease]:
        """As ``Limiter.try_acquire``: a grant only if it fits now in its ``priority``'s place."""
        place = place_of(self.budget, priority, tenant)
        lease_id, requests, tokens = self._prepare(requests, tokens, None, place=place)
        return self._tried(await self._try_acquire(lease_id, requests, tokens, place), requests, tokens)

    async def _try_acquire(
        self, lease_id: str, requests: float, tokens: float, place: Place = ANYWHERE
    ) -> Decision[AsyncLease]:
        outage = self._outage
        if outage is not None and not outage.ended:
            decision = await self._try_in_outage(outage, requests, tokens)
            if decision is not None:
                return decision
        try:
            reply = decode_acquire(await self._run("acquire", self._try_args(lease_id, requests, tokens, place)))
        except BackendError as exc:
            if not transient(exc):
                raise
            await self._give_back(lease_id, now=False)  # the grant may have happened with its reply lost
            await self._enter_outage(exc)
            outage = self._outage
            if outage is None or outage.ended:
                return Decision(False)
            return await self._try_in_outage(outage, requests, tokens) or Decision(False)
        if reply.kind != "granted":
            return self._refused(reply, requests, tokens)
        return Decision(True, self._hold(lease_id, requests, tokens, place.levels))

    def _hold(self, lease_id: str, requests: float, tokens: float, levels: tuple[Level, ...] = ()) -> AsyncLease:
        lease = AsyncLease(self, lease_id, requests, tokens)
        lease.levels = levels
        self._held[lease_id] = time.monotonic() + self.heartbeat_interval
        self._leases[lease_id] = lease
        # dropped without being settled: settle at the estimate (the call may have gone out), on this loop
        loop = asyncio.get_running_loop()
        self._finalizers[lease_id] = fin = weakref.finalize(lease, self._dropped, loop, lease_id)
        fin.atexit = False  # no loop runs at exit: what is held then expires with its TTL
        if self._beater is None or self._beater.done():
            self._beater = asyncio.get_running_loop().create_task(self._beat(), name="xflow-heartbeat")
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
                    if expiry is None:
                        # Redis does not hold it (its keys were lost, or it expired while Redis could
                        # not be reached); its call runs all the same: register it again
                        await self._rejoin(lease)
                        log.warning("lease %s of budget %s was gone from Redis; registered again", lid,
                                    self.budget.name)  # fmt: skip
                except XflowError as exc:  # a backend failure, or limits reconfigured meanwhile
                    log.warning("heartbeat of lease %s failed: %s", lid, exc)
                    continue

    async def _renew(self) -> None:
        """One task per limiter renews the queued tickets in rounds (``_renewals``); it wakes the waiters
        whose ticket was granted or dropped meanwhile, and all of a round that failed (each then asks
        for itself, and meets the failure)."""
        while self._renewals:
            now = time.monotonic()
            ids = self._renewals.take(now)
            if not ids:
                await asyncio.sleep(max(0.0, (self._renewals.next_due() or now) - now))
                continue
            raw = None
            if self._outage is None:
                try:
                    raw = await self._run("renew", self._renewals.args(ids))
                except XflowError as exc:
                    log.warning("renewal of %d queued tickets failed: %s", len(ids), exc)
            self._renewed(ids, None if raw is None else raw[1:])

    def _riders(self, op: str) -> list[str]:
        return self._renewals.riders(time.monotonic()) if op == "settle" and self._renewals else []

    def _renewed(self, ids: list[str], statuses: Any | None) -> None:
        for lid, notice in self._renewals.notices(ids, statuses, time.monotonic()):
            if self._events is not None and (inbox := self._events.mail.inbox(lid)) is not None:
                inbox.put_nowait(notice)

    async def _rejoin(self, lease: AsyncLease) -> None:
        """Register ``lease`` again; a release crossing it is settled again (see ``Limiter._rejoin``)."""
        raw = await self._run("rejoin", self._rejoin_args(lease.id, lease.requests, lease.tokens, levels=lease.levels))
        if adopted(raw) and lease.closed:
            await self._run("settle", self._settle_args(lease.id, None))

    def _rejoin_soon(self) -> None:
        """Register every lease held again, in the background (Redis may have lost them)."""
        if self._held:
            self._spawn(self._rejoin_held())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _rejoin_held(self) -> None:
        for lid in list(self._held):
            lease = self._leases.get(lid)
            if lease is None or lease.closed:
                continue
            try:
                await self._rejoin(lease)
            except XflowError as exc:
                log.warning("lease %s of budget %s could not be registered again: %s", lid, self.budget.name, exc)
                return

    # -- the outage policy (see _outage.py) --------------------------------------------------------

    async def _enter_outage(self, exc: BaseException) -> None:
        """Redis does not answer: switch to the outage policy (once) and start probing for its return."""
        if self._outage is not None or self._closed:
            return
        policy = self.outage_policy
        n = self.processes
        local: AsyncLimiter | None = None
        share_budget = None
        if policy.mode != "closed" and not no_slot(self.budget, policy.mode, n):
            share_budget = share(self.budget, policy.mode, n)
            local = AsyncLimiter(share_budget, f"memory://xflow-outage-{uuid.uuid4().hex}",
                                 cooldown_policy=self.cooldown_policy, ticket_ttl=self.ticket_ttl)  # fmt: skip
            local._quiet = True
        outage = Outage(policy.mode, reason(exc), n, local, share_budget, back=asyncio.Event())
        outage.opens = outage.since + hold_after(exc, self._reply_wait)
        self._outage = outage  # set before any await: one outage per limiter
        if local is not None and share_budget is not None:
            req, tok = emptying_cost(share_budget)
            if req or tok:
                first = await local.try_acquire(tok, requests=req)
                if first.lease is not None:
                    await first.lease.release()
            for lid in list(self._held):  # their calls run on: they take their slots in the share
                shadow = await local.try_acquire(0, requests=0)
                if shadow.lease is not None:
                    outage.shadows[lid] = shadow.lease
        log.warning("budget %s: Redis does not answer (%s); outage policy %r: %s", self.budget.name,
                    outage.reason, policy.mode, outage.describe())  # fmt: skip
        if self._events is not None:  # waiters in the shared queue come back to take the outage path
            for inbox in self._events.mail.everyone():
                inbox.put_nowait(Resubscribed())
        self._spawn(self._probe(outage))

    async def _acquire_in_outage(
        self, outage: Outage, requests: float, tokens: float, timeout: float | None
    ) -> AsyncLease | None:
        """A grant from the outage policy, or None once Redis answers again (ask it then)."""
        if outage.mode == "closed":
            raise outage.unavailable(self.budget.name)
        if outage.local is None:  # no slot of our own: wait for Redis
            try:
                async with asyncio.timeout(timeout):
                    await outage.back.wait()
            except TimeoutError:
                raise AcquireTimeout(
                    f"budget {self.budget.name!r}: Redis does not answer and this process's share of the "
                    f"concurrency is none ({self.processes} processes, max_concurrency "
                    f"{self.budget.max_concurrency}); no grant within {timeout:g}s",
                    budget=self.budget.name,
                ) from None
            return None
        lease: AsyncLease | None = None
        outage.waiting += 1
        try:
            lease = await self._acquire_from_share(outage, requests, tokens, timeout)
        finally:
            outage.waiting -= 1
            if lease is not None:
                outage.granted(requests, tokens)
            if outage.ended and outage.waiting == 0:
                await outage.local.aclose()
        return lease

    async def _acquire_from_share(
        self, outage: Outage, requests: float, tokens: float, timeout: float | None
    ) -> AsyncLease | None:
        """Wait for the share in slices, so that a waiter goes back to the shared budget as soon as
        Redis answers (None) rather than being granted by a share that no longer counts."""
        local = outage.local
        assert local is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not outage.ended:
            rest = left(deadline)
            if rest is not None and rest <= 0:
                raise AcquireTimeout(
                    f"no grant from budget {self.budget.name!r} (on its local share) within {timeout:g}s",
                    budget=self.budget.name,
                )
            step = SHARE_SLICE if rest is None else min(SHARE_SLICE, rest)
            if (hold := outage.closed_for()) > 0:  # calls sent before may still free slots in Redis
                await asyncio.sleep(min(hold, step))
                continue
            try:
                lease: AsyncLease = await local.acquire(tokens, requests=requests, timeout=step)
            except AcquireTimeout as exc:  # at once, for a rate: sleep toward the fit time
                if exc.retry_after is not None:
                    await asyncio.sleep(min(exc.retry_after, step))
                continue
            if not outage.ended:
                return lease
            await lease.cancel()  # granted as Redis came back: the call has not started, ask Redis instead
        return None

    async def _try_in_outage(self, outage: Outage, requests: float, tokens: float) -> Decision[AsyncLease] | None:
        """The share's answer, or None once Redis answers again (ask it then)."""
        if outage.mode == "closed":
            raise outage.unavailable(self.budget.name)
        if outage.local is None:
            return Decision(False)
        if (hold := outage.closed_for()) > 0:
            return Decision(False, retry_after=hold)
        decision: Decision[AsyncLease] = await outage.local.try_acquire(tokens, requests=requests)
        if decision.lease is None:
            return decision
        if outage.ended:  # granted as Redis came back: the call has not started, ask Redis instead
            await decision.lease.cancel()
            return None
        outage.granted(requests, tokens)
        return decision

    async def _probe(self, outage: Outage) -> None:
        """Try Redis every ``probe_interval``; once it answers, bring this process back to it."""
        while not self._closed and self._outage is outage:
            await asyncio.sleep(self.outage_policy.probe_interval)
            try:
                await self._client.ping()
            except Exception as exc:  # whatever a client in failover raises: keep probing
                log.debug("budget %s: Redis probe: %s", self.budget.name, exc)
                continue
            try:
                await self._come_back(outage)
            except Exception as exc:  # the probe never dies: a failed way back is tried again
                log.debug("budget %s: Redis answered but the way back failed (%s); still out", self.budget.name, exc)

    async def _come_back(self, outage: Outage) -> None:
        """Charge what the share spent, register every lease held (shared, then the share's), switch
        back (see ``Limiter._come_back``)."""
        local = outage.local
        level = await local.status() if local is not None and outage.mode == "local" else None
        spent_now = outage.to_charge(level)
        if local is not None:
            # Other processes back from the same outage must register their shares' calls before
            # anyone takes a slot that Redis, thawed, may just have freed: a short hold on new grants.
            await self._run("rejoin", self._rejoin_args("", 0, 0, spent_now, hold=self.comeback_hold))
        for lid in list(self._held):
            lease = self._leases.get(lid)
            if lease is not None and not lease.closed:
                await self._rejoin(lease)
        outage.ended = True
        if local is not None:
            for lid in list(local._held):
                lease = local._leases.get(lid)
                if lease is None or lease.closed:
                    continue
                try:
                    await self._take_over(outage, lease)
                except Exception as exc:  # it stays on the share, whose settle is only local
                    log.warning("lease %s of budget %s could not join the shared budget: %s", lid,
                                self.budget.name, exc)  # fmt: skip
        self._outage = None
        outage.back.set()
        self._kick()  # the settles that failed meanwhile go out now
        for shadow in outage.shadows.values():
            with contextlib.suppress(XflowError):
                await shadow.release()
        if local is not None and outage.waiting == 0:
            await local.aclose()
        log.warning("budget %s: Redis answers again after %.1fs; back on the shared budget (%d grants on "
                    "the %r policy meanwhile)", self.budget.name, time.monotonic() - outage.since, outage.grants,
                    outage.mode)  # fmt: skip

    async def _take_over(self, outage: Outage, lease: AsyncLease) -> None:
        """A lease the share granted becomes one of the shared budget's (see ``Limiter._take_over``)."""
        if lease.closed:  # released meanwhile: its settle went to the share
            return
        local = outage.local
        if local is not None:
            local._disown(lease)
        lease._limiter = self
        self._held[lease.id] = time.monotonic() + self.heartbeat_interval
        self._leases[lease.id] = lease
        loop = asyncio.get_running_loop()
        self._finalizers[lease.id] = fin = weakref.finalize(lease, self._dropped, loop, lease.id)
        fin.atexit = False
        if self._beater is None or self._beater.done():
            self._beater = asyncio.get_running_loop().create_task(self._beat(), name="xflow-heartbeat")
        await self._rejoin(lease)

    def _disown(self, lease: AsyncLease) -> None:
        self._held.pop(lease.id, None)
        self._leases.pop(lease.id, None)
        fin = self._finalizers.pop(lease.id, None)
        if fin is not None:
            fin.detach()

    def _later(self, op: str, argv: list[str], key: str) -> None:
        """Retry ``op`` in the background until it lands or the lease or ticket is gone anyway."""
        self._held.pop(key, None)
        old = self._retries.pop(key, None)
        if old is not None:
            old.cancel()
        task = asyncio.ensure_future(self._retry(op, argv, time.monotonic() + self.retry_window))
        self._retries[key] = task
        task.add_done_callback(lambda t: self._retries.pop(key, None) if self._retries.get(key) is t else None)

    def _kick(self) -> None:
        """Redis answers again: retry what is pending now rather than at its backoff's next step."""
        self._kicked.set()
        self._kicked = asyncio.Event()

    async def _retry(self, op: str, argv: list[str], give_up: float) -> None:
        delay = RETRY_FIRST
        while True:
            kicked = self._kicked
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await kicked.wait()
            if kicked.is_set():
                delay = RETRY_FIRST
            if self._outage is not None and time.monotonic() < give_up:
                # out: the way back sends it (kick) once the share's calls are registered, lest the
                # slot it frees go to another process while this one's share still runs calls in it
                delay = RETRY_MAX
                continue
            try:
                await self._run(op, argv)
                return
            except XflowError as exc:  # a refusal (limits reconfigured meanwhile) ends the retries too
                if not transient(exc) or time.monotonic() >= give_up:
                    log.warning("gave up retrying %s: %s", op, exc)
                    return
            delay = min(RETRY_MAX, delay * 2)

    async def _finish(self, lease: AsyncLease, op: str, argv: list[str]) -> SettleReply | None:
        """Settle or cancel; on a transient failure it is retried in the background and None returned."""
        self._held.pop(lease.id, None)
        outage = self._outage
        if outage is not None and (shadow := outage.shadows.pop(lease.id, None)) is not None:
            with contextlib.suppress(XflowError):
                await shadow.release()
        fin = self._finalizers.pop(lease.id, None)
        if fin is not None:
            fin.detach()
        if outage is not None and outage.defers():  # the way back sends it (see _outage)
            self._later(op, argv, lease.id)
            return None
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
        return self._finished(lease.tokens, op, raw)

    async def _give_back(self, lease_id: str, *, now: bool) -> None:
        """Cancel a ticket or a grant not handed out; once now if ``now``, else (and on failure) later."""
        outage = self._outage
        if now and not (outage is not None and outage.defers()):
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
        headers: Mapping[str, str] | None = None,
    ) -> SettleReply:
        """Learn from a provider's reply that holds no lease (a call made outside the budget).

        ``facts`` are its parsed headers (``parse_limit_headers``), or ``headers`` the raw ones;
        keywords override them. Limits are
        per minute, learned for ``model`` (each model its own); what remains caps the shared levels.
        Returns the limits in force after it.
        """
        argv = self._learn_args(
            facts, limit_requests, limit_tokens, remaining_requests, remaining_tokens, model, headers
        )
        return decode_settle(await self._run("settle", argv))

    async def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause the whole fleet (honouring ``retry_after`` seconds if given); during
        an outage on a local share, pause that share."""
        outage = self._outage
        if outage is not None and outage.local is not None:
            reply: CooldownReply = await outage.local.cooldown(retry_after)
        else:
            reply = decode_cooldown(await self._run("cooldown", self._cooldown_args(retry_after)))
        return self._cooled(reply)

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
        """A read-only snapshot: levels, leases in flight, queue, cooldown; during an outage, this
        process's share, with ``mode`` saying which policy runs it."""
        outage = self._outage
        if outage is not None:
            local = None if outage.local is None else await outage.local.status()
            return outage.status(self.budget.name, local)
        return decode_status(self.budget, await self._run("status", []))

    async def aclose(self) -> None:
        """Give back the leases still held (settled at their estimate), wait for the settles still
        being retried (one more try each), stop the background tasks; close the client if this
        limiter made it."""
        _LIVE.discard(self)
        self._closed = True
        outage, self._outage = self._outage, None
        if outage is not None and outage.local is not None:
            outage.back.set()
            await outage.local.aclose()
        held = [lease for lid in list(self._held) if (lease := self._leases.get(lid)) is not None]
        self._held.clear()
        for task in (self._beater, self._renewer):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._renewals.clear()
        for lease in held:
            if lease._close():
                with contextlib.suppress(XflowError):
                    await self._finish(lease, "settle", self._settle_args(lease.id, None))
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._retries:
            await asyncio.wait(list(self._retries.values()), timeout=self.io_timeout * 2)
            for task in list(self._retries.values()):
                task.cancel()
        if self._events is not None:
            for inbox in self._events.mail.everyone():  # no round renews their tickets now: let them know
                inbox.put_nowait(Resubscribed())
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
        self._renewer = None
        self._renewals = Renewals(self.ticket_ttl)
        self._events = None
        self._events_lock = None
        self._gate = None
        self._kicked = asyncio.Event()
        self._queued = set()
        self._outage = None
        if self._owns:
            _INHERITED.append(self._client)  # never closed here: its sockets are the parent's
            self._bind(async_client(self._target, self.io_timeout)[0], True)
            self._scripts = register(self._client, self.io_timeout)

    async def __aenter__(self) -> AsyncLimiter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
