"""The suite's Redis: a real ``redis-server`` it starts on a free loopback port and stops after.

Where no binary exists it falls back to fakeredis's TCP server and says so in the header;
``XFLOW_REQUIRE_REDIS=1`` (set by CI) turns that fallback into an error.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
import redis

from xflow_dist._backend import sync_client
from xflow_dist._embedded import EmbeddedRedis

_REQUIRE = os.environ.get("XFLOW_REQUIRE_REDIS", "") not in ("", "0")
_server: EmbeddedRedis | None = None


def _started() -> EmbeddedRedis:
    global _server
    if _server is None:
        _server = EmbeddedRedis(allow_fake=not _REQUIRE).start()
    return _server


def pytest_report_header(config: pytest.Config) -> list[str]:
    try:
        server = _started()
    except Exception as exc:
        raise pytest.UsageError(f"xflow-dist tests need redis-server: {exc}") from exc
    if server.kind == "fakeredis":
        return ["redis: NO redis-server binary: falling back to fakeredis (not a proof of distribution)"]
    return [f"redis: real redis-server at {server.url}"]


def pytest_unconfigure(config: pytest.Config) -> None:
    if _server is not None:
        _server.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _started().url


@pytest.fixture(scope="session")
def real_redis() -> bool:
    return _started().kind == "redis-server"


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
    """Both backends: the spawned Redis and the embedded ``memory://``."""
    return redis_url if request.param == "redis" else f"memory://{uuid.uuid4().hex[:8]}"


@pytest.fixture
def rclient(url: str) -> Iterator[redis.Redis]:
    """A sync client of ``url``'s backend, for calling the scripts directly."""
    client, _ = sync_client(url)
    yield client
    client.close()
