"""Redis servers a test starts for itself: given arguments, a free loopback port, stopped after.

    with RedisServer("--requirepass", "pw", ping=lambda port: redis.Redis(port=port, password="pw")) as s:
        client = redis.Redis(port=s.port, password="pw")

The suite's shared server is ``conftest.py``'s; start one here when a test needs other settings
(TLS, ACL, a cluster node) or must be free to break it.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

import pytest
import redis

from xflow_dist._embedded import find_redis_server, free_port

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
