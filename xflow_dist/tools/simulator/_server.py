"""Serving the simulator: in a background thread (``SimulatorServer``) or in the foreground (``main``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

try:
    from aiohttp import web
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.tools.simulator needs aiohttp: pip install 'xflow-dist[demo]'") from exc

from ..._exceptions import ConfigurationError
from ._app import _SIMULATOR, create_app
from ._limits import SimulatorConfig

_T = TypeVar("_T")


def _check_host(host: str, allow_remote: bool) -> None:
    if allow_remote or host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ConfigurationError(f"the simulator listens on loopback hosts only unless allowed, not {host!r}")


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def _start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


class SimulatorServer:
    """The simulator on a loopback port, served by a background thread with its own event loop.

    Use as a context manager; ``port=0`` picks a free port. ``clock`` may be a fake (it is read on the
    server's thread) to make every header exact in tests.
    """

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        allow_remote: bool = False,
    ) -> None:
        _check_host(host, allow_remote)
        self.config = config or SimulatorConfig()
        self.host = host
        self._port = port
        self._app = create_app(self.config, clock=clock, wall_clock=wall_clock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def port(self) -> int:
        """The port actually bound (known once started)."""
        if self._loop is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, without a trailing slash."""
        return _url(self.host, self.port)

    def start(self) -> SimulatorServer:
        """Bind and serve; returns once the port accepts connections."""
        if self._thread is not None:
            raise RuntimeError("the simulator was already started")
        self._thread = threading.Thread(target=self._run, name="xflow-simulator", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner, self._port = await _start(self._app, self.host, self._port)
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await runner.cleanup()

    def stop(self) -> None:
        """Stop serving and join the thread; in-flight requests get a second to finish."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between
                loop.call_soon_threadsafe(stop.set)
        if thread is not None:
            thread.join(timeout=30)

    def _call(self, func: Callable[[], _T]) -> _T:
        """Run ``func`` on the server's loop: the ledger is only ever touched there."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the simulator is not running")

        async def call() -> _T:
            return func()

        coro: Coroutine[Any, Any, _T] = call()
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=30)

    def stats(self) -> dict[str, Any]:
        """What ``GET /stats`` returns."""
        sim = self._app[_SIMULATOR]
        return self._call(lambda: sim.ledger.stats())

    def reset(self, **limits: float | None) -> dict[str, Any]:
        """Fresh buckets and ledger, optionally with new ``rpm``, ``tpm`` or ``max_concurrency``."""
        sim = self._app[_SIMULATOR]
        return self._call(lambda: sim.reset(limits))

    def __enter__(self) -> SimulatorServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


async def _serve_foreground(config: SimulatorConfig, host: str, port: int) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows has no add_signal_handler
            loop.add_signal_handler(sig, stop.set)
    runner, bound = await _start(create_app(config), host, port)
    try:
        print(f"xflow-simulator listening on {_url(host, bound)}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None, prog: str = "python -m xflow_dist.tools.simulator") -> int:
    """Serve the simulator in the foreground until SIGINT or SIGTERM; ``prog`` names the command in
    its usage (``xflow simulate`` when the CLI runs it)."""
    defaults = SimulatorConfig()
    parser = argparse.ArgumentParser(
        prog=prog,
        description="A simulated OpenAI-compatible provider with strict rate limits.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (loopback unless --allow-remote)")
    parser.add_argument("--port", type=int, default=0, help="port to bind; 0 picks a free one")
    parser.add_argument("--rpm", type=float, default=defaults.rpm, help="requests per minute")
    parser.add_argument("--tpm", type=float, default=defaults.tpm, help="tokens per minute")
    parser.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")
    parser.add_argument("--latency-base", type=float, default=defaults.latency_base, help="seconds per reply")
    parser.add_argument(
        "--latency-per-token", type=float, default=defaults.latency_per_token, help="seconds per output token"
    )
    parser.add_argument("--headers", choices=("openai", "anthropic"), default=defaults.headers)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--allow-remote", action="store_true", help="allow binding a non-loopback host")
    args = parser.parse_args(argv)
    try:
        _check_host(args.host, args.allow_remote)
        config = SimulatorConfig(
            rpm=args.rpm,
            tpm=args.tpm,
            max_concurrency=args.max_concurrency,
            latency_base=args.latency_base,
            latency_per_token=args.latency_per_token,
            headers=args.headers,
            seed=args.seed,
        )
    except ConfigurationError as exc:
        print(f"xflow-simulator: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_serve_foreground(config, args.host, args.port))
    except OSError as exc:
        print(f"xflow-simulator: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - only where signal handlers are unavailable
        return 0


if __name__ == "__main__":
    sys.exit(main())
