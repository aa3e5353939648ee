"""The rate-limit headers a reply carries: OpenAI's or Anthropic's, rounded so that waiting for them is enough."""

from __future__ import annotations

import datetime
import math
from typing import Literal

from ..._durations import format_duration
from ._ledger import ProviderLedger
from ._limits import _EPS, Levels


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
