"""One process's own budget on plain floats: the scripts' decisions without their bookkeeping.

The XtremeFlow API's default scheduler has a budget no other process can see, so it needs none of
what makes a shared budget survive crashes and outages: no lease TTLs, no ticket renewals, no
claim of a grant made in the queue, no lost keys, no learned limits, no keys to expire. What is
left is what ``acquire.lua``, ``settle.lua``, ``cancel.lua``, ``cooldown.lua`` and
``clear_cooldown.lua`` decide for a budget with ``overdraft`` (the compatible API's admission): a
TAT per bucket, the concurrency count, the cooldown and its backoff level, one queue in order of
place (first come, first served within a priority class) whose head is told its fit time, and the
late head's credit. The arithmetic is the scripts', in the
same order, state rounded to six decimals as they store it; ``tests/test_local.py`` replays random
histories on this and on ``_engine`` (the Lua in plain Python, itself proved against the Lua) and
requires the same grants at the same times, the same replies and the same state.

Time is the caller's (``now``, seconds); a head told its fit time is granted by ``tick`` at or
after it, as a queued waiter of the shared budget comes back when told.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ._engine import LATE_CREDIT


class Held:
    """A granted lease: what it was charged. ``open`` until settled or cancelled."""

    __slots__ = ("open", "requests", "tokens")

    def __init__(self, requests: float, tokens: float) -> None:
        self.requests = requests
        self.tokens = tokens
        self.open = True


class Waiting:
    """A queued ticket: its cost, its place (acquire.lua's), the fit time its head was last told
    (-1: never), and the grant made to it once its turn came (``held``)."""

    __slots__ = (
        "fin",
        "fit",
        "held",
        "inc",
        "place",
        "queued",
        "requests",
        "since",
        "tag",
        "tenant",
        "tokens",
        "waiter",
    )

    def __init__(
        self,
        requests: float,
        tokens: float,
        place: float = 0.0,
        tag: float | None = None,
        inc: float = 0.0,
        tenant: str = "",
        fin: float = 0.0,
    ) -> None:
        self.requests = requests
        self.tokens = tokens
        self.place = place
        # queued by a tenant (fair queuing): its place for the virtual time (``tag``), the turn it was
        # charged, whose it is and the tenant's finish tag it set
        self.tag, self.inc, self.tenant, self.fin = tag, inc, tenant, fin
        self.fit = -1.0
        self.held: Held | None = None
        self.queued = True
        #: What the front waits on (an asyncio future) and since when; the core never touches them.
        self.waiter: object = None
        self.since = 0.0


class LocalBudget:
    """The state and decisions of one in-process budget (see the module's docstring).

    ``granted(ticket)`` is called when a queued ticket's turn comes (its ``held`` set), from within
    the operation that made the grant: it must not call back into the budget. ``claim_window`` is
    the shared budget's: a head held back by the slots a grant in the queue just took is told the
    moment that grant would lapse unclaimed, as the scripts tell it (the claim is instant here, but
    the time told counts when the head is charged; see ``tick``). ``lease`` is the class of the
    leases it makes (a front's subclass of ``Held``).
    """

    __slots__ = (
        "burst",
        "cl",
        "claim_window",
        "cr",
        "cu",
        "due",
        "granted",
        "in_flight",
        "lease",
        "max_conc",
        "queue",
        "rate_req",
        "rate_tok",
        "rt",
        "seq",
        "tenants",
        "tt",
        "vt",
    )

    def __init__(
        self,
        rate_req: float,
        rate_tok: float,
        burst: float,
        max_conc: int,
        claim_window: float,
        granted: Callable[[Waiting], None],
        lease: type[Held] = Held,
    ) -> None:
        self.rate_req, self.rate_tok, self.burst, self.max_conc = rate_req, rate_tok, burst, max_conc
        self.claim_window = claim_window
        self.lease = lease
        self.granted = granted
        self.rt = self.tt = self.cu = self.cl = self.cr = 0.0
        self.in_flight = 0
        self.seq = 0  # arrivals that queued or passed the queue (acquire.lua's seq)
        self.vt = 0.0  # the tenants' virtual time, and each tenant's finish tag (acquire.lua's)
        self.tenants: dict[str, float] = {}
        self.queue: deque[Waiting] = deque()
        #: When the head is told it fits (a rate or the cooldown holds it): tick then. None otherwise.
        self.due: float | None = None

    # --- the prelude's helpers, for overdraft budgets ---

    def _fit(self, now: float, creq: float, ctok: float) -> float:
        """fit_time(): with overdraft each bucket's slack is its whole burst."""
        fit = now if now > self.cu else self.cu
        if self.rate_req > 0 and creq > 0 and self.rt - self.burst > fit:
            fit = self.rt - self.burst
        if self.rate_tok > 0 and ctok > 0 and self.tt - self.burst > fit:
            fit = self.tt - self.burst
        return fit

    def _from(self, now: float, tat: float, fit: float, cost: float, rate: float) -> float:
        """charged_from(): a head that comes back late is charged from its fit time, by at most
        LATE_CREDIT and its own refill time; anyone else from now."""
        if fit < 0 or fit >= now or self.cu >= fit - 0.000001 or tat - self.burst < fit - 0.000001:
            return max(tat, now)
        return max(tat, fit, now - LATE_CREDIT, now - cost / rate)

    def _charge(self, now: float, creq: float, ctok: float, fit: float) -> Held:
        if self.rate_req > 0:
            self.rt = self._from(now, self.rt, fit, creq, self.rate_req) + creq / self.rate_req
        if self.rate_tok > 0:
            self.tt = self._from(now, self.tt, fit, ctok, self.rate_tok) + ctok / self.rate_tok
        self.in_flight += 1
        if creq % 1 == 0 and ctok % 1 == 0 and creq < 1e14 and ctok < 1e14:  # whole: stored as they are
            return self.lease(creq, ctok)
        return self.lease(_g14(creq), _g14(ctok))

    def _refund(self, now: float, creq: float, ctok: float) -> None:
        if self.rate_req > 0 and self.rt > now:
            self.rt = max(now, self.rt - creq / self.rate_req)
        if self.rate_tok > 0 and self.tt > now:
            self.tt = max(now, self.tt - ctok / self.rate_tok)

    def _tag(self, tenant: str) -> float:
        """tenant_tag(): the tenant's finish tag, or the virtual time if later; tags behind it go."""
        tenants, vt = self.tenants, self.vt
        if len(tenants) > 64:  # (the scripts drop them at every call: the same tags either way)
            for name in [n for n, f in tenants.items() if f <= vt]:
                del tenants[name]
        f = tenants.get(tenant, 0.0)
        return f if f > vt else vt

    def _cost(self, creq: float, ctok: float) -> float:
        """virtual_cost(): the seconds of the rates a call takes, the larger; else a slot's share."""
        c = 0.0
        if self.rate_req > 0:
            c = max(c, creq / self.rate_req)
        if self.rate_tok > 0:
            c = max(c, ctok / self.rate_tok)
        if c == 0 and self.max_conc > 0:
            c = 1 / self.max_conc
        return c

    def _slot_free(self) -> bool:
        return self.max_conc <= 0 or self.in_flight < self.max_conc

    def _save(self) -> None:
        """save_state(): the scripts store six decimals; within an operation they work unrounded
        (the cooldown's fields change in its two operations only: ``_save_cooldown``)."""
        if self.rate_req > 0:
            self.rt = round(self.rt, 6)
        if self.rate_tok > 0:
            self.tt = round(self.tt, 6)

    def _save_cooldown(self) -> None:
        self.cu, self.cr = round(self.cu, 6), round(self.cr, 6)
        self._save()

    def tick(self, now: float) -> None:
        """The head comes back when told (or anything else happens): grant what fits now."""
        self._advance(now)
        self._save()

    def _advance(self, now: float, granted: bool = False) -> bool:
        """advance(): grant the queue's heads in order while they fit; tell the next its fit time.
        ``granted``: a grant in the queue was made earlier in this operation (the scripts still
        count it provisional until its waiter claims it, after the operation). Returns whether one
        was made, by then."""
        self.due = None
        queue = self.queue
        while queue:
            t = queue[0]
            if not self._slot_free():
                if granted:  # the scripts tell it when the grant just made lapses unless claimed
                    told = now + self.claim_window
                    if abs(told - t.fit) > 0.0000005:
                        t.fit = round(told, 6)
                return granted
            fit = self._fit(now, t.requests, t.tokens)
            if fit > now:
                if abs(fit - t.fit) > 0.0000005:
                    t.fit = round(fit, 6)
                self.due = fit
                return granted
            queue.popleft()
            t.queued = False
            t.held = self._charge(now, t.requests, t.tokens, t.fit)
            if t.tag is not None and t.tag > self.vt:
                self.vt = t.tag
            granted = True
            self.granted(t)
        return granted

    # --- the operations ---

    def acquire(
        self,
        now: float,
        creq: float,
        ctok: float,
        max_wait: float | None = None,
        may_queue: bool = True,
        lead: int = 0,
        tenant: str = "",
        weight: float = 0.0,
    ) -> Held | Waiting | float | None:
        """A lease granted now, or the ticket queued for one (``granted`` is called in its turn).
        Refused, nothing queued: the exact wait (a float) when it is longer than ``max_wait`` or
        ``may_queue`` is false; None when it is false and a slot or the queue holds it back.
        ``lead``, ``tenant`` and ``weight``: the call's place, as acquire.lua takes it."""
        queue = self.queue
        granted = self._advance(now) if queue else False
        seq = self.seq + 1
        place, first = float(seq), not queue
        tag: float | None = None
        cost = 0.0
        if weight > 0:
            tag, cost = self._tag(tenant), self._cost(creq, ctok)
            place = _r6(tag - lead * cost)
        elif lead > 0:
            place = seq - lead - 0.5
        if not first and (weight > 0 or lead > 0):
            first = place < queue[0].place
        if first and (self.max_conc <= 0 or self.in_flight < self.max_conc):
            fit = self._fit(now, creq, ctok)
            if fit <= now:
                held = self._charge(now, creq, ctok, -1.0)
                if tag is not None:  # the virtual time moves to its place (a lead's is below its tag)
                    self.tenants[tenant] = _r6(tag + cost / weight)
                    self.vt = max(self.vt, place)
                if queue:  # it passed the queue: an arrival, or its tenant's tag moved on (see acquire.lua)
                    if tag is None:
                        self.seq = seq
                    self._advance(now, granted)
                self._save()
                return held
            if not may_queue or (max_wait is not None and fit - now > max_wait):
                self._save()
                return fit - now
        elif not may_queue:
            self._save()
            return None
        if tag is not None:
            self.tenants[tenant] = _r6(tag + cost / weight)
        else:
            self.seq = seq
        t = Waiting(_g14(creq), _g14(ctok), place)
        if tag is not None:
            t.tag, t.inc, t.tenant, t.fin = place, _r6(cost / weight), tenant, _r6(tag + cost / weight)
        if not queue or place >= queue[-1].place:
            queue.append(t)
        else:  # ahead of later places; behind equal ones, which arrived first
            i = len(queue) - 1
            while i > 0 and queue[i - 1].place > place:
                i -= 1
            queue.insert(i, t)
        self._advance(now, granted)
        self._save()
        return t

    def settle(self, now: float, held: Held, actual: float | None) -> float:
        """Free the slot and correct the tokens to ``actual`` (None: the estimate stands); the
        tokens refunded (negative: debt charged). A lease settled or cancelled before: 0."""
        refunded = 0.0
        if held.open:
            held.open = False
            self.in_flight -= 1
            if actual is not None:
                refunded = held.tokens - actual
                if refunded > 0:
                    self._refund(now, 0.0, refunded)
                elif refunded < 0 and self.rate_tok > 0:
                    self.tt = max(self.tt, now) - refunded / self.rate_tok
        if self.queue:
            self._advance(now)
        self._save()
        return refunded

    def cancel(self, now: float, item: Held | Waiting) -> str:
        """Give a reservation back whole: a ticket leaves the queue, a lease is refunded."""
        reply = "unknown"
        if isinstance(item, Waiting):
            if item.queued:
                item.queued = False
                self.queue.remove(item)
                f = self.tenants.get(item.tenant) if item.tag is not None and item.fin > self.vt else None
                if f is not None:  # drop(): its tenant gets back the turn it was charged
                    self.tenants[item.tenant] = _r6(f - item.inc)
                reply = "dequeued"
            elif item.held is not None:
                return self.cancel(now, item.held)
        elif item.open:
            item.open = False
            self.in_flight -= 1
            self._refund(now, item.requests, item.tokens)
            reply = "cancelled"
        self.tick(now)
        return reply

    def cooldown(
        self,
        now: float,
        retry_after: float | None,
        base: float,
        max_backoff: float,
        quiet: float,
        jitter: float,
        draw: float,
        max_pause: float,
    ) -> tuple[float, int, bool]:
        """Pause every grant: (until, backoff level, whether this began the pause)."""
        level = 0.0
        if self.cu > now:
            level = self.cl
        elif self.cr > now:
            level = self.cl + 1
        backoff = 0.0
        if retry_after is None or level > 0:
            backoff = min(max_backoff, base * 2.0**level)
        asked = -1.0 if retry_after is None else retry_after
        pause = min(max_pause, max(asked, backoff) * (1 + jitter * draw))
        started = self.cu <= now
        self.cu = max(self.cu, now + pause)
        if self.rate_req > 0:
            self.rt = max(self.rt, now + self.burst)
        if self.rate_tok > 0:
            self.tt = max(self.tt, now + self.burst)
        self.cl = level
        self.cr = self.cu + quiet
        self._advance(now)
        self._save_cooldown()
        return self.cu, int(level), started

    def clear_cooldown(self, now: float) -> tuple[float, int]:
        """End the pause and reset the backoff: (the pause's end as it stood, its level)."""
        was_until, was_level = self.cu, self.cl
        if self.cu > now:
            self.cu = now
        if self.cr > now:
            self.cr = now
        self.cl = 0.0
        self._advance(now)
        self._save_cooldown()
        return was_until, int(was_level)

    def level(self, now: float, tat: float, rate: float) -> float | None:
        """What a bucket holds now (negative: debt), None where the dimension is not limited."""
        if rate <= 0:
            return None
        return rate * self.burst - rate * max(0.0, tat - now)


def _r6(x: float) -> float:
    """What the scripts read back of a number they stored: six decimals."""
    return float(f"{x:.6f}")


def _g14(x: float) -> float:
    """A cost as the scripts keep it once stored: 14 significant digits (a whole number stays)."""
    return x if x % 1 == 0 and x < 1e14 else float(f"{x:.14g}")
