"""Model-based test: the Lua operations against a pure-Python model of the same budget.

``BudgetModel`` re-implements, from the header comments of ``lua/*.lua`` and nothing else, what
one budget remembers (a TAT per bucket, the cooldown deadline, backoff level and quiet period, the
leases and the one FIFO queue of tickets with the fit time told to its head) and what every
operation decides. A hypothesis state machine drives acquire / return to the queue (on time, at
the announced fit time, late) / settle / cancel / extend / cooldown / rejoin / status on fakeredis
(it runs the very same Lua through lupa) with a fake clock, and compares every reply, every message
published on the events channel ("g", "h", "c", "l") and, after every step, the status snapshot.

The keys may also be lost (FLUSHALL) while the machine still holds leases and tickets: every call
says, as the library does, whether this process has seen the keys (ARGV[10]), so the model makes a
lost state (empty buckets, a hold) exactly where the scripts do, and the machine rejoins its leases.

Time is deterministic: fakeredis reads ``time.time()`` both for TIME (the scripts' clock) and for
key expiry, and both are patched to one fake clock. The clock moves in steps of 1/64 s and every
rate, burst, cost, TTL, retry-after and jitter is chosen so that all the arithmetic, in Lua
doubles and in the six-decimal strings the scripts store, is exact: the model uses Fractions and
a decision on an exact boundary (a lease expiring exactly now, a start exactly at max wait) is
the same on both sides rather than a coin flip of rounding.

Key expiry is checked rather than re-implemented: when the budget's keys are found gone, the
model must have had nothing left to remember (every bucket full, no pause, no quiet period, no
live lease, no live ticket); it then forgets everything too.

Every step also runs on ``memory://``'s engine (``xflow_dist/_engine.py``, the scripts in plain
Python) at the same clock, and must give the very same reply bytes, publish the very same events,
leave the same keys and set the same expiry (``Twin``): the in-process mode is the Lua, exactly.

One more test replays a fixed sequence against the real redis-server, the model taking as its
clock the ``now`` each reply reports.
"""

from __future__ import annotations

import bisect
import copy
import math
import time as _time
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, ClassVar

import fakeredis
import fakeredis._socket._base as _fake_socket_base
import fakeredis.commands_mixins.server_mixin as _fake_server_mixin
import pytest
import redis
from hypothesis import HealthCheck, Phase, reject, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from xflow_dist import Budget, Cap, CooldownPolicy
from xflow_dist._base import LimiterBase
from xflow_dist._core import (
    _num,
    acquire_args,
    budget_args,
    channel,
    cooldown_args,
    decode_acquire,
    decode_cooldown,
    decode_settle,
    decode_status,
    keys,
    settle_args,
)
from xflow_dist._memory import MemoryServer
from xflow_dist._scripts import register

F = Fraction
ZERO = F(0)
#: how far back a late head of the queue may be charged (lua/_prelude.lua)
LATE_CREDIT = F(1, 16)
#: claim windows of the hold a lost state is made with (lua/_prelude.lua)
RECOVERY_WINDOWS = 3
#: how deep advance() looks for a ticket its caps do not hold (lua/_prelude.lua)
MAX_SCAN = 32


def frac(x: float | int | str | bytes | Fraction) -> Fraction:
    """Exact value of a number or of a decimal string (floats via repr, as the args are built)."""
    if isinstance(x, bytes):
        x = x.decode()
    if isinstance(x, float):
        x = repr(x)
    return F(x)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CapLevel:
    """One cap a call passes (acquire.lua's levels): rates per second (0: none), bursts, slots (0: none)."""

    node: str
    request_rate: Fraction
    request_burst: Fraction
    token_rate: Fraction
    token_burst: Fraction
    max_concurrency: int


@dataclass
class Lease:
    requests: Fraction
    tokens: Fraction
    start: Fraction  # its grant time (now), or a reservation's fit time
    expiry: Fraction
    # for the provider's correction: the levels just after the grant (None where no rate), and the
    # corrections (kr, kt) and charges (cq, ct) made by then
    snap_requests: Fraction | None = None
    snap_tokens: Fraction | None = None
    marks: tuple[Fraction, Fraction, Fraction, Fraction] = (ZERO, ZERO, ZERO, ZERO)
    provisional: bool = False  # granted to a queued ticket and not claimed yet
    levels: tuple[CapLevel, ...] = ()  # the caps it passed, charged and given back with it


@dataclass
class Ticket:
    requests: Fraction
    tokens: Fraction
    alive_until: Fraction
    ttl: Fraction
    fit: Fraction | None = None  # the fit time last announced to it as head
    overdraft: bool = False  # fits once the buckets are out of debt, whatever its cost
    place: Fraction = ZERO  # its arrival's number, less its class's lead and a half if it has one
    lead: int = 0  # its priority class's lead
    tag: Fraction | None = None  # its place (tag less lead x cost), where the budget is shared by tenant
    inc: Fraction = ZERO  # the turn its tenant was charged when it queued (its cost / the weight)
    tenant: str = ""
    fin: Fraction = ZERO  # the tenant's finish tag it set
    passed: int = 0  # later arrivals granted or queued ahead of it (at most the greatest lead less its own)
    levels: tuple[CapLevel, ...] = ()  # the caps it passes
    book: bool = False  # reserved for its fit time at the head, within its horizon, if its process is connected


Reply = tuple[list[Any], list[tuple[Any, ...]]]  # (reply fields, events published in order)


@dataclass
class Grant:
    """One grant for the safety check: when Redis granted it, its segment of constant rates, its
    cost, and the fit time it was told if it came back after it."""

    at: Fraction
    segment: tuple[int, Fraction, Fraction]
    cost: tuple[Fraction, Fraction]
    late_fit: Fraction | None
    overdraft: bool = False


def ceil_us(x: Fraction) -> Fraction:
    """Seconds rounded up to the microsecond, as the scripts round a rescaled TAT."""
    return F(math.ceil(x * 10**6 - F(1, 1000)), 10**6)


def effective(configured: Fraction, per_minute: Fraction) -> Fraction:
    """The configured rate lowered to the learned limit, or the learned one where none is configured."""
    learned = per_minute / 60
    if learned > 0 and (configured <= 0 or learned < configured):
        return learned
    return configured


@dataclass
class BudgetModel:
    """One budget as the Lua headers describe it. Times are Fractions of seconds of Redis time."""

    configured_request_rate: Fraction
    configured_token_rate: Fraction
    burst: Fraction
    max_concurrency: int
    lease_ttl: Fraction
    claim_window: Fraction

    rt: Fraction = ZERO  # TAT of the request bucket
    tt: Fraction = ZERO  # TAT of the token bucket
    cu: Fraction = ZERO  # cooldown deadline
    cl: int = 0  # backoff level
    cr: Fraction = ZERO  # end of the quiet period
    kr: Fraction = ZERO  # requests / tokens taken off the levels by corrections and tighter rates
    kt: Fraction = ZERO
    cq: Fraction = ZERO  # requests / tokens charged so far
    ct: Fraction = ZERO
    lr: Fraction = ZERO  # limits learned from the provider, per minute (0: none)
    lt: Fraction = ZERO
    lu: Fraction = ZERO  # the last learned limit is remembered until then
    # per model: [rpm, rpm live until, tpm, tpm live until]; lr, lt are the tightest live, as applied
    learned: dict[str, list[Fraction]] = field(default_factory=dict)
    rescales: int = 0  # rate changes applied so far (the safety check's segments)
    offgrid: bool = False  # a rescaled TAT left the 1/64 s grid (the harness keeps it on)
    pb: int = 0  # probe: 0 none, 1 probing, 2 over
    leases: dict[str, Lease] = field(default_factory=dict)
    queue: dict[str, Ticket] = field(default_factory=dict)  # in order of (place, id)
    seq: int = 0  # arrivals that queued or passed the queue
    vt: Fraction = ZERO  # virtual time of the tenants' fair queuing: the latest tag granted
    # what the reservations hold of each bucket: the latest start plus its cost's refill time; a
    # refund never takes the TAT below it (or lower if it already is)
    rf: Fraction = ZERO
    tf: Fraction = ZERO
    tenants: dict[str, Fraction] = field(default_factory=dict)  # tenant -> finish tag
    # each cap's [request TAT, token TAT, leases held] (absent: full and unused)
    caps: dict[str, list[Any]] = field(default_factory=dict)
    stored: bool = False  # the keys exist (some operation other than status ran)
    # the processes connected (their own channel subscribed): grants to their tickets are firm; not
    # the keys' state, so a lost state keeps it
    live: set[str] = field(default_factory=set)
    arriving: str | None = None  # the ticket this acquire queues: it is never booked in its own call

    def reset(self) -> None:
        self.rt = self.tt = self.cu = self.cr = ZERO
        self.kr = self.kt = self.cq = self.ct = self.lr = self.lt = self.lu = ZERO
        self.cl = self.pb = 0
        self.learned.clear()
        self.rescales += 1
        self.leases.clear()
        self.queue.clear()
        self.seq = 0
        self.vt = self.rf = self.tf = ZERO
        self.tenants.clear()
        self.caps.clear()
        self.stored = False

    @property
    def request_rate(self) -> Fraction:
        """The rate in force: the configured one lowered to the learned limit."""
        return effective(self.configured_request_rate, self.lr)

    @property
    def token_rate(self) -> Fraction:
        return effective(self.configured_token_rate, self.lt)

    @property
    def probing(self) -> bool:
        return self.pb == 1

    # ---- one bucket: capacity C = rate * burst, level(t) = C - rate * max(0, TAT - t) ----------

    def _level(self, tat: Fraction, rate: Fraction, now: Fraction) -> Fraction:
        if rate == 0:
            return ZERO
        return rate * self.burst - rate * max(ZERO, tat - now)

    def _need(self, rate: Fraction, cost: Fraction, overdraft: bool) -> Fraction:
        """What the bucket must hold for a cost to fit: min(cost, C); in overdraft, nothing (out of debt)."""
        return ZERO if overdraft else min(cost, rate * self.burst)

    def _fits_from(self, tat: Fraction, rate: Fraction, cost: Fraction, now: Fraction, overdraft: bool) -> Fraction:
        """Earliest t >= now at which the bucket holds what the cost needs."""
        if rate == 0 or cost == 0:
            return now
        capacity = rate * self.burst
        # capacity - rate * (tat - t) >= need  <=>  t >= tat - (capacity - need) / rate
        return max(now, tat - (capacity - self._need(rate, cost, overdraft)) / rate)

    def _fit(self, requests: Fraction, tokens: Fraction, now: Fraction, overdraft: bool = False) -> Fraction:
        """Every limit at once, and never inside a pause."""
        return max(
            now,
            self.cu,
            self._fits_from(self.rt, self.request_rate, requests, now, overdraft),
            self._fits_from(self.tt, self.token_rate, tokens, now, overdraft),
        )

    @staticmethod
    def _give_back(tat: Fraction, rate: Fraction, amount: Fraction, now: Fraction, floor: Fraction = ZERO) -> Fraction:
        """Refund credit, never above capacity: the TAT does not go below now, nor below what the
        reservations hold of the bucket (``floor``; where it is already below, not at all)."""
        if rate == 0 or tat <= now:
            return tat
        return max(now, min(tat, floor), tat - amount / rate)

    # ---- leases and the queue -----------------------------------------------------------------

    def _reap(self, now: Fraction) -> None:
        """Leases whose expiry has come belong to dead holders; their charge stays, except that of a
        provisional grant never claimed (its holder never called), which is refunded."""
        for lease_id in [i for i, lease in self.leases.items() if lease.expiry <= now]:
            lease = self.leases.pop(lease_id)
            if lease.provisional:
                self.rt = self._give_back(self.rt, self.request_rate, lease.requests, now, self.rf)
                self.tt = self._give_back(self.tt, self.token_rate, lease.tokens, now, self.tf)
                self._release_levels(lease.levels, lease.requests, lease.tokens, now)
            else:
                self._release_levels(lease.levels, ZERO, ZERO, now)

    # ---- caps: a hierarchy under the budget ------------------------------------------------------

    def _cap(self, node: str) -> list[Any]:
        return self.caps.setdefault(node, [ZERO, ZERO, 0])

    @staticmethod
    def _cap_fits_from(
        tat: Fraction, rate: Fraction, burst: Fraction, cost: Fraction, now: Fraction, overdraft: bool
    ) -> Fraction:
        """Earliest t >= now at which a cap's bucket holds min(cost, C) (in overdraft: is out of debt)."""
        if rate == 0 or cost == 0:
            return now
        need = ZERO if overdraft else min(cost, rate * burst)
        return max(now, tat - (rate * burst - need) / rate)

    def _level_fit(
        self, levels: tuple[CapLevel, ...], requests: Fraction, tokens: Fraction, now: Fraction, overdraft: bool
    ) -> tuple[Fraction, bool, list[str]]:
        """When every cap's rates let the cost through, whether each has a slot, and the caps that bind
        it: those without a slot, else those whose rates fit last (the others free before it fits)."""
        fit, slot, fits = now, True, []
        for lv in levels:
            rt, tt, held = self._cap(lv.node)
            at = max(
                self._cap_fits_from(rt, lv.request_rate, lv.request_burst, requests, now, overdraft),
                self._cap_fits_from(tt, lv.token_rate, lv.token_burst, tokens, now, overdraft),
            )
            full = lv.max_concurrency > 0 and held >= lv.max_concurrency
            slot = slot and not full
            fit = max(fit, at)
            fits.append((lv.node, at, full))
        return fit, slot, [node for node, at, full in fits if (full if not slot else at >= fit)]

    def _charge_levels(self, levels: tuple[CapLevel, ...], requests: Fraction, tokens: Fraction, now: Fraction) -> None:
        """A grant is charged at every cap it passes (from now) and holds a slot there."""
        for lv in levels:
            cap = self._cap(lv.node)
            if lv.request_rate and requests:
                cap[0] = max(cap[0], now) + requests / lv.request_rate
            if lv.token_rate and tokens:
                cap[1] = max(cap[1], now) + tokens / lv.token_rate
            cap[2] += 1

    def _release_levels(
        self, levels: tuple[CapLevel, ...], requests: Fraction, tokens: Fraction, now: Fraction
    ) -> None:
        """A lease ends: its slot at every cap; what is given back there as at the budget (tokens
        below 0: an under-estimate, charged as debt)."""
        for lv in levels:
            cap = self._cap(lv.node)
            cap[2] = max(0, cap[2] - 1)
            cap[0] = self._give_back(cap[0], lv.request_rate, requests, now) if requests > 0 else cap[0]
            if tokens > 0:
                cap[1] = self._give_back(cap[1], lv.token_rate, tokens, now)
            elif tokens < 0 and lv.token_rate:
                cap[1] = max(cap[1], now) - tokens / lv.token_rate

    def _virtual_cost(self, requests: Fraction, tokens: Fraction) -> Fraction:
        """A call's cost in the tenants' virtual time: the seconds of the rates in force it takes,
        the larger; a slot's share where no rate sees it."""
        cost = ZERO
        if self.request_rate:
            cost = max(cost, requests / self.request_rate)
        if self.token_rate:
            cost = max(cost, tokens / self.token_rate)
        if cost == 0 and self.max_concurrency:
            cost = F(1, self.max_concurrency)
        return cost

    def _slot_free(self) -> bool:
        """Below max concurrency, and none at all in flight while the budget probes."""
        if self.probing and self.leases:
            return False
        return self.max_concurrency == 0 or len(self.leases) < self.max_concurrency

    def _charged_from(
        self, tat: Fraction, rate: Fraction, cost: Fraction, fit: Fraction | None, now: Fraction, overdraft: bool
    ) -> Fraction:
        """Where a charge starts: now; for a head of the queue back after its fit time, as of then in
        a bucket that set that time (not full before it) unless a cooldown set it, at most
        LATE_CREDIT and its cost's refill time back."""
        slack = (rate * self.burst - self._need(rate, cost, overdraft)) / rate
        if fit is None or fit >= now or self.cu >= fit or tat - slack < fit:
            return max(tat, now)
        return max(tat, fit, now - LATE_CREDIT, now - cost / rate)

    def _charge(
        self, requests: Fraction, tokens: Fraction, now: Fraction, fit: Fraction | None = None, overdraft: bool = False
    ) -> None:
        """Charge every limited bucket, all or none (see _charged_from; ``fit``: the fit time told to a
        head of the queue, None: charged from now), counting it in cq, ct."""
        self.cq += requests
        self.ct += tokens
        if self.request_rate:
            start = self._charged_from(self.rt, self.request_rate, requests, fit, now, overdraft)
            self.rt = start + requests / self.request_rate
        if self.token_rate:
            start = self._charged_from(self.tt, self.token_rate, tokens, fit, now, overdraft)
            self.tt = start + tokens / self.token_rate

    def _grant(
        self,
        lease_id: str,
        requests: Fraction,
        tokens: Fraction,
        now: Fraction,
        fit: Fraction | None = None,
        provisional: bool = False,
        overdraft: bool = False,
        levels: tuple[CapLevel, ...] = (),
        start: Fraction | None = None,
    ) -> None:
        """Charge every limited bucket and hand out the lease (remembering the levels after, at its
        start: now, or a reservation's fit time, when the provider sees the call)."""
        at = now if start is None else start
        if at > now:  # a reservation is charged from its start in every bucket, not only the binding one
            if self.request_rate and requests:
                self.rt = max(self.rt, at)
            if self.token_rate and tokens:
                self.tt = max(self.tt, at)
        self._charge(requests, tokens, now, fit, overdraft)
        if at > now and self.request_rate and requests:  # what it holds, no refund gives back before then
            self.rf = max(self.rf, at) + requests / self.request_rate
        if at > now and self.token_rate and tokens:
            self.tf = max(self.tf, at) + tokens / self.token_rate
        self._charge_levels(levels, requests, tokens, now)
        self.leases[lease_id] = Lease(
            requests,
            tokens,
            at,
            at + (self.claim_window if provisional else self.lease_ttl),
            self._level(self.rt, self.request_rate, at) if self.request_rate else None,
            self._level(self.tt, self.token_rate, at) if self.token_rate else None,
            (self.kr, self.kt, self.cq, self.ct),
            provisional,
            levels,
        )

    # ---- learning from the provider -------------------------------------------------------------

    def _rescale(
        self, tat: Fraction, r1: Fraction, r2: Fraction, charged: Fraction, now: Fraction
    ) -> tuple[Fraction, Fraction]:
        """A rate change that invents no credit: tighter keeps the debt (the level drops by the
        capacity lost), looser keeps the level; from no rate, the capacity less all charged so far."""
        if r2 <= 0 or r1 == r2:
            return tat, ZERO
        b = self.burst
        if r1 <= 0:
            return now + ceil_us(min(r2 * b, charged) / r2), ZERO
        debt = max(ZERO, tat - now)
        if r2 < r1:
            out, drop = now + ceil_us(debt * r1 / r2), (r1 - r2) * b
        else:
            out, drop = now + ceil_us(b - (b - debt) * r1 / r2), ZERO
        self.offgrid = self.offgrid or (out * TICKS).denominator != 1
        return out, drop

    def _live(self, now: Fraction) -> tuple[Fraction, Fraction]:
        """The tightest learned limits still live, over every model (0: none)."""
        lr = min((e[0] for e in self.learned.values() if e[0] > 0 and e[1] > now), default=ZERO)
        lt = min((e[2] for e in self.learned.values() if e[2] > 0 and e[3] > now), default=ZERO)
        return lr, lt

    def _relimit(self, lr: Fraction, lt: Fraction, now: Fraction) -> None:
        """Put learned limits in force, rescaling each bucket whose rate changes."""
        if (lr, lt) == (self.lr, self.lt):
            return
        old_req, old_tok = self.request_rate, self.token_rate
        self.lr, self.lt = lr, lt
        if (old_req, old_tok) != (self.request_rate, self.token_rate):
            self.rescales += 1
        self.rt, drop = self._rescale(self.rt, old_req, self.request_rate, self.cq, now)
        self.kr += drop
        self.tt, drop = self._rescale(self.tt, old_tok, self.token_rate, self.ct, now)
        self.kt += drop
        # while a reservation waits, no refund takes a rescaled bucket below its new TAT
        if self.rf > now:
            self.rf = max(self.rf, self.rt)
        if self.tf > now:
            self.tf = max(self.tf, self.tt)

    def _expire(self, now: Fraction) -> None:
        """Every operation first takes the learned limits that expired out of force."""
        self._relimit(*self._live(now), now)

    def _lose(self, now: Fraction) -> None:
        """A state the caller has seen (or holds a lease or ticket of) but that is absent was lost, not
        expired: it is made anew with both buckets empty (the calls in flight spent them) and a hold of
        RECOVERY_WINDOWS claim windows, a cooldown deadline that leaves the backoff level alone."""
        self.rt = self.tt = now + self.burst
        self.cu = now + RECOVERY_WINDOWS * self.claim_window
        self.rf = self.tf = ZERO

    def _load(self, now: Fraction, seen_keys: bool) -> bool:
        """What every operation that saves starts with: leases past expiry reaped, a lost state made
        anew (see _lose), expired learned limits out of force. True if this call found the state lost."""
        self._reap(now)
        lost = seen_keys and not self.stored
        if lost:
            self._lose(now)
        self._expire(now)
        return lost

    def _saved(self, lost: bool, now: Fraction, events: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The state saved: a lost state made anew is announced ("l <now>") once, when it is saved."""
        self.stored = True
        if lost:
            events.append(("l", now))
        return events

    def _learn(
        self,
        limit_req: Fraction | None,
        limit_tok: Fraction | None,
        memory: Fraction,
        now: Fraction,
        model: str = "",
    ) -> None:
        """One model's report replaces its own limits, each live for ``memory``; the tightest live
        limit of any model is in force."""
        if not limit_req and not limit_tok:
            return
        entry = self.learned.setdefault(model, [ZERO, ZERO, ZERO, ZERO])
        if limit_req:
            entry[0], entry[1] = limit_req, now + memory
        if limit_tok:
            entry[2], entry[3] = limit_tok, now + memory
        for name in [m for m, e in self.learned.items() if e[1] <= now and e[3] <= now]:
            del self.learned[name]
        self.lu = max(self.lu, now + memory)
        if self.pb == 1:
            self.pb = 2
        self._relimit(*self._live(now), now)

    def _corrected(
        self,
        tat: Fraction,
        rate: Fraction,
        k: Fraction,
        seen: Fraction | None,
        now: Fraction,
        snap: Fraction | None = None,
        k0: Fraction = ZERO,
        c: Fraction = ZERO,
        c0: Fraction = ZERO,
    ) -> tuple[Fraction, Fraction]:
        """The provider had ``seen`` left: a lead beyond every later charge and correction (and one
        unit of its rounding) is taken off; with no snapshot, the level is capped at seen + 1."""
        if seen is None or rate <= 0:
            return tat, k
        if snap is not None:
            ahead = snap - (k - k0) - (c - c0) - (seen + 1)
        else:
            ahead = self._level(tat, rate, now) - (seen + 1)
        if ahead > 0:
            return max(tat, now) + ahead / rate, k + ahead
        return tat, k

    def _head(self) -> str | None:
        return next(iter(self.queue), None)

    def _drop(self, ticket_id: str) -> None:
        """A ticket leaves the queue without a grant: its tenant gets back the turn it was charged."""
        ticket = self.queue.pop(ticket_id)
        # (a finish tag the virtual time passed was forgotten: the tenant starts at vt anyway)
        if ticket.tag is not None and ticket.fin > self.vt and ticket.tenant in self.tenants:
            self.tenants[ticket.tenant] -= ticket.inc

    def _advance(self, now: Fraction, events: list[tuple[Any, ...]]) -> tuple[bool, set[str]]:
        """Only the head may be granted: every head that fits now is, in order; the first that does
        not is told when it will fit (once per change of that time) and its ticket lives until
        then plus its TTL. A dead head (not renewed in time) is dropped. A ticket that only its caps
        hold back (they would let it through later than the budget) is told when they will and
        passed over, with every later ticket of those caps, up to MAX_SCAN deep. Returns whether no
        ticket waits for the budget itself, and the caps that hold tickets."""
        rank, held = 0, set()
        while (head := next(iter(list(self.queue)[rank : rank + 1]), None)) is not None:
            ticket = self.queue[head]
            if ticket.alive_until < now:
                self._drop(head)
                continue
            if any(lv.node in held for lv in ticket.levels):
                rank += 1
                if rank >= MAX_SCAN:
                    return False, held
                continue
            if not self._slot_free():
                # an unclaimed provisional grant frees its slot at its expiry: the head comes back then
                self._announce(head, self._unclaimed_expiry(), now, events)
                return False, held
            fit = self._fit(ticket.requests, ticket.tokens, now, ticket.overdraft)
            lfit, lslot, holders = self._level_fit(ticket.levels, ticket.requests, ticket.tokens, now, ticket.overdraft)
            if not lslot or lfit > fit:
                held.update(holders)
                # told when its caps' rates fit; held by a cap's slot, when an unclaimed grant's claim
                # window ends if the first lease is one (as for the budget's slot)
                self._announce(head, lfit if lslot else self._unclaimed_expiry(), now, events)
                rank += 1
                if rank >= MAX_SCAN:
                    return False, held
                continue
            if fit <= now:
                del self.queue[head]
                firm = owner_of(head) in self.live  # its process connected: no claim needed
                self._grant(
                    head, ticket.requests, ticket.tokens, now, ticket.fit, not firm, ticket.overdraft, ticket.levels
                )
                if ticket.tag is not None:
                    self.vt = max(self.vt, ticket.tag)
                events.append(("g", head, now, "f") if firm else ("g", head, now))
                continue
            if (
                ticket.book
                and head != self.arriving
                and not ticket.levels
                and fit > self.cu
                and fit - now <= self._horizon(ticket)
                and owner_of(head) in self.live
            ):
                # booked: reserved for its fit time, firm (its waiter starts then without coming back)
                del self.queue[head]
                self._grant(head, ticket.requests, ticket.tokens, now, ticket.fit, False, ticket.overdraft, start=fit)
                if ticket.tag is not None:
                    self.vt = max(self.vt, ticket.tag)
                events.append(("g", head, now, "f", fit))
                continue
            self._announce(head, fit, now, events)
            # a head that died never comes back: the next waiter (of another process; here every id
            # is its own) is told to come back a claim window after the head's fit time
            second = next(iter(list(self.queue)[rank + 1 : rank + 2]), None)
            if second is not None:
                self._announce(second, fit + self.claim_window, now, events)
            return False, held
        return True, held

    def _horizon(self, ticket: Ticket) -> Fraction:
        """How far ahead of its fit time a booking head is reserved: two refill times of its cost, at
        most a second."""
        h = ZERO
        if self.request_rate:
            h = max(h, ticket.requests / self.request_rate)
        if self.token_rate:
            h = max(h, ticket.tokens / self.token_rate)
        return min(F(1), 2 * h)

    def _announce(self, ticket_id: str, at: Fraction | None, now: Fraction, events: list[tuple[Any, ...]]) -> None:
        """Tell a ticket to come back at ``at`` (None: nothing to tell), once per change of that time;
        it lives until then plus its TTL."""
        ticket = self.queue[ticket_id]
        if at is not None and ticket.fit != at:
            ticket.fit = at
            ticket.alive_until = max(ticket.alive_until, at + ticket.ttl)
            events.append(("h", ticket_id, at, now))

    def _unclaimed_expiry(self) -> Fraction | None:
        """The expiry of the lease that expires first (equal expiries: by id, as Redis orders them), if
        it is a grant not claimed yet."""
        first = min(self.leases.items(), key=lambda item: (item[1].expiry, item[0]), default=None)
        return first[1].expiry if first is not None and first[1].provisional else None

    def _wait_hint(self, ticket_id: str, now: Fraction) -> Fraction:
        """The head waiting for its rates: exactly until it fits; else a renewal interval; the head
        no later than when the first lease would expire (an unclaimed grant's credit comes back then)."""
        ticket = self.queue[ticket_id]
        is_head = self._head() == ticket_id
        hint = ticket.ttl / 2
        if (is_head or ticket.levels) and ticket.fit is not None and ticket.fit > now:
            hint = ticket.fit - now
        if is_head and self.leases:
            hint = min(hint, min(lease.expiry for lease in self.leases.values()) - now)
        return max(F(1, 1000), hint)

    def remembers(self, now: Fraction) -> list[str]:
        """What the budget still has to remember at ``now`` (must be nothing when keys expire)."""
        out = []
        for what, t in (
            ("request TAT", self.rt),
            ("token TAT", self.tt),
            ("cooldown", self.cu),
            ("quiet period", self.cr),
            ("learned limits", self.lu),
        ):
            if t > now:
                out.append(f"{what} {float(t):.6f} > now {float(now):.6f}")
        out += [f"cap {n} TAT" for n, cap in self.caps.items() if cap[0] > now or cap[1] > now]
        out += [f"live lease {i}" for i, lease in self.leases.items() if lease.expiry > now]
        out += [
            f"live ticket {i} (alive until {float(t.alive_until):.6f})"
            for i, t in self.queue.items()
            if t.alive_until >= now
        ]
        return out

    # ---- operations ---------------------------------------------------------------------------

    def acquire(
        self,
        now: Fraction,
        lease_id: str,
        requests: Fraction,
        tokens: Fraction,
        max_wait: Fraction | None,
        may_queue: bool,
        ticket_ttl: Fraction,
        probe: bool = False,
        seen_keys: bool = False,
        overdraft: bool = False,
        lead: int = 0,
        tenant: str = "",
        weight: Fraction = ZERO,
        levels: tuple[CapLevel, ...] = (),
        reserve: bool = False,
        book: bool = False,
    ) -> Reply:
        events: list[tuple[Any, ...]] = []
        lost = self._load(now, seen_keys)
        reply = self._acquire(
            now, lease_id, requests, tokens, max_wait, may_queue, ticket_ttl, probe, events, overdraft, lead, tenant,
            weight, levels, reserve, book,
        )  # fmt: skip
        self.arriving = None
        return reply, self._saved(lost, now, events)

    def _acquire(
        self,
        now: Fraction,
        lease_id: str,
        requests: Fraction,
        tokens: Fraction,
        max_wait: Fraction | None,
        may_queue: bool,
        ticket_ttl: Fraction,
        probe: bool,
        events: list[tuple[Any, ...]],
        overdraft: bool = False,
        lead: int = 0,
        tenant: str = "",
        weight: Fraction = ZERO,
        levels: tuple[CapLevel, ...] = (),
        reserve: bool = False,
        book: bool = False,
    ) -> list[Any]:
        if probe and self.pb == 0:  # the first acquire of a probing budget: one call at a time
            self.pb = 2 if self.lr or self.lt else 1
        open_, held_caps = self._advance(now, events)
        held = self.leases.get(lease_id)
        if held is not None:
            if held.provisional:  # the holder claims its grant: it lives a lease TTL from now
                held.provisional = False
                held.expiry = now + self.lease_ttl
            return ["granted", held.start, now, held.expiry]
        ticket = self.queue.get(lease_id)
        if ticket is not None:  # a return: same place, renewed from now (or from its fit time)
            ticket.ttl = ticket_ttl  # for the caller's TTL: a parked waiter keeps its place that long
            ticket.alive_until = max(now, ticket.fit if ticket.fit is not None else now) + ticket.ttl
            return ["queued", self._wait_hint(lease_id, now), now]
        # a cost the limits in force can never grant (a minute, or the burst if longer) is refused
        for what, cost, rate, floor in (
            ("requests", requests, self.request_rate, F(1)),
            ("tokens", tokens, self.token_rate, ZERO),
        ):
            most = max(floor, rate * max(self.burst, F(60)))
            if rate > 0 and cost > most and not overdraft:
                return ["too_large", most, now, what]
        for lv in levels:  # and so for every cap it passes
            for what, cost, rate, burst, floor in (
                ("requests", requests, lv.request_rate, lv.request_burst, F(1)),
                ("tokens", tokens, lv.token_rate, lv.token_burst, ZERO),
            ):
                most = max(floor, rate * max(burst, F(60)))
                if rate > 0 and cost > most and not overdraft:
                    return ["too_large", most, now, what, lv.node]
        # A new arrival's place: its number, FIFO; with a lead, ahead of the last `lead` arrivals. It
        # is first where nothing waits or it goes before the head; then, fitting now, it is granted.
        # Shared by tenant: start-time fair queuing, the tag its tenant's finish tag or the virtual
        # time if later (finish tags behind it are forgotten), its place the tag less lead x its cost.
        seq = self.seq + 1
        place, first = F(seq), not self.queue
        tag: Fraction | None = None
        cost = ZERO
        if weight > 0:
            self.tenants = {name: f for name, f in self.tenants.items() if f > self.vt}
            tag = max(self.vt, self.tenants.get(tenant, ZERO))
            cost = self._virtual_cost(requests, tokens)
            place = tag - lead * cost
        elif lead > 0:
            place = seq - lead - F(1, 2)
        if not first and (weight > 0 or lead > 0):
            first = place < self.queue[next(iter(self.queue))].place
        if not first and open_:  # every ticket waits for its caps alone: first unless its own caps hold one
            first = not any(lv.node in held_caps for lv in levels)
        lfit, lslot = now, True
        if first and levels:
            lfit, lslot, _ = self._level_fit(levels, requests, tokens, now, overdraft)
        if first and lslot and self._slot_free():
            fit = max(self._fit(requests, tokens, now, overdraft), lfit)
            if fit > now and (not may_queue or (max_wait is not None and fit - now > max_wait)):
                return ["refused", fit - now, now]
            # reserved: granted now for the fit time the rates (not a cooldown) set, and started then;
            # no refund gives back what it holds of the buckets
            start = fit if reserve and not levels and fit > now and fit > self.cu else now
            if fit <= start:
                self._grant(lease_id, requests, tokens, now, overdraft=overdraft, levels=levels, start=start)
                if tag is not None:  # the virtual time moves to its place (a lead's is below its tag)
                    self.tenants[tenant] = tag + cost / weight
                    self.vt = max(self.vt, place)
                if self.queue:  # it passed every waiter: an arrival, so that passes stay bounded
                    if tag is None:
                        self.seq = seq
                    for waiter in self.queue.values():
                        waiter.passed += 1
                    self._advance(now, events)
                return ["granted", start, now, start + self.lease_ttl]
        elif not may_queue:
            return ["refused", F(-1), now]
        if tag is not None:
            self.tenants[tenant] = tag + cost / weight
        else:
            self.seq = seq
        ticket = Ticket(
            requests, tokens, now + ticket_ttl, ticket_ttl, overdraft=overdraft, place=place, lead=lead,
            tag=place if tag is not None else None, inc=cost / weight if tag is not None else ZERO, tenant=tenant,
            fin=tag + cost / weight if tag is not None else ZERO, levels=levels, book=book and not levels,
        )  # fmt: skip
        for waiter_id, waiter in self.queue.items():
            if (place, lease_id.encode()) < (waiter.place, waiter_id.encode()):
                waiter.passed += 1
        self.queue[lease_id] = ticket
        order = sorted(self.queue.items(), key=lambda item: (item[1].place, item[0].encode()))
        self.queue = dict(order)
        self.arriving = lease_id
        self._advance(now, events)
        lease = self.leases.get(lease_id)
        if lease is not None:  # granted just now, behind tickets only their caps hold: claimed
            lease.provisional = False
            lease.expiry = now + self.lease_ttl
            return ["granted", now, now, lease.expiry]
        return ["queued", self._wait_hint(lease_id, now), now]

    def settle(
        self,
        now: Fraction,
        lease_id: str,
        actual: Fraction | None,
        seen: tuple[Fraction | None, Fraction | None] = (None, None),
        limits: tuple[Fraction | None, Fraction | None] = (None, None),
        memory: Fraction = ZERO,
        model: str = "",
        seen_keys: bool = False,
    ) -> Reply:
        """Learn the limits, then correct (down) by what the provider had left, then refund or
        charge debt. Lease id "" only learns (and caps the levels at what was left plus a unit)."""
        events: list[tuple[Any, ...]] = []
        lost = self._load(now, seen_keys)
        self._learn(limits[0], limits[1], memory, now, model)
        lease = None if lease_id == "" else self.leases.pop(lease_id, None)
        if lease_id == "":
            self.rt, self.kr = self._corrected(self.rt, self.request_rate, self.kr, seen[0], now)
            self.tt, self.kt = self._corrected(self.tt, self.token_rate, self.kt, seen[1], now)
            reply: list[Any] = ["learned", ZERO, now]
        elif lease is None:
            reply = ["unknown", ZERO, now]
        else:
            if self.pb == 1:
                self.pb = 2
            kr0, kt0, cq0, ct0 = lease.marks
            self.rt, self.kr = self._corrected(
                self.rt, self.request_rate, self.kr, seen[0], now, lease.snap_requests, kr0, self.cq, cq0
            )
            self.tt, self.kt = self._corrected(
                self.tt, self.token_rate, self.kt, seen[1], now, lease.snap_tokens, kt0, self.ct, ct0
            )
            if actual is None:
                self._release_levels(lease.levels, ZERO, ZERO, now)
                reply = ["settled", ZERO, now]
            else:
                diff = lease.tokens - actual
                if diff > 0:  # over-estimate: refund
                    self.tt = self._give_back(self.tt, self.token_rate, diff, now, self.tf)
                elif diff < 0 and self.token_rate:  # under-estimate: debt charged now
                    self.tt = max(self.tt, now) + (-diff) / self.token_rate
                self._release_levels(lease.levels, ZERO, diff, now)  # the same at every cap
                reply = ["settled", diff, now]
        reply += [self.request_rate * 60, self.token_rate * 60]
        self._advance(now, events)
        return reply, self._saved(lost, now, events)

    def cancel(self, now: Fraction, lease_id: str, seen_keys: bool = False) -> Reply:
        events: list[tuple[Any, ...]] = []
        lost = self._load(now, seen_keys)
        if lease_id in self.queue:
            self._drop(lease_id)
            reply: list[Any] = ["dequeued", now]
        elif lease_id in self.leases:
            lease = self.leases.pop(lease_id)
            self.rt = self._give_back(self.rt, self.request_rate, lease.requests, now, self.rf)
            self.tt = self._give_back(self.tt, self.token_rate, lease.tokens, now, self.tf)
            self._release_levels(lease.levels, lease.requests, lease.tokens, now)
            reply = ["cancelled", now]
        else:
            reply = ["unknown", now]
        self._advance(now, events)
        return reply, self._saved(lost, now, events)

    def extend(self, now: Fraction, lease_id: str, seen_keys: bool = False) -> Reply:
        events: list[tuple[Any, ...]] = []
        lost = self._load(now, seen_keys)
        self._advance(now, events)
        lease = self.leases.get(lease_id)
        if lease is None:
            return ["lost", ZERO, now], self._saved(lost, now, events)
        lease.expiry = max(lease.expiry, now + self.lease_ttl)
        lease.provisional = False  # a heartbeat claims a provisional grant too
        return ["extended", lease.expiry, now], self._saved(lost, now, events)

    def rejoin(
        self,
        now: Fraction,
        lease_id: str,
        requests: Fraction,
        tokens: Fraction,
        spent_requests: Fraction,
        spent_tokens: Fraction,
        seen_keys: bool = False,
        hold: Fraction = ZERO,
        levels: tuple[CapLevel, ...] = (),
    ) -> Reply:
        """What was spent outside the budget is charged as debt, unless this very call found the state
        lost (its empty buckets stand for it); ``hold`` seconds of no new grant (the cooldown deadline,
        the backoff left alone). Then a lease id Redis holds is extended (and claimed)
        as by extend; one it does not hold is added, held for a lease TTL and charged nothing (at the
        levels "u u": no snapshot), even past max concurrency. Id "": only the charge."""
        events: list[tuple[Any, ...]] = []
        lost = self._load(now, seen_keys)
        if (spent_requests > 0 or spent_tokens > 0) and not lost:
            self._charge(spent_requests, spent_tokens, now)
        if hold > 0:
            self.cu = max(self.cu, now + hold)
        kind = "charged"
        if lease_id:
            lease = self.leases.get(lease_id)
            if lease is not None:
                lease.expiry = max(lease.expiry, now + self.lease_ttl)
                lease.provisional = False
                kind = "extended"
            else:
                marks = (self.kr, self.kt, self.cq, self.ct)
                self.leases[lease_id] = Lease(
                    requests, tokens, now, now + self.lease_ttl, None, None, marks, levels=levels
                )
                self._charge_levels(levels, ZERO, ZERO, now)  # its slot at each of its caps, charged nothing
                kind = "adopted"
        self._advance(now, events)
        return [kind, now], self._saved(lost, now, events)

    def cooldown(
        self,
        now: Fraction,
        retry_after: Fraction | None,
        policy: CooldownPolicy,
        draw: Fraction,
        seen_keys: bool = False,
    ) -> Reply:
        events: list[tuple[Any, ...]] = []
        lost = self._load(now, seen_keys)
        if self.cu > now:  # a 429 of a call sent before this pause: same episode
            level = self.cl
        elif self.cr > now:  # within the quiet period after a pause: a repeat
            level = self.cl + 1
        else:
            level = 0
        pause = ZERO if retry_after is None else retry_after
        if retry_after is None or level > 0:
            pause = max(pause, min(frac(policy.max_backoff), frac(policy.base) * 2**level))
        pause = min(frac(policy.max_pause), pause * (1 + frac(policy.jitter) * draw))
        started = self.cu <= now  # no pause was in force: this 429 begins one
        self.cu = max(self.cu, now + pause)  # never shortened
        # the provider's bucket is empty now: zero credit now (level(now) = 0), debt kept
        if self.request_rate:
            self.rt = max(self.rt, now + self.burst)
        if self.token_rate:
            self.tt = max(self.tt, now + self.burst)
        # reservations still to start start no sooner than the pause's end: the buckets hold them as
        # charged then, after the zero credit of now, and no refund goes below that (the floors)
        held = [lease for lease in self.leases.values() if lease.start > now]
        if self.request_rate and sum(lease.requests for lease in held):
            self.rt = max(self.rt, max(now + self.burst, self.cu) + sum(h.requests for h in held) / self.request_rate)
            self.rf = max(self.rf, self.rt)
        if self.token_rate and sum(lease.tokens for lease in held):
            self.tt = max(self.tt, max(now + self.burst, self.cu) + sum(h.tokens for h in held) / self.token_rate)
            self.tf = max(self.tf, self.tt)
        self.cl = level
        self.cr = self.cu + frac(policy.quiet)  # the quiet period runs from the pause's end
        self._advance(now, events)
        self._saved(lost, now, events)
        events.append(("c", now, self.cu))
        return ["cooldown", self.cu, now, level, "1" if started else "0"], events

    def status(self, now: Fraction, seen_keys: bool = False) -> list[Any]:
        """Read-only: leases past expiry are not counted, dead tickets still are (not dropped yet);
        learned limits that expired are out of force, as the next operation will find them; a lost
        state is shown as the next operation will make it, but neither saved nor announced."""
        if seen_keys and not self.stored:
            view = copy.deepcopy(self)
            view._lose(now)
            view.stored = True
            return view.status(now)
        if self._live(now) != (self.lr, self.lt):
            seen = copy.deepcopy(self)
            seen._expire(now)
            self.offgrid = self.offgrid or seen.offgrid
            return seen.status(now)
        return [
            now,
            self._level(self.rt, self.request_rate, now),
            self._level(self.tt, self.token_rate, now),
            sum(1 for lease in self.leases.values() if lease.expiry > now),
            len(self.queue),
            max(ZERO, self.cu - now),
            self.cl,
            self.request_rate * 60,
            self.token_rate * 60,
            self.lr,
            self.lt,
            1 if self.probing else 0,
        ]


def cap_levels(levels: tuple[Any, ...]) -> tuple[CapLevel, ...]:
    """The model's levels of a call, exact, from the ones the client sends (``Budget.levels``)."""
    return tuple(
        CapLevel(
            lv.node,
            frac(lv.request_rate),
            frac(lv.request_burst),
            frac(lv.token_rate),
            frac(lv.token_burst),
            lv.max_concurrency,
        )
        for lv in levels
    )


def owner_of(lease_id: str) -> str:
    """The process an id belongs to: ids are ``<process>.<unique>`` (one without a dot is its own)."""
    process, dot, _ = lease_id.partition(".")
    return process if dot and process else lease_id


def listen(client: Any, budget: Budget) -> Any:
    """A subscriber to every event of the budget: those on its channel and those on the processes'
    own channels beside it (``<channel>:<process>``), in the order Redis published them."""
    pubsub = client.pubsub()
    pubsub.psubscribe(f"{channel(budget)}*")
    msg = pubsub.get_message(timeout=2)
    assert msg is not None and msg["type"] == "psubscribe"  # confirmed: nothing published is missed
    pubsub.ignore_subscribe_messages = True
    return pubsub


def routed(budget: Budget, msg: dict[str, Any], live: Any = ()) -> str | None:
    """The text of a published event, checked to have gone where it belongs: a notice about a ticket
    ("g", "h") of a process in ``live`` (connected: it holds its own channel) to that channel, so that
    it wakes that process alone; anything else to the budget's, which every process holds. None for a
    subscription message."""
    if msg["type"] not in ("message", "pmessage"):
        return None
    text = msg["data"].decode()
    words = text.split()
    mine = words[0] in ("g", "h") and owner_of(words[1]) in live
    where = f"{channel(budget)}:{owner_of(words[1])}" if mine else channel(budget)
    got = msg["channel"].decode() if isinstance(msg["channel"], bytes) else msg["channel"]
    assert got == where, f"{text!r} published on {got}, not {where}"
    return text


def model_of(budget: Budget) -> BudgetModel:
    return BudgetModel(
        configured_request_rate=frac(budget.request_rate or 0.0),
        configured_token_rate=frac(budget.token_rate or 0.0),
        burst=frac(budget.credit),
        max_concurrency=budget.max_concurrency or 0,
        lease_ttl=frac(budget.lease_ttl),
        claim_window=frac(min(budget.claim_window, budget.lease_ttl)),
    )


# --------------------------------------------------------------------------------------------
# Comparing replies
# --------------------------------------------------------------------------------------------


def texts(raw: Any) -> list[str]:
    return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]


def assert_matches(what: str, got_raw: Any, want: list[Any], tol: Fraction) -> None:
    got = texts(got_raw)
    shown = [w if isinstance(w, str) else f"{float(w):.6f}" for w in want]
    assert len(got) == len(want), f"{what}: got {got}, model {shown}"
    for g, w in zip(got, want, strict=True):
        if isinstance(w, str):
            ok = g == w
        elif isinstance(w, int):
            ok = g == str(w)
        else:
            ok = abs(F(g) - w) <= tol
        assert ok, f"{what}: got {got}, model {shown}"


def assert_events(what: str, got: list[str], want: list[tuple[Any, ...]], tol: Fraction) -> None:
    shown = [" ".join(x if isinstance(x, str) else f"{float(x):.6f}" for x in e) for e in want]
    assert len(got) == len(want), f"{what} published {got}, model {shown}"
    for g, w in zip(got, want, strict=True):
        assert_matches(f"{what} published", g.split(), list(w), tol)


# --------------------------------------------------------------------------------------------
# Deterministic time for fakeredis
# --------------------------------------------------------------------------------------------

BASE = 1_700_000_000
TICKS = 64  # the fake clock moves in 1/64 s: exact in binary and in six decimals


class FakeClock:
    """Stands in for the ``time`` module where fakeredis reads the wall clock."""

    def __init__(self) -> None:
        self.ticks = 0

    def now(self) -> Fraction:
        return BASE + F(self.ticks, TICKS)

    def time(self) -> float:
        return BASE + self.ticks / TICKS

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


CLOCK = FakeClock()


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    # TIME (the scripts' clock) and the per-command clock of key expiry both come from here.
    monkeypatch.setattr(_fake_server_mixin, "time", CLOCK)
    monkeypatch.setattr(_fake_socket_base, "time", CLOCK)
    CLOCK.ticks = 0
    return CLOCK


class Twin:
    """``memory://``'s engine beside a fakeredis running the Lua, on the same clock: every call runs
    on both, and everything they answer, publish and keep must be the same."""

    def __init__(self, client: fakeredis.FakeRedis) -> None:
        self.client = client
        self.server = MemoryServer(clock=CLOCK.time)
        self.inbox: list[dict[str, Any]] = []
        self.server.engine.publish = self.deliver  # every event, whichever channel it goes to

    def deliver(self, channel_name: str, message: str) -> None:
        self.inbox.append({"type": "message", "channel": channel_name.encode(), "data": message.encode()})

    def run(self, op: str, keys_: list[str], args: list[str], lua: Any) -> None:
        """``lua``: the Lua's reply (or the ResponseError it raised) to the same call, just made."""
        try:
            mine: Any = self.server.run(op, keys_, args)
        except redis.ResponseError as exc:
            mine = exc
        if isinstance(lua, redis.ResponseError):
            assert isinstance(mine, redis.ResponseError) and str(mine) == str(lua), (op, args, mine, lua)
        else:
            assert mine == lua, f"{op}{args}: the engine answered {mine}, the Lua {lua}"
        lua_keys = {k.decode() for k in self.client.keys("*")}
        assert set(k.decode() for k in self.server.scan()) == lua_keys, (op, args)
        for key in lua_keys:
            budget = self.server.engine.budgets[key.rsplit(":", 1)[0] + ":state"]
            assert budget.expire_at is not None and int(budget.expire_at * 1000) == self.client.pexpiretime(key), key

    def take_events(self) -> list[dict[str, Any]]:
        out, self.inbox = self.inbox, []
        return out


# --------------------------------------------------------------------------------------------
# The state machine
# --------------------------------------------------------------------------------------------

# Rates divide 64 and costs are whole, so cost / rate is a multiple of 1/64 s; bursts and TTLs
# are multiples of 1/64 s too.
SHAPES: dict[str, dict[str, Any]] = {
    "requests-only": {"rps": 4, "burst": 0.0, "lease_ttl": 2.0},
    "tokens-only-burst-mc2": {"tps": 64, "burst": 2.0, "max_concurrency": 2, "lease_ttl": 2.0},
    "both-burst-mc2": {"rps": 2, "tps": 64, "burst": 0.5, "max_concurrency": 2, "lease_ttl": 2.0},
    "both-burst0-mc1": {"rps": 2, "tps": 32, "burst": 0.0, "max_concurrency": 1, "lease_ttl": 1.5},
    "both-burst-no-mc": {"rps": 4, "tps": 16, "burst": 1.0, "lease_ttl": 3.0},
    "concurrency-only": {"max_concurrency": 2, "lease_ttl": 2.0},
    # 62.5 ms of lateness is 2 requests here: a window's bound shows any credit a late head gets
    "fast-requests": {"rps": 32, "tps": 64, "burst": 0.5, "lease_ttl": 2.0},
}

# base and retry-after are multiples of 1/4 s and jitter * draw of 1/16: pauses stay exact
POLICIES = st.builds(
    CooldownPolicy,
    base=st.sampled_from([0.25, 0.5, 1.0]),
    max_backoff=st.sampled_from([1.0, 2.0, 4.0]),
    quiet=st.sampled_from([0.0, 1.0, 2.0]),
    jitter=st.sampled_from([0.0, 0.25, 0.5]),
)
RETRY_AFTER = st.sampled_from([None, 0.0, 0.25, 0.5, 1.0, 2.5])
DRAWS = st.sampled_from([0.0, 0.25, 0.5, 0.75])
MAX_WAIT = st.sampled_from([None, 0.0, 0.25, 1.0, 2.5])
REQUESTS = st.sampled_from([0, 1, 1, 1, 2, 3])
TOKENS = st.integers(0, 200)
OVERDRAFT = st.sampled_from([False, False, False, True])  # XtremeFlow's admission, now and then
LEADS = st.sampled_from([0, 0, 0, 1, 2, 5])  # priority classes' leads: most arrivals have none
TOP_LEAD = 5  # the top class's: its arrivals reserve (see acquire.lua)
# tenants and their weights (powers of two at most 1, so that tags stay on the grid); "" is untagged
TENANT_WEIGHTS = {"": F(1), "a": F(1), "b": F(1, 2), "c": F(1, 4)}
TENANTS = st.sampled_from(sorted(TENANT_WEIGHTS))
ACTUAL = st.none() | st.integers(0, 300)

# learned limits per minute: rates of whole powers of two per second, so times stay on the grid
LEARN_REQUESTS = [60, 120, 240, 480]
LEARN_TOKENS = [120, 480, 960, 1920, 3840]
SEEN_REQUESTS = st.none() | st.integers(0, 1) | st.integers(0, 6)  # small: the level is often ahead
SEEN_TOKENS = st.none() | st.integers(0, 16) | st.integers(0, 200)
MODELS = st.sampled_from(["", "m1", "m2"])  # two models and the unnamed one, each with its own limits

UNKNOWN = "never-acquired"
EXACT = F(2, 10**6)  # six-decimal formatting of a wait of ticket_ttl / 2 is the only rounding


class BudgetMachine(RuleBasedStateMachine):
    shape: ClassVar[dict[str, Any]] = {}
    always_fair: ClassVar[bool] = False  # every run shares the budget by tenant

    ids = Bundle("ids")

    def __init__(self) -> None:
        super().__init__()
        CLOCK.ticks = 0
        self.client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.scripts = register(self.client)
        self.budget = Budget("model", **self.shape)
        self.keys = keys(self.budget)
        self.model = model_of(self.budget)
        self.pubsub = listen(self.client, self.budget)
        self.twin = Twin(self.client)
        self.live = self.client.pubsub()  # the processes' own channels (connected(): firm grants)
        self.policy = CooldownPolicy()
        self.ticket_ttl = self.budget.lease_ttl
        self.base_args = budget_args(self.budget)
        self.costs: dict[str, tuple[int, int]] = {}
        self.overdrafts: set[str] = set()  # leases asked for in overdraft (XtremeFlow's admission)
        self.leads: dict[str, int] = {}  # the lead of each lease's priority class, where it has one
        self.tenant_of: dict[str, str] = {}  # each lease's tenant, on a budget shared by tenant
        self.fair = False  # the budget is shared by tenant: every acquire carries its tenant's weight
        self.serial = 0
        self.probe = False
        self.memory = 5.0
        # the safety check's record, from the scripts' replies and events only (see safety_holds)
        self.grants: list[Grant] = []
        # (grants before it, dimension, amount): an under-estimate's debt, or minus a refund
        self.adjustments: list[tuple[Fraction, int, int, Fraction]] = []  # (when, grants before, dim, amount)
        self.grant_of: dict[str, int] = {}  # each lease's grant in self.grants
        # lease id -> what it stands charged at, which a settle or cancel refunds from: its grant's
        # cost, or an adopted lease's estimate (see _record)
        self.charged: dict[str, tuple[Fraction, Fraction]] = {}
        self.told: dict[str, Fraction] = {}  # ticket id -> the fit time last announced to it
        self.paused_until = ZERO  # the latest cooldown deadline announced (a lost state's hold too)
        self.hold_until = ZERO  # the end of the hold announced by "l": no new grant before it
        self.last: tuple[str, list[str], set[str]] = ("", [], set())
        self.provisional: dict[str, Lease] = {}  # provisional grants before the last operation
        # What this process believes, as the library does, whatever Redis still remembers: its
        # leases (True) and tickets or unclaimed grants (False), each until when it would be live.
        self.holding: dict[str, tuple[bool, Fraction]] = {}
        self.fresh_until = ZERO  # until then the keys cannot have expired: a script wrote them
        self.idle_grace = F(10)
        self.seen = False  # the flag sent with the last operation (ARGV[10])
        self.notice = False  # a lost state was announced and this process has not rejoined since
        self.outage = False  # Redis did not answer: the way back says it has seen the keys

    def teardown(self) -> None:
        self.pubsub.close()
        self.live.close()
        self.client.close()

    @initialize(
        policy=POLICIES,
        ticket_ttl_share=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
        idle_grace=st.sampled_from([10.0, 0.5]),
        probe=st.booleans(),
        memory=st.sampled_from([0.5, 5.0]),
        fair=st.booleans(),
    )
    def configure(
        self,
        policy: CooldownPolicy,
        ticket_ttl_share: float,
        idle_grace: float,
        probe: bool,
        memory: float,
        fair: bool,
    ) -> None:
        self.policy = policy
        self.fair = fair or self.always_fair  # shared by tenant: every acquire carries a tenant and its weight
        self.probe = probe  # the budget's probe flag, sent with every acquire
        self.memory = memory  # how long learned limits are remembered (short: the keys may expire)
        self.ticket_ttl = self.budget.lease_ttl * ticket_ttl_share
        # a short idle grace lets keys expire within a run (checked by _sync_expiry)
        self.base_args = [*self.base_args[:6], _num(idle_grace), *self.base_args[7:]]
        self.idle_grace = frac(idle_grace)

    # ---- plumbing ------------------------------------------------------------------------------

    def _sync_expiry(self) -> None:
        """Keys gone: the model must have had nothing left to remember, then forgets too."""
        if self.model.stored and not self.client.exists(self.keys[0]):
            now = CLOCK.now()
            assert self.client.exists(*self.keys) == 0, "the budget's keys expired one by one"
            left = list(self.model.remembers(now))
            assert not left, f"keys expired at {float(now):.6f} while the budget remembers {left}"
            self.model.reset()

    def _on_the_grid(self) -> None:
        """An expiry loosens a rate wherever it falls: where the rescaled TAT would leave the 1/64 s
        grid (a debt times r1 / r2), let a few more ticks pass first, so that all stays exact."""
        for _ in range(4 * TICKS):
            now = CLOCK.now()
            if self.model._live(now) == (self.model.lr, self.model.lt):
                return
            after = copy.deepcopy(self.model)
            after.offgrid = False
            after._expire(now)
            if not after.offgrid:
                return
            CLOCK.ticks += 1
        # A debt charged off the grid (a spending of the way back, say) can leave no such time: the
        # model could only agree approximately there, so this example is dropped, not failed.
        reject()

    def _seen(self, now: Fraction) -> bool:
        """ARGV[10] as ``LimiterBase._argv`` sends it: this process holds a lease or a ticket of the
        budget or is in an outage, or a script wrote its keys within 0.8 idle grace (so they cannot
        have expired)."""
        holds = any(until > now or (not lease and until == now) for lease, until in self.holding.values())
        return holds or self.outage or now < self.fresh_until

    def _run(self, op: str, argv: list[str]) -> Any:
        self._sync_expiry()
        self._on_the_grid()
        self._sync_expiry()
        now = CLOCK.now()
        self.last = (op, argv, {i for i, lease in self.model.leases.items() if lease.expiry > now})
        self.provisional = {i: lease for i, lease in self.model.leases.items() if lease.provisional}
        self.seen = self._seen(now)
        block = [*self.base_args[:9], "1" if self.seen else "0", *self.base_args[10:]]
        raw = self.scripts[op](keys=self.keys, args=[*block, *argv])
        self.twin.run(op, self.keys, [*block, *argv], raw)
        if op != "status":  # status.lua writes nothing: no sighting of the keys
            self.fresh_until = now + F(4, 5) * self.idle_grace
        return raw

    def _events(self) -> list[str]:
        out = []
        while (msg := self.pubsub.get_message(timeout=0)) is not None:
            if (text := routed(self.budget, msg, self.model.live)) is not None:
                out.append(text)
        mine = [routed(self.budget, m, self.model.live) for m in self.twin.take_events()]
        assert mine == out, "the engine published other events"
        return out

    def _check(self, what: str, raw: Any, result: tuple[list[Any], list[tuple[Any, ...]]]) -> None:
        want, events = result
        assert_matches(what, raw, want, EXACT)
        got = self._events()
        assert_events(what, got, events, EXACT)
        self._record(texts(raw), got)
        self._track()

    def _track(self) -> None:
        """What this process holds after the last operation: what it closed itself is gone whatever
        Redis said; what Redis holds is as Redis says; the rest (lost with the keys) it still holds
        until it would have expired."""
        op, argv, _ = self.last
        now = CLOCK.now()
        if op in ("settle", "cancel"):
            self.holding.pop(argv[0], None)
        for lease_id, lease in self.model.leases.items():
            self.holding[lease_id] = (not lease.provisional, lease.expiry)
        for ticket_id, ticket in self.model.queue.items():
            self.holding[ticket_id] = (False, ticket.alive_until)
        for held in [i for i, (lease, until) in self.holding.items() if until < now or (lease and until == now)]:
            del self.holding[held]

    def _granted(self, lease_id: str, at: Fraction) -> None:
        assert at >= self.hold_until, f"{lease_id} granted at {float(at):.6f}, within a lost state's hold"
        requests, tokens = self.costs[lease_id]
        fit = self.told.pop(lease_id, None)
        late = fit is not None and fit < at and fit > self.paused_until  # a cooldown did not set it
        segment = (self.model.rescales, self.model.request_rate, self.model.token_rate)
        self.charged[lease_id] = (F(requests), F(tokens))
        overdraft = lease_id in self.overdrafts
        self.grant_of[lease_id] = len(self.grants)
        self.grants.append(Grant(at, segment, (F(requests), F(tokens)), fit if late else None, overdraft))

    def _record(self, reply: list[str], events: list[str]) -> None:
        """What the safety check needs: each grant at the time Redis records, what stays charged of
        it once settled (see safety_holds), under-estimates and spending charged as debt, announced
        fit times and holds. And where a lost state is made (an "l" event), its hold: no grant before
        it ends (see _granted); after any grant, no more leases than max concurrency, adopted ones
        included (an adoption may exceed it, a grant may not)."""
        op, argv, held = self.last
        grants_before = len(self.grants)
        lost_here = False
        for event in events:
            if event.split()[0] == "l":
                lost_here = True
                hold = frac(event.split()[1]) + RECOVERY_WINDOWS * self.model.claim_window
                self.hold_until = max(self.hold_until, hold)
                self.paused_until = max(self.paused_until, hold)  # it sets fit times as a cooldown does
                self.notice = True
        for lease_id, lease in sorted(self.provisional.items()):  # never claimed, reaped: refunded
            closed_here = bool(argv) and argv[0] == lease_id and reply[0] in ("settled", "cancelled")
            gone = self.model.leases.get(lease_id) is not lease and not closed_here
            cost = self.charged.pop(lease_id, None) if gone else None
            if cost is not None:
                for d in (0, 1):
                    self._adjust(d, -cost[d])
        cost = self.charged.get(argv[0]) if argv else None
        if op == "settle" and reply[0] == "settled" and cost is not None and argv[1] != "-1":
            self._adjust(1, frac(argv[1]) - cost[1], argv[0])
        elif op == "cancel" and reply[0] == "cancelled" and cost is not None:
            for d in (0, 1):  # everything given back
                self._adjust(d, -cost[d], argv[0])
        elif op == "rejoin":
            # Spending is a charge like an under-estimate's debt (not made where this very call found
            # the state lost: its empty buckets stand for it). An adopted lease is charged nothing: it
            # is no grant and adds nothing to a window; but it stands charged at its estimate, which
            # its settle or cancel refunds from like any lease's, credit that counts as a refund.
            if not lost_here:
                for d in (0, 1):
                    if frac(argv[3 + d]) > 0:
                        self._adjust(d, frac(argv[3 + d]))
            if reply[0] == "adopted":
                self.charged[argv[0]] = (frac(argv[1]), frac(argv[2]))
        for event in events:
            kind, subject, *rest = event.split()
            if kind == "h":
                self.told[subject] = frac(rest[0])
            elif kind == "g":  # (booked: "g <id> <now> f <start>", granted for its start)
                self._granted(subject, frac(rest[2] if len(rest) > 2 else rest[0]))
            elif kind == "c":
                self.paused_until = max(self.paused_until, frac(rest[0]))
        granted_here = any(e.split()[:2] == ["g", argv[0] if argv else ""] for e in events)
        if op == "acquire" and reply[0] == "granted" and argv[0] not in held and not granted_here:
            self._granted(argv[0], frac(reply[1]))
        most = self.budget.max_concurrency or 0
        if most and len(self.grants) > grants_before:
            in_flight = self.client.zcard(self.keys[1])
            assert in_flight <= most, f"{op}{argv} granted with {in_flight} leases in flight, max {most}"

    def _adjust(self, d: int, amount: Fraction, lease_id: str = "") -> None:
        """A change of dimension ``d``'s level besides a grant, now. A refund of a reservation before
        its start (given back, or settled below its estimate, while its caller still waits) is folded
        into that grant's cost: the provider sees the call at its start as it was settled by then, or
        not at all. (A debt is not: like any under-estimate, it counts against the grants after it.)"""
        k = self.grant_of.get(lease_id)
        if k is not None and amount < 0 and self.grants[k].at > CLOCK.now():
            cost = list(self.grants[k].cost)
            cost[d] += amount
            self.grants[k].cost = (cost[0], cost[1])
            return
        self.adjustments.append((CLOCK.now(), len(self.grants), d, amount))

    def _fresh(self) -> str:
        self.serial += 1
        return f"L{self.serial}"

    def _acquire(
        self, lease_id: str, max_wait: float | None, may_queue: bool, ticket_ttl: float | None = None
    ) -> None:
        requests, tokens = self.costs[lease_id]
        overdraft = lease_id in self.overdrafts
        lead = self.leads.get(lease_id, 0)
        tenant = self.tenant_of.get(lease_id, "")
        weight = TENANT_WEIGHTS.get(tenant, F(1)) if self.fair else ZERO
        ticket_ttl = self.ticket_ttl if ticket_ttl is None else ticket_ttl
        levels = self.budget.levels(tenant) if tenant else ()  # the caps its path passes, if any
        reserve = lead == TOP_LEAD  # as the client sends it: the top class reserves
        book = not reserve and not levels  # (the client books on budgets without classes: any here)
        argv = acquire_args(
            lease_id, requests, tokens, max_wait, may_queue, ticket_ttl, self.probe, overdraft, lead, tenant,
            float(weight), levels, reserve, book,
        )  # fmt: skip
        raw = self._run("acquire", argv)
        result = self.model.acquire(
            CLOCK.now(),
            lease_id,
            F(requests),
            F(tokens),
            None if max_wait is None else frac(max_wait),
            may_queue,
            frac(ticket_ttl),
            self.probe,
            self.seen,
            overdraft,
            lead,
            tenant if weight else "",
            weight,
            cap_levels(levels),
            reserve,
            book and may_queue,
        )
        what = f"acquire({lease_id}, {requests}, {tokens}, {max_wait}, {may_queue}, {overdraft}, {lead}, {tenant!r})"
        self._check(what, raw, result)
        reply, want = decode_acquire(raw), result[0]
        assert reply.kind == want[0]
        if reply.kind == "queued":
            assert reply.wait == pytest.approx(float(want[1]), abs=1e-6), (reply.wait, float(want[1]), raw)
        elif reply.kind == "refused":
            assert reply.retry_after == (None if want[1] < 0 else pytest.approx(float(want[1])))
        elif reply.kind == "too_large":
            assert reply.most == pytest.approx(float(want[1])) and reply.dimension == want[3]
        if self.budget.caps:  # no cap holds more leases than its slots, and Redis counts them as the model
            self._caps_agree()

    def _caps_agree(self) -> None:
        now = CLOCK.now()
        stored = {k.decode(): v.decode().split() for k, v in self.client.hgetall(self.keys[7]).items()}
        for node, (rt, tt, held) in self.model.caps.items():
            cap = self.budget.caps[node] if self.budget.caps and node in self.budget.caps else None
            most = cap.max_concurrency if cap is not None else None
            assert most is None or held <= most, f"cap {node} holds {held} leases, max {most}"
            assert held == sum(1 for lease in self.model.leases.values() if any(lv.node == node for lv in lease.levels))
            if node not in stored:
                assert held == 0 and rt <= now and tt <= now, f"cap {node} forgotten while it remembers"
                continue
            # (a TAT at or before now is a full bucket, whatever its value: forgotten, or an old one)
            got = (max(frac(stored[node][0]), now), max(frac(stored[node][1]), now), int(stored[node][2]))
            rt, tt = max(rt, now), max(tt, now)
            assert abs(got[0] - rt) <= EXACT and abs(got[1] - tt) <= EXACT and got[2] == held, (
                node, stored[node], float(rt), float(tt), held,
            )  # fmt: skip

    # ---- rules ---------------------------------------------------------------------------------

    @rule(
        target=ids,
        requests=REQUESTS,
        tokens=TOKENS,
        max_wait=MAX_WAIT,
        may_queue=st.booleans(),
        overdraft=OVERDRAFT,
        lead=LEADS,
        tenant=TENANTS,
    )
    def acquire(
        self,
        requests: int,
        tokens: int,
        max_wait: float | None,
        may_queue: bool,
        overdraft: bool,
        lead: int,
        tenant: str = "",
    ) -> str:
        lease_id = self._fresh()
        self.costs[lease_id] = (requests, tokens)
        if overdraft:
            self.overdrafts.add(lease_id)
        if lead:
            self.leads[lease_id] = lead
        if tenant:
            self.tenant_of[lease_id] = tenant
        self._acquire(lease_id, max_wait, may_queue)
        return lease_id

    @rule(
        target=ids,
        requests=REQUESTS,
        tokens=TOKENS,
        max_wait=st.none() | MAX_WAIT,
        overdraft=OVERDRAFT,
        lead=LEADS,
        tenant=TENANTS,
    )
    def acquire_or_queue(
        self, requests: int, tokens: int, max_wait: float | None, overdraft: bool, lead: int, tenant: str
    ) -> str:
        """The way the limiter acquires: queue for a slot when none is free."""
        return self.acquire(requests, tokens, max_wait, True, overdraft, lead, tenant)

    @rule(lease_id=ids, max_wait=MAX_WAIT)
    def repoll(self, lease_id: str, max_wait: float | None) -> None:
        """Acquire again with the same id: a queued ticket keeps its place, a lease is reported."""
        self._acquire(lease_id, max_wait, True)

    @rule(retry_after=st.sampled_from([0.5, 1.0, 2.5]), tokens=st.sampled_from([0, 8]), late=st.integers(1, 8))
    def a_head_released_by_a_cooldown_comes_back_late(self, retry_after: float, tokens: int, late: int) -> None:
        """Where a late head's credit would overflow a full bucket: the pause outlasts the refill."""
        self.cooldown(retry_after, 0.0)
        self.acquire(1, tokens, None, True, False, 0)
        if self.model.queue:
            self.head_returns_late(late)
        self.drain(tokens)

    @rule(tokens=st.sampled_from([0, 1, 8]))
    def drain(self, tokens: int, most: int = 24) -> None:
        """Take all the budget grants at once, one request at a time (what tests a window's bound),
        ``most`` of them at most."""
        for _ in range(most):
            lease_id = self._fresh()
            self.costs[lease_id] = (1, tokens)
            self._acquire(lease_id, 0.0, False)
            if lease_id not in self.model.leases:
                return

    @rule(lease_id=ids | st.just(UNKNOWN), actual=ACTUAL)
    def settle(self, lease_id: str, actual: int | None) -> None:
        raw = self._run("settle", settle_args(lease_id, actual))
        result = self.model.settle(CLOCK.now(), lease_id, None if actual is None else F(actual), seen_keys=self.seen)
        self._check(f"settle({lease_id}, {actual})", raw, result)
        assert decode_settle(raw).settled == (result[0][0] == "settled")

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data(), actual=ACTUAL)
    def settle_held(self, data: st.DataObject, actual: int | None) -> None:
        self.settle(data.draw(st.sampled_from(sorted(self.model.leases)), label="lease"), actual)

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data(), actual=st.integers(0, 300))
    def settle_held_with_usage(self, data: st.DataObject, actual: int) -> None:
        self.settle(data.draw(st.sampled_from(sorted(self.model.leases)), label="lease"), actual)

    # ---- learning from the provider ----------------------------------------------------------

    def _exact_limits(self, data: st.DataObject, settling: str | None, seen: tuple[Any, Any], model: str) -> list[Any]:
        """Limits to report for ``model``, per minute or None, drawn among those that keep every time
        on the 1/64 s grid: any that tightens the rate in force (or is the first); one that loosens it
        only where no lease's correction spans it and the rescaled TAT lands on the grid. (Looser
        limits off the grid: tests/test_learning.py; expiries wait for the grid, see _on_the_grid.)"""
        self._sync_expiry()
        self._on_the_grid()
        self._sync_expiry()
        now = CLOCK.now()
        out: list[Any] = []
        for i, (dim, choices) in enumerate((("requests", LEARN_REQUESTS), ("tokens", LEARN_TOKENS))):
            allowed: list[Any] = [None]
            for per_minute in choices:
                after = copy.deepcopy(self.model)
                after._load(now, self._seen(now))  # as the settle finds it (a lost state made anew too)
                before = after.request_rate if i == 0 else after.token_rate
                after.offgrid = False
                limits = (F(per_minute), None) if i == 0 else (None, F(per_minute))
                after._learn(*limits, frac(self.memory), now, model)
                rate = after.request_rate if i == 0 else after.token_rate
                if before == 0 or rate <= before:
                    allowed.append(per_minute)
                    continue
                others = [lease for lease in self.model.leases if lease != settling]
                spans = others or (settling is not None and seen[i] is not None)
                if not spans and not after.offgrid:
                    allowed.append(per_minute)
            out.append(data.draw(st.sampled_from(allowed), label=f"{dim} limit"))
        return out

    def _settle_reporting(
        self, lease_id: str, actual: int | None, seen: tuple[Any, Any], limits: list[Any], model: str = ""
    ) -> None:
        argv = settle_args(lease_id, actual, seen[0], seen[1], limits[0], limits[1], self.memory, model=model)
        raw = self._run("settle", argv)
        result = self.model.settle(
            CLOCK.now(),
            lease_id,
            None if actual is None else F(actual),
            (None if seen[0] is None else F(seen[0]), None if seen[1] is None else F(seen[1])),
            (None if limits[0] is None else F(limits[0]), None if limits[1] is None else F(limits[1])),
            frac(self.memory),
            model,
            self.seen,
        )
        self._check(f"settle({lease_id!r}, {actual}, seen={seen}, limits={limits}, model={model!r})", raw, result)

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data(), actual=ACTUAL, seen_requests=SEEN_REQUESTS, seen_tokens=SEEN_TOKENS)
    def settle_with_the_providers_word(
        self, data: st.DataObject, actual: int | None, seen_requests: int | None, seen_tokens: int | None
    ) -> None:
        """A reply's headers: what the provider had left when it admitted the call, and its limits."""
        lease_id = data.draw(st.sampled_from(sorted(self.model.leases)), label="lease")
        seen = (seen_requests, seen_tokens)
        model = data.draw(MODELS, label="model")
        self._settle_reporting(lease_id, actual, seen, self._exact_limits(data, lease_id, seen, model), model)

    @rule(data=st.data(), seen_requests=SEEN_REQUESTS, seen_tokens=SEEN_TOKENS)
    def learn_without_a_lease(self, data: st.DataObject, seen_requests: int | None, seen_tokens: int | None) -> None:
        """limiter.learn: a reply that holds no lease."""
        seen = (seen_requests, seen_tokens)
        model = data.draw(MODELS, label="model")
        self._settle_reporting("", None, seen, self._exact_limits(data, None, seen, model), model)

    @rule(lease_id=ids | st.just(UNKNOWN), seen_tokens=SEEN_TOKENS)
    def stale_settle_with_limits(self, lease_id: str, seen_tokens: int | None) -> None:
        """A settle of a lease that may be gone: its remaining counts are ignored, tighter limits learned."""
        if lease_id in self.model.leases:
            return
        limits = [None, min(LEARN_TOKENS)]
        self._settle_reporting(lease_id, 5, (None, seen_tokens), limits)

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data())
    def extend_held(self, data: st.DataObject) -> None:
        """A heartbeat."""
        self.extend(data.draw(st.sampled_from(sorted(self.model.leases)), label="lease"))

    @precondition(lambda self: self.model.leases or self.model.queue)
    @rule(data=st.data())
    def cancel_held_or_queued(self, data: st.DataObject) -> None:
        ids = sorted(self.model.leases) + list(self.model.queue)
        self.cancel(data.draw(st.sampled_from(ids), label="lease or ticket"))

    @precondition(lambda self: self.model.queue)
    @rule(data=st.data(), max_wait=MAX_WAIT)
    def repoll_queued(self, data: st.DataObject, max_wait: float | None) -> None:
        self.repoll(data.draw(st.sampled_from(list(self.model.queue)), label="ticket"), max_wait)

    @precondition(lambda self: self.model.queue)
    @rule(data=st.data(), away=st.sampled_from([0.5, 2.0, 6.0]))
    def park_queued(self, data: st.DataObject, away: float) -> None:
        """A waiter leaves for a while (a Celery task re-queued with a countdown) and keeps its
        ticket that long: it renews with a TTL of ``away`` times its usual one."""
        ticket = data.draw(st.sampled_from(list(self.model.queue)), label="ticket")
        self._acquire(ticket, None, True, self.ticket_ttl * away)

    @precondition(lambda self: any(t.fit is not None and t.fit > CLOCK.now() for t in self.model.queue.values()))
    @rule()
    def head_returns_at_its_fit_time(self) -> None:
        """The head was told when it fits: it sleeps exactly until then and comes back."""
        head = next(iter(self.model.queue))
        fit = self.model.queue[head].fit
        if fit is not None and fit > CLOCK.now():
            CLOCK.ticks = int((fit - BASE) * TICKS)
            assert CLOCK.now() == fit
        self._acquire(head, None, True)

    @precondition(lambda self: self.model.queue)
    @rule(late=st.integers(1, 3 * TICKS))
    def head_returns_late(self, late: int) -> None:
        """The head comes back some time after it was told to (or after its renewal time)."""
        head = next(iter(self.model.queue))
        ticket = self.model.queue[head]
        since = ticket.fit if ticket.fit is not None and ticket.fit > CLOCK.now() else CLOCK.now()
        CLOCK.ticks = int((since - BASE) * TICKS) + late
        self._acquire(head, None, True)

    @precondition(lambda self: any(lease.start > CLOCK.now() for lease in self.model.leases.values()))
    @rule(late=st.integers(0, 2), tokens=st.sampled_from([0, 1, 8]))
    def a_reservation_starts(self, late: int, tokens: int) -> None:
        """The clock reaches a reservation's start and calls take all the budget grants then: no
        refund given before it (a cancel, an over-estimate) may have handed its share out again."""
        start = min(lease.start for lease in self.model.leases.values() if lease.start > CLOCK.now())
        CLOCK.ticks = max(CLOCK.ticks, math.ceil((start - BASE) * TICKS) + late)
        self.drain(tokens)

    @rule(tokens=st.sampled_from([0, 1, 8]), settled=st.booleans())
    def a_refund_while_a_reservation_waits(self, tokens: int, settled: bool) -> None:
        """All the budget taken, then a call of the top class, reserved if it fits later; the first
        lease given back (cancelled, or settled below its estimate) before that start, which then comes."""
        self.drain(tokens)
        before = set(self.model.leases)
        self.acquire(1, tokens, None, True, False, TOP_LEAD)
        if before and set(self.model.leases) - before:
            first = min(before, key=lambda i: int(i[1:]))
            if settled:
                self.settle(first, 0)
            else:
                self.cancel(first)
            if any(lease.start > CLOCK.now() for lease in self.model.leases.values()):
                self.a_reservation_starts(0, tokens)

    @precondition(lambda self: any(lease.provisional for lease in self.model.leases.values()))
    @rule(late=st.integers(0, 2))
    def holder_never_claims(self, late: int) -> None:
        """A waiter granted in the queue died before claiming: its grant expires and is refunded."""
        expiry = min(lease.expiry for lease in self.model.leases.values() if lease.provisional)
        CLOCK.ticks = max(CLOCK.ticks, int((expiry - BASE) * TICKS) + late)
        self.cancel(UNKNOWN)

    def _booking_head(self) -> Ticket | None:
        """The head, if it books, its process is connected and it was told a fit time still ahead."""
        head = next(iter(self.model.queue), None)
        ticket = self.model.queue.get(head) if head is not None else None
        if ticket is None or not ticket.book or ticket.levels or owner_of(head or "") not in self.model.live:
            return None
        return ticket if ticket.fit is not None and ticket.fit > CLOCK.now() else None

    @precondition(lambda self: self._booking_head() is not None)
    @rule(around=st.sampled_from([-1, 0, 0, 1, 4]))
    def a_script_about_a_horizon_before_the_heads_fit_time(self, around: int) -> None:
        """Some other call's script runs about a horizon before the fit time of a booking head (a
        tick before, at, or after its edge): within it, the head is booked for that fit time."""
        ticket = self._booking_head()
        assert ticket is not None and ticket.fit is not None
        edge = ticket.fit - self.model._horizon(ticket)
        CLOCK.ticks = max(CLOCK.ticks, math.floor((edge - BASE) * TICKS) + around)
        self.cancel(UNKNOWN)

    @precondition(lambda self: len(self.model.leases) + len(self.model.queue) < 12)  # (each run adds up to 9)
    @rule(
        target=ids, tokens=st.sampled_from([0, 1, 8]), waiters=st.integers(1, 3), around=st.sampled_from([-1, 0, 1, 4])
    )
    def connected_waiters_paced_by_a_rate(self, tokens: int, waiters: int, around: int) -> str:
        """All the budget taken, then calls of connected processes queue for the rates, one after the
        other: each arrival books the head before it (its own arrival does not book it), and the
        third fits beyond its horizon; a script runs about a horizon before the last one's fit time."""
        self.drain(tokens, 6)  # (the shapes' bursts hold at most 4 requests)
        lease_id = ""
        for _ in range(waiters):
            lease_id = self._fresh()
            self.costs[lease_id] = (1, tokens)
            self.connect(lease_id, True)
            self._acquire(lease_id, None, True)
        if self._booking_head() is not None:
            self.a_script_about_a_horizon_before_the_heads_fit_time(around)
        return lease_id

    @rule(target=ids, requests=REQUESTS, tokens=TOKENS, lead=LEADS)
    def queue_from_a_connected_process(self, requests: int, tokens: int, lead: int) -> str:
        """An arrival whose process holds its channel: when its ticket is granted in the queue, firm."""
        lease_id = self.acquire(requests, tokens, None, True, False, lead, "")
        self.connect(lease_id, True)
        return lease_id

    @rule(lease_id=ids, up=st.booleans())
    def connect(self, lease_id: str, up: bool) -> None:
        """The process of ``lease_id`` (every id is its own here) subscribes its own channel, or drops
        it (its connection closed): grants to its tickets are firm while it holds it."""
        name = f"{channel(self.budget)}:{owner_of(lease_id)}"
        if up and owner_of(lease_id) not in self.model.live:
            self.live.subscribe(name)
            self.twin.server.subscribe(name, self.twin)  # type: ignore[arg-type]
            self.model.live.add(owner_of(lease_id))
        elif not up and owner_of(lease_id) in self.model.live:
            self.live.unsubscribe(name)
            self.twin.server.unsubscribe(name, self.twin)  # type: ignore[arg-type]
            self.model.live.discard(owner_of(lease_id))

    @rule(lease_id=ids | st.just(UNKNOWN))
    def cancel(self, lease_id: str) -> None:
        raw = self._run("cancel", [lease_id])
        self._check(f"cancel({lease_id})", raw, self.model.cancel(CLOCK.now(), lease_id, self.seen))

    @rule(lease_id=ids | st.just(UNKNOWN))
    def extend(self, lease_id: str) -> None:
        """A heartbeat; Redis not holding a lease this process holds (lost with the keys), it is
        registered again, as ``Limiter._extend`` does."""
        raw = self._run("extend", [lease_id])
        self._check(f"extend({lease_id})", raw, self.model.extend(CLOCK.now(), lease_id, self.seen))
        lease, until = self.holding.get(lease_id, (False, ZERO))
        if texts(raw)[0] == "lost" and lease and until > CLOCK.now():
            self._rejoin(lease_id, *self.costs[lease_id])

    # ---- lost state and rejoining ----------------------------------------------------------------

    def _rejoin(
        self, lease_id: str, requests: int, tokens: int, spent: tuple[int, int] = (0, 0), hold: float = 0.0
    ) -> None:
        tenant = self.tenant_of.get(lease_id, "")
        levels = self.budget.levels(tenant) if lease_id and tenant else ()  # the caps it passes, if any
        argv = LimiterBase._rejoin_args(lease_id, requests, tokens, spent, hold, levels)
        raw = self._run("rejoin", argv)
        now, spent_req, spent_tok = CLOCK.now(), F(spent[0]), F(spent[1])
        result = self.model.rejoin(
            now, lease_id, F(requests), F(tokens), spent_req, spent_tok, self.seen, frac(hold), cap_levels(levels)
        )
        what = f"rejoin({lease_id!r}, {requests}, {tokens}, spent={spent}, seen={self.seen}, hold={hold})"
        self._check(what, raw, result)

    @precondition(lambda self: self.model.stored)
    @rule()
    def lose_state(self) -> None:
        """FLUSHALL (a restart without persistence, a failover to a replica behind): the keys vanish
        while this process still holds its leases and tickets. The model forgets as Redis does; the
        next call says it has seen the keys and makes them anew as a lost state."""
        self._sync_expiry()
        self.client.flushall()
        self.twin.server.flush()
        self.model.reset()
        self.told.clear()  # those tickets are gone: a fit time told before is no one's
        self.paused_until = self.hold_until = ZERO  # a state made afresh has neither

    def _rejoin_held(self) -> None:
        """What a process does on the "l" notice (or when its events connection returns): register
        again every lease it holds; then each of its waiters asks again (its ticket may be gone)."""
        self.notice = False
        now = CLOCK.now()
        for lease_id in sorted(i for i, (lease, until) in self.holding.items() if lease and until > now):
            self._rejoin(lease_id, *self.costs[lease_id])
        for ticket_id in [i for i, (lease, until) in self.holding.items() if not lease and until >= now]:
            if not self.holding.get(ticket_id, (True, ZERO))[0]:  # not granted and claimed meanwhile
                self._acquire(ticket_id, None, True)

    @precondition(lambda self: self.holding)
    @rule()
    def rejoin_held(self) -> None:
        self._rejoin_held()

    @precondition(lambda self: self.notice)
    @rule()
    def rejoin_on_the_notice(self) -> None:
        """The "l" notice came: rejoining is more likely soon after it than any other time."""
        self._rejoin_held()

    @rule(
        spent_requests=st.sampled_from([0, 1, 2, 5]),
        spent_tokens=st.sampled_from([0, 8, 64, 200]),
        hold=st.sampled_from([0.0, 0.5, 1.5]),
    )
    def rejoin_spent(self, spent_requests: int, spent_tokens: int, hold: float) -> None:
        """Back from an outage run on a local share: what it spent is charged as debt (id ""), and new
        grants are held while the other processes come back."""
        self._rejoin("", 0, 0, (spent_requests, spent_tokens), hold)

    @rule(
        target=ids,
        requests=REQUESTS,
        tokens=TOKENS,
        spent_requests=st.sampled_from([0, 1]),
        spent_tokens=st.sampled_from([0, 16]),
    )
    def rejoin_from_a_share(self, requests: int, tokens: int, spent_requests: int, spent_tokens: int) -> str:
        """A lease a local share granted in an outage joins the shared budget, charged nothing (its
        cost is in the spending), even past max concurrency."""
        lease_id = self._fresh()
        self.costs[lease_id] = (requests, tokens)
        self._rejoin(lease_id, requests, tokens, (spent_requests, spent_tokens))
        return lease_id

    @rule(
        spent_requests=st.sampled_from([0, 1, 3]),
        spent_tokens=st.sampled_from([0, 16, 100]),
        restarted_empty=st.booleans(),
    )
    def outage_ends(self, spent_requests: int, spent_tokens: int, restarted_empty: bool) -> None:
        """Redis answers again after an outage run on a local share (``Limiter._come_back``), maybe
        restarted empty: what the share spent is charged, then every lease held is registered again.
        A first call that finds the state lost charges nothing: its empty buckets stand for it."""
        if restarted_empty:
            self.lose_state()
        self.outage = True
        try:
            if (spent_requests, spent_tokens) != (0, 0):
                self._rejoin("", 0, 0, (spent_requests, spent_tokens))
            now = CLOCK.now()
            for lease_id in sorted(i for i, (lease, until) in self.holding.items() if lease and until > now):
                self._rejoin(lease_id, *self.costs[lease_id])
        finally:
            self.outage = False

    @precondition(lambda self: any(lease.provisional for lease in self.model.leases.values()))
    @rule(data=st.data(), later=st.integers(0, TICKS // 4))
    def rejoin_unclaimed(self, data: st.DataObject, later: int) -> None:
        """rejoin.lua claims a provisional grant it extends, as extend.lua does: the waiter coming to
        claim it later finds it claimed, its expiry a lease TTL from the rejoin."""
        unclaimed = sorted(i for i, lease in self.model.leases.items() if lease.provisional)
        lease_id = data.draw(st.sampled_from(unclaimed), label="grant")
        self._rejoin(lease_id, *self.costs[lease_id])
        CLOCK.ticks += later
        self._acquire(lease_id, None, True)

    @rule(retry_after=RETRY_AFTER, draw=DRAWS)
    def cooldown(self, retry_after: float | None, draw: float) -> None:
        raw = self._run("cooldown", cooldown_args(self.policy, retry_after, draw))
        result = self.model.cooldown(
            CLOCK.now(), None if retry_after is None else frac(retry_after), self.policy, frac(draw), self.seen
        )
        self._check(f"cooldown({retry_after}, draw={draw}, {self.policy})", raw, result)
        assert decode_cooldown(raw).level == result[0][3]
        assert decode_cooldown(raw).started == (result[0][4] == "1")

    @rule(ticks=st.integers(0, TICKS // 2) | st.integers(0, 3 * TICKS))
    def advance(self, ticks: int) -> None:
        CLOCK.ticks += ticks

    @rule(ticks=st.integers(4 * TICKS, 12 * TICKS))
    def idle(self, ticks: int) -> None:
        """A longer silence: leases die, pauses and quiet periods end, keys may expire."""
        CLOCK.ticks += ticks

    @invariant()
    def safety_holds(self) -> None:
        """No window [t_i, t_j] of grants, as Redis records them, admits more than r x (t_j - t_i)
        + max(C, c_j) in a dimension, plus, only where t_i is a head of the queue granted after its
        fit time (not a cooldown's end nor a lost state's hold), min(c_i, r x lateness, r x
        LATE_CREDIT). Computed from the replies and events alone. Settles count when they happen,
        between grants i and j: an under-estimate's excess adds to the window, a refund (an
        over-estimate, a cancel) is taken off at its full amount (at most what the bucket gets
        back), so credit given back and spent again is not counted twice, and a refund of a charge
        made before t_i still counts: it gives credit back now, which is what makes a window admit
        more. Spending charged by rejoin.lua adds like an under-estimate's debt: the level drops by
        it as by a grant. An adopted lease adds nothing (it is no grant and was charged nothing),
        but its settle or cancel refunds from its estimate, and that credit is taken off like any
        refund: the bound holds because every change of the level is counted, whatever the lease
        was charged. Only windows within one segment of constant rates (no learned limit changed in
        between, keys neither expired nor lost: a lost state forgets the debt, its hold stands for
        it). A window ends at a grant with a cost in that dimension: only such a grant had to fit
        the level."""
        # In order of grant time: a reservation (granted now, for its fit time) comes after grants
        # made later. A change of level is placed where it happened: after the grants before it in
        # time, and at one time, after those granted before it in calls. A debt counts only against
        # grants charged after it (a reservation charged before cannot wait it out, as no grant can
        # wait out an under-estimate not yet settled); a refund counts from when it was given.
        order = sorted(range(len(self.grants)), key=lambda k: (self.grants[k].at, k))
        grants = [self.grants[k] for k in order]
        keys = [(g.at, k) for g, k in zip(grants, order, strict=True)]
        between: dict[tuple[int, int], list[tuple[int, Fraction]]] = {}
        for when, position, dim, amount in self.adjustments:
            at = bisect.bisect_left(keys, (when, position - F(1, 2)))
            between.setdefault((at, dim), []).append((position, amount))
        burst = frac(self.budget.credit)
        for i, first in enumerate(grants):
            for d in (0, 1):
                rate = first.segment[1 + d]
                if rate == 0:
                    continue
                slack = ZERO
                if first.late_fit is not None:
                    slack = min(first.cost[d], rate * LATE_CREDIT, rate * (first.at - first.late_fit))
                total, changes = ZERO, []
                for j in range(i, len(grants)):
                    last = grants[j]
                    if last.segment != first.segment:
                        break
                    if j > i:
                        changes += between.get((j, d), [])
                    total += last.cost[d]
                    if last.cost[d] == 0:  # a cost of 0 fits whatever the level: it bounds nothing
                        continue
                    changed = sum((a for p, a in changes if a < 0 or p <= order[j]), ZERO)
                    # the last grant had to find the bucket holding min(cost, C); in overdraft, out of debt
                    most = rate * burst + last.cost[d] if last.overdraft else max(rate * burst, last.cost[d])
                    bound = rate * (last.at - first.at) + most + slack
                    assert total + changed <= bound, (
                        f"{'requests' if d == 0 else 'tokens'}: grants {i}..{j} admit {float(total + changed)} in "
                        f"{float(last.at - first.at):.6f} s, more than {float(bound)}"
                    )

    @invariant()
    def no_waiter_is_passed_more_than_the_leads_allow(self) -> None:
        """Priority classes never starve a waiter: a ticket is passed (by a later arrival granted at
        once or queued ahead of it) at most the greatest lead less its own class's times."""
        if self.fair:  # tenants' tags order the queue: fairness among tenants, not arrival counts
            return
        if self.budget.caps:  # a ticket its caps hold is passed as long as they hold it
            return
        most = max(LEADS.elements)  # type: ignore[attr-defined]
        for ticket_id, ticket in self.model.queue.items():
            assert ticket.passed <= most - ticket.lead, f"{ticket_id} passed {ticket.passed} times"

    @invariant()
    def status_agrees(self) -> None:
        raw = self._run("status", [])
        want = self.model.status(CLOCK.now(), self.seen)
        assert not self.model.offgrid, "a rescaled TAT left the grid"
        assert_matches("status", raw, want, EXACT)
        assert decode_status(self.budget, raw).in_flight == want[3]
        assert self._events() == [], "status published something"


def run_machine(base: type[BudgetMachine], name: str, shape: dict[str, Any], steps: int = 40) -> None:
    """Run ``base`` as a test on a budget of ``shape``: 30 examples of ``steps`` steps each."""
    machine = type(f"{base.__name__}_{name}", (base,), {"shape": shape})
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=30,
            stateful_step_count=steps,
            deadline=None,
            phases=[Phase.explicit, Phase.generate, Phase.shrink],  # (explaining a failure outlasts the timeout)
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )


@pytest.mark.parametrize("shape", list(SHAPES))
def test_lua_agrees_with_the_model(shape: str, fake_clock: FakeClock) -> None:
    run_machine(BudgetMachine, shape, SHAPES[shape], steps=35)


class LearningMachine(BudgetMachine):
    """The same machine, with the provider's word three times as likely: more settles that learn a
    limit and correct the level, so rescaled buckets meet held leases, the queue and the probe."""

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data(), actual=ACTUAL, seen_requests=SEEN_REQUESTS, seen_tokens=SEEN_TOKENS)
    def settle_with_the_providers_word_again(
        self, data: st.DataObject, actual: int | None, seen_requests: int | None, seen_tokens: int | None
    ) -> None:
        self.settle_with_the_providers_word(data, actual, seen_requests, seen_tokens)

    @precondition(lambda self: self.model.leases)
    @rule(data=st.data(), actual=ACTUAL, seen_requests=SEEN_REQUESTS, seen_tokens=SEEN_TOKENS)
    def settle_with_the_providers_word_once_more(
        self, data: st.DataObject, actual: int | None, seen_requests: int | None, seen_tokens: int | None
    ) -> None:
        self.settle_with_the_providers_word(data, actual, seen_requests, seen_tokens)

    @rule(data=st.data(), seen_requests=SEEN_REQUESTS, seen_tokens=SEEN_TOKENS)
    def learn_without_a_lease_again(
        self, data: st.DataObject, seen_requests: int | None, seen_tokens: int | None
    ) -> None:
        self.learn_without_a_lease(data, seen_requests, seen_tokens)


@pytest.mark.parametrize("shape", ["tokens-only-burst-mc2", "both-burst-mc2", "both-burst-no-mc", "concurrency-only"])
def test_lua_agrees_with_the_model_while_learning(shape: str, fake_clock: FakeClock) -> None:
    run_machine(LearningMachine, shape, SHAPES[shape])


class TenantMachine(BudgetMachine):
    """The same machine on a budget shared by tenant, with arrivals twice as likely: deep queues of
    several tenants, so that tags, the virtual time and passes meet the grants, refunds and expiries."""

    always_fair = True

    @rule(target=BudgetMachine.ids, requests=REQUESTS, tokens=TOKENS, lead=LEADS, tenant=TENANTS)
    def queue_for_a_tenant(self, requests: int, tokens: int, lead: int, tenant: str) -> str:
        return self.acquire(requests, tokens, None, True, False, lead, tenant)

    @rule(target=BudgetMachine.ids, requests=REQUESTS, tokens=TOKENS, tenant=TENANTS)
    def queue_for_a_tenant_again(self, requests: int, tokens: int, tenant: str) -> str:
        return self.acquire(requests, tokens, None, True, False, 0, tenant)


@pytest.mark.parametrize("shape", ["requests-only", "both-burst-mc2", "both-burst0-mc1", "concurrency-only"])
def test_lua_agrees_with_the_model_shared_by_tenant(shape: str, fake_clock: FakeClock) -> None:
    run_machine(TenantMachine, shape, SHAPES[shape])


# a team with two users under it, another team, and calls that pass no cap (rates of powers of two
# per second: times stay on the grid)
CAPS = {
    "a": Cap(rps=2, tps=32, max_concurrency=2, burst=0.5),
    "a/*": Cap(tps=16, max_concurrency=1, burst=1.0),
    "b": Cap(rps=1, burst=0.0),
}
CAP_TENANTS = st.sampled_from(["a/x", "a/x", "a/x", "a/y", "b", "b", "c", ""])  # a/x often held by its cap


class CapMachine(BudgetMachine):
    """The same machine on a budget with caps: arrivals of the tenant paths of two teams, deep queues
    of calls its caps hold, passed over by the others, with grants, refunds, expiries and lost state.
    Shared by tenant in some runs (``fair``), first come first served in the others."""

    @rule(target=BudgetMachine.ids, requests=REQUESTS, tokens=TOKENS, lead=LEADS, tenant=CAP_TENANTS)
    def queue_under_caps(self, requests: int, tokens: int, lead: int, tenant: str) -> str:
        return self.acquire(requests, tokens, None, True, False, lead, tenant)

    @rule(target=BudgetMachine.ids, requests=REQUESTS, tokens=TOKENS, tenant=CAP_TENANTS, may_queue=st.booleans())
    def acquire_under_caps(self, requests: int, tokens: int, tenant: str, may_queue: bool) -> str:
        return self.acquire(requests, tokens, None, may_queue, False, 0, tenant)


@pytest.mark.parametrize("shape", ["both-burst-mc2", "both-burst-no-mc", "concurrency-only", "fast-requests"])
def test_lua_agrees_with_the_model_under_caps(shape: str, fake_clock: FakeClock) -> None:
    run_machine(CapMachine, shape, {**SHAPES[shape], "caps": CAPS})


# --------------------------------------------------------------------------------------------
# Where the scripts depart from their headers: deterministic reproductions
# --------------------------------------------------------------------------------------------


class Budgeted:
    """One budget on a fresh fakeredis driven by the fake clock, for short fixed sequences."""

    def __init__(self, budget: Budget) -> None:
        self.client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
        self.scripts = register(self.client)
        self.budget = budget
        self.args = budget_args(budget)  # idle grace: the library's own 10 s

    def run(self, op: str, argv: list[str]) -> list[str]:
        return texts(self.scripts[op](keys=keys(self.budget), args=[*self.args, *argv]))

    def at(self, seconds: float) -> None:
        CLOCK.ticks = round(seconds * TICKS)


def test_keys_outlive_the_head_told_when_it_fits(fake_clock: FakeClock) -> None:
    b = Budgeted(Budget("late-head", rps=1, max_concurrency=1, lease_ttl=30.0))
    ttl = 30.0  # the limiter's default ticket_ttl: the budget's lease_ttl
    b.at(0)
    b.run("cooldown", cooldown_args(CooldownPolicy(jitter=0.0), 60.0, 0.0))  # paused until 60
    assert b.run("acquire", acquire_args("a", 1, 0, None, True, ttl))[:2] == ["queued", "60.000000"]
    # "a" is the head, told it fits at 60: its ticket lives until 60 + 30 = 90. The keys expire
    # at 80 (the quiet period's end, 70, plus the 10 s idle grace).
    b.at(82)
    # A newcomer must not overtake the head: "a" is granted first and holds the only slot.
    assert b.run("acquire", acquire_args("b", 1, 0, None, False, ttl))[0] == "refused"
    b.at(85)
    assert b.run("acquire", acquire_args("a", 1, 0, None, True, ttl))[0] == "granted"


def test_keys_outlive_a_ticket_with_a_long_ttl(fake_clock: FakeClock) -> None:
    b = Budgeted(Budget("long-ticket", max_concurrency=1, lease_ttl=2.0))
    ttl = 30.0  # LimiterBase(ticket_ttl=30) with this budget sends exactly this
    b.at(0)
    assert b.run("acquire", acquire_args("a", 1, 0, None, True, ttl))[0] == "granted"
    assert b.run("acquire", acquire_args("b", 1, 0, None, True, ttl))[0] == "queued"  # alive to 30
    b.at(13)  # "a" died at 2 and nobody called since; the keys expired at 12
    assert b.run("acquire", acquire_args("c", 1, 0, None, False, ttl))[0] == "refused"


def test_control_the_keys_remember_the_head_within_the_grace(fake_clock: FakeClock) -> None:
    b = Budgeted(Budget("late-head", rps=1, max_concurrency=1, lease_ttl=30.0))
    b.at(0)
    b.run("cooldown", cooldown_args(CooldownPolicy(jitter=0.0), 60.0, 0.0))
    b.run("acquire", acquire_args("a", 1, 0, None, True, 30.0))
    b.at(78)
    assert b.run("acquire", acquire_args("b", 1, 0, None, False, 30.0))[0] == "refused"
    assert b.run("acquire", acquire_args("a", 1, 0, None, True, 30.0))[0] == "granted"


# --------------------------------------------------------------------------------------------
# A lost state, step by step
# --------------------------------------------------------------------------------------------


class Modelled(Budgeted):
    """A Budgeted whose every call is checked against the model, reply and events."""

    def __init__(self, budget: Budget) -> None:
        super().__init__(budget)
        self.model = model_of(budget)
        self.pubsub = listen(self.client, budget)

    def call(self, op: str, argv: list[str], seen: bool, *model_args: Any) -> list[str]:
        args = budget_args(self.budget, seen=seen)
        got = texts(self.scripts[op](keys=keys(self.budget), args=[*args, *argv]))
        if op == "status":
            want, events = self.model.status(CLOCK.now(), seen), []
        else:
            want, events = getattr(self.model, op)(CLOCK.now(), *model_args, seen_keys=seen)
        assert_matches(f"{op}{argv}", got, want, EXACT)
        published = []
        while (msg := self.pubsub.get_message(timeout=0)) is not None:
            if (text := routed(self.budget, msg)) is not None:
                published.append(text)
        assert_events(f"{op}{argv}", published, events, EXACT)
        return got

    def acquire(self, lease_id: str, seen: bool, may_queue: bool = False) -> list[str]:
        argv = acquire_args(lease_id, 1, 0, None, may_queue, 2.0)
        return self.call("acquire", argv, seen, lease_id, F(1), ZERO, None, may_queue, F(2))

    def rejoin(self, lease_id: str, seen: bool, spent: tuple[int, int] = (0, 0)) -> list[str]:
        argv = LimiterBase._rejoin_args(lease_id, 1, 0, spent)
        return self.call("rejoin", argv, seen, lease_id, F(1), ZERO, F(spent[0]), F(spent[1]))

    def lose(self) -> None:
        self.client.flushall()
        self.model.reset()


def test_after_a_loss_nothing_is_granted_within_the_hold_and_adopted_leases_take_their_slots(
    fake_clock: FakeClock,
) -> None:
    b = Modelled(Budget("lost", rps=4, burst=1.0, max_concurrency=1, lease_ttl=4.0))  # hold: 3 x 0.5 s
    b.at(0)
    assert b.acquire("a", seen=False)[0] == "granted"
    b.lose()
    b.at(0.25)
    assert b.call("status", [], True)[5] == "1.500000"  # read as lost, neither made nor announced
    assert b.acquire("b", seen=True)[:2] == ["refused", "1.500000"]  # made lost: "l", until the hold ends
    assert b.rejoin("a", seen=True)[0] == "adopted"
    assert b.rejoin("c", seen=True, spent=(3, 0))[0] == "adopted"  # another process's: 2 leases, max 1
    assert b.call("status", [], True)[1:4] == ["-3.000000", "0.000000", "2"]  # the spending as debt
    b.at(1.75)  # the hold ends; the debt was paid at 1.0
    assert b.acquire("b", seen=True)[:2] == ["refused", "-1"]  # for a slot
    b.call("settle", settle_args("a", None), True, "a", None)
    assert b.acquire("b", seen=True)[:2] == ["refused", "-1"]  # "c" alone holds the one slot
    b.call("cancel", ["c"], True, "c")
    assert b.acquire("b", seen=True)[0] == "granted"


def test_rejoin_claims_a_provisional_grant(fake_clock: FakeClock) -> None:
    b = Modelled(Budget("claimed", max_concurrency=1, lease_ttl=4.0))
    b.at(0)
    assert b.acquire("a", seen=False)[0] == "granted"
    assert b.acquire("w", seen=True, may_queue=True)[0] == "queued"
    b.call("settle", settle_args("a", None), True, "a", None)  # "w" granted, provisional for 0.5 s
    b.at(0.25)
    assert b.rejoin("w", seen=True)[0] == "extended"  # claimed: it lives until 4.25
    b.at(1)  # past the claim window: an unclaimed grant would be gone, and a claim now would say 5
    assert b.acquire("w", seen=True, may_queue=True)[3] == f"{BASE + 4.25:.6f}"


# --------------------------------------------------------------------------------------------
# The real redis-server agrees with the model too
# --------------------------------------------------------------------------------------------

REAL_TOL = F(1, 10**4)  # Redis time in doubles near 1.8e9 s carries ~2e-7 s; levels are x rate
NOW_FIELD = {"acquire": 2, "settle": 2, "cancel": 1, "extend": 2, "cooldown": 2, "status": 0, "rejoin": 1}


def test_real_redis_agrees_with_the_model(redis_url: str, name: str) -> None:
    """A fixed sequence whose decisions all have margins of 0.1 s or more over the real time
    that passes between its calls; the model runs at the ``now`` each reply reports."""
    budget = Budget(name, rps=2, tps=100, burst=1.0, max_concurrency=2, lease_ttl=30.0)
    policy = CooldownPolicy(base=1.0, max_backoff=8.0, quiet=5.0, jitter=0.5)
    ttl = 30.0
    model = model_of(budget)
    client = redis.Redis.from_url(redis_url)
    pubsub = listen(client, budget)
    scripts = register(client)
    published: list[tuple[Any, ...]] = []
    kinds: list[str] = []

    def step(op: str, argv: list[str], expect: Any = None) -> list[str]:
        got = texts(scripts[op](keys=keys(budget), args=[*budget_args(budget), *argv]))
        now = F(got[NOW_FIELD[op]])  # the model runs at the time Redis says it ran
        want, events = (model.status(now), []) if op == "status" else expect(now)
        assert_matches(f"{op}{argv}", got, want, REAL_TOL)
        published.extend(events)
        kinds.append(got[0] if op != "status" else "status")
        return got

    def acquire(lease_id: str, req: int, tok: int, max_wait: float | None, may_queue: bool) -> None:
        step(
            "acquire",
            acquire_args(lease_id, req, tok, max_wait, may_queue, ttl),
            lambda now: model.acquire(
                now, lease_id, F(req), F(tok), None if max_wait is None else frac(max_wait), may_queue, frac(ttl)
            ),
        )

    try:
        step("status", [])
        acquire("a", 1, 60, None, True)  # granted now
        acquire("b", 1, 80, None, False)  # refused: its tokens fit in 0.4 s
        acquire("b", 1, 80, 0.1, True)  # refused: beyond its max wait
        acquire("b", 1, 80, None, True)  # queued as head, told it fits in 0.4 s
        acquire("c", 1, 10, None, False)  # refused: a queue ahead
        acquire("c", 1, 10, None, True)  # queued behind "b"
        step(
            "settle",
            settle_args("a", 20),  # 40 tokens back: "b" is granted, "c" told its fit
            lambda now: model.settle(now, "a", F(20)),
        )
        acquire("b", 1, 80, None, True)  # its lease
        acquire("c", 1, 10, None, True)  # the head, waiting for its request
        step("status", [])
        step(
            "cooldown",
            cooldown_args(policy, 1.0, 0.5),  # paused 1.25 s: "c" told again
            lambda now: model.cooldown(now, F(1), policy, F(1, 2)),
        )
        acquire("d", 1, 10, 0.5, True)  # queued behind "c" (max wait is for new heads only)
        step("cancel", ["b"], lambda now: model.cancel(now, "b"))
        step("extend", ["b"], lambda now: model.extend(now, "b"))
        step("cancel", ["c"], lambda now: model.cancel(now, "c"))  # "d" becomes head
        step("cancel", ["nobody"], lambda now: model.cancel(now, "nobody"))
        step(
            "cooldown",
            cooldown_args(policy, None, 0.0),  # same episode: level 0, base 1 s
            lambda now: model.cooldown(now, None, policy, ZERO),
        )
        step("settle", settle_args("b", 5), lambda now: model.settle(now, "b", F(5)))
        acquire("d", 1, 10, None, True)
        step("status", [])

        assert kinds == [
            "status",
            "granted",
            "refused",
            "refused",
            "queued",
            "refused",
            "queued",
            "settled",
            "granted",
            "queued",
            "status",
            "cooldown",
            "queued",
            "cancelled",
            "lost",
            "dequeued",
            "unknown",
            "cooldown",
            "unknown",
            "queued",
            "status",
        ]
        got_events: list[str] = []
        deadline = _time.monotonic() + 5.0
        while len(got_events) < len(published) and _time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None and (text := routed(budget, msg)) is not None:
                got_events.append(text)
        assert {e[0] for e in published} == {"g", "h", "c"}
        assert_events("the sequence", got_events, published, REAL_TOL)
    finally:
        pubsub.close()
        client.delete(*keys(budget))
        client.close()


def test_real_redis_agrees_with_the_model_after_a_loss(redis_url: str, name: str) -> None:
    """The budget's keys deleted while a lease is held (FLUSHALL would take the other tests' keys):
    the next call that has seen them makes a lost state with a hold of 1.5 s, far longer than the
    sequence takes; the model runs at the ``now`` each reply reports."""
    budget = Budget(name, rps=2, tps=100, burst=1.0, max_concurrency=1, lease_ttl=30.0)
    model = model_of(budget)
    client = redis.Redis.from_url(redis_url)
    pubsub = listen(client, budget)
    scripts = register(client)
    published: list[tuple[Any, ...]] = []

    def step(op: str, argv: list[str], seen: bool, *model_args: Any) -> list[str]:
        got = texts(scripts[op](keys=keys(budget), args=[*budget_args(budget, seen=seen), *argv]))
        now = F(got[NOW_FIELD[op]])
        if op == "status":
            want, events = model.status(now, seen), []
        else:
            want, events = getattr(model, op)(now, *model_args, seen_keys=seen)
        assert_matches(f"{op}{argv}", got, want, REAL_TOL)
        published.extend(events)
        return got

    def acquire(lease_id: str, seen: bool) -> str:
        argv = acquire_args(lease_id, 1, 10, None, False, 30.0)
        return step("acquire", argv, seen, lease_id, F(1), F(10), None, False, F(30))[0]

    try:
        assert acquire("a", seen=False) == "granted"
        client.delete(*keys(budget))
        model.reset()
        assert float(step("status", [], True)[5]) > 1.4  # read as lost: the hold, not announced
        assert acquire("b", seen=True) == "refused"  # made lost: "l", and the hold
        rejoin = LimiterBase._rejoin_args
        assert step("rejoin", rejoin("a", 1, 10), True, "a", F(1), F(10), ZERO, ZERO)[0] == "adopted"
        assert step("rejoin", rejoin("c", 1, 10, (1, 50)), True, "c", F(1), F(10), F(1), F(50))[0] == "adopted"
        assert step("status", [], True)[3] == "2"  # past max concurrency: both calls run
        assert acquire("b", seen=True) == "refused"
        step("settle", settle_args("a", 5), True, "a", F(5))
        step("cancel", ["c"], True, "c")
        got_events: list[str] = []
        deadline = _time.monotonic() + 5.0
        while len(got_events) < len(published) and _time.monotonic() < deadline:
            msg = pubsub.get_message(timeout=0.1)
            if msg is not None and (text := routed(budget, msg)) is not None:
                got_events.append(text)
        assert [e[0] for e in published] == ["l"]
        assert_events("the sequence", got_events, published, REAL_TOL)
    finally:
        pubsub.close()
        client.delete(*keys(budget))
        client.close()
