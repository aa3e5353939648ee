"""The operator's commands through the entry point: budgets, status, cooldown, reset, on the spawned server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from _helpers import budget_keys

from xflow_dist import Budget, Limiter

pytestmark = pytest.mark.timeout(120)


def xflow(
    *args: str, url: str | None = None, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "xflow_dist.cli", *args]
    if url is not None:
        argv += ["--redis-url", url]
    full_env = {k: v for k, v in os.environ.items() if k != "XFLOW_REDIS_URL"} | (env or {})
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, input=stdin, env=full_env, check=False)


def test_budgets_lists_the_budgets_in_use(redis_url: str, name: str) -> None:
    with Limiter(Budget(f"{name}-a", rpm=600), redis_url) as a, Limiter(Budget(f"{name}-b", tpm=6000), redis_url) as b:
        a.acquire().release()
        b.acquire(tokens=10).release()
        done = xflow("budgets", url=redis_url)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split()
    assert f"{name}-a" in listed and f"{name}-b" in listed


def test_status_reads_the_fleets_own_limits_from_redis(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rpm=600, max_concurrency=4), redis_url) as limiter:
        held = limiter.acquire()
        done = xflow("status", name, "--json", url=redis_url)
        text = xflow("status", name, url=redis_url)
        held.release()
    assert done.returncode == 0, done.stderr
    s = json.loads(done.stdout)
    assert (s["budget"], s["rpm"], s["in_flight"], s["max_concurrency"], s["queued"]) == (name, 600, 1, 4, 0)
    assert s["tpm"] is None and s["tokens_available"] is None
    assert text.returncode == 0 and "in flight" in text.stdout and "1 of 4" in text.stdout


def test_status_watch_refreshes_and_the_url_may_come_from_the_environment(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rpm=600), redis_url) as limiter:
        limiter.acquire().release()
        done = xflow("status", name, "--json", "--watch", "0.1", "--times", "3", env={"XFLOW_REDIS_URL": redis_url})
    assert done.returncode == 0, done.stderr
    assert [json.loads(line)["budget"] for line in done.stdout.splitlines()] == [name] * 3


def test_cooldown_set_pauses_the_fleet_and_clear_ends_it(redis_url: str, name: str) -> None:
    with Limiter(Budget(name, rpm=600), redis_url) as limiter:
        limiter.acquire().release()
        paused = xflow("cooldown", name, "--set", "30", url=redis_url)
        assert paused.returncode == 0, paused.stderr
        assert 29 < limiter.status().cooldown_remaining <= 30
        assert not limiter.try_acquire().granted
        cleared = xflow("cooldown", name, "--clear", url=redis_url)
        assert cleared.returncode == 0 and "were left" in cleared.stdout, cleared
        assert limiter.status().cooldown_remaining == 0
        assert limiter.try_acquire().granted


def test_reset_asks_first_then_deletes_every_key(redis_url: str, name: str, client: object) -> None:
    with Limiter(Budget(name, rpm=600), redis_url) as limiter:
        limiter.acquire().release()
    refused = xflow("reset", name, url=redis_url, stdin="n\n")
    assert refused.returncode == 1 and "nothing deleted" in refused.stdout
    assert budget_keys(client, name)  # type: ignore[arg-type]
    done = xflow("reset", name, "--yes", url=redis_url)
    assert done.returncode == 0, done.stderr
    assert budget_keys(client, name) == []  # type: ignore[arg-type]


def test_errors_are_one_line_with_the_password_masked(redis_url: str, name: str) -> None:
    missing = xflow("status", f"{name}-never-used", url=redis_url)
    assert missing.returncode == 1 and missing.stderr.count("\n") == 1 and "no budget" in missing.stderr
    no_url = xflow("budgets")
    assert no_url.returncode == 2 and "XFLOW_REDIS_URL" in no_url.stderr
    unreachable = xflow("budgets", url="redis://user:s3cret-pw@127.0.0.1:1/0")
    assert unreachable.returncode == 1 and unreachable.stderr.count("\n") == 1, unreachable.stderr
    assert "s3cret-pw" not in unreachable.stderr
    bad = xflow("cooldown", name, "--set", "-1", url=redis_url)
    assert bad.returncode in (1, 2) and bad.stderr.count("\n") == 1
