"""``Limiter``: the blocking front, for threads, Celery tasks and plain scripts."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis

from . import _observe as observe
from ._backend import IO_TIMEOUT, RedisLike, sync_client
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
from ._cluster import subscriber, subscribers
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
from ._flow import AwaitNotice, GiveBack, RunScript, acquire_flow
from ._headers import LimitFacts
from ._lease import Lease
from ._outage import SHARE_SLICE, Outage, OutagePolicy, diverted, emptying_cost, hold_after, no_slot, reason, share
from ._renewals import Renewals
from ._scripts import register

log = logging.getLogger("xflow_dist")


def _gate(client: Any) -> Any:
    """A semaphore of ``gate_size`` permits in front of the pool, or a no-op."""
    size = gate_size(client)
    return threading.BoundedSemaphore(size) if size is not None else contextlib.nullcontext()


class _Events:
    """One subscriber thread per limiter: hands each queued acquirer the notices about its ticket.

    A dropped connection is re-established (redis-py subscribes again on connect); every waiter is
    then sent ``Resubscribed`` and asks Redis again, so no grant or fit time announced meanwhile is lost.
    """

    def __init__(self, limiter: Limiter, name: str) -> None:
        self.mail: Mailroom[queue.SimpleQueue[Notice]] = Mailroom(queue.SimpleQueue, name)
        self._limiter = limiter
        self._client = limiter._client
        self._name = name
        self._pubsub = subscriber(self._client)  # on a cluster, one that moves to a live node after a failure
        self._pubsub.subscribe(name, own_channel(name))  # the second: connected, and its tickets' notices
        confirmed, deadline = 0, time.monotonic() + 10.0
        while confirmed < 2 and time.monotonic() < deadline:  # live before anyone relies on them
            msg = self._pubsub.get_message(timeout=1.0)
            if msg is not None and msg.get("type") == "subscribe":
                confirmed += 1
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
            if self._limiter._census_overdue():
                self._census()
            if msg is None:
                continue
            if self.mail.resets(msg):
                self._limiter._upkeep.rejoin_soon()
                self._limiter._upkeep.kick()
            for inbox, notice in self.mail.deliver(msg):
                inbox.put(notice)

    def _census(self) -> None:
        """Count the processes using the budget (its channel's subscribers): an outage shares by it."""
        self._limiter._census_asked()
        # best effort, and never the end of the reader: on a failure the last count (or the policy's
        # fleet_size) stands
        with contextlib.suppress(Exception):
            self._limiter._counted(subscribers(self._client, self._name))

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
    """One thread per limiter: extends every held lease each third of its TTL, renews the queued
    tickets in rounds (``_renewals``), and retries the settles and give-backs that failed on a
    transient Redis error until they land or are moot."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._due: dict[str, float] = {}  # lease id -> next heartbeat
        self._leases: weakref.WeakValueDictionary[str, Lease] = weakref.WeakValueDictionary()
        self._pending: dict[str, _Retry] = {}  # lease or ticket id -> what to retry
        self._rejoin = False  # every lease held is to be registered again (the state was lost)
        self._renewals = Renewals(limiter.ticket_ttl)
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

    def queued(self, lease_id: str) -> None:
        """An acquire queued (or renewed) ``lease_id``: renew it in the rounds from now on."""
        with self._cond:
            self._renewals.queued(lease_id, time.monotonic())
            self._start()

    def unqueued(self, lease_id: str) -> None:
        with self._cond:
            self._renewals.discard(lease_id)

    def disown(self, lease_id: str) -> None:
        """Forget a lease that another limiter holds from now on."""
        with self._cond:
            self._due.pop(lease_id, None)
            self._leases.pop(lease_id, None)

    def holding(self) -> bool:
        return bool(self._due)

    def rejoin_soon(self) -> None:
        """Register every lease held again, at once, in the background (Redis may have lost them)."""
        with self._cond:
            if self._due:
                self._rejoin = True
                self._start()

    def later(self, op: str, argv: list[str], key: str) -> None:
        """Retry ``op`` in the background (idempotent by its id)."""
        now = time.monotonic()
        with self._cond:
            self._due.pop(key, None)
            self._pending[key] = _Retry(op, argv, now + self._limiter.retry_window, now + RETRY_FIRST)
            self._start()

    def kick(self) -> None:
        """Redis answers again: retry what is pending now rather than at its backoff's next step."""
        with self._cond:
            now = time.monotonic()
            for retry in self._pending.values():
                retry.at, retry.delay = now, RETRY_FIRST
            if self._pending:
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
                    tickets = self._renewals.take(now)
                    if beats or retries or tickets or self._rejoin:
                        break
                    renewal = self._renewals.next_due()
                    nxt = min(
                        [*self._due.values(), *(r.at for r in self._pending.values()), *([renewal] if renewal else [])],
                        default=now + 60.0,
                    )
                    self._cond.wait(nxt - now)
                if self._stopped:
                    return
                for lid in beats:
                    self._due[lid] = now + self._limiter.heartbeat_interval
                rejoin, self._rejoin = self._rejoin, False
            if rejoin:
                self._limiter._rejoin_held()
            if tickets:
                self._renew(tickets)
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

    def _renew(self, ids: list[str]) -> None:
        """One round: renew ``ids``; wake the waiters whose ticket was granted or dropped meanwhile, and
        all of them where the round failed (each then asks for itself, and meets the failure)."""
        raw = None
        if self._limiter._outage is None:
            try:
                raw = self._limiter._run("renew", self._renewals.args(ids))
            except XflowError as exc:
                log.warning("renewal of %d queued tickets failed: %s", len(ids), exc)
        self.renewed(ids, None if raw is None else raw[1:])

    def riders(self, op: str) -> list[str]:
        """The tickets a settle about to be sent renews (``Renewals.riders``)."""
        if op != "settle" or not self._renewals:
            return []
        with self._cond:
            return self._renewals.riders(time.monotonic())

    def renewed(self, ids: list[str], statuses: Any | None) -> None:
        """Wake the waiters of ``ids`` that their renewal's ``statuses`` concern (None: it failed)."""
        with self._cond:
            notices = self._renewals.notices(ids, statuses, time.monotonic())
        events = self._limiter._events
        for lid, notice in notices:
            if events is not None and (inbox := events.mail.inbox(lid)) is not None:
                inbox.put(notice)

    def _retry(self, key: str, retry: _Retry) -> None:
        if self._limiter._outage is not None:
            # Out: the way back sends it (kick) once the share's calls are registered, lest the slot
            # it frees go to another process while this one's share still runs calls in it.
            with self._cond:
                retry.at = time.monotonic() + RETRY_MAX
            return
        try:
            self._limiter._run(retry.op, retry.argv)
        except XflowError as exc:  # a refusal (limits reconfigured meanwhile) ends the retries too
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
        outage: OutagePolicy | str | None = None,
    ) -> None:
        super().__init__(
            budget, cooldown_policy=cooldown_policy, ticket_ttl=ticket_ttl, io_timeout=io_timeout, outage=outage
        )
        self._target = redis
        self._bind(*sync_client(redis, self.io_timeout))
        self._scripts = register(self._client, self.io_timeout)
        self._gate = _gate(self._client)
        self._events: _Events | None = None
        self._events_lock = threading.Lock()
        self._upkeep = _Upkeep(self)
        self._finalizers: dict[str, weakref.finalize[Any, Any]] = {}
        self._outage_lock = threading.Lock()
        self._queued: set[str] = set()  # tickets of this process now in the shared queue
        self._closed = False
        _LIVE.add(self)

    def _run(self, op: str, argv: list[str]) -> Any:
        self._rights.ensure(self._client)
        with self._gate:
            return self._call(op, argv)

    def _call(self, op: str, argv: list[str]) -> Any:
        riders = self._riders(op)
        try:
            return self._attempts(op, argv, riders)
        except BaseException:
            if riders:  # their waiters ask for themselves, as after a round that failed
                self._renewed(riders, None)
            raise

    def _attempts(self, op: str, argv: list[str], riders: list[str]) -> Any:
        for attempt in (1, 2):
            try:
                reply = self._scripts[op](keys=self._keys, args=self._argv(op, argv, riders))
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

    def _hub(self) -> _Events:
        self._rights.ensure(self._client)
        with self._events_lock:
            if self._events is None:
                try:
                    self._events = _Events(self, channel(self.budget))
                except (redis.RedisError, OSError) as exc:
                    raise BackendError(f"cannot subscribe to budget events: {exc}", budget=self.budget.name) from exc
            return self._events

    def _holding(self) -> bool:
        return self._upkeep.holding() or bool(self._queued) or self._outage is not None

    def _riders(self, op: str) -> list[str]:
        return self._upkeep.riders(op)

    def _renewed(self, ids: list[str], statuses: Any | None) -> None:
        self._upkeep.renewed(ids, statuses)

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
    ) -> Lease:
        """Wait for ``requests`` and ``tokens`` and a concurrency slot, all together.

        Waits in first-come-first-served order across the fleet; raises ``AcquireTimeout`` at
        once when the budget can tell the grant would come after ``timeout``, or at the deadline
        (``timeout=0``: try once, never queue). When Redis does not answer (within ``io_timeout``)
        the outage policy decides: a local share of the budget, no limit, or
        ``BudgetUnavailableError`` (see ``OutagePolicy``).

        ``keep_place=True``: a wait beyond ``timeout`` still joins the queue, and at the deadline the
        ticket keeps its place (``AcquireTimeout.ticket``, alive for the limiter's ticket TTL, or
        longer with ``park``); ``acquire(..., ticket=that)`` takes it up again, in its turn.

        ``priority``: the class of the call, one of the budget's ``priorities`` (None: its
        ``default_priority``); an unknown name raises ``ConfigurationError`` before Redis is touched.
        ``tenant``: whose call it is, on a budget shared by tenant (``Budget(tenants=...)``).
        """
        place = place_of(self.budget, priority, tenant)
        lease_id, requests, tokens = self._prepare(requests, tokens, timeout, ticket, keep_place, place)
        if not observe.OBSERVERS or self._quiet:
            return self._acquire(lease_id, requests, tokens, timeout, keep_place, place)
        started = time.monotonic()
        try:
            lease = self._acquire(lease_id, requests, tokens, timeout, keep_place, place)
        except AcquireTimeout:
            observe.timed_out(self.budget.name, started)
            raise
        observe.granted(self.budget.name, started, requests, tokens)
        return lease

    def _acquire(
        self,
        lease_id: str,
        requests: float,
        tokens: float,
        timeout: float | None,
        keep_place: bool = False,
        place: Place = ANYWHERE,
    ) -> Lease:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            outage = self._outage
            if outage is not None:
                if not outage.ended:
                    lease = self._acquire_in_outage(outage, requests, tokens, left(deadline))
                    if lease is not None:
                        return lease
                else:
                    time.sleep(0.01)  # the way back is being made: a moment
                continue
            try:
                return self._acquire_shared(lease_id, requests, tokens, left(deadline), keep_place, place)
            except BackendError as exc:
                if not transient(exc):
                    raise
                self._enter_outage(exc)
            # the failed id is given back in the background: never reuse it (a ticket that may leave
            # keeps an id of its own "process", as _prepare made it)
            lease_id = away_id() if keep_place else new_id()

    def _acquire_shared(
        self,
        lease_id: str,
        requests: float,
        tokens: float,
        timeout: float | None,
        keep_place: bool = False,
        place: Place = ANYWHERE,
    ) -> Lease:
        hub = self._hub()
        inbox = hub.mail.expect(lease_id)
        flow = acquire_flow(self.budget, lease_id, requests, tokens, timeout, self.ticket_ttl, keep_place, place)
        try:
            step = next(flow)
            while True:
                if isinstance(step, RunScript):
                    if self._outage is not None:  # another call found Redis out: do not wait for it here
                        raise diverted(self.budget)
                    raw = self._run(step.op, step.argv)
                    if queued(raw):  # the ticket keeps the keys alive: their absence now means loss
                        self._queued.add(lease_id)
                        self._upkeep.queued(lease_id)
                    elif reserved(raw):  # so does a reservation waiting for its start
                        self._queued.add(lease_id)
                    step = flow.send(raw)
                elif isinstance(step, GiveBack):
                    self._give_back(step.lease_id, now=True)
                    step = flow.send(None)
                else:
                    notice = self._await_notice(inbox, step)
                    if isinstance(notice, GrantNotice) and notice.firm:  # granted: its renewals end
                        self._upkeep.unqueued(lease_id)
                    step = flow.send(notice)
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
            self._queued.discard(lease_id)
            self._upkeep.unqueued(lease_id)
        return self._hold(lease_id, requests, tokens, place.levels)

    @staticmethod
    def _await_notice(inbox: queue.SimpleQueue[Notice], step: AwaitNotice) -> Notice | None:
        try:
            return inbox.get(timeout=step.timeout)
        except queue.Empty:
            return None

    def park(
        self,
        ticket: str,
        seconds: float,
        tokens: float = 0,
        *,
        requests: float = 1,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> Lease | None:
        """Keep ``ticket`` (from ``AcquireTimeout.ticket``) in the queue for ``seconds`` more while its
        holder is away (a Celery task re-queued with a countdown); ``tokens`` and ``requests`` are
        the ticket's. Returns the lease if the ticket was granted meanwhile (claimed now: use it),
        else None. A ticket Redis lost joins the queue again, as a new arrival of class ``priority``."""
        place = place_of(self.budget, priority, tenant)
        lease_id, requests, tokens = self._prepare(requests, tokens, None, ticket, place=place)
        _check_seconds("seconds", seconds)
        raw = self._run("acquire", self._park_args(lease_id, requests, tokens, seconds, place))
        return self._hold(lease_id, requests, tokens, place.levels) if self._parked(raw, requests, tokens) else None

    def try_acquire(
        self, tokens: float = 0, *, requests: float = 1, priority: str | None = None, tenant: str | None = None
    ) -> Decision[Lease]:
        """Take a grant only if it fits now with nobody queued ahead (of its ``priority``'s place:
        a class with a lead may pass the queue); never waits, never queues."""
        place = place_of(self.budget, priority, tenant)
        lease_id, requests, tokens = self._prepare(requests, tokens, None, place=place)
        return self._tried(self._try_acquire(lease_id, requests, tokens, place), requests, tokens)

    def _try_acquire(self, lease_id: str, requests: float, tokens: float, place: Place = ANYWHERE) -> Decision[Lease]:
        outage = self._outage
        if outage is not None and not outage.ended:
            decision = self._try_in_outage(outage, requests, tokens)
            if decision is not None:
                return decision
        try:
            reply = decode_acquire(self._run("acquire", self._try_args(lease_id, requests, tokens, place)))
        except BackendError as exc:
            if not transient(exc):
                raise
            self._give_back(lease_id, now=False)  # the grant may have happened with its reply lost
            self._enter_outage(exc)
            outage = self._outage
            if outage is None or outage.ended:
                return Decision(False)
            return self._try_in_outage(outage, requests, tokens) or Decision(False)
        if reply.kind != "granted":
            return self._refused(reply, requests, tokens)
        return Decision(True, self._hold(lease_id, requests, tokens, place.levels))

    def _hold(self, lease_id: str, requests: float, tokens: float, levels: tuple[Level, ...] = ()) -> Lease:
        lease = Lease(self, lease_id, requests, tokens)
        lease.levels = levels
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
        outage = self._outage
        if outage is not None and (shadow := outage.shadows.pop(lease.id, None)) is not None:
            with contextlib.suppress(XflowError):
                shadow.release()
        fin = self._finalizers.pop(lease.id, None)
        if fin is not None:
            fin.detach()
        if outage is not None and outage.defers():  # the way back sends it (see _outage)
            self._upkeep.later(op, argv, lease.id)
            return None
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
        return self._finished(lease.tokens, op, raw)

    def _extend(self, lease: Lease) -> bool:
        if lease.closed:
            return False
        if decode_extend(self._run("extend", [lease.id])) is not None:
            return True
        # Redis does not hold it: its keys were lost, or it expired while this process could not
        # reach Redis. Its call runs all the same: register it again, so the slot count stays true.
        try:
            self._rejoin(lease)
        except XflowError as exc:
            lease.lost = True
            log.warning("lease %s of budget %s was lost and could not be registered again: %s", lease.id,
                        self.budget.name, exc)  # fmt: skip
            return False
        log.warning("lease %s of budget %s was gone from Redis; registered again", lease.id, self.budget.name)
        return True

    def _rejoin(self, lease: Lease) -> None:
        """Register ``lease`` again. Its release may cross this call: a release settled just before
        would be undone by the re-registration, so a lease found closed after it is settled again (at
        its estimate; a settle of a lease already gone changes nothing)."""
        raw = self._run("rejoin", self._rejoin_args(lease.id, lease.requests, lease.tokens, levels=lease.levels))
        if adopted(raw) and lease.closed:
            self._run("settle", self._settle_args(lease.id, None))

    def _rejoin_held(self) -> None:
        """Register every lease held again (Redis lost its keys, or the events connection came back)."""
        for lease in self._upkeep.held():
            if lease.closed:
                continue
            try:
                self._rejoin(lease)
            except XflowError as exc:
                log.warning("lease %s of budget %s could not be registered again: %s", lease.id, self.budget.name, exc)
                return

    # -- the outage policy (see _outage.py) --------------------------------------------------------

    def _enter_outage(self, exc: BaseException) -> None:
        """Redis does not answer: switch to the outage policy (once) and start probing for its return."""
        with self._outage_lock:
            if self._outage is not None or self._closed:
                return
            policy = self.outage_policy
            n = self.processes
            local: Limiter | None = None
            share_budget = None
            if policy.mode != "closed" and not no_slot(self.budget, policy.mode, n):
                share_budget = share(self.budget, policy.mode, n)
                local = Limiter(share_budget, f"memory://xflow-outage-{uuid.uuid4().hex}",
                                cooldown_policy=self.cooldown_policy, ticket_ttl=self.ticket_ttl)  # fmt: skip
                local._quiet = True
                req, tok = emptying_cost(share_budget)
                if req or tok:
                    first = local.try_acquire(tok, requests=req)
                    if first.lease is not None:
                        first.lease.release()
            outage = Outage(policy.mode, reason(exc), n, local, share_budget, back=threading.Event())
            outage.opens = outage.since + hold_after(exc, self._reply_wait)
            if local is not None:
                for lease in self._upkeep.held():  # their calls run on: they take their slots in the share
                    shadow = local.try_acquire(0, requests=0)
                    if shadow.lease is not None:
                        outage.shadows[lease.id] = shadow.lease
            self._outage = outage
        log.warning("budget %s: Redis does not answer (%s); outage policy %r: %s", self.budget.name,
                    outage.reason, policy.mode, outage.describe())  # fmt: skip
        if self._events is not None:  # waiters in the shared queue come back to take the outage path
            for inbox in self._events.mail.everyone():
                inbox.put(Resubscribed())
        threading.Thread(target=self._probe, args=(outage,), name="xflow-probe", daemon=True).start()

    def _acquire_in_outage(self, outage: Outage, requests: float, tokens: float, timeout: float | None) -> Lease | None:
        """A grant from the outage policy, or None once Redis answers again (ask it then)."""
        if outage.mode == "closed":
            raise outage.unavailable(self.budget.name)
        if outage.local is None:  # no slot of our own: wait for Redis
            if not outage.back.wait(timeout):
                raise AcquireTimeout(
                    f"budget {self.budget.name!r}: Redis does not answer and this process's share of the "
                    f"concurrency is none ({self.processes} processes, max_concurrency "
                    f"{self.budget.max_concurrency}); no grant within {timeout:g}s",
                    budget=self.budget.name,
                )
            return None
        lease: Lease | None = None
        with self._outage_lock:
            outage.waiting += 1
        try:
            lease = self._acquire_from_share(outage, requests, tokens, timeout)
        finally:
            with self._outage_lock:
                outage.waiting -= 1
                if lease is not None:
                    outage.granted(requests, tokens)
                last = outage.ended and outage.waiting == 0
            if last:
                outage.local.close()
        return lease

    def _acquire_from_share(
        self, outage: Outage, requests: float, tokens: float, timeout: float | None
    ) -> Lease | None:
        """Wait for the share in slices, so that a waiter goes back to the shared budget as soon as
        Redis answers (None) rather than being granted by a share that no longer counts."""
        local = outage.local
        assert local is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while not outage.ended:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise AcquireTimeout(
                    f"no grant from budget {self.budget.name!r} (on its local share) within {timeout:g}s",
                    budget=self.budget.name,
                )
            step = SHARE_SLICE if left is None else min(SHARE_SLICE, left)
            if (hold := outage.closed_for()) > 0:  # calls sent before may still free slots in Redis
                time.sleep(min(hold, step))
                continue
            try:
                lease: Lease = local.acquire(tokens, requests=requests, timeout=step)
            except AcquireTimeout as exc:  # at once, for a rate: sleep toward the fit time
                if exc.retry_after is not None:
                    time.sleep(min(exc.retry_after, step))
                continue
            if not outage.ended:
                return lease
            lease.cancel()  # granted as Redis came back: the call has not started, ask Redis instead
        return None

    def _try_in_outage(self, outage: Outage, requests: float, tokens: float) -> Decision[Lease] | None:
        """The share's answer, or None once Redis answers again (ask it then)."""
        if outage.mode == "closed":
            raise outage.unavailable(self.budget.name)
        if outage.local is None:
            return Decision(False)
        if (hold := outage.closed_for()) > 0:
            return Decision(False, retry_after=hold)
        decision: Decision[Lease] = outage.local.try_acquire(tokens, requests=requests)
        if decision.lease is None:
            return decision
        if outage.ended:  # granted as Redis came back: the call has not started, ask Redis instead
            decision.lease.cancel()
            return None
        with self._outage_lock:
            outage.granted(requests, tokens)
        return decision

    def _probe(self, outage: Outage) -> None:
        """Try Redis every ``probe_interval``; once it answers, bring this process back to it."""
        while not self._closed and self._outage is outage:
            time.sleep(self.outage_policy.probe_interval)
            try:
                self._client.ping()
            except Exception as exc:  # whatever a client in failover raises: keep probing
                log.debug("budget %s: Redis probe: %s", self.budget.name, exc)
                continue
            try:
                self._come_back(outage)
            except Exception as exc:  # the probe never dies: a failed way back is tried again
                log.debug("budget %s: Redis answered but the way back failed (%s); still out", self.budget.name, exc)

    def _come_back(self, outage: Outage) -> None:
        """Charge what the share spent, register every lease held (shared, then the share's), switch back.
        Waiters on the share see ``ended`` and ask Redis; a lease the share grants meanwhile is taken
        over here or given back by its waiter, whichever comes first (see ``_acquire_from_share``)."""
        local = outage.local
        spent_now = outage.to_charge(local.status() if local is not None and outage.mode == "local" else None)
        if local is not None:
            # Other processes back from the same outage must register their shares' calls before
            # anyone takes a slot that Redis, thawed, may just have freed: a short hold on new grants.
            self._run("rejoin", self._rejoin_args("", 0, 0, spent_now, hold=self.comeback_hold))
        for lease in self._upkeep.held():
            self._rejoin(lease)
        with self._outage_lock:
            outage.ended = True
        if local is not None:
            for lease in local._upkeep.held():
                try:
                    self._take_over(outage, lease)
                except Exception as exc:  # it stays on the share, whose settle is only local
                    log.warning("lease %s of budget %s could not join the shared budget: %s", lease.id,
                                self.budget.name, exc)  # fmt: skip
        with self._outage_lock:
            self._outage = None
            last = outage.waiting == 0
        outage.back.set()
        self._upkeep.kick()  # the settles that failed meanwhile go out now
        for shadow in outage.shadows.values():
            with contextlib.suppress(XflowError):
                shadow.release()
        if local is not None and last:
            local.close()
        log.warning("budget %s: Redis answers again after %.1fs; back on the shared budget (%d grants on "
                    "the %r policy meanwhile)", self.budget.name, time.monotonic() - outage.since, outage.grants,
                    outage.mode)  # fmt: skip

    def _take_over(self, outage: Outage, lease: Lease) -> None:
        """A lease the share granted becomes one of the shared budget's: pointed here first (a release
        from then on settles in Redis), then registered there (see ``_rejoin`` for a release crossing it)."""
        if lease.closed:  # released meanwhile: its settle went to the share
            return
        local = outage.local
        if local is not None:
            local._disown(lease)
        lease._limiter = self
        self._upkeep.add(lease)
        self._finalizers[lease.id] = fin = weakref.finalize(lease, self._dropped, lease.id)
        fin.atexit = False
        self._rejoin(lease)

    def _disown(self, lease: Lease) -> None:
        self._upkeep.disown(lease.id)
        fin = self._finalizers.pop(lease.id, None)
        if fin is not None:
            fin.detach()

    def _give_back(self, lease_id: str, *, now: bool) -> None:
        """Cancel a ticket or a grant not handed out; once now if ``now``, else (and on failure) later."""
        outage = self._outage
        if now and not (outage is not None and outage.defers()):
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
        return decode_settle(self._run("settle", argv))

    def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause the whole fleet (honouring ``retry_after`` seconds if given); during
        an outage on a local share, pause that share."""
        outage = self._outage
        if outage is not None and outage.local is not None:
            reply: CooldownReply = outage.local.cooldown(retry_after)
        else:
            reply = decode_cooldown(self._run("cooldown", self._cooldown_args(retry_after)))
        return self._cooled(reply)

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
        """A read-only snapshot: levels, leases in flight, queue, cooldown; during an outage, this
        process's share, with ``mode`` saying which policy runs it."""
        outage = self._outage
        if outage is not None:
            return outage.status(self.budget.name, None if outage.local is None else outage.local.status())
        return decode_status(self.budget, self._run("status", []))

    def close(self) -> None:
        """Give back the leases still held (settled at their estimate), make one last try at the
        settles still pending, stop the background threads; close the client if this limiter made it."""
        if self._closed:
            return
        self._closed = True
        _LIVE.discard(self)
        outage, self._outage = self._outage, None
        if outage is not None and outage.local is not None:
            outage.back.set()
            outage.local.close()
        self._upkeep.close()
        for lease in self._upkeep.held():
            if lease._close():
                with contextlib.suppress(XflowError):
                    self._finish(lease, "settle", self._settle_args(lease.id, None))
        for retry in self._upkeep.drain():
            with contextlib.suppress(XflowError):
                self._run(retry.op, retry.argv)
        if self._events is not None:
            for inbox in self._events.mail.everyone():  # no round renews their tickets now: let them know
                inbox.put(Resubscribed())
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
        self._queued = set()
        self._outage = None  # the parent's probe does not run here: the next failure starts our own
        self._outage_lock = threading.Lock()
        if self._owns:
            _INHERITED.append(self._client)  # never closed here: its sockets are the parent's
            self._bind(sync_client(self._target, self.io_timeout)[0], True)
            self._scripts = register(self._client, self.io_timeout)
        self._gate = _gate(self._client)

    def __enter__(self) -> Limiter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
