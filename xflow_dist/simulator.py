"""A simulated OpenAI-compatible provider that enforces its rate limits strictly, for tests, benchmarks and demos.

It does what OpenAI documents: a request bucket and a token bucket, each holding one minute of its limit
and refilling continuously; a request is charged its prompt tokens plus ``max_tokens * n`` when admitted,
the unused part is refunded when it completes, and rejections charge nothing. Every response carries
OpenAI's (or Anthropic's) rate-limit headers, every 429 an exact ``retry-after-ms``. A ledger records what
was admitted and proves, independently of the buckets, that no window ever held more than the limits allow.

A 429's ``retry-after-ms`` is the exact wait until the request would fit (for requests ``(1 - level) / rate``,
for tokens ``(cost - level) / rate``, for concurrency until the earliest in-flight request is due to end),
rounded up to the microsecond; ``retry-after`` is its ceiling in whole seconds, so 0 only when the wait is 0
(an overdue in-flight request). A cost above the token capacity can never fit: its 429 has no retry headers.
Bodies of 429s are OpenAI's in both header styles. Reset durations are rounded up to whole milliseconds,
Anthropic's reset timestamps up to whole seconds, so that waiting for them is always enough.

``ProviderLedger`` is the I/O-free accounting, driven by an injectable clock. ``create_app`` builds the
aiohttp application, ``SimulatorServer`` runs it in a background thread, and ``python -m xflow_dist.simulator``
serves it in the foreground. aiohttp is an optional dependency: ``import xflow_dist`` never imports this module.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import math
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.simulator needs aiohttp: pip install aiohttp") from exc

from ._durations import format_duration
from ._exceptions import ConfigurationError, InvalidCostError
from ._tokens import estimate_messages_tokens, estimate_text_tokens

__all__ = [
    "Admission",
    "Levels",
    "ProviderLedger",
    "SimulatorConfig",
    "SimulatorServer",
    "create_app",
    "main",
    "rate_limit_headers",
]

_T = TypeVar("_T")

#: Providers' buckets hold one minute of their per-minute limit.
WINDOW = 60.0
#: Float slack for "the bucket holds enough": a waiter told to come back after exactly the wait must fit.
_EPS = 1e-9
#: OpenAI's upper bound for ``n``.
_MAX_N = 128
#: Distinct request bodies whose repeat counters are remembered (oldest forgotten first).
_MAX_REPEAT_KEYS = 65_536
#: Largest request body accepted (aiohttp's default of 1 MiB is below a long-context prompt).
_MAX_BODY = 32 * 1024 * 1024
#: Four-byte words: a reply of k of them estimates to exactly k tokens.
_WORDS = (" the", " and", " for", " you", " not", " are", " but", " all", " can", " was", " one", " may")

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


def _ceil_ms(seconds: float) -> float:
    return math.ceil(round(seconds * 1000, 6)) / 1000


def _ms_text(seconds: float) -> str:
    """Milliseconds, rounded up to the microsecond so that waiting that long always suffices."""
    micros = math.ceil(round(seconds * 1_000_000, 3))
    whole, frac = divmod(micros, 1000)
    return f"{whole}.{frac:03d}".rstrip("0").rstrip(".") if frac else str(whole)


def _rfc3339(wall: float) -> str:
    stamp = datetime.datetime.fromtimestamp(math.ceil(wall), tz=datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _limit(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _remaining(level: float) -> int:
    return max(0, math.floor(level + _EPS))


def rate_limit_headers(
    style: Literal["openai", "anthropic"], ledger: ProviderLedger, levels: Levels, wall_now: float
) -> dict[str, str]:
    """The rate-limit headers a provider of ``style`` sends with bucket ``levels``."""
    requests_left, tokens_left = _remaining(levels.requests), _remaining(levels.tokens)
    if style == "openai":
        return {
            "x-ratelimit-limit-requests": _limit(ledger.rpm),
            "x-ratelimit-limit-tokens": _limit(ledger.tpm),
            "x-ratelimit-remaining-requests": str(requests_left),
            "x-ratelimit-remaining-tokens": str(tokens_left),
            "x-ratelimit-reset-requests": format_duration(_ceil_ms(levels.requests_reset)),
            "x-ratelimit-reset-tokens": format_duration(_ceil_ms(levels.tokens_reset)),
        }
    headers = {
        "anthropic-ratelimit-requests-limit": _limit(ledger.rpm),
        "anthropic-ratelimit-requests-remaining": str(requests_left),
        "anthropic-ratelimit-requests-reset": _rfc3339(wall_now + levels.requests_reset),
    }
    for kind in ("tokens", "input-tokens", "output-tokens"):
        headers[f"anthropic-ratelimit-{kind}-limit"] = _limit(ledger.tpm)
        headers[f"anthropic-ratelimit-{kind}-remaining"] = str(tokens_left)
        headers[f"anthropic-ratelimit-{kind}-reset"] = _rfc3339(wall_now + levels.tokens_reset)
    return headers


# --------------------------------------------------------------------------------------------------------------
# Requests


class _BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class _Chat:
    model: str
    prompt_tokens: int
    max_tokens: int
    n: int
    stream: bool
    include_usage: bool


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"the body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _positive_int(body: Mapping[str, Any], key: str, default: int, maximum: int | None = None) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (maximum is not None and value > maximum):
        bound = f" and at most {maximum}" if maximum is not None else ""
        raise _BadRequest(f"{key} must be an integer of at least 1{bound}, not {value!r}", key)
    return value


def _model(body: Mapping[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("you must provide a model parameter", "model")
    return model


def _parse_chat(body: Mapping[str, Any], default_max_tokens: int) -> _Chat:
    model = _model(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages must be a non-empty array", "messages")
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise _BadRequest("every message must be an object with a string role", "messages")
    try:
        prompt = estimate_messages_tokens(messages)
    except ValueError as exc:
        raise _BadRequest(str(exc), "messages") from exc
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise _BadRequest("give max_tokens or max_completion_tokens, not both", "max_tokens")
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _positive_int(body, key, default_max_tokens)
    n = _positive_int(body, "n", 1, _MAX_N)
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise _BadRequest("stream must be a boolean", "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise _BadRequest("stream_options must be an object", "stream_options")
        if not stream:
            raise _BadRequest("stream_options is only allowed when stream is true", "stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise _BadRequest("stream_options.include_usage must be a boolean", "stream_options.include_usage")
    return _Chat(model, prompt, max_tokens, n, stream, include_usage)


def _parse_embedding_inputs(body: Mapping[str, Any]) -> list[str]:
    value = body.get("input")
    inputs = [value] if isinstance(value, str) else value
    if not isinstance(inputs, list) or not inputs or not all(isinstance(text, str) and text for text in inputs):
        raise _BadRequest("input must be a non-empty string or a non-empty array of non-empty strings", "input")
    return inputs


def _unit_floats(seed: bytes, count: int) -> list[float]:
    """``count`` deterministic floats in [0, 1) drawn from ``seed``."""
    out: list[float] = []
    block = 0
    while len(out) < count:
        digest = hashlib.blake2b(seed + struct.pack(">Q", block), digest_size=64).digest()
        out.extend(value / 2**64 for value in struct.unpack(">8Q", digest))
        block += 1
    return out[:count]


def _reply_text(tokens: int, offset: int) -> str:
    return "".join(_WORDS[(offset + i) % len(_WORDS)] for i in range(tokens))


def _split(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


class _Simulator:
    """The app's state: config, ledger, repeat counters; all touched only on the server's event loop."""

    def __init__(self, config: SimulatorConfig, clock: Callable[[], float], wall_clock: Callable[[], float]) -> None:
        self.clock = clock
        self.wall_clock = wall_clock
        self.config = config
        self.ledger = self._fresh_ledger()
        self.repeats: collections.OrderedDict[bytes, int] = collections.OrderedDict()
        self.next_id = 0

    def _fresh_ledger(self) -> ProviderLedger:
        c = self.config
        return ProviderLedger(rpm=c.rpm, tpm=c.tpm, max_concurrency=c.max_concurrency, clock=self.clock)

    def reset(self, limits: Mapping[str, Any]) -> dict[str, Any]:
        unknown = set(limits) - {"rpm", "tpm", "max_concurrency"}
        if unknown:
            raise ConfigurationError(f"reset accepts rpm, tpm and max_concurrency, not {sorted(unknown)}")
        self.config = dataclasses.replace(self.config, **dict(limits))
        self.ledger = self._fresh_ledger()
        self.repeats.clear()
        return self.ledger.stats()

    def _headers(self, ledger: ProviderLedger, levels: Levels) -> dict[str, str]:
        return rate_limit_headers(self.config.headers, ledger, levels, self.wall_clock())

    def _draw_completions(self, raw: bytes, max_tokens: int, n: int) -> tuple[bytes, int, list[int]]:
        key = hashlib.sha256(raw).digest()
        repeat = self.repeats.get(key, 0)
        low, high = self.config.completion_ratio
        seed = struct.pack(">qQ", self.config.seed & (2**63 - 1), repeat) + key
        counts = [max(1, min(max_tokens, round(max_tokens * (low + (high - low) * u)))) for u in _unit_floats(seed, n)]
        return key, repeat, counts

    def _remember(self, key: bytes, repeat: int) -> None:
        self.repeats[key] = repeat + 1
        self.repeats.move_to_end(key)
        while len(self.repeats) > _MAX_REPEAT_KEYS:
            self.repeats.popitem(last=False)

    def _error(
        self, status: int, message: str, kind: str, param: str | None, code: str | None, headers: Mapping[str, str]
    ) -> web.Response:
        body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        return web.json_response(body, status=status, headers=dict(headers))

    def _bad_request(self, exc: _BadRequest) -> web.Response:
        ledger = self.ledger
        headers = self._headers(ledger, ledger.levels())
        return self._error(400, str(exc), "invalid_request_error", exc.param, None, headers)

    def _too_many(self, ledger: ProviderLedger, admission: Admission, model: str) -> web.Response:
        headers = self._headers(ledger, admission.levels)
        wait = admission.retry_after
        used = math.floor(ledger.tpm) - _remaining(admission.levels.tokens)
        tail = f" Please try again in {format_duration(_ceil_ms(wait))}." if wait is not None else ""
        if admission.reason == "too_large":
            message = (
                f"Request too large for {model} on tokens per min (TPM): Limit {_limit(ledger.tpm)}, "
                f"Requested {admission.cost}. The input or output tokens must be reduced in order to run successfully."
            )
        elif admission.reason == "tokens":
            message = (
                f"Rate limit reached for {model} on tokens per min (TPM): Limit {_limit(ledger.tpm)}, "
                f"Used {used}, Requested {admission.cost}.{tail}"
            )
        elif admission.reason == "requests":
            used_requests = math.floor(ledger.rpm) - _remaining(admission.levels.requests)
            message = (
                f"Rate limit reached for {model} on requests per min (RPM): Limit {_limit(ledger.rpm)}, "
                f"Used {used_requests}, Requested 1.{tail}"
            )
        else:
            message = f"Too many concurrent requests for {model}: Limit {ledger.max_concurrency} in flight.{tail}"
        if wait is not None:
            headers["retry-after"] = str(math.ceil(round(wait, 9)))
            headers["retry-after-ms"] = _ms_text(wait)
        kind = "tokens" if admission.reason in ("tokens", "too_large") else "requests"
        return self._error(429, message, kind, None, "rate_limit_exceeded", headers)

    def _new_id(self, prefix: str) -> str:
        self.next_id += 1
        return f"{prefix}-sim{self.next_id:08d}"

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            chat = _parse_chat(_json_object(raw), self.config.default_max_tokens)
        except _BadRequest as exc:
            return self._bad_request(exc)
        key, repeat, counts = self._draw_completions(raw, chat.max_tokens, chat.n)
        completion = sum(counts)
        config = self.config
        latency = config.latency_base + config.latency_per_token * completion
        ledger = self.ledger
        admission = ledger.try_admit(chat.prompt_tokens, chat.max_tokens * chat.n, hold=latency)
        if not admission.admitted or admission.ticket is None:
            return self._too_many(ledger, admission, chat.model)
        self._remember(key, repeat)
        headers = self._headers(ledger, admission.levels)
        ident = self._new_id("chatcmpl")
        created = int(self.wall_clock())
        offset = key[0]
        try:
            if chat.stream:
                try:
                    return await self._stream(request, chat, counts, offset, ident, created, headers)
                except ConnectionResetError:  # the client left mid-stream; nobody is there to answer
                    return web.Response(status=499)
            await asyncio.sleep(latency)
            choices = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": _reply_text(count, offset + i), "refusal": None},
                    "logprobs": None,
                    "finish_reason": "length" if count >= chat.max_tokens else "stop",
                }
                for i, count in enumerate(counts)
            ]
            body = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": chat.model,
                "choices": choices,
                "usage": {
                    "prompt_tokens": chat.prompt_tokens,
                    "completion_tokens": completion,
                    "total_tokens": chat.prompt_tokens + completion,
                },
                "system_fingerprint": "xflow-simulator",
            }
            return web.json_response(body, headers=headers)
        finally:
            # Also on cancellation or a dropped client: the provider produced the tokens anyway.
            ledger.complete(admission.ticket, completion)

    async def _stream(
        self,
        request: web.Request,
        chat: _Chat,
        counts: list[int],
        offset: int,
        ident: str,
        created: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        config = self.config
        response = web.StreamResponse(
            headers={**headers, "content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> None:
            chunk: dict[str, Any] = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": chat.model,
                "system_fingerprint": "xflow-simulator",
                "choices": choices,
            }
            if chat.include_usage:
                chunk["usage"] = usage
            await response.write(f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode())

        def delta(index: int, content: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {"index": index, "delta": content, "logprobs": None, "finish_reason": finish}

        await asyncio.sleep(config.latency_base)
        await send([delta(i, {"role": "assistant", "content": ""}) for i in range(chat.n)])
        steps = max(1, min(16, max(counts)))
        pieces = [_split(count, steps) for count in counts]
        produced = [0] * chat.n
        step_sleep = config.latency_per_token * sum(counts) / steps
        for step in range(steps):
            await asyncio.sleep(step_sleep)
            choices = []
            for i, parts in enumerate(pieces):
                if parts[step]:
                    text = _reply_text(parts[step], offset + i + produced[i])
                    produced[i] += parts[step]
                    choices.append(delta(i, {"content": text}))
            if choices:
                await send(choices)
        await send([delta(i, {}, "length" if c >= chat.max_tokens else "stop") for i, c in enumerate(counts)])
        if chat.include_usage:
            total = sum(counts)
            usage = {
                "prompt_tokens": chat.prompt_tokens,
                "completion_tokens": total,
                "total_tokens": chat.prompt_tokens + total,
            }
            await send([], usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = _json_object(raw)
            model = _model(body)
            inputs = _parse_embedding_inputs(body)
            dimensions = _positive_int(body, "dimensions", 8, 4096)
        except _BadRequest as exc:
            return self._bad_request(exc)
        prompt = sum(estimate_text_tokens(text) for text in inputs)
        ledger = self.ledger
        latency = self.config.latency_base
        admission = ledger.try_admit(prompt, 0, hold=latency)
        if not admission.admitted or admission.ticket is None:
            return self._too_many(ledger, admission, model)
        headers = self._headers(ledger, admission.levels)
        try:
            await asyncio.sleep(latency)
            data = []
            for index, text in enumerate(inputs):
                raw_vector = [2 * u - 1 for u in _unit_floats(hashlib.sha256(text.encode()).digest(), dimensions)]
                norm = math.sqrt(sum(x * x for x in raw_vector)) or 1.0
                data.append({"object": "embedding", "index": index, "embedding": [x / norm for x in raw_vector]})
            payload = {
                "object": "list",
                "data": data,
                "model": model,
                "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
            }
            return web.json_response(payload, headers=headers)
        finally:
            ledger.complete(admission.ticket, 0)

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.ledger.stats())

    async def reset_handler(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            limits = _json_object(raw) if raw.strip() else {}
            return web.json_response(self.reset(limits))
        except _BadRequest as exc:
            return self._bad_request(exc)
        except ConfigurationError as exc:
            return self._bad_request(_BadRequest(str(exc)))


_SIMULATOR: web.AppKey[_Simulator] = web.AppKey("xflow_simulator", _Simulator)


def create_app(
    config: SimulatorConfig | None = None,
    *,
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], float] = time.time,
) -> web.Application:
    """The simulator as an aiohttp application; ``clock`` drives the buckets, ``wall_clock`` dates replies."""
    sim = _Simulator(config or SimulatorConfig(), clock, wall_clock)
    app = web.Application(client_max_size=_MAX_BODY)
    app[_SIMULATOR] = sim
    app.router.add_post("/v1/chat/completions", sim.chat_completions)
    app.router.add_post("/v1/embeddings", sim.embeddings)
    app.router.add_get("/stats", sim.stats)
    app.router.add_post("/reset", sim.reset_handler)
    return app


# --------------------------------------------------------------------------------------------------------------
# Serving


def _check_host(host: str, allow_remote: bool) -> None:
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"the simulator listens on loopback hosts only unless allowed, not {host!r}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class SimulatorServer:
    """The simulator on a loopback port, served by a background thread with its own event loop.

    Use as a context manager; ``port=0`` picks a free port. ``clock`` may be a fake (it is read on the
    server's thread) to make every header exact in tests.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        allow_remote: bool = False,
    ) -> None:
        _check_host(host, allow_remote)
        self.config = config or SimulatorConfig()
        self.host = host
        self._port = port
        self._app = create_app(self.config, clock=clock, wall_clock=wall_clock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port actually bound (known once started)."""
        if self._loop is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return _url(self.host, self.port)

    def start(self) -> SimulatorServer:
        """Bind and serve; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the simulator was already started")
        self._thread = threading.Thread(target=self._run, name="xflow-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner, self._port = await _start(self._app, self.host, self._port)
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        """Stop serving and join the thread; in-flight requests get a second to finish."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout=30)

    def _call(self, func: Callable[[], _T]) -> _T:
        """Run ``func`` on the server's loop: the ledger is only ever touched there."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the simulator is not running")

        async def call() -> _T:
            return func()

        coro: Coroutine[Any, Any, _T] = call()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` returns."""
        sim = self._app[_SIMULATOR]
        return self._call(lambda: sim.ledger.stats())

    def reset(self, **limits: float | None) -> dict[str, Any]:
        """Fresh buckets and ledger, optionally with new ``rpm``, ``tpm`` or ``max_concurrency``."""
        sim = self._app[_SIMULATOR]
        return self._call(lambda: sim.reset(limits))

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _serve_foreground(config: SimulatorConfig, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows has no add_signal_handler
            loop.add_signal_handler(sig, stop.set)
    runner, bound = await _start(create_app(config), host, port)
    try:
        print(f"xflow-simulator listening on {_url(host, bound)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m xflow_dist.simulator") -> int:
    """Serve the simulator in the foreground until SIGINT or SIGTERM; ``prog`` names the command in
    its usage (``xflow simulate`` when the CLI runs it)."""
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A simulated OpenAI-compatible provider with strict rate limits.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless --allow-remote)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--rpm", type=float, default=defaults.rpm, help="requests per minute")
    parser.add_argument("--tpm", type=float, default=defaults.tpm, help="tokens per minute")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--latency-base", type=float, default=defaults.latency_base, help="seconds per reply")
    parser.add_argument(
        "--latency-per-token", type=float, default=defaults.latency_per_token, help="seconds per output token"
    )
    parser.add_argument("--headers", choices=("openai", "anthropic"), default=defaults.headers)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback host")
    args = parser.parse_args(argv)
    try:
        _check_host(args.host, args.allow_remote)
        config = SimulatorConfig(
            rpm=args.rpm,
            tpm=args.tpm,
            max_concurrency=args.max_concurrency,
            latency_base=args.latency_base,
            latency_per_token=args.latency_per_token,
            headers=args.headers,
            seed=args.seed,
        )
    except ConfigurationError as exc:
        print(f"xflow-simulator: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve_foreground(config, args.host, args.port))
    except OSError as exc:
        print(f"xflow-simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - only where signal handlers are unavailable
        return 0


if __name__ == "__main__":
    sys.exit(main())
