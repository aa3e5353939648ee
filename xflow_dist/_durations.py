"""Go-style durations (``6m0s``, ``12ms``, ``1m30.5s``), the format of OpenAI's ``x-ratelimit-reset-*`` headers.

Both functions are exact to the nanosecond, Go's own resolution: ``format_duration`` rounds its input to
whole nanoseconds and then prints what Go's ``time.Duration.String`` prints for that many nanoseconds.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal

__all__ = ["format_duration", "parse_duration"]

_NS_PER_S = 1_000_000_000

#: Nanoseconds per unit, as Go's ``time.ParseDuration`` accepts them (micro as u, U+00B5 or U+03BC).
_UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,
    "\u03bcs": 1_000,
    "ms": 1_000_000,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_UNIT = r"(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h)"
_WHOLE = re.compile(rf"[-+]?(?:{_NUMBER}{_UNIT})+")
_PART = re.compile(rf"({_NUMBER})({_UNIT})")


def _fraction(value: int, digits: int) -> str:
    """``value`` as ``digits`` decimals with trailing zeros (and then the point) dropped, as Go's fmtFrac."""
    text = str(value).rjust(digits, "0").rstrip("0")
    return f".{text}" if text else ""


def format_duration(seconds: float) -> str:
    """``seconds`` as Go's ``time.Duration.String``: ``0s``, ``1.5ms``, ``12ms``, ``1s``, ``6m0s``, ``1h0m0s``."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds):
        raise ValueError(f"a duration must be a finite number of seconds, not {seconds!r}")
    ns = round(Decimal(seconds) * _NS_PER_S)
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns == 0:
        return "0s"
    if ns < _NS_PER_S:
        for unit, size, digits in (("ns", 1, 0), ("\u00b5s", 1_000, 3), ("ms", 1_000_000, 6)):
            if ns < size * 1000:
                return f"{sign}{ns // size}{_fraction(ns % size, digits)}{unit}"
    whole, frac = divmod(ns, _NS_PER_S)
    text = f"{whole % 60}{_fraction(frac, 9)}s"
    minutes = whole // 60
    if minutes:
        text = f"{minutes % 60}m{text}"
        hours = minutes // 60
        if hours:
            text = f"{hours}h{text}"
    return sign + text


def parse_duration(text: str) -> float:
    """Seconds in a Go duration such as ``1m30.5s``, ``250ms``, ``1h2m``, ``1.5µs`` or ``0``.

    Accepts what Go's ``time.ParseDuration`` accepts (every number needs a unit, except a lone ``0``);
    raises ``ValueError`` on anything else.
    """
    if not isinstance(text, str):
        raise ValueError(f"a duration must be a string, not {text!r}")
    if text in ("0", "+0", "-0"):
        return 0.0
    if not _WHOLE.fullmatch(text):
        raise ValueError(f"not a Go duration: {text!r}")
    total = Decimal(0)
    for number, unit in _PART.findall(text):
        total += Decimal(number) * _UNITS[unit]
    ns = -total if text.startswith("-") else total
    return float(ns / _NS_PER_S)
