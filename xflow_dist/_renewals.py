"""The queued tickets of one limiter, kept alive together.

A ticket dies unless renewed within its TTL. Its waiter used to come back every half TTL to renew
it (one acquire each), so a deep queue cost Redis a call per waiter per half TTL. Instead each
limiter renews every ticket of its own that is due, in one call, and wakes only the waiters whose
ticket was granted or dropped meanwhile. A busy process renews them on the settles it sends anyway
(``riders``: settle.lua takes them after its own arguments); a round of ``renew.lua`` renews only the
tickets no settle took in time. Both fronts drive this table.
"""

from __future__ import annotations

from typing import Any

from ._core import _num, _strings
from ._events import HeadNotice, Notice, Renewed, Resubscribed

#: Ticket ids one renew.lua call takes (``MAX_IDS`` there).
MAX_RENEW = 1000


#: A waiter whose ticket the table renews still comes back after this many ticket TTLs, in case no
#: round ran (it never should be needed).
LAST_RESORT = 4.0


def renewal_only(wait: float, ticket_ttl: float) -> bool:
    """An acquire reply's wait that is the renewal interval (half the TTL: acquire.lua's hint for a
    ticket that is not a head told its fit time), so that its waiter need not come back for it. A
    fit time or a lease's expiry that falls on it to the microsecond is served by the next round,
    whose renew.lua serves the queue too."""
    return abs(wait - ticket_ttl / 2) <= 1e-6


class Renewals:
    """Ticket id -> when its next renewal is due (monotonic); not thread-safe (the sync front locks).

    Every due time is set to the time of the call plus half a TTL, and a ticket set again moves to
    the end, so the table is in order of due time: a settle or a round reads only the tickets it
    takes (and one more), however deep the queue."""

    def __init__(self, ticket_ttl: float) -> None:
        self.ticket_ttl = ticket_ttl
        self._due: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._due)

    def _set(self, lease_id: str, now: float) -> None:
        self._due.pop(lease_id, None)
        self._due[lease_id] = now + self.ticket_ttl / 2

    def queued(self, lease_id: str, now: float) -> None:
        """An acquire just queued (or renewed) ``lease_id``: its next renewal is half a TTL away."""
        self._set(lease_id, now)

    def discard(self, lease_id: str) -> None:
        self._due.pop(lease_id, None)

    def clear(self) -> None:
        self._due.clear()

    def next_due(self) -> float | None:
        return next(iter(self._due.values()), None)

    def take(self, now: float) -> list[str]:
        """The tickets a round renews now: none until one is due, then every one due within the next
        quarter TTL too (so that a round serves many), at most ``MAX_RENEW``; each is due again
        half a TTL later."""
        first = self.next_due()
        if first is None or first > now:
            return []
        return self.riders(now)

    def riders(self, now: float) -> list[str]:
        """The tickets a settle sent now renews on its way: every one due within a quarter TTL
        (renewed at least a quarter TTL ago, and a ticket lives a whole TTL), at most ``MAX_RENEW``;
        each is due again half a TTL later. Where the settle fails, ``notices`` sends their waiters
        back, as for a round that failed."""
        soon = now + self.ticket_ttl / 4
        ids: list[str] = []
        for lid, at in self._due.items():
            if at > soon or len(ids) == MAX_RENEW:
                break
            ids.append(lid)
        for lid in ids:
            self._set(lid, now)
        return ids

    def notices(self, ids: list[str], statuses: Any | None, arrived: float) -> list[tuple[str, Notice]]:
        """What renewing ``ids`` tells their waiters, given one status each as renew.lua replies (None:
        the call failed, or Redis is out): ``Renewed`` to each granted or dropped meanwhile, which leave
        the table until their next acquire queues them again; ``HeadNotice`` to the head told its time,
        unless that is only the renewal interval; and where the call failed, ``Resubscribed`` to all
        (each asks for itself, and meets the failure), and they leave the table."""
        if statuses is None:
            for lid in ids:
                self._due.pop(lid, None)
            return [(lid, Resubscribed()) for lid in ids]
        out: list[tuple[str, Notice]] = []
        for lid, status in zip(ids, _strings(statuses, len(ids), "renew")[: len(ids)], strict=True):
            if status[:1] == "h":
                if not renewal_only(wait := float(status[1:]), self.ticket_ttl):
                    out.append((lid, HeadNotice(lid, wait, arrived)))
            elif status != "q":
                self._due.pop(lid, None)
                out.append((lid, Renewed(granted=status == "g")))
        return out

    def args(self, ids: list[str]) -> list[str]:
        return renewal_args(self.ticket_ttl, ids)


def renewal_args(ticket_ttl: float, ids: list[str]) -> list[str]:
    """renew.lua's arguments to renew ``ids``, and a settle's after its own (settle.lua)."""
    return [_num(ticket_ttl), *ids]
