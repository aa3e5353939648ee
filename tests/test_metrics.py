"""Metrics and traces: what the counters, gauges and spans say, checked against what happened.

The counters are checked call by call on both backends and both fronts; the gauges against the
budget's own ``status``; the fleet test scrapes ``/metrics`` while spawned processes (prometheus
multiprocess mode, as in Celery prefork) call the simulated provider, and checks the final figures
against the provider's ledger.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from xflow_dist import AcquireTimeout, AsyncLimiter, Budget, ConfigurationError, Limiter, _observe, metrics, tracing
from xflow_dist.httpx import RateLimitedTransport
from xflow_dist.tools.simulator import SimulatorConfig, SimulatorServer

ROOT = Path(__file__).resolve().parent.parent
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 40}


@pytest.fixture
def registry() -> Iterator[CollectorRegistry]:
    """A registry of this test's own, counting while the test runs, uninstalled after."""
    reg = CollectorRegistry()
    metrics.enable(reg)
    yield reg
    metrics.disable()
    assert not _observe.OBSERVERS


def samples(reg: CollectorRegistry | str) -> dict[tuple[str, str], float]:
    """{(sample name, budget): value} of a registry or of scraped text."""
    text = reg if isinstance(reg, str) else generate_latest(reg).decode()
    out: dict[tuple[str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if "le" not in s.labels:
                out[(s.name, s.labels.get("budget", ""))] = s.value
    return out


def test_a_limiter_counts_grants_charges_refunds_and_debt(url: str, name: str, registry: CollectorRegistry) -> None:
    with Limiter(Budget(name, rpm=600, tpm=10_000, max_concurrency=2, burst=60), url) as lim:
        with lim.acquire(tokens=100) as lease:
            lease.report(60)  # 40 refunded
        with lim.acquire(tokens=100) as lease:
            lease.report(130)  # 30 owed
        lim.acquire(tokens=50).release()  # at the estimate
        lim.acquire(tokens=20).cancel()  # never sent: all of it back
    got = samples(registry)
    assert got[("xflow_grants_total", name)] == 4
    assert got[("xflow_tokens_charged_total", name)] == 60 + 130 + 50
    assert got[("xflow_tokens_refunded_total", name)] == 40 + 20
    assert got[("xflow_tokens_owed_total", name)] == 30
    assert got[("xflow_acquire_wait_seconds_count", name)] == 4
    assert got[("xflow_request_tokens_count", name)] == 4  # the cancel counts as a request charged 0
    assert got[("xflow_request_tokens_sum", name)] == 240


async def test_an_async_limiter_counts_refusals_timeouts_and_429s(
    url: str, name: str, registry: CollectorRegistry
) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), url) as lim:
        held = await lim.acquire()
        refused = await lim.try_acquire()
        with pytest.raises(AcquireTimeout):
            await lim.acquire(timeout=0.05)
        await held.release()
        first = await lim.cooldown(retry_after=5)
        again = await lim.cooldown(retry_after=1)  # meets the pause: a 429, not a new pause
        assert not refused and first.started and not again.started
    got = samples(registry)
    assert got[("xflow_grants_total", name)] == 1
    assert got[("xflow_refusals_total", name)] == 1
    assert got[("xflow_timeouts_total", name)] == 1
    assert got[("xflow_rate_limited_total", name)] == 2
    assert got[("xflow_cooldowns_started_total", name)] == 1


def test_nothing_is_counted_when_metrics_are_off(url: str, name: str) -> None:
    reg = CollectorRegistry()
    metrics.enable(reg)
    metrics.disable()
    with Limiter(Budget(name, rpm=600), url) as lim:
        lim.acquire().release()
    assert ("xflow_grants_total", name) not in samples(reg)


def test_an_observer_that_raises_never_fails_the_call(url: str, name: str, caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def __getattr__(self, what: str) -> Any:
            def fail(*args: object) -> None:
                raise RuntimeError("observer broke")

            return fail

    broken = Broken()
    _observe.install(broken)
    try:
        with Limiter(Budget(name, rpm=600), url) as lim:
            lease = lim.acquire()
            lease.release()
    finally:
        _observe.uninstall(broken)
    assert lease.closed
    assert "observer broke" in caplog.text


def test_the_gauges_are_the_budgets_status_from_redis(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rpm=600, tpm=60_000, max_concurrency=3, burst=60), redis_url) as lim:
        held = [lim.acquire(tokens=1_000), lim.acquire(tokens=1_000)]
        reg = metrics.registry_for(redis_url, [name])
        got = samples(generate_latest(reg).decode())
        status = lim.status()
        for lease in held:
            lease.release()
    assert got[("xflow_budget_in_flight", name)] == 2
    assert got[("xflow_budget_queued", name)] == 0
    assert got[("xflow_budget_max_concurrency", name)] == 3
    assert got[("xflow_budget_rpm_limit", name)] == 600
    assert got[("xflow_budget_tpm_limit", name)] == 60_000
    assert status.tokens_available is not None
    assert got[("xflow_budget_tokens_available", name)] == pytest.approx(status.tokens_available, abs=50)


def test_the_collector_leaves_out_what_redis_cannot_tell() -> None:
    reg = CollectorRegistry()
    reg.register(metrics.BudgetCollector("redis://127.0.0.1:1"))  # nothing listens on port 1
    assert not [k for k in samples(reg) if k[0].startswith("xflow_budget_")]
    with pytest.raises(ConfigurationError):
        metrics.BudgetCollector("redis://127.0.0.1:1", "one-name")  # type: ignore[arg-type]


def test_xflow_metrics_once_prints_every_budget_found(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rpm=600, max_concurrency=2), redis_url) as lim:
        lease = lim.acquire()
        done = subprocess.run(
            [sys.executable, "-m", "xflow_dist.cli", "metrics", "--once", "--redis-url", redis_url],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        lease.release()
    assert done.returncode == 0, done.stderr
    assert samples(done.stdout)[("xflow_budget_in_flight", name)] == 1


def test_xflow_metrics_says_in_one_line_when_it_cannot_listen(redis_url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "xflow_dist.cli", "metrics", "--port", "70000", "--redis-url", redis_url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "port" in done.stderr


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.instrument(provider)
    yield exporter
    tracing.uninstrument()
    assert not _observe.OBSERVERS and _observe.TRACER is None


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(rpm=600, tpm=60_000, latency_base=0.01, latency_per_token=0.0)) as s:
        yield s


def test_a_traced_call_carries_its_wait_reservation_status_and_charge(
    sim: SimulatorServer, redis_url: str, name: str, spans: InMemorySpanExporter
) -> None:
    lim = Limiter(Budget(name, tpm=60_000, burst=60), redis_url)
    with lim, httpx.Client(transport=RateLimitedTransport(lim), base_url=sim.url) as client:
        reply = client.post("/v1/chat/completions", json=CHAT)
    used = reply.json()["usage"]["total_tokens"]
    by_name = {s.name: s for s in spans.get_finished_spans()}
    call, acquire = by_name["xflow.call"], by_name["xflow.acquire"]
    assert call.attributes is not None and acquire.attributes is not None
    assert call.attributes["xflow.budget"] == name
    assert call.attributes["http.response.status_code"] == 200
    assert call.attributes["xflow.tokens_charged"] == used
    assert call.attributes["xflow.tokens_reserved"] >= used  # the estimate bounds the output
    assert call.attributes["xflow.wait_seconds"] >= 0
    assert acquire.parent is not None and acquire.parent.span_id == call.context.span_id
    assert acquire.attributes["xflow.tokens_reserved"] == call.attributes["xflow.tokens_reserved"]


async def test_a_timed_out_acquire_is_an_error_span_as_long_as_its_wait(
    url: str, name: str, spans: InMemorySpanExporter
) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), url) as lim:
        held = await lim.acquire()
        with pytest.raises(AcquireTimeout):
            await lim.acquire(timeout=0.2)
        await held.release()
    timed_out = [s for s in spans.get_finished_spans() if s.status.status_code.name == "ERROR"]
    assert len(timed_out) == 1
    span = timed_out[0]
    assert span.end_time is not None and span.start_time is not None
    assert 0.15 <= (span.end_time - span.start_time) / 1e9 < 5


# --------------------------------------------------------------------------------------------
# A fleet scraped while it runs (spawned processes, prometheus-client's multiprocess mode)
# --------------------------------------------------------------------------------------------

_SPAWN = mp.get_context("spawn")


def _fleet_worker(redis_url: str, name: str, provider: str, calls: int, go: Any) -> None:
    """One process of the fleet: ``calls`` chat calls through the transport, counted (multiprocess)."""
    from xflow_dist import metrics as m

    m.enable()
    go.wait(30)
    lim = Limiter(Budget(name, rpm=1_200, tpm=24_000, max_concurrency=2, burst=60), redis_url)
    with lim, httpx.Client(transport=RateLimitedTransport(lim), base_url=provider, timeout=30) as client:
        for _ in range(calls):
            client.post("/v1/chat/completions", json=CHAT).raise_for_status()


@pytest.mark.slow
def test_a_scraped_fleet_matches_the_providers_ledger(
    redis_url: str, name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    processes, calls = 3, 25
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # the children inherit it
    # concurrency binds: 75 calls of 0.1 s, 2 at a time, take about 4 s, long enough to be seen mid-run
    config = SimulatorConfig(rpm=1_200, tpm=24_000, max_concurrency=2, latency_base=0.1, latency_per_token=0.0)
    with SimulatorServer(config) as provider:
        go = _SPAWN.Event()
        fleet = [
            _SPAWN.Process(target=_fleet_worker, args=(redis_url, name, provider.url, calls, go))
            for _ in range(processes)
        ]
        for p in fleet:
            p.start()
        server, _ = metrics.serve(0, redis=redis_url, budgets=[name])
        endpoint = f"http://127.0.0.1:{server.server_port}/metrics"
        try:
            go.set()
            during: list[dict[tuple[str, str], float]] = []
            deadline = time.monotonic() + 120
            while any(p.is_alive() for p in fleet) and time.monotonic() < deadline:
                with urllib.request.urlopen(endpoint, timeout=10) as reply:
                    during.append(samples(reply.read().decode()))
                threading.Event().wait(0.2)
            for p in fleet:
                p.join(timeout=30)
                assert p.exitcode == 0
            with urllib.request.urlopen(endpoint, timeout=10) as reply:
                after = samples(reply.read().decode())
        finally:
            server.shutdown()
            server.server_close()
        ledger = provider.stats()
    assert during, "the endpoint was scraped while the fleet ran"
    assert all(s.get(("xflow_budget_in_flight", name), 0) <= 2 for s in during)
    mid_run = [s for s in during if 0 < s.get(("xflow_grants_total", name), 0) < processes * calls]
    assert mid_run and any(s[("xflow_budget_in_flight", name)] > 0 for s in mid_run)
    assert after[("xflow_grants_total", name)] == ledger["requests"]["admitted"] == processes * calls
    assert after.get(("xflow_rate_limited_total", name), 0) == ledger["requests"]["rejected"] == 0
    assert after[("xflow_tokens_charged_total", name)] == ledger["tokens"]["settled"]
    assert after[("xflow_request_tokens_count", name)] == processes * calls
    assert after[("xflow_budget_in_flight", name)] == 0
    assert os.listdir(tmp_path), "the children wrote their counters to the multiprocess directory"


def test_the_grafana_dashboard_asks_only_for_metrics_the_library_exports(redis_url: str, name: str) -> None:
    import json
    import re

    dashboard = json.loads((ROOT / "deploy" / "grafana" / "xflow-dashboard.json").read_text())
    asked = {
        m
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for m in re.findall(r"\bxflow_[a-z_]+", target["expr"])
    }
    reg = CollectorRegistry()
    observer = metrics.PrometheusObserver(reg)
    for budget in (name,):  # one of each labelled series, so that every name is exported
        observer.granted(budget, 0.0, 1, 1)
        observer.refused(budget)
        observer.timed_out(budget, 0.0)
        observer.settled(budget, 1, 1, 1)
        observer.rate_limited(budget, True)
    with Limiter(Budget(name, rpm=60, tpm=600, max_concurrency=1), redis_url) as lim:
        lim.acquire().release()
        reg.register(metrics.BudgetCollector(redis_url, [name]))
        exported = {sample_name for sample_name, _ in samples(reg)} | {
            f"{sample_name}_bucket" for sample_name, _ in samples(reg) if sample_name.endswith("_count")
        }
    exported |= {n.removesuffix("_count") + "_bucket" for n in exported if n.endswith("_count")}
    assert asked and asked <= exported, f"the dashboard asks for {sorted(asked - exported)}"


def test_a_process_file_still_empty_does_not_fail_the_scrape(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process creates its multiprocess file before sizing it; a scrape at that moment (or after
    the process was killed then) must still answer, with the other processes' values."""
    from prometheus_client import values
    from prometheus_client.mmap_dict import MmapedDict

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    counts = MmapedDict(str(tmp_path / "counter_111.db"))  # one process's file, as it writes them
    counts.write_value(values.mmap_key("xflow_grants_total", "xflow_grants_total", ("budget",), ("b",), ""), 3.0, 0.0)
    counts.close()
    (tmp_path / "counter_222.db").write_bytes(b"")  # another's, caught between creation and sizing
    got = samples(metrics.registry_for())
    assert got[("xflow_grants_total", "b")] == 3.0
