"""What the limiters tell observers (metrics, traces): one list of hooks, empty unless one is installed.

The fronts call these functions after a grant, a refusal, a timeout, a settle and a 429 only when
``OBSERVERS`` is not empty, so that a limiter with no metrics pays one list test per call. An
observer must be quick and must not raise: it runs on the caller's thread (or event loop) and an
error there would fail a grant that Redis already made; the fronts log and drop what one raises.
"""

from __future__ import annotations

import contextlib
import logging
import time
from contextlib import AbstractContextManager
from typing import Any, Protocol

log = logging.getLogger("xflow_dist")


class Observer(Protocol):
    """The events a limiter reports; ``budget`` is the budget's name, times are seconds."""

    def granted(self, budget: str, waited: float, requests: float, tokens: float) -> None: ...

    def refused(self, budget: str) -> None: ...

    def timed_out(self, budget: str, waited: float) -> None: ...

    def settled(self, budget: str, charged: float, refunded: float, owed: float) -> None: ...

    def rate_limited(self, budget: str, started: bool) -> None: ...


#: The installed observers (``xflow_dist.metrics.enable``, ``xflow_dist.tracing.instrument``).
OBSERVERS: list[Observer] = []


def install(observer: Observer) -> None:
    if observer not in OBSERVERS:
        OBSERVERS.append(observer)


def uninstall(observer: Observer) -> None:
    if observer in OBSERVERS:
        OBSERVERS.remove(observer)


def _each(what: str, *args: object) -> None:
    for observer in tuple(OBSERVERS):
        try:
            getattr(observer, what)(*args)
        except Exception:  # an observer's failure must never fail the call it observes
            log.exception("observer %r failed on %s", observer, what)


def granted(budget: str, started: float, requests: float, tokens: float) -> None:
    _each("granted", budget, max(0.0, time.monotonic() - started), requests, tokens)


def refused(budget: str) -> None:
    _each("refused", budget)


def timed_out(budget: str, started: float) -> None:
    _each("timed_out", budget, max(0.0, time.monotonic() - started))


def settled(budget: str, estimate: float, refunded: float) -> None:
    """A lease settled: ``refunded`` tokens came back (negative: that much debt was charged)."""
    _each("settled", budget, estimate - refunded, max(0.0, refunded), max(0.0, -refunded))


def rate_limited(budget: str, started: bool) -> None:
    """A 429 was reported (``cooldown()``); ``started``: it began a pause (none was in force)."""
    _each("rate_limited", budget, started)


#: The OpenTelemetry tracer that ``xflow_dist.tracing.instrument()`` installed, or None, and the
#: span kind of a call to the provider (``SpanKind.CLIENT``), kept here so that this module imports
#: no OpenTelemetry.
TRACER: Any = None
_CLIENT: Any = None


def use_tracer(tracer: Any, client_kind: Any = None) -> None:
    """Make the transports' call spans with ``tracer`` (None: make none)."""
    global TRACER, _CLIENT
    TRACER, _CLIENT = tracer, client_kind


def call_span(budget: str) -> AbstractContextManager[Any]:
    """The span around one budgeted provider call (a transport's), or a no-op without a tracer."""
    if TRACER is None:
        return contextlib.nullcontext()
    span: AbstractContextManager[Any] = TRACER.start_as_current_span(
        "xflow.call", kind=_CLIENT, attributes={"xflow.budget": budget}
    )
    return span
