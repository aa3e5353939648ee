"""``Limiter``: the blocking front, for threads, Celery tasks and plain scripts."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from types import TracebackType
from typing import Any

import redis

from ._backend import RedisLike, SyncClient, sync_client
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
from ._flow import AwaitNotice, RunScript, acquire_flow
from ._headers import LimitFacts
from ._lease import Lease
from ._scripts import register

log = logging.getLogger("xflow_dist")


class _Events:
    """One subscriber thread per limiter: hands each queued acquirer the notices about its ticket."""

    def __init__(self, client: SyncClient, name: str) -> None:
        self.mail: Mailroom[queue.SimpleQueue[Notice]] = Mailroom(queue.SimpleQueue)
        self._pubsub = client.pubsub()  # type: ignore[no-untyped-call]
        self._pubsub.subscribe(**{name: self._on_message})
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the subscription is live before anyone relies on it
            msg = self._pubsub.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "subscribe":
                break
        self._thread = self._pubsub.run_in_thread(sleep_time=1.0, daemon=True, exception_handler=self._on_error)

    @staticmethod
    def _on_error(exc: BaseException, pubsub: Any, thread: Any) -> None:
        log.warning("xflow_dist events subscriber: %s; reconnecting", exc)
        time.sleep(0.5)

    def _on_message(self, message: dict[str, Any]) -> None:
        found = self.mail.route(message["data"])
        if found is not None:
            found[0].put(found[1])

    def close(self) -> None:
        self._thread.stop()
        with contextlib.suppress(redis.RedisError):
            self._pubsub.unsubscribe()  # its reply wakes the thread's blocking read at once
        self._thread.join(timeout=5.0)
        self._pubsub.close()


class _Heartbeats:
    """One thread per limiter extends every held lease each third of its TTL."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._due: dict[Lease, float] = {}
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._due[lease] = time.monotonic() + self._limiter.heartbeat_interval
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="xflow-heartbeat", daemon=True)
                self._thread.start()
            self._cond.notify()

    def remove(self, lease: Lease) -> None:
        with self._cond:
            self._due.pop(lease, None)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    due = [lease for lease, at in self._due.items() if at <= now]
                    if due:
                        break
                    self._cond.wait(min(self._due.values(), default=now + 60.0) - now)
                if self._stopped:
                    return
                for lease in due:
                    self._due[lease] = now + self._limiter.heartbeat_interval
            for lease in due:
                try:
                    if not self._limiter._extend(lease):
                        self.remove(lease)
                except BackendError as exc:
                    log.warning("heartbeat of lease %s failed: %s", lease.id, exc)

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


class Limiter(LimiterBase):
    """A budget shared through Redis, for blocking code.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``), a ``redis.Redis`` client, or
    ``memory://`` for an in-process budget. Thread-safe: share one per process.
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
        self._client, self._owns = sync_client(redis)
        self._scripts = register(self._client)
        self._events: _Events | None = None
        self._events_lock = threading.Lock()
        self._heartbeats = _Heartbeats(self)

    def _run(self, op: str, argv: list[str]) -> Any:
        try:
            return self._scripts[op](keys=self._keys, args=self._argv(argv))
        except redis.RedisError as exc:
            raise BackendError(f"{op} on budget {self.budget.name!r} failed: {exc}", budget=self.budget.name) from exc

    def _hub(self) -> _Events:
        with self._events_lock:
            if self._events is None:
                try:
                    self._events = _Events(self._client, channel(self.budget))
                except redis.RedisError as exc:
                    raise BackendError(f"cannot subscribe to budget events: {exc}", budget=self.budget.name) from exc
            return self._events

    def acquire(self, tokens: float = 0, *, requests: float = 1, timeout: float | None = None) -> Lease:
        """Wait for ``requests`` and ``tokens`` and a concurrency slot, all together.

        Waits in first-come-first-served order across the fleet; raises ``AcquireTimeout`` at
        once when the budget can tell the grant would come after ``timeout``, or at the deadline.
        """
        lease_id, requests, tokens = self._prepare(requests, tokens, timeout)
        hub = self._hub()
        inbox = hub.mail.expect(lease_id)
        flow = acquire_flow(self.budget, lease_id, requests, tokens, timeout, self.ticket_ttl)
        try:
            step = next(flow)
            while True:
                if isinstance(step, RunScript):
                    step = flow.send(self._run(step.op, step.argv))
                else:
                    step = flow.send(self._await_notice(inbox, step))
        except StopIteration:
            pass
        except (AcquireTimeout, CostTooLargeError):
            raise
        except BaseException:
            self._cancel_quietly(lease_id)
            raise
        finally:
            hub.mail.forget(lease_id)
        return self._hold(lease_id, requests, tokens)

    @staticmethod
    def _await_notice(inbox: queue.SimpleQueue[Notice], step: AwaitNotice) -> Notice | None:
        try:
            return inbox.get(timeout=step.timeout)
        except queue.Empty:
            return None

    def try_acquire(self, tokens: float = 0, *, requests: float = 1) -> Decision[Lease]:
        """Take a grant only if it fits now with nobody queued ahead; never waits, never queues."""
        lease_id, requests, tokens = self._prepare(requests, tokens, None)
        reply = decode_acquire(self._run("acquire", self._try_args(lease_id, requests, tokens)))
        if reply.kind != "granted":
            return self._refused(reply, requests, tokens)
        return Decision(True, self._hold(lease_id, requests, tokens))

    def _hold(self, lease_id: str, requests: float, tokens: float) -> Lease:
        lease = Lease(self, lease_id, requests, tokens)
        self._heartbeats.add(lease)
        return lease

    def _finish(self, lease: Lease, op: str, argv: list[str]) -> SettleReply | None:
        self._heartbeats.remove(lease)
        raw = self._run(op, argv)
        return decode_settle(raw) if op == "settle" else None

    def _extend(self, lease: Lease) -> bool:
        if lease.closed:
            return False
        if decode_extend(self._run("extend", [lease.id])) is None:
            lease.lost = True
            log.warning("lease %s of budget %s expired before it was settled", lease.id, self.budget.name)
            return False
        return True

    def _cancel_quietly(self, lease_id: str) -> None:
        try:
            self._run("cancel", [lease_id])
        except BackendError as exc:  # the lease, if any, expires with its TTL
            log.warning("could not give back reservation %s: %s", lease_id, exc)

    def learn(
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
        return decode_settle(self._run("settle", argv))

    def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause the whole fleet (honouring ``retry_after`` seconds if given)."""
        return decode_cooldown(self._run("cooldown", self._cooldown_args(retry_after)))

    def clear_cooldown(self) -> CooldownReply:
        """End the fleet-wide pause now and reset its backoff; the buckets stay as the 429 left them,
        so dispatch resumes paced. Returns the pause that was ended (``remaining`` 0: none)."""
        return self._cleared(self._run("clear_cooldown", []))

    def status(self) -> Status:
        """A read-only snapshot: levels, leases in flight, queue, cooldown."""
        return decode_status(self.budget, self._run("status", []))

    def close(self) -> None:
        """Stop the background threads; close the client if this limiter made it."""
        self._heartbeats.close()
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._owns:
            self._client.close()

    def __enter__(self) -> Limiter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
