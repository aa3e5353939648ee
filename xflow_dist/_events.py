"""Messages of a budget's events channel (see ``lua/_prelude.lua``).

Times here are this process's ``time.monotonic()``: a message carries durations measured by Redis
(a fit time minus its now), never a Redis timestamp compared with a local clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

Q = TypeVar("Q")


@dataclass(frozen=True, slots=True)
class GrantNotice:
    """A queued ticket was granted: its lease exists, charged. ``firm``: granted to a connected
    process, the holder starts ``delay`` seconds after ``arrived`` (0: at once; later where the
    ticket was booked, see acquire.lua); else it claims the grant first (acquire again, same id)."""

    lease_id: str
    firm: bool = False
    delay: float = 0.0
    arrived: float = 0.0


@dataclass(frozen=True, slots=True)
class HeadNotice:
    """A queued ticket is at the head and will fit ``delay`` seconds after ``arrived``: come back then."""

    lease_id: str
    delay: float
    arrived: float


@dataclass(frozen=True, slots=True)
class CooldownNotice:
    """Some process started or lengthened a fleet-wide pause of ``remaining`` seconds."""

    remaining: float
    arrived: float


@dataclass(frozen=True, slots=True)
class Resubscribed:
    """The events connection came back: notices sent meanwhile are lost, so every waiter asks again."""


@dataclass(frozen=True, slots=True)
class Renewed:
    """A renewal found the ticket out of the queue: ``granted`` (its grant notice is on its way, on
    the same events connection, so the waiter gives it a moment before it asks), or dropped (it asks
    again at once). Nothing was lost on the way: no pause can have gone unheard."""

    granted: bool


@dataclass(frozen=True, slots=True)
class StateLost:
    """Redis lost the budget's keys and made them anew: every lease held is registered again
    (``rejoin.lua``) and every waiter asks again, its ticket being gone."""


Notice = GrantNotice | HeadNotice | CooldownNotice | Resubscribed | Renewed | StateLost


def parse(data: bytes | str, arrived: float | None = None) -> Notice | None:
    """Decode one message; anything unknown is ignored (a newer peer may publish more kinds)."""
    text = data.decode() if isinstance(data, bytes) else data
    at = time.monotonic() if arrived is None else arrived
    parts = text.split()
    try:
        if parts[0] == "g" and len(parts) == 3:
            return GrantNotice(parts[1])
        if parts[0] == "g" and len(parts) == 4 and parts[3] == "f":
            return GrantNotice(parts[1], firm=True)
        if parts[0] == "g" and len(parts) == 5 and parts[3] == "f":
            return GrantNotice(parts[1], True, max(0.0, float(parts[4]) - float(parts[2])), at)
        if parts[0] == "h" and len(parts) == 4:
            return HeadNotice(parts[1], max(0.0, float(parts[2]) - float(parts[3])), at)
        if parts[0] == "c" and len(parts) == 3:
            return CooldownNotice(max(0.0, float(parts[2]) - float(parts[1])), at)
        if parts[0] == "l" and len(parts) == 2:
            return StateLost()
    except (IndexError, ValueError):
        return None
    return None


class Mailroom(Generic[Q]):
    """Routes each notice about a ticket to the inbox of the acquirer waiting for it.

    Both fronts keep one; the sync one makes ``queue.SimpleQueue`` inboxes, the async one
    ``asyncio.Queue``. ``channel``: the budget's events channel, whose (re)subscription resets (the
    process's own channel, subscribed beside it, does not).
    """

    def __init__(self, make: Callable[[], Q], channel: str | None = None) -> None:
        self._make = make
        self._inboxes: dict[str, Q] = {}
        self._channel = None if channel is None else channel.encode()

    def expect(self, lease_id: str) -> Q:
        inbox = self._inboxes[lease_id] = self._make()
        return inbox

    def forget(self, lease_id: str) -> None:
        self._inboxes.pop(lease_id, None)

    def inbox(self, lease_id: str) -> Q | None:
        """The inbox of the acquirer waiting for ``lease_id``, if one does."""
        return self._inboxes.get(lease_id)

    def resets(self, message: dict[str, Any]) -> bool:
        """A (re)subscription to the budget's channel or a lost state: the leases held must be
        registered again."""
        if message.get("type") == "subscribe":
            name = message.get("channel")
            return self._channel is None or (name.encode() if isinstance(name, str) else name) == self._channel
        return message.get("type") == "message" and isinstance(parse(message["data"]), StateLost)

    def everyone(self) -> list[Q]:
        """Every inbox: after a reconnect each waiter is sent ``Resubscribed``."""
        return list(self._inboxes.values())

    def deliver(self, message: dict[str, Any]) -> list[tuple[Q, Notice]]:
        """Where a pub/sub message goes: a notice to the waiter it names; after a (re)subscription,
        ``Resubscribed`` to every waiter, since what was published meanwhile is lost; a pause to
        every waiter (a reservation waiting for its start holds until it ends; the queue ignores it)."""
        if self.resets(message):
            return [(inbox, Resubscribed()) for inbox in self.everyone()]
        if message.get("type") == "message":
            notice = parse(message["data"])
            if isinstance(notice, CooldownNotice):
                return [(inbox, notice) for inbox in self.everyone()]
            found = self._addressed(notice)
            return [found] if found is not None else []
        return []

    def route(self, data: bytes | str) -> tuple[Q, Notice] | None:
        """The inbox a message is for, with its notice; None if nobody here waits for it."""
        return self._addressed(parse(data))

    def _addressed(self, notice: Notice | None) -> tuple[Q, Notice] | None:
        if isinstance(notice, GrantNotice | HeadNotice):
            inbox = self._inboxes.get(notice.lease_id)
            if inbox is not None:
                return inbox, notice
        return None
