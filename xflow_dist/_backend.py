"""Where a budget's Redis comes from: a URL, a redis-py client (or Cluster client), or ``memory://``.

``memory://NAME`` is an in-process Redis (fakeredis running the same Lua through lupa), shared by
every limiter of this process that names it; it cannot coordinate several processes.
"""

from __future__ import annotations

import threading
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster

from ._exceptions import ConfigurationError
from ._redact import redact_url

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
RedisLike = str | SyncClient | AsyncClient

_memory_servers: dict[str, Any] = {}
_memory_lock = threading.Lock()


def _memory_server(url: str) -> Any:
    try:
        import fakeredis
    except ImportError as exc:  # pragma: no cover - a core dependency
        raise ConfigurationError("memory:// needs fakeredis[lua]: pip install 'fakeredis[lua]'") from exc
    name = urlsplit(url).netloc or "default"
    with _memory_lock:
        if name not in _memory_servers:
            _memory_servers[name] = fakeredis.FakeServer()
        return _memory_servers[name]


#: the pool of a client made from a URL: up to 64 connections, then callers queue for one
_POOL: dict[str, Any] = {"max_connections": 64, "timeout": None}


def _check_url(url: str) -> str:
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        raise ConfigurationError(f"bad Redis URL {redact_url(url)!r}: it does not parse") from None
    if scheme not in ("redis", "rediss", "unix", "memory"):
        raise ConfigurationError(
            f"redis must be a redis://, rediss://, unix:// or memory:// URL, not {redact_url(url)!r}"
        )
    return scheme


def _pool(cls: Any, url: str) -> Any:
    """A blocking pool for ``url``; a URL redis-py cannot read is a ConfigurationError that shows it
    with its password masked (redis-py's own ValueError may quote a piece of it)."""
    try:
        return cls.from_url(url, **_POOL)
    except ValueError as exc:
        # not redis-py's message: it may quote a piece of a password that holds an unencoded "@" or "/"
        raise ConfigurationError(
            f"bad Redis URL {redact_url(url)!r}: check its port and database number, and percent-encode "
            f"the password ({type(exc).__name__})"
        ) from None


def sync_client(target: RedisLike) -> tuple[SyncClient, bool]:
    """A sync client for ``target`` and whether the limiter owns (and so closes) it."""
    if isinstance(target, str):
        if _check_url(target) == "memory":
            import fakeredis

            return fakeredis.FakeRedis(server=_memory_server(target)), True
        # a blocking pool: callers beyond max_connections wait for a connection instead of failing
        # (redis-py's default pool raises past 100, which a busy process reaches at once)
        return redis.Redis.from_pool(_pool(redis.BlockingConnectionPool, target)), True
    if isinstance(target, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        raise ConfigurationError("Limiter needs a sync redis.Redis; use AsyncLimiter for asyncio")
    if isinstance(target, redis.Redis | redis.cluster.RedisCluster):
        return target, False
    raise ConfigurationError(f"redis must be a URL or a redis.Redis client, not {target!r}")


def async_client(target: RedisLike) -> tuple[AsyncClient, bool]:
    """An asyncio client for ``target`` and whether the limiter owns (and so closes) it."""
    if isinstance(target, str):
        if _check_url(target) == "memory":
            import fakeredis

            return fakeredis.FakeAsyncRedis(server=_memory_server(target)), True
        return redis.asyncio.Redis.from_pool(_pool(redis.asyncio.BlockingConnectionPool, target)), True
    if isinstance(target, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        return target, False
    if isinstance(target, redis.Redis | redis.cluster.RedisCluster):
        raise ConfigurationError("AsyncLimiter needs redis.asyncio.Redis; use Limiter for sync code")
    raise ConfigurationError(f"redis must be a URL or a redis.asyncio.Redis client, not {target!r}")
