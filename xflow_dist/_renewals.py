"""The queued tickets of one limiter, kept alive together.

A ticket dies unless renewed within its TTL. Its waiter used to come back every half TTL to renew
it (one acquire each), so a deep queue cost Redis a call per waiter per half TTL. Instead each
limiter renews every ticket of its own that is due, in one ``renew.lua`` call a round, and wakes
only the waiters whose ticket was granted or dropped meanwhile. Both fronts drive this table.
"""

from __future__ import annotations

from typing import Any

from ._core import _num, _strings
from ._events import HeadNotice, Notice, Resubscribed

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
    """Ticket id -> when its next renewal is due (monotonic); not thread-safe (the sync front locks)."""

    def __init__(self, ticket_ttl: float) -> None:
        self.ticket_ttl = ticket_ttl
        self._due: dict[str, float] = {}

    def __bool__(self) -> bool:
        return bool(self._due)

    def queued(self, lease_id: str, now: float) -> None:
        """An acquire just queued (or renewed) ``lease_id``: its next renewal is half a TTL away."""
        self._due[lease_id] = now + self.ticket_ttl / 2

    def discard(self, lease_id: str) -> None:
        self._due.pop(lease_id, None)

    def clear(self) -> None:
        self._due.clear()

    def next_due(self) -> float | None:
        return min(self._due.values(), default=None)

    def take(self, now: float) -> list[str]:
        """The tickets to renew now: none until one is due, then every one due within the next
        quarter TTL too (so that a round serves many), at most ``MAX_RENEW``; each is due again
        half a TTL later."""
        if not self._due or min(self._due.values()) > now:
            return []
        soon = now + self.ticket_ttl / 4
        ids = sorted((lid for lid, at in self._due.items() if at <= soon), key=self._due.__getitem__)[:MAX_RENEW]
        for lid in ids:
            self._due[lid] = now + self.ticket_ttl / 2
        return ids

    def answered(self, ids: list[str], raw: Any) -> tuple[list[str], list[tuple[str, float]]]:
        """renew.lua's reply to ``ids``: the ones whose waiter must ask again (granted meanwhile, or
        dropped), which leave the table until their next acquire queues them again; and the head, with
        when it is to come back, unless that is only the renewal interval."""
        statuses = _strings(raw, len(ids) + 1, "renew")[1 : len(ids) + 1]
        wake = [lid for lid, status in zip(ids, statuses, strict=True) if status not in ("q",) and status[0] != "h"]
        heads = [
            (lid, wait)
            for lid, status in zip(ids, statuses, strict=True)
            if status[0] == "h" and not renewal_only(wait := float(status[1:]), self.ticket_ttl)
        ]
        for lid in wake:
            self._due.pop(lid, None)
        return wake, heads

    def notices(self, ids: list[str], raw: Any | None, arrived: float) -> list[tuple[str, Notice]]:
        """What a round of ``ids`` tells their waiters, given renew.lua's reply (None: the round failed,
        or Redis is out): ``Resubscribed`` to each that must ask again (all of them when the round
        failed, and they leave the table), ``HeadNotice`` to the head told its time."""
        if raw is None:
            for lid in ids:
                self._due.pop(lid, None)
            return [(lid, Resubscribed()) for lid in ids]
        wake, heads = self.answered(ids, raw)
        return [(lid, Resubscribed()) for lid in wake] + [(lid, HeadNotice(lid, w, arrived)) for lid, w in heads]

    def args(self, ids: list[str]) -> list[str]:
        return [_num(self.ticket_ttl), *ids]
