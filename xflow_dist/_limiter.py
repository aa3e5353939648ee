"""``Limiter``: the blocking front, for threads, Celery tasks and plain scripts."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis

from ._backend import IO_TIMEOUT, RedisLike, SyncClient, sync_client
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
from ._flow import AwaitNotice, GiveBack, RunScript, acquire_flow
from ._headers import LimitFacts
from ._lease import Lease
from ._scripts import register

log = logging.getLogger("xflow_dist")


class _Events:
    """One subscriber thread per limiter: hands each queued acquirer the notices about its ticket.

    A dropped connection is re-established (redis-py subscribes again on connect); every waiter is
    then sent ``Resubscribed`` and asks Redis again, so no grant or fit time announced meanwhile is lost.
    """

    def __init__(self, client: SyncClient, name: str) -> None:
        self.mail: Mailroom[queue.SimpleQueue[Notice]] = Mailroom(queue.SimpleQueue)
        self._pubsub = subscriber(client)  # on a cluster, one that moves to a live node after a failure
        self._pubsub.subscribe(name)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:  # the subscription is live before anyone relies on it
            msg = self._pubsub.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "subscribe":
                break
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name="xflow-events", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        delay = RETRY_FIRST
        while not self._stop.is_set():
            try:
                msg = self._pubsub.get_message(timeout=1.0)
            except (redis.RedisError, OSError, ValueError) as exc:
                if self._stop.is_set():
                    return
                if delay == RETRY_FIRST:
                    log.warning("xflow_dist events subscriber: %s; reconnecting", exc)
                self._stop.wait(delay)
                delay = min(RETRY_MAX, delay * 2)
                continue
            delay = RETRY_FIRST
            if msg is None:
                continue
            for inbox, notice in self.mail.deliver(msg):
                inbox.put(notice)

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.unsubscribe()  # its reply wakes the thread's blocking read at once
        self._thread.join(timeout=5.0)
        with contextlib.suppress(redis.RedisError, OSError):
            self._pubsub.close()


@dataclass
class _Retry:
    op: str
    argv: list[str]
    give_up: float
    at: float
    delay: float = RETRY_FIRST


class _Upkeep:
    """One thread per limiter: extends every held lease each third of its TTL, and retries the
    settles and give-backs that failed on a transient Redis error until they land or are moot."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._due: dict[str, float] = {}  # lease id -> next heartbeat
        self._leases: weakref.WeakValueDictionary[str, Lease] = weakref.WeakValueDictionary()
        self._pending: dict[str, _Retry] = {}  # lease or ticket id -> what to retry
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def _start(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="xflow-upkeep", daemon=True)
            self._thread.start()
        self._cond.notify()

    def add(self, lease: Lease) -> None:
        with self._cond:
            self._due[lease.id] = time.monotonic() + self._limiter.heartbeat_interval
            self._leases[lease.id] = lease
            self._start()

    def remove(self, lease_id: str) -> None:
        with self._cond:
            self._due.pop(lease_id, None)

    def later(self, op: str, argv: list[str], key: str) -> None:
        """Retry ``op`` in the background (idempotent by its id)."""
        now = time.monotonic()
        with self._cond:
            self._due.pop(key, None)
            self._pending[key] = _Retry(op, argv, now + self._limiter.retry_window, now + RETRY_FIRST)
            self._start()

    def held(self) -> list[Lease]:
        with self._cond:
            return [lease for lid in self._due if (lease := self._leases.get(lid)) is not None]

    def drain(self) -> list[_Retry]:
        with self._cond:
            pending, self._pending = list(self._pending.values()), {}
            return pending

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    now = time.monotonic()
                    beats = [lid for lid, at in self._due.items() if at <= now]
                    retries = [(key, r) for key, r in self._pending.items() if r.at <= now]
                    if beats or retries:
                        break
                    nxt = min([*self._due.values(), *(r.at for r in self._pending.values())], default=now + 60.0)
                    self._cond.wait(nxt - now)
                if self._stopped:
                    return
                for lid in beats:
                    self._due[lid] = now + self._limiter.heartbeat_interval
            for lid in beats:
                self._beat(lid)
            for key, retry in retries:
                self._retry(key, retry)

    def _beat(self, lease_id: str) -> None:
        lease = self._leases.get(lease_id)
        if lease is None or lease.closed:
            self.remove(lease_id)
            return
        try:
            if not self._limiter._extend(lease):
                self.remove(lease_id)
        except XflowError as exc:  # a backend failure, or limits reconfigured meanwhile
            log.warning("heartbeat of lease %s failed: %s", lease_id, exc)

    def _retry(self, key: str, retry: _Retry) -> None:
        try:
            self._limiter._run(retry.op, retry.argv)
        except BackendError as exc:
            now = time.monotonic()
            with self._cond:
                if not transient(exc) or now >= retry.give_up:
                    self._pending.pop(key, None)
                    log.warning("gave up retrying %s of %s: %s", retry.op, key, exc)
                else:
                    retry.delay = min(RETRY_MAX, retry.delay * 2)
                    retry.at = now + retry.delay
            return
        with self._cond:
            if self._pending.get(key) is retry:
                del self._pending[key]

    def close(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5.0)


class Limiter(LimiterBase):
    """A budget shared through Redis, for blocking code.

    ``redis`` is a URL (``redis://``, ``rediss://``, ``unix://``), a ``redis.Redis`` client, or
    ``memory://`` for an in-process budget. Thread-safe: share one per process. Every call to a
    Redis made from a URL gives up after ``io_timeout`` seconds (connect, pool wait, reply); a client
    passed in keeps its own timeouts. Safe across ``os.fork``: a child starts its own threads and
    connections and never touches the parent's leases.
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
        self._client, self._owns = sync_client(redis, self.io_timeout)
        self._scripts = register(self._client, self.io_timeout)
        self._events: _Events | None = None
        self._events_lock = threading.Lock()
        self._upkeep = _Upkeep(self)
        self._finalizers: dict[str, weakref.finalize[Any, Any]] = {}
        self._closed = False
        _LIVE.add(self)

    def _run(self, op: str, argv: list[str]) -> Any:
        for attempt in (1, 2):
            try:
                return self._scripts[op](keys=self._keys, args=self._argv(argv))
            except redis.ConnectionError as exc:  # a dead pooled connection fails at once: try a fresh one
                if attempt == 2:
                    raise script_error(self.budget, op, exc) from exc
            except redis.RedisError as exc:
                raise script_error(self.budget, op, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _hub(self) -> _Events:
        with self._events_lock:
            if self._events is None:
                try:
                    self._events = _Events(self._client, channel(self.budget))
                except (redis.RedisError, OSError) as exc:
                    raise BackendError(f"cannot subscribe to budget events: {exc}", budget=self.budget.name) from exc
            return self._events

    def acquire(self, tokens: float = 0, *, requests: float = 1, timeout: float | None = None) -> Lease:
        """Wait for ``requests`` and ``tokens`` and a concurrency slot, all together.

        Waits in first-come-first-served order across the fleet; raises ``AcquireTimeout`` at
        once when the budget can tell the grant would come after ``timeout``, or at the deadline
        (``timeout=0``: try once, never queue). With Redis unreachable or frozen it raises
        ``BackendError`` within ``timeout`` plus ``io_timeout`` at most.
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
                elif isinstance(step, GiveBack):
                    self._give_back(step.lease_id, now=True)
                    step = flow.send(None)
                else:
                    step = flow.send(self._await_notice(inbox, step))
        except StopIteration:
            pass
        except (AcquireTimeout, CostTooLargeError, BudgetConflictError):
            raise
        except BackendError as exc:
            self._give_back(lease_id, now=not transient(exc))
            raise
        except BaseException:
            self._give_back(lease_id, now=True)
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
        try:
            reply = decode_acquire(self._run("acquire", self._try_args(lease_id, requests, tokens)))
        except BackendError as exc:
            if transient(exc):  # the grant may have happened with its reply lost
                self._give_back(lease_id, now=False)
            raise
        if reply.kind != "granted":
            return self._refused(reply, requests, tokens)
        return Decision(True, self._hold(lease_id, requests, tokens))

    def _hold(self, lease_id: str, requests: float, tokens: float) -> Lease:
        lease = Lease(self, lease_id, requests, tokens)
        self._upkeep.add(lease)
        # dropped without being settled: settle at the estimate (the call may have gone out)
        self._finalizers[lease_id] = fin = weakref.finalize(lease, self._dropped, lease_id)
        fin.atexit = False  # at exit, close() gives back what is held
        return lease

    def _dropped(self, lease_id: str) -> None:
        self._finalizers.pop(lease_id, None)
        self._upkeep.later("settle", self._settle_args(lease_id, None), lease_id)

    def _finish(self, lease: Lease, op: str, argv: list[str]) -> SettleReply | None:
        """Settle or cancel; on a transient failure it is retried in the background and None returned."""
        self._upkeep.remove(lease.id)
        fin = self._finalizers.pop(lease.id, None)
        if fin is not None:
            fin.detach()
        try:
            raw = self._run(op, argv)
        except BackendError as exc:
            if not transient(exc):
                raise
            log.warning("%s of lease %s failed (%s); retrying in the background", op, lease.id, exc)
            self._upkeep.later(op, argv, lease.id)
            return None
        except BaseException:  # interrupted mid-call (a soft time limit, Ctrl-C): it still goes out
            self._upkeep.later(op, argv, lease.id)
            raise
        return decode_settle(raw) if op == "settle" else None

    def _extend(self, lease: Lease) -> bool:
        if lease.closed:
            return False
        if decode_extend(self._run("extend", [lease.id])) is None:
            lease.lost = True
            log.warning("lease %s of budget %s expired before it was settled", lease.id, self.budget.name)
            return False
        return True

    def _give_back(self, lease_id: str, *, now: bool) -> None:
        """Cancel a ticket or a grant not handed out; once now if ``now``, else (and on failure) later."""
        if now:
            try:
                self._run("cancel", [lease_id])
                return
            except BackendError as exc:
                log.warning("could not give back reservation %s: %s; retrying in the background", lease_id, exc)
        self._upkeep.later("cancel", [lease_id], lease_id)

    def learn(
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
        return decode_settle(self._run("settle", argv))

    def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause the whole fleet (honouring ``retry_after`` seconds if given)."""
        return decode_cooldown(self._run("cooldown", self._cooldown_args(retry_after)))

    def reconfigure(self, budget: Budget) -> str | None:
        """Change this budget's limits for the whole fleet, live, to ``budget``'s (the same name).

        Redis stores the new limits and rescales the buckets without inventing credit; from then on
        every process still using the old limits is refused with ``BudgetConflictError``. Returns the
        limits stored before (described), or None where none were.
        """
        old = self._adopt(budget)
        try:
            return decode_configure(self._run("configure", []))
        except BaseException:
            self._adopt(old)
            raise
    def clear_cooldown(self) -> CooldownReply:
        """End the fleet-wide pause now and reset its backoff; the buckets stay as the 429 left them,
        so dispatch resumes paced. Returns the pause that was ended (``remaining`` 0: none)."""
        return self._cleared(self._run("clear_cooldown", []))

    def status(self) -> Status:
        """A read-only snapshot: levels, leases in flight, queue, cooldown."""
        return decode_status(self.budget, self._run("status", []))

    def close(self) -> None:
        """Give back the leases still held (settled at their estimate), make one last try at the
        settles still pending, stop the background threads; close the client if this limiter made it."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        self._upkeep.close()
        for lease in self._upkeep.held():
            if lease._close():
                with contextlib.suppress(BackendError):
                    self._finish(lease, "settle", self._settle_args(lease.id, None))
        for retry in self._upkeep.drain():
            with contextlib.suppress(BackendError):
                self._run(retry.op, retry.argv)
        if self._events is not None:
            self._events.close()
            self._events = None
        if self._owns:
            self._client.close()

    def _close_at_exit(self) -> None:
        self.close()

    def _after_fork(self) -> None:
        # The parent's threads do not exist here and its sockets and leases are not ours: drop them
        # without closing anything the parent still uses, and start afresh on first use.
        for fin in self._finalizers.values():
            fin.detach()
        self._finalizers = {}
        self._events = None
        self._events_lock = threading.Lock()
        self._upkeep = _Upkeep(self)
        if self._owns:
            _INHERITED.append(self._client)  # never closed here: its sockets are the parent's
            self._client, _ = sync_client(self._target, self.io_timeout)
            self._scripts = register(self._client, self.io_timeout)

    def __enter__(self) -> Limiter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
