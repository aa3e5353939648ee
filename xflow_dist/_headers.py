"""What a provider's response says about its limits: OpenAI's ``x-ratelimit-*`` and Anthropic's
``anthropic-ratelimit-*`` headers, and ``retry-after-ms`` / ``retry-after``. I/O-free.

A header that is missing or malformed reads as None: a provider's odd header must never break a
call that otherwise succeeded. Facts are in seconds from the response (resets, retry-after), not
timestamps, so that they can be applied on any clock.
"""

from __future__ import annotations

import datetime
import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass

from ._budget import MAX_UNITS
from ._durations import parse_duration

__all__ = ["LimitFacts", "parse_limit_headers", "parse_retry_after"]


@dataclass(frozen=True, slots=True)
class LimitFacts:
    """One response's word on the provider's limits; None where it said nothing.

    ``*_limit`` is per minute; ``*_remaining`` is what is left in the provider's bucket now;
    ``*_reset`` is seconds until that bucket is full again (a duration, not a wait hint).
    """

    request_limit: float | None = None
    token_limit: float | None = None
    requests_remaining: float | None = None
    tokens_remaining: float | None = None
    requests_reset: float | None = None
    tokens_reset: float | None = None
    input_token_limit: float | None = None
    input_tokens_remaining: float | None = None
    output_token_limit: float | None = None
    output_tokens_remaining: float | None = None
    retry_after: float | None = None

    @property
    def empty(self) -> bool:
        return all(getattr(self, f) is None for f in self.__slots__)


def _lower(headers: Mapping[str, str]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}


def _number(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 <= value <= MAX_UNITS else None  # beyond: no fact to learn


def _duration(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        value = parse_duration(text.strip())
    except ValueError:
        return _number(text)  # some OpenAI-compatible servers send plain seconds
    return value if value >= 0 else None


def _until(text: str | None, now: datetime.datetime) -> float | None:
    """Seconds from ``now`` to an RFC 3339 timestamp (never negative)."""
    if text is None:
        return None
    try:
        when = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, (when - now).total_seconds())


def parse_retry_after(headers: Mapping[str, str], *, now: datetime.datetime | None = None) -> float | None:
    """Seconds to wait: ``retry-after-ms`` when present (more precise), else ``retry-after`` as
    seconds or as an HTTP date."""
    h = _lower(headers)
    ms = _number(h.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    text = h.get("retry-after")
    if text is None:
        return None
    seconds = _number(text)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    current = now or datetime.datetime.now(datetime.UTC)
    return max(0.0, (when - current).total_seconds())


def parse_limit_headers(headers: Mapping[str, str], *, now: datetime.datetime | None = None) -> LimitFacts:
    """Read OpenAI's or Anthropic's rate-limit headers (whichever are present) from a response."""
    h = _lower(headers)
    current = now or datetime.datetime.now(datetime.UTC)
    retry = parse_retry_after(h, now=current)
    if any(k.startswith("anthropic-ratelimit-") for k in h):
        a = "anthropic-ratelimit-"
        return LimitFacts(
            request_limit=_number(h.get(f"{a}requests-limit")),
            token_limit=_number(h.get(f"{a}tokens-limit")),
            requests_remaining=_number(h.get(f"{a}requests-remaining")),
            tokens_remaining=_number(h.get(f"{a}tokens-remaining")),
            requests_reset=_until(h.get(f"{a}requests-reset"), current),
            tokens_reset=_until(h.get(f"{a}tokens-reset"), current),
            input_token_limit=_number(h.get(f"{a}input-tokens-limit")),
            input_tokens_remaining=_number(h.get(f"{a}input-tokens-remaining")),
            output_token_limit=_number(h.get(f"{a}output-tokens-limit")),
            output_tokens_remaining=_number(h.get(f"{a}output-tokens-remaining")),
            retry_after=retry,
        )
    o = "x-ratelimit-"
    return LimitFacts(
        request_limit=_number(h.get(f"{o}limit-requests")),
        token_limit=_number(h.get(f"{o}limit-tokens")),
        requests_remaining=_number(h.get(f"{o}remaining-requests")),
        tokens_remaining=_number(h.get(f"{o}remaining-tokens")),
        requests_reset=_duration(h.get(f"{o}reset-requests")),
        tokens_reset=_duration(h.get(f"{o}reset-tokens")),
        retry_after=retry,
    )
