"""``AsyncLimiter``: the asyncio twin of ``Limiter``, over the same core and the same scripts."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Generator
from types import TracebackType
from typing import Any

import redis
import redis.asyncio
import redis.asyncio.cluster

from ._backend import AsyncClient, RedisLike, async_client
from ._base import Decision, LimiterBase
from ._budget import Budget, CooldownPolicy
from ._core import (
    CooldownReply,
    SettleReply,
    Status,
    channel,
    decode_acquire,
    decode_cooldown,
    decode_extend,
    decode_settle,
    decode_status,
)
from ._events import Mailroom, Notice
from ._exceptions import AcquireTimeout, BackendError, CostTooLargeError
from ._flow import RunScript, acquire_flow
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
        if isinstance(client, redis.asyncio.cluster.RedisCluster):
            await client.initialize()  # its pubsub needs the slot map, which loads lazily
        pubsub = client.pubsub()
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
        while True:
            try:
                msg = await self._pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except redis.RedisError as exc:
                log.warning("xflow_dist events subscriber: %s; reconnecting", exc)
                await asyncio.sleep(0.5)
                continue
            if msg is None:
                continue
            found = self.mail.route(msg["data"])
            if found is not None:
                found[0].put_nowait(found[1])

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
    client, or ``memory://`` for an in-process budget. Use one per event loop.
    """

    def __init__(
        self,
        budget: Budget,
        redis: RedisLike,
        *,
        cooldown_policy: CooldownPolicy | None = None,
        ticket_ttl: float | None = None,
    ) -> None:
        super().__init__(budget, cooldown_policy=cooldown_policy, ticket_ttl=ticket_ttl)
        self._client, self._owns = async_client(redis)
        self._scripts = register(self._client)
        self._events: _Events | None = None
        self._events_lock: asyncio.Lock | None = None
        self._held: dict[AsyncLease, float] = {}  # lease -> when its next heartbeat is due
        self._beater: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()

    async def _run(self, op: str, argv: list[str]) -> Any:
        try:
            return await self._scripts[op](keys=self._keys, args=self._argv(argv))
        except redis.RedisError as exc:
            raise BackendError(f"{op} on budget {self.budget.name!r} failed: {exc}", budget=self.budget.name) from exc

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
                else:
                    notice = None
                    with contextlib.suppress(TimeoutError):
                        notice = await asyncio.wait_for(inbox.get(), step.timeout)
                    step = flow.send(notice)
        except StopIteration:
            pass
        except (AcquireTimeout, CostTooLargeError):
            raise
        except BaseException:
            await self._cancel_quietly(lease_id)
            raise
        finally:
            hub.mail.forget(lease_id)
        return self._hold(lease_id, requests, tokens)

    async def try_acquire(self, tokens: float = 0, *, requests: float = 1) -> Decision[AsyncLease]:
        """Take a grant only if it fits now with nobody queued ahead; never waits, never queues."""
        lease_id, requests, tokens = self._prepare(requests, tokens, None)
        reply = decode_acquire(await self._run("acquire", self._try_args(lease_id, requests, tokens)))
        if reply.kind != "granted":
            return self._refused(reply, requests, tokens)
        return Decision(True, self._hold(lease_id, requests, tokens))

    def _hold(self, lease_id: str, requests: float, tokens: float) -> AsyncLease:
        lease = AsyncLease(self, lease_id, requests, tokens)
        self._held[lease] = time.monotonic() + self.heartbeat_interval
        if self._beater is None or self._beater.done():
            self._beater = asyncio.create_task(self._beat(), name="xflow-heartbeat")
        return lease

    async def _beat(self) -> None:
        """One task per limiter extends every held lease each third of its TTL."""
        while self._held:
            now = time.monotonic()
            due = [lease for lease, at in self._held.items() if at <= now]
            if not due:
                await asyncio.sleep(min(self._held.values()) - now)
                continue
            for lease in due:
                self._held[lease] = now + self.heartbeat_interval
            for lease in due:
                if lease.closed:
                    continue
                try:
                    expiry = decode_extend(await self._run("extend", [lease.id]))
                except BackendError as exc:
                    log.warning("heartbeat of lease %s failed: %s", lease.id, exc)
                    continue
                if expiry is None:
                    lease.lost = True
                    self._held.pop(lease, None)
                    log.warning("lease %s of budget %s expired before it was settled", lease.id, self.budget.name)

    async def _finish(self, lease: AsyncLease, op: str, argv: list[str]) -> SettleReply | None:
        self._held.pop(lease, None)
        call = self._run(op, argv)
        try:
            raw = await call
        except asyncio.CancelledError:
            # The caller is being cancelled: the settle still goes out, in the background.
            task = asyncio.ensure_future(self._run(op, argv))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            raise
        return decode_settle(raw) if op == "settle" else None

    async def _cancel_quietly(self, lease_id: str) -> None:
        try:
            await asyncio.shield(self._run("cancel", [lease_id]))
        except BackendError as exc:  # the lease, if any, expires with its TTL
            log.warning("could not give back reservation %s: %s", lease_id, exc)

    async def learn(
        self,
        facts: LimitFacts | None = None,
        *,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
    ) -> SettleReply:
        """Learn from a provider's reply that holds no lease (a call made outside the budget).

        ``facts`` are its parsed headers (``parse_limit_headers``); keywords override them. Limits are
        per minute; what remains caps the shared levels. Returns the limits in force after it.
        """
        argv = self._learn_args(facts, limit_requests, limit_tokens, remaining_requests, remaining_tokens)
        return decode_settle(await self._run("settle", argv))

    async def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause the whole fleet (honouring ``retry_after`` seconds if given)."""
        return decode_cooldown(await self._run("cooldown", self._cooldown_args(retry_after)))

    async def clear_cooldown(self) -> CooldownReply:
        """End the fleet-wide pause now and reset its backoff; the buckets stay as the 429 left them,
        so dispatch resumes paced. Returns the pause that was ended (``remaining`` 0: none)."""
        return self._cleared(await self._run("clear_cooldown", []))

    async def status(self) -> Status:
        """A read-only snapshot: levels, leases in flight, queue, cooldown."""
        return decode_status(self.budget, await self._run("status", []))

    async def aclose(self) -> None:
        """Stop the background tasks; close the client if this limiter made it."""
        self._held.clear()
        if self._beater is not None:
            self._beater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beater
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._events is not None:
            await self._events.aclose()
            self._events = None
        if self._owns:
            await self._client.aclose()

    async def __aenter__(self) -> AsyncLimiter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
