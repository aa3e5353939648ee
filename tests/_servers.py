"""Redis servers the tests and benchmarks start for themselves, on loopback, and always stop.

``RedisClusterGroup``: a Redis Cluster of ``masters`` masters with ``replicas`` replicas each, one
``redis-server --cluster-enabled yes`` process per node, built with CLUSTER ADDSLOTS, MEET and
REPLICATE (no ``redis-cli`` needed). Its node timeout is short (1 s), so a killed master's replica is
promoted within about three seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import redis

from xflow_dist._embedded import find_redis_server, free_port

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
    ) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master")
        self.masters_wanted = masters
        self.replicas_wanted = replicas
        self.node_timeout_ms = node_timeout_ms
        self.startup_timeout = startup_timeout
        self.extra_args = extra_args
        self.nodes: list[ClusterNode] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    # --- lifecycle ---

    def start(self) -> RedisClusterGroup:
        binary = find_redis_server()
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
