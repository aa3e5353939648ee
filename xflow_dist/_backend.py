"""Where a budget's Redis comes from: a URL, a redis-py client (or Cluster client), or ``memory://``.

``redis+sentinel://`` (and ``rediss+sentinel://``) URLs find the master through Redis Sentinel
(see ``_sentinel``); a client made by ``redis.sentinel.Sentinel.master_for`` may be passed in as well.
``redis+cluster://host:port[,host:port...]`` (``rediss+cluster://`` with TLS) makes a ``RedisCluster``
with the same bounded timeouts as a ``redis://`` URL (see ``_cluster``).

``memory://NAME`` is an in-process budget server (``_memory``: the scripts' decisions in plain Python,
no Lua, no socket), shared by every limiter of this process that names it; it cannot coordinate
several processes.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.backoff
import redis.cluster
import redis.retry

from . import _cluster
from ._exceptions import ConfigurationError
from ._redact import redact_url
from ._sentinel import SCHEMES as SENTINEL_SCHEMES
from ._sentinel import async_master, parse_sentinel_url, sync_master

SyncClient = redis.Redis | redis.cluster.RedisCluster
AsyncClient = redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster
RedisLike = str | SyncClient | AsyncClient


def _memory_server(url: str) -> Any:
    from . import _memory

    return _memory.server(urlsplit(url).netloc or "default")


#: Seconds any one Redis call of a client made from a URL may take: connecting, waiting for a pooled
#: connection, and waiting for a reply each give up after this (``io_timeout`` of the limiters).
IO_TIMEOUT = 1.0

#: Pooled connections idle longer than this are checked with a PING before they are used again.
HEALTH_CHECK_INTERVAL = 10.0


def _pool_options(io_timeout: float, retry: Any) -> dict[str, Any]:
    """Set here, not left to redis-py, whose defaults changed across versions (no socket timeout
    before 5.x defaults, unbounded pool waits, retries with backoff)."""
    return {
        "max_connections": 64,  # then callers queue for a connection, up to io_timeout
        "timeout": io_timeout,
        "socket_timeout": io_timeout,
        "socket_connect_timeout": io_timeout,
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "retry": retry,  # none: the limiter retries what is safe to retry (see _base.RETRIED)
    }


def _check_url(url: str) -> str:
    try:
        scheme = urlsplit(url).scheme
    except ValueError:
        raise ConfigurationError(f"bad Redis URL {redact_url(url)!r}: it does not parse") from None
    if scheme not in ("redis", "rediss", "unix", "memory", *SENTINEL_SCHEMES, *_cluster.SCHEMES):
        raise ConfigurationError(
            "redis must be a redis://, rediss://, unix://, redis+sentinel://, rediss+sentinel://, "
            "redis+cluster://, rediss+cluster:// or memory:// "
            f"URL, not {redact_url(url)!r}"
        )
    return scheme


def _pool(cls: Any, url: str, options: dict[str, Any]) -> Any:
    """A blocking pool for ``url``; a URL redis-py cannot read is a ConfigurationError that shows it
    with its password masked (redis-py's own ValueError may quote a piece of it)."""
    try:
        return cls.from_url(url, **options)
    except ValueError as exc:
        # not redis-py's message: it may quote a piece of a password that holds an unencoded "@" or "/"
        raise ConfigurationError(
            f"bad Redis URL {redact_url(url)!r}: check its port and database number, and percent-encode "
            f"the password ({type(exc).__name__})"
        ) from None


def reply_timeout(client: Any, owned: bool, io_timeout: float) -> float | None:
    """How long ``client`` waits for a script's reply before it gives up on it, or None: no bound
    known (a client passed in without a socket timeout, a Cluster client passed in) or no I/O
    (``memory://``). Scripts are told the moment their client gives up (``lua/_prelude.lua``, Late
    calls)."""
    if owned:
        return None if type(client).__module__.endswith("._memory") else io_timeout
    kwargs = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    bound = kwargs.get("socket_timeout") if isinstance(kwargs, dict) else None
    if isinstance(bound, int | float) and not isinstance(bound, bool) and 0 < bound < 1e6:
        return float(bound)
    return None


def sync_client(target: RedisLike, io_timeout: float = IO_TIMEOUT) -> tuple[SyncClient, bool]:
    """A sync client for ``target`` and whether the limiter owns (and so closes) it."""
    if isinstance(target, str):
        scheme = _check_url(target)
        if scheme == "memory":
            from ._memory import MemoryClient

            return MemoryClient(_memory_server(target)), True  # type: ignore[return-value]  # the calls limiters make
        if scheme in SENTINEL_SCHEMES:
            spec = parse_sentinel_url(target)
            return sync_master(spec, _pool_options(io_timeout, redis.retry.Retry(redis.backoff.NoBackoff(), 0))), True
        if scheme in _cluster.SCHEMES:
            client = _cluster.cluster_client(target, io_timeout, HEALTH_CHECK_INTERVAL, async_client=False)
            return client, True
        # a blocking pool: callers beyond max_connections wait for a connection instead of failing
        # (redis-py's default pool raises past 100, which a busy process reaches at once)
        options = _pool_options(io_timeout, redis.retry.Retry(redis.backoff.NoBackoff(), 0))
        return redis.Redis.from_pool(_pool(redis.BlockingConnectionPool, target, options)), True
    if isinstance(target, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        raise ConfigurationError("Limiter needs a sync redis.Redis; use AsyncLimiter for asyncio")
    if isinstance(target, redis.Redis | redis.cluster.RedisCluster):
        return target, False
    raise ConfigurationError(f"redis must be a URL or a redis.Redis client, not {target!r}")


def async_client(target: RedisLike, io_timeout: float = IO_TIMEOUT) -> tuple[AsyncClient, bool]:
    """An asyncio client for ``target`` and whether the limiter owns (and so closes) it."""
    if isinstance(target, str):
        scheme = _check_url(target)
        if scheme == "memory":
            from ._memory import AsyncMemoryClient

            return AsyncMemoryClient(_memory_server(target)), True  # type: ignore[return-value]
        if scheme in SENTINEL_SCHEMES:
            spec = parse_sentinel_url(target)
            retry = redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0)
            return async_master(spec, _pool_options(io_timeout, retry)), True
        if scheme in _cluster.SCHEMES:
            client = _cluster.cluster_client(target, io_timeout, HEALTH_CHECK_INTERVAL, async_client=True)
            return client, True
        options = _pool_options(io_timeout, redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), 0))
        return redis.asyncio.Redis.from_pool(_pool(redis.asyncio.BlockingConnectionPool, target, options)), True
    if isinstance(target, redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster):
        return target, False
    if isinstance(target, redis.Redis | redis.cluster.RedisCluster):
        raise ConfigurationError("AsyncLimiter needs redis.asyncio.Redis; use Limiter for sync code")
    raise ConfigurationError(f"redis must be a URL or a redis.asyncio.Redis client, not {target!r}")
