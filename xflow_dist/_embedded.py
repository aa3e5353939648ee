"""A private Redis for tests, benchmarks and the demo: ``redis-server`` on a free loopback port,
or, where no binary exists, fakeredis's TCP server in a thread (the same Lua, through lupa)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from types import TracebackType
from typing import Any

import redis

from ._exceptions import BackendError


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_redis_server() -> str | None:
    """``$XFLOW_REDIS_SERVER`` if set, else ``redis-server`` on PATH or in the usual places."""
    explicit = os.environ.get("XFLOW_REDIS_SERVER")
    if explicit:
        return explicit
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/usr/sbin/redis-server"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class EmbeddedRedis:
    """Start a Redis only this process knows about; ``kind`` says which one ran.

    ``allow_fake=False`` makes a missing ``redis-server`` an error instead of a fallback.
    """

    def __init__(self, *, allow_fake: bool = True, startup_timeout: float = 10.0) -> None:
        self.allow_fake = allow_fake
        self.startup_timeout = startup_timeout
        self.kind = ""
        self.url = ""
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._fake: Any = None
        self._thread: threading.Thread | None = None

    def start(self) -> EmbeddedRedis:
        binary = find_redis_server()
        if binary is not None:
            self._start_binary(binary)
        elif self.allow_fake:
            self._start_fake()
        else:
            raise BackendError(
                "no redis-server binary found (install it, e.g. apt-get install redis-server, "
                "or set XFLOW_REDIS_SERVER to its path)"
            )
        return self

    def _start_binary(self, binary: str) -> None:
        port = free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="xflow-redis-")
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
        self.kind = "redis-server"
        self._wait_ready()

    def _start_fake(self) -> None:
        from fakeredis import TcpFakeServer

        port = free_port()
        self._fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
        self._fake.daemon_threads = True
        self._thread = threading.Thread(target=self._fake.serve_forever, name="fake-redis", daemon=True)
        self._thread.start()
        self.url = f"redis://127.0.0.1:{port}/0"
        self.kind = "fakeredis"
        self._wait_ready()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    err = self._proc.stderr.read().decode() if self._proc.stderr else ""
                    raise BackendError(f"redis-server exited at start: {err.strip()}")
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise BackendError(f"{self.kind} did not answer on {self.url}") from None
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
