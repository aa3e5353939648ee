"""OpenTelemetry traces: a span for every acquire and one around every transport call.

``instrument()`` (once, at start-up, after the application set its tracer provider) makes

- ``xflow.acquire``: from the ``acquire`` call to its grant (or its ``AcquireTimeout``), child of
  the span current at the call, with ``xflow.budget``, ``xflow.wait_seconds``,
  ``xflow.requests`` and ``xflow.tokens_reserved`` (a refused ``try_acquire`` is an event on the
  current span instead);
- ``xflow.call`` (kind CLIENT): one budgeted call of the httpx transports, from acquire to settle,
  retries after a 429 included, with ``xflow.wait_seconds``, ``xflow.tokens_reserved``,
  ``http.response.status_code`` and ``xflow.tokens_charged`` (what the settle charged: the reply's
  usage, else the estimate; a streamed reply settles when its stream ends, after the span);
  a 429 adds an ``xflow.cooldown`` event.

Without ``instrument()`` the library makes no span and pays one test per call. Needs the ``otel``
extra: ``pip install 'xflow-dist[otel]'`` (the API only; the SDK and exporter are the
application's choice).
"""

from __future__ import annotations

import threading
import time
from typing import Any

try:
    from opentelemetry import trace
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.tracing needs opentelemetry-api: pip install 'xflow-dist[otel]'") from exc

from . import _observe as observe

__all__ = ["SpanObserver", "instrument", "uninstrument"]

_SCOPE = "xflow_dist"


class SpanObserver:
    """Turns the limiters' grants and timeouts into ``xflow.acquire`` spans, timed after the fact
    (the grant says how long it waited), so that an acquire costs nothing more while it waits."""

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer

    def _span(self, budget: str, waited: float, attributes: dict[str, Any]) -> Any:
        end = time.time_ns()
        span = self.tracer.start_span(
            "xflow.acquire",
            start_time=end - int(waited * 1e9),
            attributes={"xflow.budget": budget, "xflow.wait_seconds": waited, **attributes},
        )
        return span, end

    def granted(self, budget: str, waited: float, requests: float, tokens: float) -> None:
        span, end = self._span(budget, waited, {"xflow.requests": requests, "xflow.tokens_reserved": tokens})
        span.end(end_time=end)

    def timed_out(self, budget: str, waited: float) -> None:
        span, end = self._span(budget, waited, {})
        span.set_status(trace.Status(trace.StatusCode.ERROR, "AcquireTimeout"))
        span.end(end_time=end)

    def refused(self, budget: str) -> None:
        trace.get_current_span().add_event("xflow.refused", {"xflow.budget": budget})

    def settled(self, budget: str, charged: float, refunded: float, owed: float) -> None:
        return None  # the call's span carries the charge

    def rate_limited(self, budget: str, started: bool) -> None:
        return None  # the call's span carries the 429 (an xflow.cooldown event)


_lock = threading.Lock()
_installed: SpanObserver | None = None


def instrument(tracer_provider: Any = None) -> SpanObserver:
    """Trace every limiter and transport of this process with ``tracer_provider`` (default: the
    global one). Calling it again replaces the provider."""
    global _installed
    tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
    with _lock:
        if _installed is not None:
            observe.uninstall(_installed)
        _installed = SpanObserver(tracer)
        observe.install(_installed)
        observe.use_tracer(tracer, trace.SpanKind.CLIENT)
        return _installed


def uninstrument() -> None:
    """Make no more spans."""
    global _installed
    with _lock:
        if _installed is not None:
            observe.uninstall(_installed)
        _installed = None
        observe.use_tracer(None)
