"""The provider's limits and buckets: its configuration, the buckets that refill by the minute, and an
independent check that no window ever held more than the limits allow."""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass
from typing import Literal

from ..._exceptions import ConfigurationError

#: Providers' buckets hold one minute of their per-minute limit.
WINDOW = 60.0
#: Float slack for "the bucket holds enough": a waiter told to come back after exactly the wait must fit.
_EPS = 1e-9
RejectReason = Literal["requests", "tokens", "concurrency", "too_large"]


def _number(name: str, value: object, *, zero_ok: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigurationError(f"{name} must be a finite number, not {value!r}")
    if value < 0 or (value == 0 and not zero_ok):
        raise ConfigurationError(f"{name} must be {'zero or more' if zero_ok else 'more than zero'}, not {value!r}")


def _whole(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigurationError(f"{name} must be a whole number of at least {minimum}, not {value!r}")


def _validate_limits(rpm: object, tpm: object, max_concurrency: object) -> None:
    _number("rpm", rpm, zero_ok=False)
    _number("tpm", tpm, zero_ok=False)
    if max_concurrency is not None:
        _whole("max_concurrency", max_concurrency, minimum=1)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """How the simulated provider limits and answers.

    ``completion_ratio`` bounds the share of ``max_tokens`` a reply actually produces (drawn deterministically
    from ``seed`` and the request); latency is ``latency_base + latency_per_token * completion tokens``.
    """

    rpm: float = 600
    tpm: float = 60_000
    max_concurrency: int | None = None
    latency_base: float = 0.05
    latency_per_token: float = 0.0002
    completion_ratio: tuple[float, float] = (0.3, 1.0)
    default_max_tokens: int = 256
    headers: Literal["openai", "anthropic"] = "openai"
    seed: int = 0

    def __post_init__(self) -> None:
        _validate_limits(self.rpm, self.tpm, self.max_concurrency)
        _number("latency_base", self.latency_base, zero_ok=True)
        _number("latency_per_token", self.latency_per_token, zero_ok=True)
        ratio = self.completion_ratio
        if not isinstance(ratio, tuple) or len(ratio) != 2:
            raise ConfigurationError(f"completion_ratio must be a (low, high) tuple, not {ratio!r}")
        for bound in ratio:
            _number("completion_ratio", bound, zero_ok=True)
        if not 0 <= ratio[0] <= ratio[1] <= 1:
            raise ConfigurationError(f"completion_ratio must satisfy 0 <= low <= high <= 1, not {ratio!r}")
        _whole("default_max_tokens", self.default_max_tokens, minimum=1)
        if self.headers not in ("openai", "anthropic"):
            raise ConfigurationError(f"headers must be 'openai' or 'anthropic', not {self.headers!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigurationError(f"seed must be an integer, not {self.seed!r}")


# --------------------------------------------------------------------------------------------------------------
# Accounting (no I/O)


@dataclass(frozen=True, slots=True)
class Levels:
    """Both buckets at one instant: what they hold and seconds until each is full again."""

    requests: float
    tokens: float
    requests_reset: float
    tokens_reset: float


@dataclass(frozen=True, slots=True)
class Admission:
    """The answer to one request: admitted with a ``ticket`` to complete, or rejected with a ``reason``.

    ``retry_after`` is the exact wait (seconds) until this request would fit if nothing else were admitted;
    None when admitted, or when it can never fit (``too_large``). ``levels`` are after the charge, if any.
    """

    admitted: bool
    ticket: int | None
    reason: RejectReason | None
    retry_after: float | None
    levels: Levels
    cost: int


class _Bucket:
    """A bucket holding ``capacity``, refilling continuously at ``rate`` per second, starting full."""

    __slots__ = ("capacity", "level", "rate", "updated")

    def __init__(self, capacity: float, now: float) -> None:
        self.capacity = capacity
        self.rate = capacity / WINDOW
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def holds(self, amount: float) -> bool:
        return self.level >= amount - _EPS * max(1.0, amount)

    def wait_for(self, amount: float) -> float:
        return 0.0 if self.holds(amount) else (amount - self.level) / self.rate

    def until_full(self) -> float:
        return max(0.0, (self.capacity - self.level) / self.rate)


class _WindowCheck:
    """An independent proof that one dimension never over-admitted, kept apart from the bucket arithmetic.

    A bucket of capacity C refilling at r can admit a net charge (charges minus refunds) of at most
    C + r * (b - a) over any window (a, b]. With S(t) = net(start, t] - r * (t - start), that is
    S(b) - min over a < b of S(a) <= C, which one running minimum checks for every window at once.
    The trailing 60-s net is kept too: its bound is C + 60 r (twice the limit) and its peak is reported.
    """

    __slots__ = ("capacity", "min_s", "net", "peak_window", "rate", "start", "window", "window_net")

    def __init__(self, capacity: float, start: float) -> None:
        self.capacity = capacity
        self.rate = capacity / WINDOW
        self.start = start
        self.net = 0.0
        self.min_s = 0.0
        self.window: collections.deque[tuple[float, float]] = collections.deque()
        self.window_net = 0.0
        self.peak_window = 0.0

    def record(self, now: float, delta: float) -> bool:
        """Account ``delta`` (a charge if positive, a refund if negative); False if a bound was broken."""
        drift = self.rate * (now - self.start)
        self.min_s = min(self.min_s, self.net - drift)
        self.net += delta
        self.window.append((now, delta))
        self.window_net += delta
        while self.window and self.window[0][0] <= now - WINDOW:
            self.window_net -= self.window.popleft()[1]
        self.peak_window = max(self.peak_window, self.window_net)
        slack = _EPS * 1000 * max(1.0, self.capacity)
        return delta <= 0 or (
            self.net - drift - self.min_s <= self.capacity + slack
            and self.window_net <= self.capacity + self.rate * WINDOW + slack
        )
