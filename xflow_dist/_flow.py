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
from ._core import acquire_args, decode_acquire, too_large_error
from ._events import GrantNotice, HeadNotice, Notice
from ._exceptions import AcquireTimeout


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


Step = RunScript | AwaitNotice


def acquire_flow(
    budget: Budget,
    lease_id: str,
    requests: float,
    tokens: float,
    timeout: float | None,
    ticket_ttl: float,
) -> Generator[Step, Any, None]:
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            yield RunScript("cancel", [lease_id])
            raise AcquireTimeout(f"no grant from budget {budget.name!r} within {timeout:g}s", budget=budget.name)
        reply = decode_acquire(
            (
                yield RunScript(
                    "acquire", acquire_args(lease_id, requests, tokens, remaining, True, ticket_ttl, budget.probe)
                )
            )
        )
        if reply.kind == "granted":
            return
        if reply.kind == "too_large":
            raise too_large_error(budget, requests, tokens, reply)
        if reply.kind == "refused":
            wait = reply.retry_after if reply.retry_after is not None else float("nan")
            raise AcquireTimeout(
                f"budget {budget.name!r} can grant this request in {wait:.3f}s, after the {timeout:g}s timeout",
                budget=budget.name,
                retry_after=reply.retry_after,
            )
        # Queued: sleep until the exact fit time (or the renewal time), unless a notice comes first.
        wake = time.monotonic() + reply.wait
        while True:
            until = wake if deadline is None else min(wake, deadline)
            left = until - time.monotonic()
            if left <= 0:
                break
            notice: Notice | None = yield AwaitNotice(lease_id, left)
            if isinstance(notice, GrantNotice):
                return
            if isinstance(notice, HeadNotice):
                wake = notice.arrived + notice.delay
