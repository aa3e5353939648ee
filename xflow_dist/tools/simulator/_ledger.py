"""The provider's books, with no I/O: admissions, completions, refunds and the figures a run is judged by."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..._exceptions import InvalidCostError
from ._limits import Admission, Levels, RejectReason, _Bucket, _validate_limits, _WindowCheck


@dataclass(slots=True)
class _InFlight:
    ends: float
    reserved: int
    prompt: int


def _summary(values: list[float]) -> dict[str, float | int | None]:
    """Count, median and 90th percentile (seconds) of ``values``; None where there are none."""
    ordered = sorted(values)
    n = len(ordered)
    return {
        "count": n,
        "median": ordered[n // 2] if n else None,
        "p90": ordered[min(n - 1, int(n * 0.9))] if n else None,
    }


def _bump(series: list[int], index: int, amount: int) -> None:
    if index < 0:
        return
    if len(series) <= index:
        series.extend([0] * (index + 1 - len(series)))
    series[index] += amount


class ProviderLedger:
    """The provider's buckets and its books, with no I/O: every call reads ``clock`` (seconds, monotonic).

    Admission needs the request bucket to hold 1, the token bucket to hold the cost and, with
    ``max_concurrency``, fewer requests in flight; the cost is charged at admission and the unused
    completion reservation refunded by ``complete``. A cost above the token capacity is always rejected.
    """

    def __init__(
        self,
        *,
        rpm: float,
        tpm: float,
        max_concurrency: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _validate_limits(rpm, tpm, max_concurrency)
        self.rpm = float(rpm)
        self.tpm = float(tpm)
        self.max_concurrency = max_concurrency
        self._clock = clock
        self.started = clock()
        self._requests = _Bucket(self.rpm, self.started)
        self._tokens = _Bucket(self.tpm, self.started)
        self._request_check = _WindowCheck(self.rpm, self.started)
        self._token_check = _WindowCheck(self.tpm, self.started)
        self._in_flight: dict[int, _InFlight] = {}
        self._next_ticket = 0
        self.admitted = 0
        self.completed = 0
        self.rejected = 0
        self.rejected_by: dict[RejectReason, int] = {"requests": 0, "tokens": 0, "concurrency": 0, "too_large": 0}
        self.tokens_charged = 0
        self.tokens_refunded = 0
        self.tokens_settled = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.peak_in_flight = 0
        self.first_admission: float | None = None
        self.last_admission: float | None = None
        self.last_completion: float | None = None
        # the concurrency's own books: slot-seconds in flight (up to the last admission, too), and
        # the hand-overs, from a completion that freed a slot of a full limit to the next admission
        self._busy = 0.0
        self._busy_at: float | None = None
        self.busy_before_last_admission = 0.0
        self._freed: list[float] = []
        self.handovers: list[float] = []
        self.violations = 0
        self._series_requests: list[int] = []
        self._series_tokens: list[int] = []
        self._series_rejected: list[int] = []

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet completed."""
        return len(self._in_flight)

    def _now(self) -> float:
        now = self._clock()
        self._requests.refill(now)
        self._tokens.refill(now)
        return now

    def _levels(self) -> Levels:
        return Levels(
            requests=self._requests.level,
            tokens=self._tokens.level,
            requests_reset=self._requests.until_full(),
            tokens_reset=self._tokens.until_full(),
        )

    def _second(self, now: float) -> int:
        return int(now - self.started)

    def levels(self) -> Levels:
        """Both buckets now."""
        self._now()
        return self._levels()

    def try_admit(self, prompt_tokens: int, reserved_completion: int = 0, *, hold: float = 0.0) -> Admission:
        """Admit and charge a request costing ``prompt_tokens + reserved_completion``, or reject it for free.

        ``hold`` is how long the request is expected to stay in flight: it dates the concurrency wait.
        """
        for name, value in (("prompt_tokens", prompt_tokens), ("reserved_completion", reserved_completion)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidCostError(f"{name} must be a whole number of at least 0, not {value!r}")
        now = self._now()
        cost = prompt_tokens + reserved_completion
        if cost > self._tokens.capacity:
            return self._reject(now, "too_large", None, cost)
        waits: dict[RejectReason, float] = {}
        if not self._requests.holds(1):
            waits["requests"] = self._requests.wait_for(1)
        if not self._tokens.holds(cost):
            waits["tokens"] = self._tokens.wait_for(cost)
        if self.max_concurrency is not None and len(self._in_flight) >= self.max_concurrency:
            waits["concurrency"] = max(0.0, min(f.ends for f in self._in_flight.values()) - now)
        if waits:
            reason = max(waits, key=lambda key: waits[key])
            return self._reject(now, reason, waits[reason], cost)
        self._requests.level = max(0.0, self._requests.level - 1)
        self._tokens.level = max(0.0, self._tokens.level - cost)
        self._count_busy(now)
        self.busy_before_last_admission = self._busy
        self.last_admission = now - self.started
        if self._freed:  # a slot a completion freed in a full limit, taken again
            self.handovers.append(now - self._freed.pop(0))
        ticket = self._next_ticket
        self._next_ticket += 1
        self._in_flight[ticket] = _InFlight(
            ends=now + max(0.0, hold), reserved=reserved_completion, prompt=prompt_tokens
        )
        self.admitted += 1
        self.tokens_charged += cost
        self.peak_in_flight = max(self.peak_in_flight, len(self._in_flight))
        if self.first_admission is None:
            self.first_admission = now - self.started
        _bump(self._series_requests, self._second(now), 1)
        ok_requests = self._request_check.record(now, 1)
        ok_tokens = self._token_check.record(now, cost)
        if not (ok_requests and ok_tokens):
            self.violations += 1
        return Admission(admitted=True, ticket=ticket, reason=None, retry_after=None, levels=self._levels(), cost=cost)

    def _count_busy(self, now: float) -> None:
        """Add the slot-seconds since the last change of the calls in flight."""
        if self._busy_at is not None:
            self._busy += len(self._in_flight) * (now - self._busy_at)
        self._busy_at = now

    def _reject(self, now: float, reason: RejectReason, wait: float | None, cost: int) -> Admission:
        self.rejected += 1
        self.rejected_by[reason] += 1
        _bump(self._series_rejected, self._second(now), 1)
        return Admission(admitted=False, ticket=None, reason=reason, retry_after=wait, levels=self._levels(), cost=cost)

    def complete(self, ticket: int, completion_tokens: int) -> int:
        """Settle an admitted request at its actual completion tokens; refund and return the unused reservation."""
        if isinstance(completion_tokens, bool) or not isinstance(completion_tokens, int) or completion_tokens < 0:
            raise InvalidCostError(f"completion_tokens must be a whole number of at least 0, not {completion_tokens!r}")
        if ticket not in self._in_flight:
            raise KeyError(f"no request in flight with ticket {ticket}")
        now = self._now()
        self._count_busy(now)
        if self.max_concurrency is not None and len(self._in_flight) >= self.max_concurrency:
            self._freed.append(now)
        flight = self._in_flight.pop(ticket)
        refund = max(0, flight.reserved - completion_tokens)
        if refund:
            self._tokens.level = min(self._tokens.capacity, self._tokens.level + refund)
            self._token_check.record(now, -refund)
        settled = flight.prompt + completion_tokens
        self.completed += 1
        self.tokens_refunded += refund
        self.tokens_settled += settled
        self.prompt_tokens += flight.prompt
        self.completion_tokens += completion_tokens
        self.last_completion = now - self.started
        _bump(self._series_tokens, self._second(now), settled)
        return refund

    def stats(self) -> dict[str, Any]:
        """The books as JSON-ready data; times are seconds since this ledger started."""
        now = self._now()
        return {
            "limits": {"rpm": self.rpm, "tpm": self.tpm, "max_concurrency": self.max_concurrency},
            "elapsed": now - self.started,
            "requests": {
                "admitted": self.admitted,
                "completed": self.completed,
                "rejected": self.rejected,
                "rejected_by": dict(self.rejected_by),
            },
            "tokens": {
                "charged": self.tokens_charged,
                "refunded": self.tokens_refunded,
                "settled": self.tokens_settled,
                "prompt": self.prompt_tokens,
                "completion": self.completion_tokens,
            },
            "in_flight": self.in_flight,
            "peak_in_flight": self.peak_in_flight,
            "first_admission": self.first_admission,
            "last_admission": self.last_admission,
            "last_completion": self.last_completion,
            "busy_before_last_admission": self.busy_before_last_admission,
            "handovers": _summary(self.handovers),
            "levels": {"requests": self._requests.level, "tokens": self._tokens.level},
            "peak_window": {"requests": self._request_check.peak_window, "tokens": self._token_check.peak_window},
            "series": {
                "requests": list(self._series_requests),
                "tokens": list(self._series_tokens),
                "rejected": list(self._series_rejected),
            },
            "violations": self.violations,
        }


# --------------------------------------------------------------------------------------------------------------
# Headers
