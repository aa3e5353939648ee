"""Redis servers and topologies a test (or a benchmark) starts for itself on loopback.

    with RedisServer("--requirepass", "pw", ping=lambda port: redis.Redis(port=port, password="pw")) as s:
        client = redis.Redis(port=s.port, password="pw")

The suite's shared server is ``conftest.py``'s; start one here when a test needs other settings
(TLS, ACL, a cluster node) or must be free to break it. ``SentinelGroup`` starts a master, replicas
and sentinels; ``RedisClusterGroup`` a Redis Cluster of ``masters`` masters with ``replicas`` replicas
each, built with CLUSTER ADDSLOTS, MEET and REPLICATE (no ``redis-cli`` needed), its node timeout
short (1 s) so that a killed master's replica is promoted within about three seconds. Each launcher
uses free 127.0.0.1 ports and a temporary directory of its own, bounds every wait, and stops
everything it started (``stop`` or ``with``), even after a failed start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis

from xflow_dist.tools._embedded import find_redis_server, free_port, free_ports

Ping = Callable[[int], redis.Redis]


def server_binary() -> str:
    """The ``redis-server`` to run; skips the test where there is none, unless XFLOW_REQUIRE_REDIS is set."""
    binary = find_redis_server()
    if binary is None:
        if os.environ.get("XFLOW_REQUIRE_REDIS", "") not in ("", "0"):
            pytest.fail("no redis-server binary, and XFLOW_REQUIRE_REDIS is set")
        pytest.skip("needs a redis-server binary")
    return binary


def _plain(port: int) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=port)


class RedisServer:
    """One ``redis-server`` bound to 127.0.0.1, its free port given to ``port_option``, no persistence,
    its own folder (``folder``: its working directory and ``server.log``).

    ``ping`` makes the client that proves it ready (a plain one by default; a TLS-only server needs
    its own). ``start`` returns once it answers PING, or raises with its log.
    """

    def __init__(
        self,
        *args: str,
        port_option: str = "--port",
        ping: Ping = _plain,
        binary: str | None = None,
        startup_timeout: float = 10.0,
    ) -> None:
        self.args = args
        self.port_option = port_option
        self.ping = ping
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def folder(self) -> Path:
        assert self._tmp is not None, "not started"
        return Path(self._tmp.name)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self) -> RedisServer:
        binary = self.binary or server_binary()
        self.port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="xflow-server-")
        command = [
            binary,
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", self._tmp.name,
            "--logfile", str(self.folder / "server.log"),
            "--loglevel", "notice",
            "--daemonize", "no",
            *self.args,
            self.port_option, str(self.port),
        ]  # fmt: skip
        self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        client = self.ping(self.port)
        try:
            while True:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"redis-server exited at start ({self._proc.returncode}):\n{self.log()}")
                try:
                    if client.ping():
                        return
                except (redis.ConnectionError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not answer on port {self.port}:\n{self.log()}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


Address = tuple[str, int]


class SentinelGroup:
    """A master, ``replicas`` replicas and ``sentinels`` sentinels watching them as ``service``.

    ``down_after_ms`` and ``failover_timeout_ms`` are the sentinels' ``down-after-milliseconds`` and
    ``failover-timeout`` (small, so that a test sees a failover in seconds); ``password`` protects the
    data nodes (the sentinels are told it), ``sentinel_password`` the sentinels themselves.
    ``start`` returns once the data nodes replicate and every sentinel sees every replica and every
    other sentinel, so that a failover can start at once.
    """

    def __init__(
        self,
        service: str = "xflow",
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 2000,
        password: str | None = None,
        sentinel_password: str | None = None,
        startup_timeout: float = 30.0,
    ) -> None:
        self.service = service
        self.replicas = replicas
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self.startup_timeout = startup_timeout
        self.data_ports: list[int] = []  # the first one starts as the master
        self.sentinel_ports: list[int] = [0] * sentinels
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # -- what a test needs to know -------------------------------------------------------------
    @property
    def url(self) -> str:
        """``redis+sentinel://`` URL of the service, with the passwords if any."""
        auth = f":{self.password}@" if self.password else ""
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        query = f"?sentinel_password={self.sentinel_password}" if self.sentinel_password else ""
        return f"redis+sentinel://{auth}{hosts}/{self.service}{query}"

    def sentinel(self, index: int = 0) -> redis.Redis:
        """A plain client of one sentinel (close it after use)."""
        return redis.Redis("127.0.0.1", self.sentinel_ports[index], password=self.sentinel_password, socket_timeout=2.0)

    def node(self, port: int) -> redis.Redis:
        """A plain client of one data node (close it after use)."""
        return redis.Redis("127.0.0.1", port, password=self.password, socket_timeout=2.0)

    def master_address(self) -> Address:
        """The master the first sentinel that answers names now."""
        for index in range(len(self.sentinel_ports)):
            client = self.sentinel(index)
            try:
                host, port = client.sentinel_get_master_addr_by_name(self.service)
                return str(host.decode() if isinstance(host, bytes) else host), int(port)
            except (redis.RedisError, TypeError):
                continue
            finally:
                client.close()
        raise RuntimeError(f"no sentinel names a master for {self.service!r}")

    def kill(self, port: int, sig: int = signal.SIGKILL) -> float:
        """Send ``sig`` to the process on ``port``; returns ``time.monotonic()`` just before."""
        proc = self._procs[port]
        at = time.monotonic()
        os.kill(proc.pid, sig)
        if sig == signal.SIGKILL:
            proc.wait(timeout=10)
        return at

    def kill_master(self) -> tuple[Address, float]:
        """SIGKILL the current master; returns its address and the monotonic time of the kill."""
        address = self.master_address()
        return address, self.kill(address[1])

    def wait_master(self, other_than: Address, timeout: float = 30.0) -> Address:
        """Poll until the sentinels name a master other than ``other_than``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                address = self.master_address()
                if address != other_than:
                    return address
            except RuntimeError:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"no new master for {self.service!r} within {timeout:g}s")

    def switches(self) -> SwitchWatcher:
        """Watch every sentinel for ``+switch-master`` (start it before the failover)."""
        return SwitchWatcher(self)

    # -- start and stop --------------------------------------------------------------------------
    def start(self) -> SentinelGroup:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("SentinelGroup needs a redis-server binary")
        self._tmp = tempfile.TemporaryDirectory(prefix="xflow-sentinel-")
        try:
            self.data_ports = free_ports(1 + self.replicas)
            master = self.data_ports[0]
            for port in self.data_ports:
                self._data_node(binary, port, None if port == master else master)
            self._until(lambda: all(self._node_ready(p, master) for p in self.data_ports), "the replicas to sync")
            self.sentinel_ports = free_ports(len(self.sentinel_ports))  # the data nodes hold theirs now
            for port in self.sentinel_ports:
                self._sentinel(binary, port, master)
            self._until(self._sentinels_ready, "the sentinels to see the replicas and each other")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for proc in self._procs.values():
            if proc.poll() is None:
                proc.kill()
        for proc in self._procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):  # a SIGKILL that did not land
                proc.wait(timeout=10)
        self._procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SentinelGroup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # -- internals -------------------------------------------------------------------------------
    @property
    def _dir(self) -> Path:
        assert self._tmp is not None
        return Path(self._tmp.name)

    def _spawn(self, port: int, argv: list[str]) -> None:
        log = open(self._dir / f"{port}.log", "wb")  # noqa: SIM115 - the child writes it until it exits
        try:
            self._procs[port] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=self._dir)
        finally:
            log.close()

    def _data_node(self, binary: str, port: int, master: int | None) -> None:
        workdir = self._dir / str(port)
        workdir.mkdir()
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
        argv += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "notice"]
        argv += ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        if self.password:
            argv += ["--requirepass", self.password, "--masterauth", self.password]
        if master is not None:
            argv += ["--replicaof", "127.0.0.1", str(master)]
        self._spawn(port, argv)

    def _sentinel(self, binary: str, port: int, master: int) -> None:
        conf = self._dir / f"sentinel-{port}.conf"  # a sentinel rewrites its own file: one each
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            f"dir {self._dir}",
            "daemonize no",
            "sentinel resolve-hostnames no",
            f"sentinel monitor {self.service} 127.0.0.1 {master} {self.quorum}",
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}",
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}",
            f"sentinel parallel-syncs {self.service} 1",
        ]
        if self.password:
            lines.append(f"sentinel auth-pass {self.service} {self.password}")
        if self.sentinel_password:
            lines.append(f"requirepass {self.sentinel_password}")  # also what it shows other sentinels
        conf.write_text("\n".join(lines) + "\n")
        self._spawn(port, [binary, str(conf), "--sentinel"])

    def _node_ready(self, port: int, master: int) -> bool:
        client = self.node(port)
        try:
            info = client.info("replication")
        except redis.RedisError:
            return False
        finally:
            client.close()
        if port == master:
            return int(info.get("connected_slaves", 0)) >= self.replicas
        return info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for index in range(len(self.sentinel_ports)):
            client = self.sentinel(index)
            try:
                state = client.sentinel_master(self.service)
                replicas = client.sentinel_slaves(self.service)
            except redis.RedisError:
                return False
            finally:
                client.close()
            if state.get("num-other-sentinels", 0) < len(self.sentinel_ports) - 1:
                return False
            healthy = [r for r in replicas if not (r["is_sdown"] or r["is_odown"] or r["is_disconnected"])]
            if len(healthy) < self.replicas or any(r.get("master-link-status") != "ok" for r in healthy):
                return False
        return True

    def _until(self, ready: Any, what: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            dead = [port for port, proc in self._procs.items() if proc.poll() is not None]
            if dead:
                raise RuntimeError(f"redis-server on port {dead[0]} exited: {self._log_tail(dead[0])}")
            if ready():
                return
            time.sleep(0.05)
        raise TimeoutError(f"gave up waiting {self.startup_timeout:g}s for {what}")

    def _log_tail(self, port: int) -> str:
        try:
            return (self._dir / f"{port}.log").read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


class SwitchWatcher:
    """Records when each sentinel announces ``+switch-master`` for the group's service.

    ``first`` is ``(monotonic time, new master address)`` of the earliest announcement, or None.
    """

    def __init__(self, group: SentinelGroup) -> None:
        self._group = group
        self._clients = [group.sentinel(i) for i in range(len(group.sentinel_ports))]
        self._subs = [c.pubsub() for c in self._clients]
        self._stop = threading.Event()
        self._seen = threading.Event()
        self.events: list[tuple[float, int, Address]] = []  # (time, sentinel index, new master)
        self._thread = threading.Thread(target=self._read, name="switch-watcher", daemon=True)

    @property
    def first(self) -> tuple[float, Address] | None:
        return (self.events[0][0], self.events[0][2]) if self.events else None

    def start(self) -> SwitchWatcher:
        for sub in self._subs:
            sub.subscribe("+switch-master")
            for _ in range(50):  # bounded: the confirmation comes at once on loopback
                msg = sub.get_message(timeout=0.1)
                if msg is not None and msg["type"] == "subscribe":
                    break
        self._thread.start()
        return self

    def wait(self, timeout: float) -> tuple[float, Address]:
        """The first switch; raises ``TimeoutError`` if none comes within ``timeout``."""
        if not self._seen.wait(timeout) or self.first is None:
            raise TimeoutError(f"no +switch-master within {timeout:g}s")
        return self.first

    def _read(self) -> None:
        while not self._stop.is_set():
            for index, sub in enumerate(self._subs):
                try:
                    msg = sub.get_message(timeout=0.005)
                except (redis.RedisError, OSError):
                    continue
                if msg is None or msg["type"] != "message":
                    continue
                at = time.monotonic()
                # "<name> <old ip> <old port> <new ip> <new port>"
                name, _, _, ip, port = msg["data"].decode().split()
                if name == self._group.service:
                    self.events.append((at, index, (ip, int(port))))
                    self._seen.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        for sub, client in zip(self._subs, self._clients, strict=True):
            sub.close()
            client.close()

    def __enter__(self) -> SwitchWatcher:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


SLOTS = 16_384


def cluster_port() -> int:
    """A free loopback port whose cluster bus port (port + 10000) is valid and free too."""
    for _ in range(200):
        port = free_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def until(what: str, check: Callable[[], bool], timeout: float, step: float = 0.02) -> None:
    """Wait for ``check()`` to be true, at most ``timeout`` seconds; errors count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:g}s")
        time.sleep(step)


@dataclass
class ClusterNode:
    port: int
    proc: subprocess.Popen[bytes]
    node_id: str = ""

    def call(self, *args: object, timeout: float = 2.0) -> Any:
        """One command on this node alone (no redirections), on a connection of its own."""
        with redis.Redis(
            "127.0.0.1", self.port, socket_timeout=timeout, socket_connect_timeout=timeout, decode_responses=True
        ) as admin:
            return admin.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2.0, decode_responses=True) as admin:
            return admin.info(section)

    def cluster_info(self) -> dict[str, str]:
        info: dict[str, str] = self.call("CLUSTER INFO")  # parsed by redis-py
        return info


class RedisClusterGroup:
    """A Redis Cluster of its own: ``start()`` returns when every node says ``cluster_state:ok``,
    sees every other node and agrees on who serves which slot, and every replica is in sync.

    ``node_timeout_ms`` is ``cluster-node-timeout``: a master silent this long is marked failed and
    its replica starts an election. ``extra_args`` go to every ``redis-server``.
    """

    def __init__(
        self,
        masters: int = 3,
        replicas: int = 1,
        *,
        node_timeout_ms: int = 1000,
        startup_timeout: float = 30.0,
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master")
        self.masters_wanted = masters
        self.replicas_wanted = replicas
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.binary = binary  # None: the redis-server found on this machine
        self.nodes: list[ClusterNode] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # --- lifecycle ---

    def start(self) -> RedisClusterGroup:
        binary = self.binary or find_redis_server()
        if binary is None:
            raise RuntimeError("no redis-server binary (install redis-server or set XFLOW_REDIS_SERVER)")
        self._tmp = tempfile.TemporaryDirectory(prefix="xflow-cluster-")
        try:
            for _ in range(self.masters_wanted * (1 + self.replicas_wanted)):
                self.nodes.append(self._spawn(binary, cluster_port()))
            for node in self.nodes:
                until(f"node {node.port} answers", lambda n=node: self._answers(n), self.startup_timeout)  # type: ignore[misc]
                node.node_id = node.call("CLUSTER MYID")
            self._form()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node still running (SIGKILL after 10 s) and remove their files."""
        for node in self.nodes:
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    node.proc.send_signal(signal.SIGCONT)  # a test may have frozen it
                node.proc.terminate()
        for node in self.nodes:
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(timeout=10)
        self.nodes = []
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> RedisClusterGroup:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- what tests use ---

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a startup node."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node(self, port: int) -> ClusterNode:
        (found,) = [node for node in self.nodes if node.port == port]
        return found

    def alive(self) -> list[ClusterNode]:
        return [node for node in self.nodes if node.proc.poll() is None]

    def slot_owners(self) -> list[tuple[int, int, int]]:
        """(first slot, last slot, master's port) for every range, as a live node sees them now."""
        for node in self.alive():
            try:
                return sorted((start, end, int(master[1])) for start, end, master, *_ in node.call("CLUSTER SLOTS"))
            except redis.RedisError:
                continue
        raise LookupError("no live node answers CLUSTER SLOTS")

    def master_of(self, slot: int) -> ClusterNode:
        """The node that serves ``slot``, as a live node sees it now."""
        for start, end, port in self.slot_owners():
            if start <= slot <= end:
                return self.node(port)
        raise LookupError(f"no master serves slot {slot}")

    def replica_of(self, master: ClusterNode) -> ClusterNode:
        """A live replica of ``master``, by the cluster's own record."""
        for node in self.alive():
            if node is not master and self._role(node) == ("slave", master.port):
                return node
        raise LookupError(f"master {master.port} has no live replica")

    def kill(self, node: ClusterNode) -> None:
        """SIGKILL: no goodbye to its peers or clients, as when a machine dies."""
        node.proc.kill()
        node.proc.wait(timeout=10)

    def is_master(self, node: ClusterNode) -> bool:
        return self._role(node)[0] == "master"

    def wait_ok(self, timeout: float = 30.0) -> None:
        """Every live node says ``cluster_state:ok`` and lists the same masters for all slots."""
        until("cluster state ok on every live node", self._settled, timeout)

    # --- internals ---

    def _spawn(self, binary: str, port: int) -> ClusterNode:
        assert self._tmp is not None
        folder = os.path.join(self._tmp.name, str(port))
        os.mkdir(folder)
        args = [
            binary,
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--save", "",
            "--appendonly", "no",
            "--repl-diskless-sync-delay", "0",  # a replica attaches at once, not 5 s later
            # a replica is listed in CLUSTER SLOTS once its offset moves, and pings move it
            "--repl-ping-replica-period", "1",
            "--dir", folder,
            "--daemonize", "no",
            "--loglevel", "warning",
            *self.extra_args,
        ]  # fmt: skip
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return ClusterNode(port, proc)

    def _answers(self, node: ClusterNode) -> bool:
        if node.proc.poll() is not None:
            raise RuntimeError(f"cluster node on port {node.port} exited at start")
        return bool(node.call("PING", timeout=0.5))

    def _form(self) -> None:
        masters = self.nodes[: self.masters_wanted]
        replicas = self.nodes[self.masters_wanted :]
        size = SLOTS // len(masters)
        for i, master in enumerate(masters):
            end = SLOTS if i == len(masters) - 1 else (i + 1) * size
            master.call("CLUSTER ADDSLOTS", *range(i * size, end))
        for node in self.nodes[1:]:
            self.nodes[0].call("CLUSTER MEET", "127.0.0.1", node.port)
        everyone = len(self.nodes)
        until(
            "every node sees every other",
            lambda: all(int(n.cluster_info()["cluster_known_nodes"]) == everyone for n in self.nodes),
            self.startup_timeout,
        )
        for i, replica in enumerate(replicas):
            master = masters[i % len(masters)]
            # retried: a replica may not yet know the master as a master (its slots) just after MEET
            until(
                f"node {replica.port} replicates {master.port}",
                lambda r=replica, m=master: bool(r.call("CLUSTER REPLICATE", m.node_id)),  # type: ignore[misc]
                self.startup_timeout,
                step=0.1,
            )
        until("replicas in sync", lambda: all(self._in_sync(r) for r in replicas), self.startup_timeout)
        until(
            "every node lists every master and replica",
            lambda: self._settled(self.replicas_wanted),
            self.startup_timeout,
        )

    def _role(self, node: ClusterNode) -> tuple[str, int]:
        role = node.call("ROLE")
        return (role[0], int(role[2])) if role[0] == "slave" else (role[0], 0)

    def _in_sync(self, replica: ClusterNode) -> bool:
        info = replica.info("replication")
        return info.get("master_link_status") == "up" and not info.get("master_sync_in_progress")

    def _settled(self, replicas: int | None = None) -> bool:
        """Every live node is ok and lists the same masters (and, if given, this many replicas each)."""
        views = []
        for node in self.alive():
            if node.cluster_info()["cluster_state"] != "ok":
                return False
            ranges = node.call("CLUSTER SLOTS")
            if replicas is not None and any(len(served) - 3 != replicas for served in ranges):
                return False
            views.append(sorted((start, end, int(master[1])) for start, end, master, *_ in ranges))
        return bool(views) and all(view == views[0] for view in views)


class Server:
    """A redis-server on a fixed loopback port, killed and started again at will (nothing on disk)."""

    def __init__(self) -> None:
        binary = find_redis_server()
        if binary is None:
            pytest.skip("needs a redis-server binary")
        self.binary = binary
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            until("the server answers", lambda: _answers(probe), 10.0)
        finally:
            probe.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def in_flight(srv: Server, name: str) -> int:
    c = srv.client()
    try:
        return int(c.zcard(f"{{xflow:{name}}}:leases"))
    finally:
        c.close()
