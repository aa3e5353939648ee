"""A master found through Redis Sentinel: ``redis+sentinel://`` URLs and the pools behind them.

The URL names the sentinels and the service; the client asks the sentinels for the master's address
on every new connection, so after a failover the next connection (and the events subscriber's
reconnect) goes to the promoted replica::

    redis+sentinel://[[username]:password@]host[:port][,host[:port]...]/service_name[/db][?option=value...]

``username:password`` are the data nodes' credentials; the sentinels get none unless the query gives
``sentinel_username`` / ``sentinel_password``. A host without a port means 26379. ``rediss+sentinel://``
speaks TLS to the sentinels and the data nodes alike, with the options ``ssl_ca_certs``,
``ssl_certfile``, ``ssl_keyfile`` and ``ssl_cert_reqs`` (``required``, ``optional`` or ``none``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import redis
import redis.asyncio
import redis.asyncio.sentinel
import redis.sentinel

from ._exceptions import ConfigurationError
from ._redact import redact_url

__all__ = ["SCHEMES", "SentinelURL", "async_master", "parse_sentinel_url", "sync_master"]

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_PORT = 26379

_SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs")
_CERT_REQS = ("required", "optional", "none")


@dataclass(frozen=True)
class SentinelURL:
    """What a ``redis+sentinel://`` URL says; ``repr`` never shows a password."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    tls: dict[str, Any] | None = None  # None: plain TCP; else the ssl options, ssl=True among them


def _bad(url: str, why: str) -> ConfigurationError:
    return ConfigurationError(f"bad Sentinel URL {redact_url(url)!r}: {why}")


def _address(url: str, item: str) -> tuple[str, int]:
    if item.startswith("["):  # [IPv6]:port
        host, close, rest = item[1:].partition("]")
        if not close or (rest and not rest.startswith(":")):
            raise _bad(url, f"sentinel address {item!r} is not [IPv6]:port")
        port_text = rest[1:] if rest else ""
    else:
        host, _, port_text = item.partition(":")
    if not host:
        raise _bad(url, "a sentinel address has no host (write host:port, separated by commas)")
    if not port_text:
        return host, DEFAULT_PORT
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"sentinel port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def parse_sentinel_url(url: str) -> SentinelURL:
    """Read a ``redis+sentinel://`` URL, touching no network; a ``ConfigurationError`` says what is
    wrong with it and shows it with its passwords masked."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise _bad(url, "it does not parse") from None
    if parts.scheme not in SCHEMES:
        raise _bad(url, f"the scheme must be one of {', '.join(s + '://' for s in SCHEMES)}")
    if parts.fragment:
        raise _bad(url, "it has a '#' fragment (percent-encode a '#' in a password as %23)")
    if "@" in parts.path:
        raise _bad(url, "an '@' follows the first '/': percent-encode a '/' in a password as %2F")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else None
    if not hosts:
        raise _bad(url, "it names no sentinel (redis+sentinel://host:port[,host:port...]/service_name)")
    sentinels = tuple(_address(url, item.strip()) for item in hosts.split(","))
    path = [unquote(p) for p in parts.path.split("/")[1:]]
    if path and path[-1] == "" and len(path) > 1:
        path.pop()  # a trailing slash
    if not path or not path[0]:
        raise _bad(url, "it names no service: the path must be /service_name or /service_name/db")
    if len(path) > 2:
        raise _bad(url, "the path must be /service_name or /service_name/db (percent-encode '/' in a password)")
    db = 0
    if len(path) == 2:
        if not path[1].isdigit():
            raise _bad(url, f"the database {path[1]!r} is not a number")
        db = int(path[1])
    tls_scheme = parts.scheme == "rediss+sentinel"
    known = _SENTINEL_OPTIONS + (_TLS_OPTIONS if tls_scheme else ())
    options: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key not in known:
            hint = " (TLS options need rediss+sentinel://)" if key in _TLS_OPTIONS else ""
            raise _bad(url, f"unknown option {key!r}{hint}; known: {', '.join(known)}")
        if key in options:
            raise _bad(url, f"option {key!r} is given twice")
        options[key] = value
    tls: dict[str, Any] | None = None
    if tls_scheme:
        tls = {"ssl": True}
        for key in _TLS_OPTIONS:
            if key in options:
                tls[key] = options[key]
        if tls.get("ssl_cert_reqs", "required") not in _CERT_REQS:
            raise _bad(url, f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
    return SentinelURL(
        sentinels=sentinels,
        service=path[0],
        db=db,
        username=username,
        password=password,
        sentinel_username=options.get("sentinel_username") or None,
        sentinel_password=options.get("sentinel_password") or None,
        tls=tls,
    )


def _sentinel_kwargs(spec: SentinelURL, options: dict[str, Any]) -> dict[str, Any]:
    """How to talk to the sentinels: the data connections' bounds, the sentinels' own credentials."""
    kwargs: dict[str, Any] = {
        "socket_timeout": options["socket_timeout"],
        "socket_connect_timeout": options["socket_connect_timeout"],
        "retry": options["retry"],  # redis-py's default would retry each sentinel with backoff
        "username": spec.sentinel_username,
        "password": spec.sentinel_password,
    }
    return kwargs | (spec.tls or {})


def _master_kwargs(spec: SentinelURL, options: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(options, db=spec.db, username=spec.username, password=spec.password)
    return kwargs | (spec.tls or {})


class BlockingSentinelPool(redis.sentinel.SentinelConnectionPool, redis.BlockingConnectionPool):
    """redis-py's Sentinel pool, with callers past ``max_connections`` waiting up to ``timeout`` for a
    connection (as with every other URL) instead of failing at once; its ``disconnect`` of every
    connection (what closing the client does) also closes the connections to the sentinels."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        if not inuse_connections:
            # what the Sentinel pool asks when the master moved; redis-py 5's blocking pool cannot
            # be told to spare the connections in use, so the idle ones are picked here
            for connection in [c for c in list(self.pool.queue) if c is not None]:
                connection.disconnect()
            return
        redis.BlockingConnectionPool.disconnect(self)
        for sentinel in self.sentinel_manager.sentinels:
            sentinel.connection_pool.disconnect()


class AsyncBlockingSentinelPool(redis.asyncio.sentinel.SentinelConnectionPool, redis.asyncio.BlockingConnectionPool):
    """The asyncio twin of ``BlockingSentinelPool``."""

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:
            for sentinel in self.sentinel_manager.sentinels:
                await sentinel.connection_pool.disconnect()


def sync_master(spec: SentinelURL, options: dict[str, Any]) -> redis.Redis:
    """A client of the service's master, found through the sentinels at each connect; ``options`` are
    the pool's (``_backend._pool_options``). No I/O here."""
    sentinels = list(spec.sentinels)
    manager = redis.sentinel.Sentinel(sentinels, sentinel_kwargs=_sentinel_kwargs(spec, options))  # type: ignore[no-untyped-call]
    client: redis.Redis = manager.master_for(  # type: ignore[no-untyped-call]
        spec.service, connection_pool_class=BlockingSentinelPool, **_master_kwargs(spec, options)
    )
    return client


def async_master(spec: SentinelURL, options: dict[str, Any]) -> redis.asyncio.Redis:
    """The asyncio twin of ``sync_master``."""
    sentinels = list(spec.sentinels)
    manager = redis.asyncio.sentinel.Sentinel(sentinels, sentinel_kwargs=_sentinel_kwargs(spec, options))  # type: ignore[no-untyped-call]
    client: redis.asyncio.Redis = manager.master_for(
        spec.service, connection_pool_class=AsyncBlockingSentinelPool, **_master_kwargs(spec, options)
    )
    return client
