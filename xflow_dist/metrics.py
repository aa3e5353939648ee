"""Prometheus metrics: what each process's limiters did, and what the shared budget holds in Redis.

Two sources, kept apart so that no fleet-wide figure is a sum of processes' guesses:

- **Counters and histograms** (``enable()``): grants, refusals, timeouts, 429s, cooldowns started,
  tokens charged, refunded and owed, the acquire wait and the tokens per request, counted by every
  limiter of the process as it works, labelled by budget. Prometheus sums them over processes.
- **Gauges** (``BudgetCollector``): credit per bucket, leases in flight, queue length, cooldown left,
  read from Redis with the budget's ``status`` script at each scrape, so that they are the fleet's.

``serve(port, redis=...)`` exposes both on ``/metrics``. Celery prefork (and any fleet of forked
workers on one node): set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the processes
start; children then write their counters there, and ``serve`` in the parent (or ``xflow metrics``
beside them) reads them all (prometheus-client's multiprocess mode). Needs the ``metrics`` extra:
``pip install 'xflow-dist[metrics]'``.
"""

from __future__ import annotations

import contextlib
import glob
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

try:
    import prometheus_client
    from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
    from prometheus_client.core import GaugeMetricFamily
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.metrics needs prometheus-client: pip install 'xflow-dist[metrics]'") from exc

from . import _observe as observe
from ._backend import RedisLike
from ._exceptions import BudgetNotFoundError, ConfigurationError, XflowError
from ._operator import Operator

__all__ = ["BudgetCollector", "PrometheusObserver", "disable", "enable", "serve"]

#: Seconds from ``acquire`` to its grant: from "fits now" (a Redis round trip) to a long queue.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
#: Tokens a request was finally charged: a short chat to a long context.
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16_384, 65_536, 262_144, 1_048_576)


def multiprocess_dir() -> str | None:
    """prometheus-client's multiprocess directory, when this process runs in that mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class PrometheusObserver:
    """The counters and histograms of one registry, fed by every limiter of this process."""

    def __init__(self, registry: CollectorRegistry | None, namespace: str = "xflow") -> None:
        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["budget"], namespace=namespace, registry=registry)

        self.grants = counter("grants", "Leases granted (acquire and try_acquire).")
        self.refusals = counter("refusals", "try_acquire calls refused (it did not fit now).")
        self.timeouts = counter("timeouts", "acquire calls that raised AcquireTimeout.")
        self.limited = counter("rate_limited", "429s reported to the budget (cooldown calls).")
        self.cooldowns = counter("cooldowns_started", "429s that began a fleet-wide pause (none was in force).")
        self.charged = counter("tokens_charged", "Tokens settled leases were finally charged.")
        self.refunded = counter("tokens_refunded", "Tokens given back by settles (over-estimates, cancels).")
        self.owed = counter("tokens_owed", "Tokens charged as debt by settles (under-estimates).")
        self.wait = Histogram(
            "acquire_wait_seconds", "Seconds from acquire to its grant.", ["budget"],
            namespace=namespace, registry=registry, buckets=WAIT_BUCKETS,
        )  # fmt: skip
        self.tokens = Histogram(
            "request_tokens", "Tokens a settled request was finally charged.", ["budget"],
            namespace=namespace, registry=registry, buckets=TOKEN_BUCKETS,
        )  # fmt: skip

    def granted(self, budget: str, waited: float, requests: float, tokens: float) -> None:
        self.grants.labels(budget).inc()
        self.wait.labels(budget).observe(waited)

    def refused(self, budget: str) -> None:
        self.refusals.labels(budget).inc()

    def timed_out(self, budget: str, waited: float) -> None:
        self.timeouts.labels(budget).inc()

    def settled(self, budget: str, charged: float, refunded: float, owed: float) -> None:
        self.charged.labels(budget).inc(max(0.0, charged))
        if refunded:
            self.refunded.labels(budget).inc(refunded)
        if owed:
            self.owed.labels(budget).inc(owed)
        self.tokens.labels(budget).observe(max(0.0, charged))

    def rate_limited(self, budget: str, started: bool) -> None:
        self.limited.labels(budget).inc()
        if started:
            self.cooldowns.labels(budget).inc()


_lock = threading.Lock()
_enabled: dict[CollectorRegistry | None, PrometheusObserver] = {}


def enable(registry: CollectorRegistry | None = None, *, namespace: str = "xflow") -> PrometheusObserver:
    """Count what every limiter of this process does into ``registry`` (default: prometheus-client's
    global one); once per registry, later calls return the same metrics.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) the values go to that directory and are
    registered nowhere: ``serve`` (or ``xflow metrics``) collects them from every process.
    """
    target = None if multiprocess_dir() else (registry or prometheus_client.REGISTRY)
    with _lock:
        metrics = _enabled.get(target)
        if metrics is None:
            metrics = _enabled[target] = PrometheusObserver(target, namespace)
        observe.install(metrics)
        return metrics


def disable() -> None:
    """Stop counting (the metrics already registered stay, with their values)."""
    with _lock:
        for metrics in _enabled.values():
            observe.uninstall(metrics)


class BudgetCollector(Collector):
    """Gauges of shared budgets, read from Redis at each scrape: the fleet's figures, whoever reads.

    ``budgets`` names them; None (the default) finds every budget in that Redis (SCAN) at each
    scrape. A budget that vanished between the listing and its read is left out of that scrape.
    """

    def __init__(self, redis: RedisLike, budgets: Sequence[str] | None = None, *, namespace: str = "xflow") -> None:
        if budgets is not None and (isinstance(budgets, str) or not all(isinstance(b, str) for b in budgets)):
            raise ConfigurationError(f"budgets must be a list of budget names, not {budgets!r}")
        self._operator = Operator(redis)
        self._budgets = None if budgets is None else list(budgets)
        self._prefix = f"{namespace}_budget_"
        self._lock = threading.Lock()  # one scrape at a time on the one connection

    #: (gauge, the status field it shows, help)
    _GAUGES: tuple[tuple[str, str, str], ...] = (
        ("requests_available", "requests_available", "Requests the shared bucket holds now (below zero: debt)."),
        ("tokens_available", "tokens_available", "Tokens the shared bucket holds now (below zero: debt)."),
        ("in_flight", "in_flight", "Leases held across the fleet."),
        ("queued", "queued", "Callers waiting in the fleet's queue."),
        ("cooldown_seconds", "cooldown_remaining", "Seconds left of the fleet-wide pause (0: none)."),
        ("backoff_level", "backoff_level", "Repeated 429s in the current episode (the pause doubles per level)."),
        ("rpm_limit", "rpm", "Requests per minute in force (configured, lowered to what was learned)."),
        ("tpm_limit", "tpm", "Tokens per minute in force (configured, lowered to what was learned)."),
        ("max_concurrency", "max_concurrency", "Leases the budget allows in flight at once."),
    )

    def _families(self) -> dict[str, GaugeMetricFamily]:
        return {name: GaugeMetricFamily(self._prefix + name, doc, labels=["budget"]) for name, _, doc in self._GAUGES}

    def describe(self) -> Iterable[Any]:
        return list(self._families().values())

    def collect(self) -> Iterator[Any]:
        families = {
            name: GaugeMetricFamily(self._prefix + name, doc, labels=["budget"]) for name, _, doc in self._GAUGES
        }
        with self._lock:
            try:
                names = self._budgets if self._budgets is not None else self._operator.budgets()
                snapshots = []
                for name in names:
                    try:
                        snapshots.append(self._operator.status(name))
                    except BudgetNotFoundError:
                        continue
            except XflowError:
                snapshots = []  # Redis does not answer: no gauges this scrape (an absent series, not a zero)
        for snap in snapshots:
            for metric, field, _ in self._GAUGES:
                value = snap.get(field)
                if value is not None:
                    families[metric].add_metric([snap["budget"]], float(value))
        yield from families.values()

    def close(self) -> None:
        self._operator.close()


class _ProcessFiles(multiprocess.MultiProcessCollector):
    """prometheus-client's multiprocess collector, skipping the files still empty.

    A process creates its file before sizing it: a scrape at that moment, or one after a process
    killed then, fails whole on the empty file (prometheus/client_python#1199). An empty file
    holds no value, so leaving it out changes no figure.
    """

    def collect(self) -> Iterable[Any]:
        files = []
        for path in glob.glob(os.path.join(self._path, "*.db")):
            with contextlib.suppress(OSError):  # gone meanwhile: a process marked dead
                if os.path.getsize(path) >= 8:
                    files.append(path)
        return self.merge(files, accumulate=True)  # type: ignore[no-untyped-call, no-any-return]


def registry_for(redis: RedisLike | None = None, budgets: Sequence[str] | None = None) -> CollectorRegistry:
    """A registry with this process's metrics (or, in multiprocess mode, every process's) and, with
    ``redis``, the budgets' gauges."""
    if multiprocess_dir():
        registry = CollectorRegistry()
        _ProcessFiles(registry)  # type: ignore[no-untyped-call]
    else:
        registry = prometheus_client.REGISTRY
    if redis is not None:
        registry.register(BudgetCollector(redis, budgets))
    return registry


def serve(
    port: int,
    *,
    redis: RedisLike | None = None,
    budgets: Sequence[str] | None = None,
    addr: str = "127.0.0.1",
) -> tuple[Any, threading.Thread]:
    """Serve ``/metrics`` on ``addr:port`` from a background thread: this process's counters (every
    process's in multiprocess mode) and, with ``redis``, the budgets' gauges. ``addr`` is loopback
    by default; a pod that Prometheus scrapes binds ``0.0.0.0``. Returns prometheus-client's
    server and thread (``server.shutdown()`` then ``server.server_close()`` stop it)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65_535:
        raise ConfigurationError(f"port must be a whole number from 0 to 65535, not {port!r}")
    registry = registry_for(redis, budgets)
    server, thread = prometheus_client.start_http_server(port, addr=addr, registry=registry)
    return server, thread
