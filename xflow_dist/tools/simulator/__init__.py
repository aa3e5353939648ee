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
aiohttp application, ``SimulatorServer`` runs it in a background thread, and ``python -m xflow_dist.tools.simulator``
serves it in the foreground. aiohttp is an optional dependency: ``import xflow_dist`` never imports this module.
"""

from __future__ import annotations

from ._app import create_app
from ._headers import rate_limit_headers
from ._ledger import ProviderLedger
from ._limits import Admission, Levels, SimulatorConfig
from ._server import SimulatorServer, main

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
