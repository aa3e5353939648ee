"""Messages of a budget's events channel, and the local view of fleet-wide pauses they give.

Times here are this process's ``time.monotonic()``: a message carries durations measured by
Redis (start minus now), never a Redis timestamp compared with a local clock.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GrantNotice:
    """A queued ticket got its lease; the holder may start ``delay`` seconds after ``arrived``."""

    lease_id: str
    delay: float
    arrived: float


@dataclass(frozen=True, slots=True)
class CooldownNotice:
    """Some process started or lengthened a fleet-wide pause."""

    remaining: float
    shift: float
    arrived: float
    key: str = ""


def parse(data: bytes | str, arrived: float | None = None) -> GrantNotice | CooldownNotice | None:
    """Decode one message; anything unknown is ignored (a newer peer may publish more kinds)."""
    text = data.decode() if isinstance(data, bytes) else data
    at = time.monotonic() if arrived is None else arrived
    parts = text.split()
    try:
        if parts[0] == "g" and len(parts) == 4:
            return GrantNotice(parts[1], max(0.0, float(parts[2]) - float(parts[3])), at)
        if parts[0] == "c" and len(parts) == 4:
            remaining = max(0.0, float(parts[2]) - float(parts[1]))
            return CooldownNotice(remaining, float(parts[3]), at, f"{parts[1]} {parts[2]}")
    except (IndexError, ValueError):
        return None
    return None


class PauseClock:
    """Moves reservations handed out before a pause, the way ``cooldown.lua`` moved the buckets.

    A reservation made at local time ``since`` to start at ``start`` is pushed back by the shift of
    every pause announced after it, and never starts inside a pause.
    """

    def __init__(self, keep: int = 256) -> None:
        self._pauses: deque[tuple[float, float, float]] = deque(maxlen=keep)
        self._seen: deque[str] = deque(maxlen=keep)

    def record(self, notice: CooldownNotice) -> None:
        """Note a pause once, whether it came from our own reply or from the channel."""
        if notice.key and notice.key in self._seen:
            return
        self._seen.append(notice.key)
        self._pauses.append((notice.arrived, notice.arrived + notice.remaining, notice.shift))

    def adjust(self, start: float, since: float) -> float:
        for at, until, shift in self._pauses:
            if at < since:
                continue
            if start > at:
                start += shift
            start = max(start, until)
        return start

    def pause_left(self, now: float | None = None) -> float:
        """Seconds until the latest known pause ends (0 when none is active)."""
        t = time.monotonic() if now is None else now
        return max(0.0, max((until - t for _, until, _ in self._pauses), default=0.0))
