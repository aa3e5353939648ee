"""httpx transports that put every LLM call through a shared budget.

``AsyncRateLimitedTransport`` / ``RateLimitedTransport`` wrap any httpx transport. A POST to an
OpenAI-compatible endpoint (chat completions, completions, embeddings, responses) is estimated,
acquires that cost from the budget a :class:`Router` picks, goes out, and settles with the reply's
``usage`` and the provider's rate-limit headers; a 429 starts the fleet-wide cooldown and is
retried within a bound, each retry acquiring again. A streamed reply holds its lease until the
stream is closed or dropped. Other requests pass through untouched. The ``openai`` SDK 1.x and
2.x use httpx; 3.x uses httpx2, for which :mod:`xflow_dist.httpx2` has the same classes.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

try:
    import httpx
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.httpx needs httpx: pip install 'xflow-dist[httpx]'") from exc

from ._router import Call, NoRouteError, Router
from ._transport import PRIORITY_HEADER, TENANT_HEADER, AsyncTransportCore, SyncTransportCore, estimate_request

__all__ = [
    "PRIORITY_HEADER",
    "TENANT_HEADER",
    "AsyncRateLimitedTransport",
    "Call",
    "NoRouteError",
    "RateLimitedTransport",
    "Router",
    "estimate_request",
]


class AsyncRateLimitedTransport(AsyncTransportCore, httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=AsyncRateLimitedTransport(limiter_or_router))``: every LLM call
    shares the budget. ``max_retries`` bounds the retries of 429s (each waits out the cooldown).
    ``priority`` and ``tenant``: each call's class and tenant (a name, or a function of the request),
    unless the request's ``x-xflow-priority`` or ``x-xflow-tenant`` header names one (taken off
    before it is sent)."""

    http: ClassVar[ModuleType] = httpx


class RateLimitedTransport(SyncTransportCore, httpx.BaseTransport):
    """``httpx.Client(transport=RateLimitedTransport(limiter_or_router))``: the blocking twin."""

    http: ClassVar[ModuleType] = httpx
