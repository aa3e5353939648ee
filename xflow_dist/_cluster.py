"""What a Redis Cluster needs beyond a plain Redis: a client from a ``redis+cluster://`` URL, scripts
that ride out a slot migration, and an events subscriber that moves to a live node.

All keys of a budget share the hash tag ``{xflow:<name>}``, so each script runs on the one master
that serves that slot; redis-py follows MOVED and ASK redirections itself. While a slot is being
migrated, a script whose keys are split between two nodes, or partly missing (a budget rarely has
all seven), is answered TRYAGAIN until the migration of that slot ends; redis-py retries that about
16 times (0.4 s), then raises ``ClusterError("TTL exhausted.")``, which the scripts here retry
until ``io_timeout`` has passed.

The events channel uses classic PUBLISH/SUBSCRIBE, which a cluster forwards to every node, so the
subscriber may listen on any node: first the one that serves the channel's slot, and after a
failure the next node the client knows of. redis-py's own cluster pub/sub stays on the node it
first chose (a dead master, after a failover) and is missing from ``redis.asyncio`` before 6.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from inspect import signature
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.asyncio.retry
import redis.backoff
import redis.cluster
import redis.exceptions
import redis.retry

from ._exceptions import BackendError, ConfigurationError
from ._redact import redact_url

SCHEMES = ("redis+cluster", "rediss+cluster")

#: Pause between two attempts of a script whose slot is being migrated.
MIGRATION_PAUSE = 0.05

_REDIS_MAJOR = int(redis.__version__.split(".", 1)[0])


def in_transition(exc: BaseException) -> bool:
    """A cluster error that passes by itself: a slot being migrated or a master being replaced."""
    return isinstance(
        exc,
        redis.exceptions.ClusterDownError  # CLUSTERDOWN: a master failed and its replica is not yet promoted
        | redis.exceptions.TryAgainError
        | redis.exceptions.SlotNotCoveredError,
    ) or _migrating(exc)


def _migrating(exc: BaseException) -> bool:
    # redis-py's answer to TRYAGAIN after TTL tries (or to a long chain of redirections)
    return type(exc) is redis.exceptions.ClusterError and "TTL exhausted" in str(exc)


def _as_redis_error(exc: redis.exceptions.RedisClusterException) -> redis.RedisError:
    """redis-py's cluster client raises RedisClusterException, which is no RedisError, when its slot
    map has a hole or no node answers a refresh: as the limiter's errors, a cluster down and a
    connection failure, both transient."""
    if isinstance(exc, redis.exceptions.SlotNotCoveredError):
        return redis.exceptions.ClusterDownError(f"slot map incomplete: {exc}")
    return redis.ConnectionError(str(exc))


# --- clients from URLs ---


def _addresses(netloc: str, url: str) -> tuple[str, list[tuple[str, int]]]:
    """``user:pass@h1:p1,h2:p2`` -> ("user:pass@", [(h1, p1), (h2, p2)]); a missing port is 6379."""
    userinfo, at, hosts = netloc.rpartition("@")
    found = []
    for item in hosts.split(","):
        if item.startswith("["):  # [IPv6]:port
            host, _, rest = item[1:].partition("]")
            port = rest[1:] if rest.startswith(":") else rest or "6379"
        else:
            host, colon, port = item.partition(":")
            port = port if colon else "6379"
        if not host or not port.isdigit() or not 0 < int(port) < 65_536:
            raise ConfigurationError(f"bad Redis Cluster URL {redact_url(url)!r}: {item!r} is not host:port")
        found.append((host, int(port)))
    return userinfo + at, found


def _no_retries(client: Any) -> Any:
    """Turn off the cluster client's own retries of a failed command (10 in redis-py 8, each after a
    refresh of the slot map, 0.25 s apart on CLUSTERDOWN): the limiter bounds every call by
    ``io_timeout`` and retries what is safe. Redirections (MOVED, ASK, TRYAGAIN) are still followed.
    Set after construction, where redis-py's sync client connects and should try another node."""
    if _REDIS_MAJOR >= 6:
        is_async = isinstance(client, redis.asyncio.cluster.RedisCluster)
        none = redis.asyncio.retry.Retry if is_async else redis.retry.Retry
        client.set_retry(none(redis.backoff.NoBackoff(), 0))
    else:
        client.cluster_error_retry_attempts = 0
    return client


def cluster_client(url: str, io_timeout: float, health_check_interval: float, *, async_client: bool) -> Any:
    """A ``RedisCluster`` (or its asyncio twin) for ``redis+cluster://[user:password@]host:port[,host:port...]``;
    ``rediss+cluster://`` for TLS. Query options are redis-py's, as for ``redis://``."""
    parts = urlsplit(url)
    if parts.path not in ("", "/", "/0"):
        raise ConfigurationError(f"bad Redis Cluster URL {redact_url(url)!r}: a cluster has database 0 only")
    userinfo, addresses = _addresses(parts.netloc, url)
    (first_host, first_port), rest = addresses[0], addresses[1:]
    host = f"[{first_host}]" if ":" in first_host else first_host
    first = urlunsplit((parts.scheme.split("+")[0], f"{userinfo}{host}:{first_port}", "", parts.query, ""))
    options: dict[str, Any] = {
        "socket_timeout": io_timeout,
        "socket_connect_timeout": io_timeout,
        "health_check_interval": health_check_interval,
    }
    if async_client:
        cls: Any = redis.asyncio.cluster.RedisCluster
        node: Any = redis.asyncio.cluster.ClusterNode
        if "connection_error_retry_attempts" in signature(cls.__init__).parameters:
            options["connection_error_retry_attempts"] = 0  # redis-py 5: retries on the same (dead) node
    else:
        cls, node = redis.cluster.RedisCluster, redis.cluster.ClusterNode
    try:
        client = cls.from_url(first, startup_nodes=[node(h, p) for h, p in rest], **options)
    except (ValueError, TypeError) as exc:
        raise ConfigurationError(
            f"bad Redis Cluster URL {redact_url(url)!r}: check its hosts, ports and options, and percent-encode "
            f"the password ({type(exc).__name__})"
        ) from None
    except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:  # the sync client connects at once
        raise BackendError(f"the cluster at {redact_url(url)!r} did not answer: {exc}") from exc
    return _no_retries(client)


# --- scripts across a slot migration ---


class SlotMovingScript:
    """A redis-py ``Script`` on a ``RedisCluster``, retried while its slot is being migrated (for
    up to ``io_timeout`` seconds, plus the attempt then under way: about 0.4 s)."""

    def __init__(self, script: Any, io_timeout: float) -> None:
        self._script = script
        self._io_timeout = io_timeout

    def __call__(self, keys: list[str], args: list[str]) -> Any:
        give_up = time.monotonic() + self._io_timeout
        while True:
            try:
                return self._script(keys=keys, args=args)
            except redis.exceptions.RedisClusterException as exc:
                raise _as_redis_error(exc) from exc
            except AttributeError as exc:  # a slot map caught mid-failover (redis-py issue #3835)
                raise redis.ConnectionError(f"cluster topology in flux: {exc}") from exc
            except redis.exceptions.RedisError as exc:
                if not _migrating(exc) or time.monotonic() + MIGRATION_PAUSE >= give_up:
                    raise
            time.sleep(MIGRATION_PAUSE)


class AsyncSlotMovingScript:
    """The asyncio twin of ``SlotMovingScript``."""

    def __init__(self, script: Any, io_timeout: float) -> None:
        self._script = script
        self._io_timeout = io_timeout

    async def __call__(self, keys: list[str], args: list[str]) -> Any:
        give_up = time.monotonic() + self._io_timeout
        while True:
            try:
                return await self._script(keys=keys, args=args)
            except redis.exceptions.RedisClusterException as exc:
                raise _as_redis_error(exc) from exc
            except AttributeError as exc:  # a slot map caught mid-failover (redis-py issue #3835)
                raise redis.ConnectionError(f"cluster topology in flux: {exc}") from exc
            except redis.exceptions.RedisError as exc:
                if not _migrating(exc) or time.monotonic() + MIGRATION_PAUSE >= give_up:
                    raise
            await asyncio.sleep(MIGRATION_PAUSE)


def ride_out_migrations(client: Any, scripts: dict[str, Any], io_timeout: float) -> dict[str, Any]:
    """``scripts`` as they are for a plain Redis; for a cluster, each retried across a slot migration."""
    if isinstance(client, redis.cluster.RedisCluster):
        return {op: SlotMovingScript(s, io_timeout) for op, s in scripts.items()}
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        return {op: AsyncSlotMovingScript(s, io_timeout) for op, s in scripts.items()}
    return scripts


# --- the events subscriber ---


def _numsub(reply: Any) -> int:
    """A ``PUBSUB NUMSUB`` reply as redis-py gives it ([(channel, n)], [channel, n], or per node)."""
    if isinstance(reply, dict):
        return sum(_numsub(v) for v in reply.values())
    if not reply:
        return 0
    if isinstance(reply[0], list | tuple):
        return sum(int(n) for _, n in reply)
    return int(reply[1]) if len(reply) >= 2 else 0


def is_cluster(client: Any) -> bool:
    """A Redis Cluster client, sync or asyncio."""
    return isinstance(client, redis.cluster.RedisCluster | redis.asyncio.cluster.RedisCluster)


def subscribers(client: Any, channel: str) -> int:
    """How many connections listen on ``channel``: ``PUBSUB NUMSUB`` counts one node's own, and a
    cluster's subscribers may be on any node (classic pub/sub reaches them all; ours start on the
    channel slot's master and move on a failure), so a cluster is asked node by node and summed;
    a node that does not answer counts none. (redis-py sends NUMSUB to its default node alone.)"""
    if not isinstance(client, redis.cluster.RedisCluster):
        return _numsub(client.pubsub_numsub(channel))
    total = 0
    for node in client.get_nodes():  # type: ignore[no-untyped-call]
        with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException, OSError):
            total += _numsub(client.execute_command("PUBSUB NUMSUB", channel, target_nodes=node))  # type: ignore[no-untyped-call]
    return total


async def async_subscribers(client: Any, channel: str) -> int:
    """``subscribers`` for the asyncio clients."""
    if not isinstance(client, redis.asyncio.cluster.RedisCluster):
        return _numsub(await client.pubsub_numsub(channel))
    total = 0
    for node in client.get_nodes():
        with contextlib.suppress(redis.RedisError, redis.exceptions.RedisClusterException, OSError):
            total += _numsub(await client.execute_command("PUBSUB NUMSUB", channel, target_nodes=node))
    return total


def _first_node(client: Any, channel: str) -> Any:
    """The node serving ``channel``'s slot, where its budget's scripts publish (any node if unknown)."""
    try:
        return client.get_node_from_key(channel)
    except (redis.RedisError, redis.exceptions.RedisClusterException):
        return _next_node(client.get_nodes(), None)


def _next_node(nodes: list[Any], after: str | None) -> Any:
    """The node after ``after`` in name order (the first if ``after`` is gone)."""
    if not nodes:
        raise redis.ConnectionError("the cluster client knows no node")
    ordered = sorted(nodes, key=lambda n: n.name)
    names = [n.name for n in ordered]
    i = names.index(after) + 1 if after in names else 0
    return ordered[i % len(ordered)]


class ClusterSubscriber:
    """A classic pub/sub connection to one node of a ``RedisCluster``, moved to another node after
    any failure (a dead master stays dead: its replica is promoted on another address).

    The methods the limiter uses of a redis-py ``PubSub``: subscribe, get_message, unsubscribe, close.
    The next ``get_message`` after a failure subscribes again on the next node; its confirmation
    reaches the limiter as after any reconnection, and every waiter asks Redis again.
    """

    def __init__(self, client: redis.cluster.RedisCluster) -> None:
        self._client = client
        self._channels: list[str] = []
        self._pubsub: Any = None
        self._node: str | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def node(self) -> str | None:
        """The ``host:port`` listened on (or last tried)."""
        return self._node

    def subscribe(self, *channels: str) -> None:
        self._channels.extend(channels)
        self._connect(_first_node(self._client, channels[0]))

    def _connect(self, node: Any) -> None:
        with self._lock:
            if self._closed:
                raise redis.ConnectionError("subscriber closed")
            self._node = node.name
            pubsub = self._client.get_redis_connection(node).pubsub()  # type: ignore[no-untyped-call]
            self._pubsub = pubsub
        try:
            pubsub.subscribe(*self._channels)
        except BaseException:
            self._drop()  # never subscribed: the next get_message tries the next node
            raise

    def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        if self._pubsub is None:
            self._connect(_next_node(self._client.get_nodes(), self._node))  # type: ignore[no-untyped-call]
        try:
            message: dict[str, Any] | None = self._pubsub.get_message(timeout=timeout)
            return message
        except BaseException:
            self._drop()
            raise

    def _drop(self) -> None:
        with self._lock:
            pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(redis.RedisError, OSError):
                pubsub.close()

    def unsubscribe(self) -> None:
        pubsub = self._pubsub
        if pubsub is not None:
            pubsub.unsubscribe()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop()


class AsyncClusterSubscriber:
    """The asyncio twin of ``ClusterSubscriber``; each node's connection is its own small pool, built
    from that node's connection settings (redis-py's asyncio cluster nodes have no ``Redis`` object)."""

    def __init__(self, client: redis.asyncio.cluster.RedisCluster) -> None:
        self._client = client
        self._channels: list[str] = []
        self._pubsub: Any = None
        self._redis: Any = None
        self._node: str | None = None
        self._closed = False

    @property
    def node(self) -> str | None:
        return self._node

    async def subscribe(self, *channels: str) -> None:
        self._channels.extend(channels)
        try:
            await self._client.initialize()  # the slot map loads lazily
        except redis.exceptions.RedisClusterException as exc:
            raise _as_redis_error(exc) from exc
        await self._connect(_first_node(self._client, channels[0]))

    async def _connect(self, node: Any) -> None:
        if self._closed:
            raise redis.ConnectionError("subscriber closed")
        self._node = node.name
        pool = redis.asyncio.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
        self._redis = redis.asyncio.Redis(connection_pool=pool)
        self._pubsub = self._redis.pubsub()
        try:
            await self._pubsub.subscribe(*self._channels)
        except BaseException:
            await self._drop()  # never subscribed: the next get_message tries the next node
            raise

    async def get_message(self, timeout: float = 0.0) -> dict[str, Any] | None:
        if self._pubsub is None:
            await self._connect(_next_node(self._client.get_nodes(), self._node))
        try:
            message: dict[str, Any] | None = await self._pubsub.get_message(timeout=timeout)
            return message
        except BaseException:
            await self._drop()
            raise

    async def _drop(self) -> None:
        pubsub, client, self._pubsub, self._redis = self._pubsub, self._redis, None, None
        for closing in (pubsub, client):
            if closing is not None:
                with contextlib.suppress(redis.RedisError, OSError):
                    await closing.aclose()
        if client is not None:
            await client.connection_pool.disconnect()

    async def aclose(self) -> None:
        self._closed = True
        await self._drop()


def subscriber(client: Any) -> Any:
    """A pub/sub for the events of a budget: redis-py's for a plain Redis, one that moves between
    nodes for a Cluster."""
    if isinstance(client, redis.cluster.RedisCluster):
        return ClusterSubscriber(client)
    if isinstance(client, redis.asyncio.cluster.RedisCluster):
        return AsyncClusterSubscriber(client)
    return client.pubsub()
