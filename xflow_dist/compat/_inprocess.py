"""The compatible schedulers' default: a budget of this scheduler's own, in this event loop.

XtremeFlow kept its scheduler's state in the process; so does a scheduler made without ``redis=``.
Its budget is ``_local.LocalBudget`` (the scripts' decisions on floats, no bookkeeping for crashes
no other process could see) driven by the loop's clock: a grant that fits is made within the
caller's own step, with no await; a queued ticket waits on a future that the budget resolves in its
turn, and the head told its fit time is ticked by a timer at that time. ``LocalLimiter`` answers the
calls the schedulers make of an ``AsyncLimiter`` (acquire, cooldown, clear_cooldown, status) the
same way, so a scheduler behaves alike with or without Redis, only faster without.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .. import _observe as observe
from .._async_limiter import _Acquiring
from .._base import Decision, _check_seconds
from .._budget import MAX_UNITS, Budget, CooldownPolicy
from .._core import ANYWHERE, CooldownReply, Place, SettleReply, Status, place_of, validate_cost, validate_retry_after
from .._engine import LATE_CREDIT
from .._exceptions import AcquireTimeout, ConfigurationError, InvalidCostError
from .._local import Held, LocalBudget, Waiting


class LocalLease(Held):
    """A lease of the in-process budget: ``report``, ``release``, ``cancel``, as an ``AsyncLease``'s.

    The budget makes it (its ``Held``: one object a task, no wrapper); each ``LocalLimiter`` has a
    subclass of its own that names it, so a lease needs no field for it.
    """

    __slots__ = ()
    _limiter: LocalLimiter
    id = "local"
    #: No heartbeat can find it expired: nothing outside this loop can take its slot.
    lost = False
    #: What the provider's limits would be learned for: nothing is learned in process.
    model = ""

    @property
    def closed(self) -> bool:
        """Settled, released or cancelled: nothing more will be charged or refunded."""
        return not self.open

    async def report(self, actual_tokens: float, **facts: Any) -> SettleReply | None:
        """Settle with the tokens really used (refund or debt) and free the slot; once only."""
        limiter = self._limiter
        _refuse(facts)
        if (
            isinstance(actual_tokens, bool)
            or not isinstance(actual_tokens, int | float)
            or not 0 <= actual_tokens <= MAX_UNITS  # NaN and infinity fail this too
        ):
            raise InvalidCostError(
                f"actual_tokens must be finite, from 0 to {MAX_UNITS:g}, not {actual_tokens!r}",
                budget=limiter.budget.name,
            )
        if not self.open:
            return None
        return limiter._settle(self, float(actual_tokens))

    async def release(self, **facts: Any) -> SettleReply | None:
        """Settle at the estimate and free the slot."""
        _refuse(facts)
        if not self.open:
            return None
        return self._limiter._settle(self, None)

    def _release_now(self) -> None:
        """``release`` for the schedulers, at the end of a task: no await, no reply."""
        if self.open:
            self._limiter._settled(self, None)

    async def cancel(self) -> None:
        """Give the whole reservation back: the call was never made."""
        if self.open:
            self._limiter._cancel(self)

    async def __aenter__(self) -> LocalLease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()

    def __repr__(self) -> str:
        return f"<LocalLease tokens={self.tokens:g} {'held' if self.open else 'closed'}>"


def _refuse(facts: dict[str, Any]) -> None:
    """A provider's word given to an in-process lease: nothing here learns from it."""
    if facts:
        raise ConfigurationError(
            f"a scheduler without redis= learns nothing from the provider ({', '.join(sorted(facts))} given): "
            "its limits are the ones it was made with"
        )


#: How late the loop may run a head's tick and still have been on time: epoll sleeps in whole
#: milliseconds, a busy loop runs other callbacks first, and a collection of a large heap holds it
#: for tens of milliseconds (22 ms for a gen-2 collection with 2,000 tasks queued; XtremeFlow's own
#: starts ran up to 60 ms behind in the same benchmark). Heads ticked within it are caught up as of
#: their times, as XtremeFlow's booked start times are; the scripts forgive a late head as much
#: (``LATE_CREDIT``). Later than this the loop was held up (a blocking call), and the heads are
#: late waiters.
TIMER_SLACK = LATE_CREDIT


class _Kept(LocalLease):
    """A lease handed to a caller of ``LocalLimiter.acquire``: dropped unsettled, it is released
    (an ``AsyncLease`` has a finalizer for that; nothing else would ever free its slot here)."""

    __slots__ = ()

    def __del__(self) -> None:
        if self.open:
            limiter = self._limiter
            try:  # in the loop's thread, after this collection: the settle arms the loop's timer
                limiter._loop.call_soon_threadsafe(limiter._settled, self, None)
            except RuntimeError:  # the loop is closed: settle here (the next loop arms its timer)
                limiter._core.settle(limiter._now(), self, None)


class LocalLimiter:
    """The budget of one scheduler, made in a running event loop; ``_rebind`` moves it to another
    (an ``asyncio.run`` per batch of work): the buckets, debt and cooldown carry over, as a shared
    budget's would."""

    def __init__(self, budget: Budget, cooldown_policy: CooldownPolicy) -> None:
        if budget.caps is not None:
            raise ConfigurationError(
                "caps need the shared budget (a Redis URL or memory://), not the in-process one", budget=budget.name
            )
        self.budget = budget
        self.cooldown_policy = cooldown_policy
        # the leases this budget makes know it by their class (see LocalLease)
        self._lease_type = type("LocalLease", (LocalLease,), {"__slots__": (), "_limiter": self})
        self._kept_type = type("LocalLease", (_Kept,), {"__slots__": (), "_limiter": self})
        self._core = LocalBudget(
            budget.request_rate or 0.0, budget.token_rate or 0.0, budget.credit, budget.max_concurrency or 0,
            min(budget.claim_window, budget.lease_ttl), self._granted, self._lease_type,
        )  # fmt: skip
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._rebind()

    def _rebind(self) -> None:
        """Run in the running loop from now on (its clock and timers)."""
        loop = asyncio.get_running_loop()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
        self._loop = loop
        #: The loop's clock (its timers'): asyncio's own loop reads time.monotonic, called directly.
        self._now: Callable[[], float] = time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        self._arm()

    # --- the queue's clock ---

    def _granted(self, t: Waiting) -> None:
        waiter = t.waiter
        if isinstance(waiter, asyncio.Future) and not waiter.done():
            waiter.set_result(None)
        # a waiter cancelled meanwhile finds t.held set and gives it back (see _acquire)

    def _arm(self) -> None:
        """A timer for the head told its fit time; none while nothing waits for a time."""
        due = self._core.due
        if due != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = None if due is None else self._loop.call_at(due, self._tick)
            self._timer_at = due

    def _tick(self) -> None:
        self._timer = self._timer_at = None
        self._now_caught_up()
        self._arm()

    def _now_caught_up(self) -> float:
        """Now, once every head whose time came meanwhile is back: as of its time when the loop ran
        its tick within ``TIMER_SLACK`` of it, else now.

        A head told its time is ticked by the loop's timer, which runs late (epoll sleeps in whole
        milliseconds; a busy loop runs other callbacks first; a collection pauses it), and another
        call may come before it. Nothing acted on the budget since that time (whatever did ran the
        queue then), so a tick late by a hiccup of the loop is the scripts' punctual waiter, not a
        late one (which keeps at most one refill time of credit and would lose the rest at high
        rates). A loop held up for longer (a blocking call) makes the heads late waiters, as they
        are: granted now, by the late head's rule, so that they do not all start at once when it
        resumes.
        """
        now = self._now()
        core = self._core
        due = core.due
        if due is None or due > now:  # the common case: nothing is due
            return now
        # each tick grants the head or tells it a later time (a microsecond later, at most once a
        # head, where the state's rounding moved its fit): the bound is never reached in practice
        for _ in range(2 * len(core.queue) + 2):
            if due is None or due > now:
                break
            core.tick(due if now - due <= TIMER_SLACK else now)
            due = core.due
        return now

    # --- what the schedulers call ---

    def acquire(
        self,
        tokens: float = 0,
        *,
        requests: float = 1,
        timeout: float | None = None,
        priority: str | None = None,
        tenant: str | None = None,
    ) -> _Acquiring[LocalLease]:
        """Wait for ``requests``, ``tokens`` and a slot together, first come first served within
        ``priority``'s class: await it, or ``async with``. ``timeout``: raise ``AcquireTimeout`` at once
        when the wait is known to be longer, else at the deadline, as ``AsyncLimiter.acquire`` does."""
        place = place_of(self.budget, priority, tenant)  # an unknown class or a bad tenant raises here
        requests, tokens = validate_cost(self.budget, requests, tokens)
        return _Acquiring(self._acquire_kept(requests, tokens, _check_seconds("timeout", timeout), place))

    async def _acquire_kept(self, requests: float, tokens: float, timeout: float | None, place: Place) -> LocalLease:
        name = self.budget.name
        got = self._enter(requests, tokens, timeout, place)
        if isinstance(got, float):
            raise AcquireTimeout(
                f"budget {name!r} can grant this request in {got:.3f}s, after the {timeout:g}s timeout",
                budget=name,
                retry_after=got,
            )
        if isinstance(got, Waiting):
            try:
                async with asyncio.timeout(timeout):
                    got = await self._wait(got)
            except TimeoutError:
                raise AcquireTimeout(f"no grant from budget {name!r} within {timeout:g}s", budget=name) from None
        got.__class__ = self._kept_type  # released if the caller drops it
        return got

    async def try_acquire(
        self, tokens: float = 0, *, requests: float = 1, priority: str | None = None, tenant: str | None = None
    ) -> Decision[LocalLease]:
        """A lease now, or how long until one would be granted (None: a slot or the queue holds it back)."""
        place = place_of(self.budget, priority, tenant)
        requests, tokens = validate_cost(self.budget, requests, tokens)
        got = self._core.acquire(self._now_caught_up(), requests, tokens, None, False, *place[:3])  # (no caps here)
        self._arm()  # the queue ran: a head may have been granted or told another time
        if not isinstance(got, LocalLease):
            if observe.OBSERVERS:
                observe.refused(self.budget.name)
            return Decision(False, None, got if isinstance(got, float) else None)
        if observe.OBSERVERS:
            observe.granted(self.budget.name, time.monotonic(), requests, tokens)
        got.__class__ = self._kept_type
        return Decision(True, got, None)

    def _enter(
        self,
        requests: float,
        tokens: float,
        max_wait: float | None = None,
        place: Place = ANYWHERE,
    ) -> LocalLease | Waiting | float:
        """The lease if it fits now (no await: the compatible schedulers' fast path), else the
        ticket queued, to ``_wait`` for, or the exact wait when it is longer than ``max_wait``."""
        now, core = self._now(), self._core
        if core.due is not None and core.due <= now:  # (the hot path skips the call when nothing is due)
            now = self._now_caught_up()
        if place is ANYWHERE:
            got = core.acquire(now, requests, tokens, max_wait)
        else:
            got = core.acquire(now, requests, tokens, max_wait, True, *place[:3])  # (no caps here)
        if type(got) is float:
            return got
        if type(got) is not Waiting:
            if observe.OBSERVERS:
                observe.granted(self.budget.name, time.monotonic(), requests, tokens)
            return got  # type: ignore[return-value]  # made by self._lease_type
        got.waiter = self._loop.create_future()
        got.since = time.monotonic()
        self._arm()
        return got

    async def _wait(self, t: Waiting) -> LocalLease:
        waiter = t.waiter
        assert isinstance(waiter, asyncio.Future)
        try:
            await waiter
        except BaseException:
            self._core.cancel(self._now_caught_up(), t)  # the ticket, or the grant made to it meanwhile
            self._arm()
            raise
        lease = t.held
        assert isinstance(lease, LocalLease)
        if observe.OBSERVERS:
            observe.granted(self.budget.name, t.since, lease.requests, lease.tokens)
        return lease

    def _settle(self, lease: LocalLease, actual: float | None) -> SettleReply:
        refunded = self._settled(lease, actual)
        rpm, tpm = self._core.rate_req * 60, self._core.rate_tok * 60
        return SettleReply(True, refunded, time.time(), rpm or None, tpm or None)

    def _settled(self, lease: LocalLease, actual: float | None) -> float:
        core, now = self._core, self._now()
        if core.due is not None and core.due <= now:  # (the hot path skips the call when nothing is due)
            now = self._now_caught_up()
        refunded = core.settle(now, lease, actual)
        if core.due != self._timer_at:
            self._arm()
        if observe.OBSERVERS:
            observe.settled(self.budget.name, lease.tokens, refunded)
        return refunded

    def _cancel(self, lease: LocalLease) -> None:
        self._core.cancel(self._now_caught_up(), lease)
        self._arm()
        if observe.OBSERVERS:
            observe.settled(self.budget.name, lease.tokens, lease.tokens)

    async def cooldown(self, retry_after: float | None = None) -> CooldownReply:
        """A 429 was seen: pause every grant (``retry_after`` seconds if given), capped at the
        policy's ``max_pause``, as the shared budget does."""
        retry_after = validate_retry_after(self.budget, retry_after)
        p = self.cooldown_policy
        if retry_after is not None:
            retry_after = min(retry_after, p.max_pause)
        now = self._now_caught_up()
        until, level, started = self._core.cooldown(
            now, retry_after, p.base, p.max_backoff, p.quiet, p.jitter, random.random(), p.max_pause
        )
        self._arm()
        if observe.OBSERVERS:
            observe.rate_limited(self.budget.name, started)
        wall = time.time()
        return CooldownReply(wall + (until - now), wall, level, started)

    async def clear_cooldown(self) -> CooldownReply:
        """End the pause now and reset its backoff."""
        now = self._now_caught_up()
        until, level = self._core.clear_cooldown(now)
        self._arm()
        wall = time.time()
        return CooldownReply(wall + (until - now) if until > 0 else 0.0, wall, level)  # 0: never paused

    async def status(self) -> Status:
        """A snapshot, as ``AsyncLimiter.status`` gives it; ``mode`` is ``"in-process"``."""
        core, now = self._core, self._now_caught_up()
        self._arm()
        return Status(
            budget=self.budget.name,
            now=time.time(),
            requests_available=core.level(now, core.rt, core.rate_req),
            tokens_available=core.level(now, core.tt, core.rate_tok),
            in_flight=core.in_flight,
            queued=len(core.queue),
            cooldown_remaining=max(0.0, core.cu - now),
            backoff_level=int(core.cl),
            rpm=core.rate_req * 60 or None,
            tpm=core.rate_tok * 60 or None,
            mode="in-process",
        )

    async def aclose(self) -> None:
        """Stop the queue's timer unless someone still waits in it (the scheduler has waited for its
        tasks); the budget's state stays for the next loop the scheduler runs in."""
        if self._core.queue:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None
