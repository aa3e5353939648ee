"""``memory://NAME``: an in-process budget server, with the few client calls the limiters make of Redis.

Each name is one ``MemoryServer``, shared by every limiter of this process that names it (threads
and event loops alike) for as long as one of them holds it; it cannot coordinate several processes.
The operations run in ``_engine`` (the Lua's decisions in plain Python) under one lock, as Redis
runs one script at a time; events go straight to each subscriber's queue. The clients answer
``register_script`` (the operations), ``pubsub``, ``pubsub_numsub``, ``ping`` and ``close``, plus
the inspection calls the tests make (``time``, ``scan_iter``, ``pttl``, ``hkeys``, ``dump``,
``flushall``, ``script_flush``); anything else is an AttributeError, not a silent difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from . import _acl, _scripts
from ._engine import Engine

#: By name, while some client holds the server: the last one gone (a limiter closed and dropped), its
#: budgets go too, so that private names (every outage's local share, each compat scheduler's own
#: budget) do not pile up in a long-lived process.
_servers: weakref.WeakValueDictionary[str, MemoryServer] = weakref.WeakValueDictionary()
_servers_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A lock some other thread held at the fork stays held in the child: start every one afresh."""
    global _servers_lock
    _servers_lock = threading.Lock()
    for s in _servers.values():
        s.lock = threading.RLock()
        s.subscribers.clear()  # the parent's subscribers are not this process's: none is connected here


os.register_at_fork(after_in_child=_after_fork_in_child)


def server(name: str) -> MemoryServer:
    """The one server of this process called ``name``."""
    with _servers_lock:
        found = _servers.get(name)
        if found is None:
            found = _servers[name] = MemoryServer()
        return found


def _text(arg: Any) -> str:
    """An argument as redis-py would send it."""
    if isinstance(arg, str):
        return arg
    if isinstance(arg, bytes):
        return arg.decode()
    if isinstance(arg, float):
        return repr(arg)
    return str(arg)


def _op_of(source: str) -> str:
    """The operation a script's source text is: only the package's own scripts run here."""
    if source == _acl.source():
        return "check_rights"
    for op in _scripts.OPS:
        if source == _scripts.source(op):
            return op
    raise ValueError("memory:// runs only xflow-dist's own scripts")


class MemoryServer:
    """Budgets kept in this process; ``clock`` is the server's TIME (wall clock, as Redis's)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.lock = threading.RLock()
        self.clock = clock
        self.engine = Engine(self._publish, clock, lambda channel: len(self.subscribers.get(channel, ())))
        self.subscribers: dict[str, list[_SyncPubSub | _AsyncPubSub]] = {}

    def _publish(self, channel: str, message: str) -> None:
        for sub in self.subscribers.get(channel, ()):
            sub.deliver({"type": "message", "pattern": None, "channel": channel.encode(), "data": message.encode()})

    def run(self, op: str, keys: list[Any], args: list[Any]) -> list[Any]:
        if op == "check_rights":
            return [b"checked"]  # no ACL here: every right is held
        with self.lock:
            reply = self.engine.run(
                op, [k if type(k) is str else _text(k) for k in keys], [a if type(a) is str else _text(a) for a in args]
            )
        return [x.encode() for x in reply]

    def numsub(self, channel: str) -> list[tuple[bytes, int]]:
        with self.lock:
            return [(channel.encode(), len(self.subscribers.get(channel, ())))]

    def subscribe(self, channel: str, sub: _SyncPubSub | _AsyncPubSub) -> None:
        with self.lock:
            self.subscribers.setdefault(channel, []).append(sub)

    def unsubscribe(self, channel: str, sub: _SyncPubSub | _AsyncPubSub) -> None:
        with self.lock:
            subs = self.subscribers.get(channel, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self.subscribers.pop(channel, None)

    def scan(self, pattern: str = "*") -> list[bytes]:
        with self.lock:
            found = self.engine.existing_keys(_budget_keys)
        return [k.encode() for k in found if fnmatch.fnmatchcase(k, pattern)]

    def pttl(self, key: str) -> int:
        with self.lock:
            if key not in self.keys_now():
                return -2
            return self.engine.pttl(_first_key(key))

    def pexpiretime(self, key: str) -> int:
        with self.lock:
            if key not in self.keys_now():
                return -2
            return self.engine.pexpiretime(_first_key(key))

    def keys_now(self) -> set[str]:
        return set(self.engine.existing_keys(_budget_keys))

    def hkeys(self, key: str) -> list[bytes]:
        if not key.endswith(":learned"):
            raise NotImplementedError("memory:// answers HKEYS for the learned limits only")
        with self.lock:
            return [m.encode() for m in self.engine.learned_models(_first_key(key))]

    def dump(self, key: str) -> bytes | None:
        """A key's whole content, serialized (what DUMP is used for here: did anything change?)."""
        with self.lock:
            if key not in self.keys_now():
                return None
            b = self.engine.budgets[_first_key(key)]
            part: Any = (b.state, b.leases.by_id, b.data, b.queue, b.tickets, b.learned, b.tenants, b.caps)[
                _SUFFIXES.index(key[key.rfind(":") :])
            ]
            if part is b.data or part is b.tickets:
                part = {k: [getattr(v, f) for f in v.__slots__] for k, v in part.items()}
            return repr(sorted(part.items())).encode()

    def flush(self) -> None:
        with self.lock:
            self.engine.flush()


_SUFFIXES = (":state", ":leases", ":lease_data", ":queue", ":tickets", ":learned", ":tenants", ":caps")


def _budget_keys(first: str) -> list[str]:
    base = first[: -len(":state")] if first.endswith(":state") else first
    return [base + s for s in _SUFFIXES]


def _first_key(key: str) -> str:
    for s in _SUFFIXES:
        if key.endswith(s):
            return key[: -len(s)] + ":state"
    return key


class _Script:
    def __init__(self, server: MemoryServer, op: str) -> None:
        self.server, self.op = server, op

    def __call__(self, keys: list[Any] | None = None, args: list[Any] | None = None, client: Any = None) -> Any:
        return self.server.run(self.op, list(keys or ()), list(args or ()))


class _AsyncScript(_Script):
    async def __call__(self, keys: list[Any] | None = None, args: list[Any] | None = None, client: Any = None) -> Any:
        return self.server.run(self.op, list(keys or ()), list(args or ()))


class _SyncPubSub:
    def __init__(self, server: MemoryServer) -> None:
        self.server = server
        self.channels: list[str] = []
        self.inbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()

    def deliver(self, message: dict[str, Any]) -> None:
        self.inbox.put(message)

    def subscribe(self, *channels: str) -> None:
        for channel in channels:
            self.server.subscribe(channel, self)
            self.channels.append(channel)
            self.inbox.put(
                {"type": "subscribe", "pattern": None, "channel": channel.encode(), "data": len(self.channels)}
            )

    def unsubscribe(self, *channels: str) -> None:
        for channel in channels or tuple(self.channels):
            self.server.unsubscribe(channel, self)
            if channel in self.channels:
                self.channels.remove(channel)
            self.inbox.put({"type": "unsubscribe", "pattern": None, "channel": channel.encode(), "data": 0})

    def get_message(self, ignore_subscribe_messages: bool = False, timeout: float = 0.0) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = (
                    self.inbox.get(timeout=max(0.0, deadline - time.monotonic()))
                    if timeout > 0
                    else self.inbox.get_nowait()
                )
            except queue.Empty:
                return None
            if not ignore_subscribe_messages or msg["type"] == "message":
                return msg

    def close(self) -> None:
        self.unsubscribe()

    def __enter__(self) -> _SyncPubSub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _AsyncPubSub:
    def __init__(self, server: MemoryServer) -> None:
        self.server = server
        self.channels: list[str] = []
        self.inbox: asyncio.Queue[dict[str, Any]] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = 0

    def deliver(self, message: dict[str, Any]) -> None:
        if self.inbox is None or self.loop is None:
            return
        if threading.get_ident() == self.thread:
            self.inbox.put_nowait(message)
        else:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody listens any more
                self.loop.call_soon_threadsafe(self.inbox.put_nowait, message)

    async def subscribe(self, *channels: str) -> None:
        if self.inbox is None:
            self.inbox = asyncio.Queue()
            self.loop = asyncio.get_running_loop()
            self.thread = threading.get_ident()
        for channel in channels:
            self.server.subscribe(channel, self)
            self.channels.append(channel)
            self.inbox.put_nowait(
                {"type": "subscribe", "pattern": None, "channel": channel.encode(), "data": len(self.channels)}
            )

    async def unsubscribe(self, *channels: str) -> None:
        for channel in channels or tuple(self.channels):
            self.server.unsubscribe(channel, self)
            if channel in self.channels:
                self.channels.remove(channel)

    async def get_message(
        self, ignore_subscribe_messages: bool = False, timeout: float | None = 0.0
    ) -> dict[str, Any] | None:
        if self.inbox is None:
            return None
        deadline = time.monotonic() + (timeout or 0.0)
        while True:
            if self.inbox.empty():
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                try:
                    msg = await asyncio.wait_for(self.inbox.get(), left)
                except TimeoutError:
                    return None
            else:
                msg = self.inbox.get_nowait()
            if not ignore_subscribe_messages or msg["type"] == "message":
                return msg

    async def aclose(self) -> None:
        await self.unsubscribe()

    close = aclose


class _Inspect:
    """What the tests read of the keyspace, sync."""

    server: MemoryServer

    def time(self) -> tuple[int, int]:
        us = round(self.server.clock() * 1_000_000)
        return us // 1_000_000, us % 1_000_000

    def scan_iter(self, match: str = "*", **_: Any) -> Iterator[bytes]:
        return iter(self.server.scan(match))

    def pttl(self, key: str) -> int:
        return self.server.pttl(_text(key))

    def pexpiretime(self, key: str) -> int:
        return self.server.pexpiretime(_text(key))

    def hkeys(self, key: str) -> list[bytes]:
        return self.server.hkeys(_text(key))

    def dump(self, key: str) -> bytes | None:
        return self.server.dump(_text(key))

    def flushall(self, *_: Any, **__: Any) -> bool:
        self.server.flush()
        return True

    def script_flush(self, *_: Any, **__: Any) -> bool:
        return True  # nothing is cached: the operations are Python


class MemoryClient(_Inspect):
    """The sync client of a ``memory://`` server."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def register_script(self, source: str) -> _Script:
        return _Script(self.server, _op_of(source))

    def pubsub(self, **_: Any) -> _SyncPubSub:
        return _SyncPubSub(self.server)

    def pubsub_numsub(self, *channels: str) -> list[tuple[bytes, int]]:
        return [pair for c in channels for pair in self.server.numsub(_text(c))]

    def ping(self) -> bool:
        return True

    def close(self) -> None:
        pass


class AsyncMemoryClient(_Inspect):
    """The asyncio client of a ``memory://`` server."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def register_script(self, source: str) -> _AsyncScript:
        return _AsyncScript(self.server, _op_of(source))

    def pubsub(self, **_: Any) -> _AsyncPubSub:
        return _AsyncPubSub(self.server)

    async def pubsub_numsub(self, *channels: str) -> list[tuple[bytes, int]]:
        return [pair for c in channels for pair in self.server.numsub(_text(c))]

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        pass

    close = aclose
