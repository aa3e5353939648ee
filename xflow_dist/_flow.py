"""The acquire protocol, written once as a generator that the sync and async fronts drive.

The generator yields what it needs done (run a script, await a grant notice) and is sent the
answer; it returns the granted reservation or raises. The fronts add only the I/O and the sleep.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from ._budget import Budget
from ._core import acquire_args, decode_acquire
from ._events import GrantNotice
from ._exceptions import AcquireTimeout


@dataclass(frozen=True, slots=True)
class RunScript:
    """Run ``op`` with these operation arguments; send back the raw reply."""

    op: str
    argv: list[str]


@dataclass(frozen=True, slots=True)
class AwaitGrant:
    """Wait up to ``timeout`` seconds for this ticket's grant notice; send it back, or None."""

    lease_id: str
    timeout: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """A granted lease: start at local monotonic ``start``; made at ``since`` (local monotonic)."""

    lease_id: str
    start: float
    since: float
    deadline: float | None


Step = RunScript | AwaitGrant


def acquire_flow(
    budget: Budget,
    lease_id: str,
    requests: float,
    tokens: float,
    timeout: float | None,
    ticket_ttl: float,
) -> Generator[Step, Any, Reservation]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            yield RunScript("cancel", [lease_id])
            raise AcquireTimeout(f"no slot of budget {budget.name!r} within {timeout:g}s", budget=budget.name)
        reply = decode_acquire(
            (yield RunScript("acquire", acquire_args(lease_id, requests, tokens, remaining, True, ticket_ttl)))
        )
        # Counted from the reply's arrival, so a caller never starts before its Redis start time.
        received = time.monotonic()
        if reply.kind == "granted":
            return Reservation(lease_id, received + reply.delay, received, deadline)
        if reply.kind == "refused":
            wait = reply.retry_after if reply.retry_after is not None else float("nan")
            raise AcquireTimeout(
                f"budget {budget.name!r} can start this request in {wait:.3f}s, after the {timeout:g}s timeout",
                budget=budget.name,
                retry_after=reply.retry_after,
            )
        wait = reply.poll if remaining is None else min(reply.poll, max(0.0, remaining))
        notice: GrantNotice | None = yield AwaitGrant(lease_id, wait)
        if notice is not None:
            return Reservation(lease_id, notice.arrived + notice.delay, notice.arrived, deadline)
