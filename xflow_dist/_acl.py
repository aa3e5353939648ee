"""The Redis rights a limiter needs, and the check that proves them before its first call.

Redis does not roll back a script that an ACL refusal stops halfway (a PUBLISH refused after the
HSETs leaves them applied). So before a limiter's first script or subscription, one read-only
script, ``lua/check_rights.lua``, asks Redis (``redis.acl_check_cmd``) whether the connection's user
may run every command the operations run, on the budget's keys and channel, and what the client
itself sends; a right missing raises ``PermissionDeniedError`` and nothing is written. It runs once
per limiter until it passes; servers without ``redis.acl_check_cmd`` (before Redis 7.0) are not
checked.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import socket
import threading
from typing import Any

import redis
import redis.asyncio

from ._exceptions import BackendError, PermissionDeniedError
from ._scripts import lua_dir

log = logging.getLogger("xflow_dist")

#: The commands the operations run on the budget's keys, each with what follows the key in a check.
#: Every key is written (PEXPIREAT at least), so each command is checked on every key.
KEY_COMMANDS: dict[str, tuple[str, ...]] = {
    "HDEL": ("f",),
    "HGET": ("f",),
    "HGETALL": (),
    "HMGET": ("f",),
    "HSET": ("f", "v"),
    "PEXPIREAT": ("1",),
    "ZADD": ("0", "m"),
    "ZCARD": (),
    "ZCOUNT": ("0", "0"),
    "ZRANGE": ("0", "0"),
    "ZRANGEBYSCORE": ("0", "0"),
    "ZREM": ("m",),
    "ZREMRANGEBYSCORE": ("0", "0"),
    "ZSCORE": ("m",),
}

#: The commands the operations run without a key: PUBLISH (on the budget's channel and on the
#: processes' own beside it), TIME and PUBSUB
#: NUMSUB (whether a waiter's process is connected; without it, its grants wait for a claim; and the
#: count of processes a settle brings back).
SCRIPT_COMMANDS = frozenset({*KEY_COMMANDS, "PUBLISH", "TIME", "PUBSUB|NUMSUB"})

#: What the client sends besides the operations: EVALSHA (proven by running the check), SCRIPT LOAD
#: (after a NOSCRIPT), SUBSCRIBE and UNSUBSCRIBE (the budget's channel and the process's own beside
#: it), PING (health checks), PUBSUB
#: NUMSUB (the count of processes an outage shares the budget among, where no settle brought it:
#: docs/reliability.md).
CLIENT_COMMANDS = ("EVALSHA", "SCRIPT|LOAD", "SUBSCRIBE", "UNSUBSCRIBE", "PING", "PUBSUB|NUMSUB")

#: The least a limiter's user needs, for ``ACL SETUSER <user> on ><password> ...`` (docs/security.md):
#: every budget's keys and channel, the commands above and nothing else.
ACL_RULE = (
    "resetkeys ~{xflow:* resetchannels &{xflow:* -@all "
    "+evalsha +script|load +subscribe +unsubscribe +ping +pubsub|numsub "
    "+time +hget +hmget +hgetall +hset +hdel +zadd +zrem +zscore +zcard +zcount +zrange +zrangebyscore "
    "+zremrangebyscore +pexpireat +publish"
)

_HINT = f"grant the user the rule in docs/security.md: ACL SETUSER <user> on ><password> {ACL_RULE}"


@functools.cache
def source() -> str:
    """The text of ``check_rights.lua``, sent as it is (no prelude)."""
    return (lua_dir() / "check_rights.lua").read_text(encoding="utf-8")


def checks(keys: list[str], channel: str) -> list[tuple[str, ...]]:
    """Every command a limiter of the budget with these keys and channel sends, as a check (the
    process's own channel beside the budget's, ``<channel>:<process>``, checked by one such name)."""
    out: list[tuple[str, ...]] = [
        ("SCRIPT", "LOAD", "return 1"),
        ("SUBSCRIBE", channel),
        ("SUBSCRIBE", f"{channel}:0"),
        ("UNSUBSCRIBE", channel),
        ("PING",),
        ("PUBSUB", "NUMSUB", channel),
        ("TIME",),
        ("PUBLISH", channel, "x"),
        ("PUBLISH", f"{channel}:0", "x"),
    ]
    out += [(command, key, *rest) for command, rest in KEY_COMMANDS.items() for key in keys]
    return out


def encode(checks: list[tuple[str, ...]]) -> list[str]:
    """ARGV of ``check_rights.lua``: each check as its size then its words."""
    return [word for check in checks for word in (str(len(check)), *check)]


def _word(x: Any) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def decode(budget: str, checks: list[tuple[str, ...]], raw: Any) -> bool:
    """Whether the server could check (it has ``redis.acl_check_cmd``); raises for a refused check."""
    if not isinstance(raw, list | tuple) or not raw or _word(raw[0]) not in ("checked", "unchecked"):
        raise BackendError(f"unexpected reply from check_rights: {raw!r}", budget=budget)
    if _word(raw[0]) == "unchecked":
        return False
    refused = [checks[int(_word(n)) - 1] for n in raw[1:]]
    if refused:
        raise denied(budget, refused, {check[1] for check in checks if check[0] in KEY_COMMANDS})
    return True


def denied(budget: str, refused: list[tuple[str, ...]], keys: set[str]) -> PermissionDeniedError:
    """The error for refused checks: each command named once, with the keys or channel it was refused on."""
    on: dict[str, list[str]] = {}
    for check in refused:
        command = " ".join(check[:2]) if check[0] in ("SCRIPT", "PUBSUB") else check[0]
        on.setdefault(command, [])
        if command in KEY_COMMANDS or command in ("PUBLISH", "SUBSCRIBE", "UNSUBSCRIBE"):
            on[command].append(check[1])
    said = []
    for command, names in on.items():
        if command in KEY_COMMANDS:
            tag = min(keys).rpartition(":")[0]
            said.append(f"{command} on {f'every key {tag}:*' if set(names) == keys else ', '.join(names)}")
        elif names:
            said.append(f"{command} on channel {names[0]}")
        else:
            said.append(command)
    return PermissionDeniedError(
        f"the Redis user of budget {budget!r} may not run {'; '.join(said)} (the command, or its key or channel "
        f"pattern, is missing from its ACL). Nothing was written; {_HINT}",
        budget=budget,
        missing=tuple(on),
    )


_NOPERM_COMMAND = re.compile(r"run the '([^']+)' command")


def _tls(client: Any) -> bool:
    pool = getattr(client, "connection_pool", None)  # a Cluster client has one per node
    kind = getattr(pool, "connection_class", None)
    return isinstance(kind, type) and issubclass(kind, redis.SSLConnection | redis.asyncio.SSLConnection)


def _unreachable(exc: BaseException) -> bool:
    """Nothing listens there, or the host has no address: no TLS handshake was made."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ConnectionRefusedError | socket.gaierror) or "Connection refused" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _failed(budget: str, exc: redis.RedisError, tls: bool) -> Exception:
    if isinstance(exc, redis.exceptions.NoPermissionError):
        found = _NOPERM_COMMAND.search(str(exc))
        command = found[1].upper().replace("|", " ") if found else "EVALSHA"
        return PermissionDeniedError(
            f"the Redis user of budget {budget!r} may not run the limiter's scripts: {exc}. "
            f"Nothing was written; {_HINT}",
            budget=budget,
            missing=(command,),
        )
    hint = ""
    if tls and isinstance(exc, redis.ConnectionError) and not _unreachable(exc):
        # a server that wants a client certificate may just reset the connection, its alert unread
        hint = (
            " (over TLS: check the URL's ssl_ca_certs, and its ssl_certfile and ssl_keyfile where the server "
            "requires client certificates; see docs/security.md)"
        )
    return BackendError(f"budget {budget!r}: the first call to Redis failed: {exc}{hint}", budget=budget)


def _cause(exc: redis.RedisError, tls: bool) -> BaseException | None:
    """The cause a first-call failure is raised from: a TLS handshake refused (a reset without a
    refused connect) is a configuration to fix, not an outage, so it hides the transient cause."""
    if tls and isinstance(exc, redis.ConnectionError) and not _unreachable(exc):
        return None
    return exc


class Rights:
    """Proves a limiter's rights once, before its first script or subscription (thread- and
    task-safe); until a check passes, every call checks again, so a fixed ACL is taken at once."""

    def __init__(self, budget: str, keys: list[str], channel: str) -> None:
        self.budget = budget
        self.keys = keys
        self.checks = checks(keys, channel)
        self.argv = encode(self.checks)
        self.done = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._alock: asyncio.Lock | None = None

    def _fresh_locks(self) -> None:
        # a lock held by a thread or task of the parent at fork time stays held in the child forever
        if self._pid != os.getpid():
            self._pid, self._lock, self._alock = os.getpid(), threading.Lock(), None

    def _passed(self, raw: Any) -> None:
        if not decode(self.budget, self.checks, raw):
            log.debug("budget %s: this Redis has no redis.acl_check_cmd; its ACL rights are not checked", self.budget)
        self.done = True

    def ensure(self, client: Any) -> None:
        """Check with the sync ``client`` unless already done; raises PermissionDeniedError, BackendError."""
        if self.done:
            return
        self._fresh_locks()
        with self._lock:
            if self.done:
                return
            script = client.register_script(source())  # EVALSHA, SCRIPT LOAD on NOSCRIPT
            for attempt in (1, 2):
                try:
                    raw = script(keys=self.keys, args=self.argv)
                    break
                except redis.RedisError as exc:  # a dead pooled connection fails at once: try a fresh one
                    if attempt == 2 or not isinstance(exc, redis.ConnectionError):
                        raise _failed(self.budget, exc, _tls(client)) from _cause(exc, _tls(client))
            self._passed(raw)

    async def ensure_async(self, client: Any) -> None:
        """``ensure`` with an asyncio ``client``."""
        if self.done:
            return
        self._fresh_locks()
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:
            if self.done:
                return
            script = client.register_script(source())
            for attempt in (1, 2):
                try:
                    raw = await script(keys=self.keys, args=self.argv)
                    break
                except redis.RedisError as exc:
                    if attempt == 2 or not isinstance(exc, redis.ConnectionError):
                        raise _failed(self.budget, exc, _tls(client)) from _cause(exc, _tls(client))
            self._passed(raw)
