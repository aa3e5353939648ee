"""The acquire protocol, written once as a generator that the sync and async fronts drive.

The generator yields what it needs done (run a script, wait for a notice) and is sent the answer;
it returns when the lease is granted, or raises. The fronts add only the I/O and the waiting.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ._budget import Budget
from ._core import ANYWHERE, Place, acquire_args, decode_acquire, decode_status, too_large_error
from ._events import CooldownNotice, GrantNotice, HeadNotice, Notice, Renewed, Resubscribed
from ._exceptions import AcquireTimeout
from ._renewals import LAST_RESORT, renewal_only

#: How long a waiter whose renewal found it granted waits for the grant's notice before it asks
#: Redis (which claims the grant): the notice was published before the renewal's reply was sent, so
#: it is late only if lost, and then the events connection's loss sends every waiter back anyway.
NOTICE_GRACE = 0.5


@dataclass(frozen=True, slots=True)
class RunScript:
    """Run ``op`` with these operation arguments; send back the raw reply."""

    op: str
    argv: list[str]


@dataclass(frozen=True, slots=True)
class AwaitNotice:
    """Wait up to ``timeout`` seconds for the next notice about this ticket; send it back, or None."""

    lease_id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class GiveBack:
    """The deadline passed: give the ticket (or an unclaimed grant) back, without holding the caller
    longer than one bounded attempt; send back nothing."""

    lease_id: str


Step = RunScript | AwaitNotice | GiveBack


@dataclass(slots=True)
class _Pause:
    """What a waiting flow knows of a fleet pause: when the last one it heard ends (monotonic), and
    whether a reconnect may have hidden one (its notice lost): then the next grant asks Redis."""

    until: float = 0.0
    unsure: bool = False


def acquire_flow(
    budget: Budget,
    lease_id: str,
    requests: float,
    tokens: float,
    timeout: float | None,
    ticket_ttl: float,
    keep_place: bool = False,
    place: Place = ANYWHERE,
) -> Generator[Step, Any, None]:
    """Acquire, queue, sleep until the fit time or a notice, and claim a grant made in the queue.

    ``timeout=0`` tries once and never queues. A grant made to the queued ticket is provisional
    until this flow claims it (acquire again with the same id), unless it was made firm (this
    process connected, see ``connected()`` in ``lua/_prelude.lua``): then the notice is the grant.
    Every return after a reconnect is that same call: it renews the ticket, claims a grant, or
    re-enters a ticket that Redis lost.
    ``keep_place``: the ticket stays in the queue when the flow gives up (``AcquireTimeout.ticket``),
    for the caller to come back to with the same id: at the deadline, or at once when the budget
    can tell the wait is longer (then the ticket is queued first, and ``retry_after`` is that wait).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    first = True
    fits_at: float | None = None  # when the head was told it fits (monotonic), if it was
    # queued (a later start is then a booking's, which may be after the deadline), and the pauses a
    # reservation heard of: a reservation asked for again keeps to both
    waited, pause = False, _Pause()
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0 and not first:
            if keep_place:
                raise AcquireTimeout(
                    f"no grant from budget {budget.name!r} within {timeout:g}s; ticket {lease_id} keeps its place",
                    budget=budget.name,
                    retry_after=None if fits_at is None else max(0.0, fits_at - time.monotonic()),
                    ticket=lease_id,
                )
            yield GiveBack(lease_id)
            raise AcquireTimeout(f"no grant from budget {budget.name!r} within {timeout:g}s", budget=budget.name)
        first = False
        argv = acquire_args(
            lease_id, requests, tokens, remaining, timeout != 0, ticket_ttl, budget.probe, budget.overdraft, *place
        )
        reply = decode_acquire((yield RunScript("acquire", argv)))
        if reply.kind == "granted":
            if pause.unsure:  # a pause may have begun while its notice could not reach this process
                pause.unsure = False
                remaining = decode_status(budget, (yield RunScript("status", []))).cooldown_remaining
                pause.until = max(pause.until, time.monotonic() + remaining)
            if reply.start <= reply.now and pause.until <= time.monotonic():
                return
            # a reservation: the reply's half round trip only adds margin
            wake = time.monotonic() + max(0.0, reply.start - reply.now)
            if (yield from _until_start(lease_id, wake, deadline if waited else None, pause)):
                return
            continue  # a reconnect, a lost state or the deadline while it waited: ask Redis again, same id
        if reply.kind == "too_large":
            raise too_large_error(budget, requests, tokens, reply)
        if reply.kind == "refused" and keep_place:
            # Longer than the timeout, as the budget can tell: take the place (a queue with no
            # bound on the wait) and leave at once with that wait.
            argv = acquire_args(  # (never a reservation: its caller leaves at once)
                lease_id, requests, tokens, None, True, ticket_ttl, budget.probe, budget.overdraft,
                *place._replace(reserve=False, book=False),
            )  # fmt: skip
            if decode_acquire((yield RunScript("acquire", argv))).kind == "granted":
                return  # it fits after all (a release in between)
            raise AcquireTimeout(
                f"budget {budget.name!r} can grant this request in about {reply.retry_after or 0:.3f}s, after "
                f"the {timeout:g}s timeout; ticket {lease_id} keeps its place",
                budget=budget.name,
                retry_after=reply.retry_after,
                ticket=lease_id,
            )
        if reply.kind == "refused":
            wait = reply.retry_after if reply.retry_after is not None else float("nan")
            raise AcquireTimeout(
                f"budget {budget.name!r} can grant this request in {wait:.3f}s, after the {timeout:g}s timeout",
                budget=budget.name,
                retry_after=reply.retry_after,
            )
        waited = True
        # Queued: sleep until the exact fit time, unless a notice comes first; a grant, a reconnect or a
        # ticket the limiter found dropped sends the flow straight back to Redis (to claim, or to ask again).
        wake = time.monotonic() + reply.wait
        if renewal_only(reply.wait, ticket_ttl):  # the limiter renews it with its others (_renewals)
            wake = time.monotonic() + LAST_RESORT * ticket_ttl
        while True:
            until = wake if deadline is None else min(wake, deadline)
            left = until - time.monotonic()
            if left <= 0:
                break
            notice: Notice | None = yield AwaitNotice(lease_id, left)
            if isinstance(notice, GrantNotice) and notice.firm:
                # granted to this connected process: nothing to claim; booked, it starts later
                start = notice.arrived + notice.delay
                if start <= time.monotonic() and pause.until <= time.monotonic():
                    return
                if (yield from _until_start(lease_id, start, deadline, pause)):
                    return
                break  # a reconnect (ask Redis again, same id: it finds the lease) or the deadline
            if isinstance(notice, Resubscribed):
                pause.unsure = True
                break
            if isinstance(notice, GrantNotice) or (isinstance(notice, Renewed) and not notice.granted):
                break
            if isinstance(notice, Renewed):  # granted: its notice follows on the events connection
                wake = min(wake, time.monotonic() + NOTICE_GRACE)
            if isinstance(notice, HeadNotice):
                wake = fits_at = notice.arrived + notice.delay


def _until_start(lease_id: str, wake: float, deadline: float | None, pause: _Pause) -> Generator[Step, Any, bool]:
    """A reservation (a grant for a later start, see acquire.lua) sleeps until its start, ``wake``
    (monotonic), and the end of any pause heard: True then. A booking whose start is after the
    caller's ``deadline`` returns False at the deadline (the flow then gives it back and times out).
    ``pause`` keeps what it heard for the flow's next ask.

    A pause announced meanwhile (a 429 anywhere in the fleet) holds it until the pause ends as well;
    a reconnect or a lost state returns False at once, for the flow to ask Redis again with the same
    id (the lease is found and its start told again, or, lost, the call is a new arrival). A caller
    that gives up meanwhile cancels it (the fronts give the lease back)."""
    wake = max(wake, pause.until)
    while (left := wake - time.monotonic()) > 0:
        if deadline is not None and wake > deadline:
            if deadline - time.monotonic() <= 0:
                return False
            left = deadline - time.monotonic()
        notice = yield AwaitNotice(lease_id, left)
        if isinstance(notice, Resubscribed):
            pause.unsure = True
            return False
        if isinstance(notice, CooldownNotice):
            pause.until = max(pause.until, notice.arrived + notice.remaining)
            wake = max(wake, pause.until)
    return True
