"""The transports of :mod:`xflow_dist.httpx` for httpx2, the HTTP library of the openai SDK 3.x.

``OpenAI(http_client=httpx2.Client(transport=RateLimitedTransport(limiter)))``; everything else,
routing and settling included, is as documented for httpx.
"""

from __future__ import annotations

from types import ModuleType
from typing import ClassVar

try:
    import httpx2
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.httpx2 needs httpx2: pip install 'xflow-dist[httpx2]'") from exc

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


class AsyncRateLimitedTransport(AsyncTransportCore, httpx2.AsyncBaseTransport):
    """``httpx2.AsyncClient(transport=AsyncRateLimitedTransport(limiter_or_router))``."""

    http: ClassVar[ModuleType] = httpx2


class RateLimitedTransport(SyncTransportCore, httpx2.BaseTransport):
    """``httpx2.Client(transport=RateLimitedTransport(limiter_or_router))``."""

    http: ClassVar[ModuleType] = httpx2
