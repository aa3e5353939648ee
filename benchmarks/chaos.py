"""A fleet against the simulated provider while Redis misbehaves: one fault per run, each outage policy.

P worker processes x C workers (asyncio tasks; threads with ``--front sync``) call the simulated provider
(``xflow_dist.tools.simulator``, on loopback) through one shared budget, configured as the README recommends
for a per-minute provider:
``Budget(name, rpm=, tpm=, max_concurrency=, burst=60)`` with the provider's own limits, every other
setting at its default, each reply settled with its usage and rate-limit headers, each 429 answered
with ``cooldown(retry_after)``. The harness hands out the jobs (one per worker at a time, over a pipe
per process) and knows which process holds which; a job is lost only if it never completes.

Faults, each at a fixed second of its run (``--fault``):
  none          the baseline, measured in the same invocation
  redis-kill    SIGKILL to redis-server, a new one (empty: no persistence) on the same port ~3 s later
  redis-stop    SIGSTOP to redis-server for 10 s, then SIGCONT
  proxy-cut     the fleet reaches Redis through a small TCP proxy that resets every connection at once
  worker-kill   SIGKILL to the worker process holding the most leases; the harness hands its
                unfinished jobs to the others
  sentinel      the fleet on a redis+sentinel:// URL (a master, a replica, three sentinels:
                tests/_servers.SentinelGroup); the master SIGKILLed, a sentinel promotes the replica

Policies (``--policy``): ``local``, ``open``, ``closed`` (``Limiter(..., outage=...)``). Under
``closed`` a worker refused with ``BudgetUnavailableError`` retries the job after 0.25 s.

Scenarios (``--scenario``): ``rates`` (600 requests a minute bind once the provider's initial minute is
spent, which takes the first seconds of the run) and ``concurrency`` (8 slots bind, calls of 0.5 s).
The provider enforces its rates (its 429s count what the fleet sent beyond them) and does not
enforce the concurrency limit, so that its peak in flight shows what the fleet really ran against
``max_concurrency``. Figures come from the provider's ledger, the harness and the workers' grant
stamps (``time.monotonic()``, one clock for every process of a Linux machine; a grant is marked as
Redis's or the outage policy's). Every run of a scenario lasts as long (the fault's second, the
longest fault chosen, 8 s more; 4 s with ``--quick``), so that utilisation compares with the baseline.

Per run: requests sent, 429s (all, and from the fault's second on), over-admissions by the provider's
own window check, its peak in flight against ``max_concurrency``, jobs done, handed out again (a killed
worker's) and lost, hangs (a worker process not done by the end plus 40 s), the time from Redis answering
again (restarted, thawed, the new master promoted; the cut itself) to the fleet's first grant from Redis
and to every process's, and utilisation of the binding limit (as ``xflow demo`` judges it). Every loop
and wait is bounded; servers, proxy and processes are stopped on the way out, Ctrl-C and SIGTERM
included. ``kill -USR1`` on the harness or a worker prints every thread's stack.

    python benchmarks/chaos.py [--quick] [--json FILE] [--scenario S ...] [--fault F ...] [--policy P ...]
                               [--front async|sync] [--processes 4] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import itertools
import logging
import math
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import wait as wait_conns
from typing import Any

import _common as c
import redis

from xflow_dist import AcquireTimeout, AsyncLimiter, Budget, BudgetUnavailableError, Limiter
from xflow_dist._base import new_id
from xflow_dist._headers import parse_limit_headers, parse_retry_after
from xflow_dist.tools._demo import Latency, fetch_stats, judge, reset_provider, simulator_process
from xflow_dist.tools._embedded import find_redis_server, free_port
from xflow_dist.tools._fleet import Job, Limits

POLICIES = ("local", "open", "closed")
FAULTS = ("none", "redis-kill", "redis-stop", "proxy-cut", "worker-kill", "sentinel")

#: Seconds Redis stays dead in ``redis-kill`` and frozen in ``redis-stop``.
KILL_DOWN = 3.0
STOP_FOR = 10.0
#: A worker refused by the ``closed`` policy (or failing otherwise) tries the job again after this.
PAUSE = 0.25
#: Every acquire is bounded; a worker whose acquire times out tries again (and counts it).
ACQUIRE_TIMEOUT = 30.0
#: After the run's last second: how long the fleet may take to finish the jobs it holds and exit.
GRACE = 40.0

#: Seconds a Sentinel failover takes, about (down-after 1 s, then the vote): for the run's length only.
FAILOVER = 3.0


@dataclass(frozen=True)
class Scenario:
    """The provider, the jobs and when the fault strikes (seconds into the run)."""

    name: str
    limits: Limits
    max_concurrency: int
    latency: Latency
    prompt_tokens: tuple[int, int]
    max_tokens: tuple[int, int]
    fault_at: float
    fault_at_quick: float
    binding: str


SCENARIOS = {
    # 10 requests/s bind once the provider's initial minute (600) is spent, in the first ~5 s
    "rates": Scenario(
        "rates", Limits(rpm=600, tpm=1_000_000), 16, Latency(0.1, 0.0002), (10, 40), (8, 32), 9.0, 7.0, "requests"
    ),
    # 8 slots, every call 0.5 s: 16 calls/s, far under the rates
    "concurrency": Scenario(
        "concurrency", Limits(rpm=60_000, tpm=10_000_000), 8, Latency(0.5, 0.0), (50, 400), (64, 384), 5.0, 3.0,
        "concurrency",
    ),
}  # fmt: skip


def fleet_budget(name: str, scenario: Scenario) -> Budget:
    """The README's configuration for a per-minute provider: its limits, a minute of burst, defaults."""
    return Budget(
        name,
        rpm=scenario.limits.rpm,
        tpm=scenario.limits.tpm,
        max_concurrency=scenario.max_concurrency,
        burst=60,
    )


_WORDS = ("amber", "basil", "cedar", "dune", "ember", "fjord", "grove", "heath", "inlet", "jetty")


def make_job(job_id: int, seed: int, scenario: Scenario) -> Job:
    """Job ``job_id`` of the run: the same id and seed always give the same prompt and bound."""
    rng = random.Random(seed * 1_000_003 + job_id)
    words = max(1, rng.randint(*scenario.prompt_tokens) * 4 // 6)  # ~6 bytes a word, 4 bytes a token
    return Job(job_id, " ".join(rng.choice(_WORDS) for _ in range(words)), rng.randint(*scenario.max_tokens))


# --------------------------------------------------------------------------------------------------
# Servers the harness owns: a restartable redis-server and a TCP proxy


class RedisServer:
    """A redis-server on a fixed loopback port, killed, frozen and started again at will (no disk)."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary = binary
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self._dir = tempfile.TemporaryDirectory(prefix="xflow-chaos-")

    def start(self, timeout: float = 10.0) -> float:
        """Start it and return when it first answered (monotonic)."""
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self._dir.name, "--daemonize", "no", "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        return self.wait_answering(timeout)

    def wait_answering(self, timeout: float) -> float:
        probe = redis.Redis(port=self.port, socket_connect_timeout=0.2, socket_timeout=0.2)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"redis-server on port {self.port} exited at start (port taken?)")
                with contextlib.suppress(redis.RedisError):
                    if probe.ping():
                        return time.monotonic()
                time.sleep(0.01)
        finally:
            probe.close()
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout:g}s")

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(timeout=10)
            self.proc = None
            self.frozen = False

    def freeze(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGSTOP)
            self.frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self.frozen:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.frozen = False

    def stop(self) -> None:
        self.thaw()
        self.kill()

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


class Proxy:
    """A TCP proxy on a free loopback port to one upstream port, in a thread of its own (asyncio).

    ``cut()`` resets every connection through it at once (both sides, RST); new connections are
    accepted and forwarded as before.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.BaseTransport] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Proxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.upstream_port), timeout=2.0
            )
        except (OSError, TimeoutError):
            _reset(writer.transport)
            return
        mine = (writer.transport, up_writer.transport)
        self._transports.update(mine)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer), return_exceptions=True)
        finally:
            for transport in mine:
                self._transports.discard(transport)
                transport.close()

    def cut(self) -> int:
        """Reset every connection now; returns how many client connections there were."""
        return int(self._call(self._cut()))

    async def _cut(self) -> int:
        cut = list(self._transports)
        self._transports.clear()
        for transport in cut:
            _reset(transport)
        return len(cut) // 2

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        with contextlib.suppress(Exception):
            self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=2) if tasks else None


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close with an RST, as a dropped connection looks to both ends."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    transport.abort()  # type: ignore[attr-defined]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.close()


# --------------------------------------------------------------------------------------------------
# The worker process


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker process needs; plain data, so that it crosses ``spawn``."""

    index: int
    scenario: str
    policy: str
    concurrency: int
    redis_url: str
    provider_url: str
    budget_name: str
    seed: int
    front: str = "async"  # "async": AsyncLimiter and coroutines; "sync": Limiter and threads


@dataclass
class WorkerReport:
    index: int
    jobs: int = 0
    attempts: int = 0
    rejected: int = 0  # 429s this process saw
    unavailable: int = 0  # BudgetUnavailableError (the closed policy)
    acquire_timeouts: int = 0
    gave_up: bool = False
    cpu_s: float = 0.0  # CPU seconds of the process (every thread) from the start of the run to its end
    errors: dict[str, int] = field(default_factory=dict)
    grants: list[tuple[float, bool]] = field(default_factory=list)  # (monotonic, from Redis)
    log: dict[str, int] = field(default_factory=dict)  # warnings the library logged, by first words
    log_sample: list[str] = field(default_factory=list)


class _LogCount(logging.Handler):
    """Counts the library's log lines in the worker instead of printing them (the harness reports them)."""

    def __init__(self, report: WorkerReport) -> None:
        super().__init__(logging.WARNING)
        self.report = report

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        key = " ".join(text.split()[:6])
        self.report.log[key] = self.report.log.get(key, 0) + 1
        if len(self.report.log_sample) < 5:
            self.report.log_sample.append(text[:300])


def worker_main(conn: Any, spec: WorkerSpec) -> None:
    """Process entry point: get ready, say so, run the jobs handed over ``conn``, report, exit."""
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack on stderr
    report = WorkerReport(spec.index)
    logger = logging.getLogger("xflow_dist")
    logger.addHandler(_LogCount(report))
    logger.propagate = False
    try:
        if spec.front == "sync":
            _work_sync(conn, spec, report)
        else:
            asyncio.run(_work(conn, spec, report))
        conn.send(("bye", asdict(report)))
    except KeyboardInterrupt:
        pass
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


async def _work(conn: Any, spec: WorkerSpec, report: WorkerReport) -> None:
    import httpx

    scenario = SCENARIOS[spec.scenario]
    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()

    def read() -> None:  # the pipe, read in a thread: the parent hands out jobs, then says stop
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("stop",)
            loop.call_soon_threadsafe(inbox.put_nowait, msg)
            if msg[0] == "stop":
                return

    limiter = AsyncLimiter(fleet_budget(spec.budget_name, scenario), spec.redis_url, outage=spec.policy)
    limits = httpx.Limits(max_connections=spec.concurrency + 4, max_keepalive_connections=spec.concurrency + 4)
    async with httpx.AsyncClient(base_url=spec.provider_url, timeout=30, limits=limits) as http:
        await http.get("/stats")  # connected, the HTTP stack warm
        await limiter.status()  # scripts loaded, Redis connected
        threading.Thread(target=read, name="chaos-inbox", daemon=True).start()
        conn.send(("ready", spec.index, new_id().split(".")[0]))  # the prefix of this process's lease ids
        first = await inbox.get()
        assert first[0] == "go", first
        give_up = float(first[1])
        cpu = time.process_time()

        async def run(job: Job) -> bool:
            while time.monotonic() < give_up:
                report.attempts += 1
                try:
                    async with limiter.acquire(tokens=job.estimate, timeout=ACQUIRE_TIMEOUT) as lease:
                        # a grant from Redis, or from the outage policy (a share, or open)
                        report.grants.append((time.monotonic(), lease._limiter is limiter))
                        body = {"model": "sim", "messages": job.messages, "max_tokens": job.max_tokens}
                        reply = await http.post("/v1/chat/completions", json=body)
                        seen = parse_limit_headers(reply.headers)
                        if reply.status_code == 429:
                            report.rejected += 1
                            await lease.report(0, limit_requests=seen.request_limit, limit_tokens=seen.token_limit)
                            await limiter.cooldown(retry_after=parse_retry_after(reply.headers))
                            continue
                        reply.raise_for_status()
                        await lease.report(
                            actual_tokens=int(reply.json()["usage"]["total_tokens"]),
                            remaining_requests=seen.requests_remaining,
                            remaining_tokens=seen.tokens_remaining,
                            limit_requests=seen.request_limit,
                            limit_tokens=seen.token_limit,
                        )
                    return True
                except Exception as exc:  # counted and tried again: the job must not be lost
                    if _failed(report, exc):
                        await asyncio.sleep(PAUSE)
            return False

        async def slot() -> None:
            while True:
                msg = await inbox.get()
                if msg[0] == "stop":
                    inbox.put_nowait(msg)  # for the other slots
                    return
                job_id = int(msg[1])
                if await run(make_job(job_id, spec.seed, scenario)):
                    report.jobs += 1
                    conn.send(("done", job_id))

        try:
            async with asyncio.timeout(max(0.0, give_up - time.monotonic()) + 2):
                await asyncio.gather(*(slot() for _ in range(spec.concurrency)))
        except TimeoutError:
            report.gave_up = True  # jobs still held are lost: the harness counts them
        finally:
            report.cpu_s = time.process_time() - cpu
            async with asyncio.timeout(4):
                await limiter.aclose()


def _failed(report: WorkerReport, exc: Exception) -> bool:
    """Count a failed attempt at a job; True where the worker should pause before the next one."""
    if isinstance(exc, BudgetUnavailableError):
        report.unavailable += 1
        return True
    if isinstance(exc, AcquireTimeout):
        report.acquire_timeouts += 1
        return False
    key = f"{type(exc).__name__}: {str(exc)[:120]}"
    report.errors[key] = report.errors.get(key, 0) + 1
    return True


def _work_sync(conn: Any, spec: WorkerSpec, report: WorkerReport) -> None:
    """``_work`` for the sync front: one ``Limiter``, ``concurrency`` threads."""
    import httpx

    scenario = SCENARIOS[spec.scenario]
    inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
    sending = threading.Lock()

    def send(msg: tuple[Any, ...]) -> None:
        with sending:
            conn.send(msg)

    def read() -> None:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("stop",)
            inbox.put(msg)
            if msg[0] == "stop":
                return

    limiter = Limiter(fleet_budget(spec.budget_name, scenario), spec.redis_url, outage=spec.policy)
    limits = httpx.Limits(max_connections=spec.concurrency + 4, max_keepalive_connections=spec.concurrency + 4)
    try:
        with httpx.Client(base_url=spec.provider_url, timeout=30, limits=limits) as http:
            http.get("/stats")
            limiter.status()
            threading.Thread(target=read, name="chaos-inbox", daemon=True).start()
            send(("ready", spec.index, new_id().split(".")[0]))
            first = inbox.get(timeout=120)
            assert first[0] == "go", first
            give_up = float(first[1])
            cpu = time.process_time()
            counting = threading.Lock()  # the report is shared by the threads

            def run(job: Job) -> bool:
                while time.monotonic() < give_up:
                    with counting:
                        report.attempts += 1
                    try:
                        with limiter.acquire(tokens=job.estimate, timeout=ACQUIRE_TIMEOUT) as lease:
                            with counting:
                                report.grants.append((time.monotonic(), lease._limiter is limiter))
                            body = {"model": "sim", "messages": job.messages, "max_tokens": job.max_tokens}
                            reply = http.post("/v1/chat/completions", json=body)
                            seen = parse_limit_headers(reply.headers)
                            if reply.status_code == 429:
                                with counting:
                                    report.rejected += 1
                                lease.report(0, limit_requests=seen.request_limit, limit_tokens=seen.token_limit)
                                limiter.cooldown(retry_after=parse_retry_after(reply.headers))
                                continue
                            reply.raise_for_status()
                            lease.report(
                                actual_tokens=int(reply.json()["usage"]["total_tokens"]),
                                remaining_requests=seen.requests_remaining,
                                remaining_tokens=seen.tokens_remaining,
                                limit_requests=seen.request_limit,
                                limit_tokens=seen.token_limit,
                            )
                        return True
                    except Exception as exc:  # counted and tried again: the job must not be lost
                        with counting:
                            pause = _failed(report, exc)
                        if pause:
                            time.sleep(PAUSE)
                return False

            def slot() -> None:
                while time.monotonic() < give_up:
                    try:
                        msg = inbox.get(timeout=0.5)
                    except queue.Empty:
                        continue
                    if msg[0] == "stop":
                        inbox.put(msg)  # for the other threads
                        return
                    job_id = int(msg[1])
                    if run(make_job(job_id, spec.seed, scenario)):
                        with counting:
                            report.jobs += 1
                        send(("done", job_id))

            pool = [threading.Thread(target=slot, name=f"chaos-slot-{i}", daemon=True) for i in range(spec.concurrency)]
            for t in pool:
                t.start()
            for t in pool:
                t.join(timeout=max(0.0, give_up - time.monotonic()) + 2)
            report.gave_up = any(t.is_alive() for t in pool)
            report.cpu_s = time.process_time() - cpu
    finally:
        closing = threading.Thread(target=limiter.close, name="chaos-close", daemon=True)
        closing.start()
        closing.join(timeout=4)


# --------------------------------------------------------------------------------------------------
# Faults


@dataclass
class FaultTimes:
    """When the fault struck and when Redis answered again (monotonic; None: it never stopped)."""

    at: float = math.nan
    back: float | None = None
    detail: str = ""
    error: str = ""
    victim: int = -1  # the worker process killed


class Run:
    """One (scenario, fault, policy): its Redis (and proxy), the budget's name, the processes."""

    def __init__(
        self,
        redis_server: RedisServer,
        proxy: Proxy | None,
        group: Any,
        name: str,
        procs: list[Any],
        owners: list[str],
    ) -> None:
        self.redis = redis_server
        self.proxy = proxy
        self.group = group  # a SentinelGroup, for the sentinel fault
        self.name = name
        self.procs = procs
        self.owners = owners  # each process's prefix of lease ids

    def leases(self, owner: str = "") -> int:
        """Leases Redis holds for the budget now, of one process if ``owner`` (-1: no answer)."""
        try:
            port = self.redis.port if self.group is None else self.group.master_address()[1]
        except RuntimeError:  # no sentinel names a master
            return -1
        client = redis.Redis(port=port, socket_timeout=1, socket_connect_timeout=1)
        try:
            now = float(client.time()[0])
            ids = client.zrangebyscore(f"{{xflow:{self.name}}}:leases", f"({now}", "+inf")
            return sum(1 for i in ids if i.decode().startswith(owner))
        except redis.RedisError:
            return -1
        finally:
            client.close()


def inject(fault: str, run: Run, times: FaultTimes, abort: threading.Event) -> None:
    """Strike ``fault`` now (in the fault thread); every wait is bounded and ends early on ``abort``."""
    times.at = time.monotonic()
    if fault == "redis-kill":
        run.redis.kill()
        abort.wait(KILL_DOWN)
        if not abort.is_set():
            times.back = run.redis.start()
    elif fault == "redis-stop":
        run.redis.freeze()
        abort.wait(STOP_FOR)
        run.redis.thaw()
        times.back = run.redis.wait_answering(10.0)
    elif fault == "proxy-cut":
        assert run.proxy is not None
        times.detail = f"{run.proxy.cut()} connections reset"
        times.back = times.at  # Redis never stopped answering: recovery counts from the cut
    elif fault == "sentinel":
        assert run.group is not None
        with run.group.switches() as watcher:
            old, times.at = run.group.kill_master()
            times.back, new = watcher.wait(30.0)  # the promotion: Redis (a new master) answers again
        times.detail = f"master :{old[1]} killed; :{new[1]} promoted {times.back - times.at:.2f}s later"
    elif fault == "worker-kill":
        # the process holding the most leases (the worst case: its slots come back after the lease TTL)
        held = [run.leases(owner=owner + ".") for owner in run.owners]
        times.victim = max(range(len(held)), key=lambda i: (held[i], -i))
        os.kill(run.procs[times.victim].pid, signal.SIGKILL)
        times.detail = f"worker {times.victim} killed holding {held[times.victim]} of {sum(held)} leases"
    elif fault != "none":
        raise ValueError(f"no such fault: {fault}")


def fault_length(fault: str) -> float:
    return {"redis-kill": KILL_DOWN, "redis-stop": STOP_FOR, "sentinel": FAILOVER}.get(fault, 0.0)


def _sentinel_launcher() -> Any:
    tests = str(c.HERE.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    from _servers import SentinelGroup

    return SentinelGroup


def sentinel_group() -> Any:
    """A started ``SentinelGroup`` (``tests/_servers.py``, the suite's launcher: master, replica, three
    sentinels on loopback, failover in seconds)."""
    return _sentinel_launcher()().start()


def sentinel_support() -> str | None:
    """None where the Sentinel fault can run (the launcher and redis+sentinel:// URLs), else why not."""
    try:
        _sentinel_launcher()
        import xflow_dist._sentinel  # noqa: F401
    except ImportError as exc:
        return f"not run: {exc}"
    return None


# --------------------------------------------------------------------------------------------------
# The harness


@dataclass
class Options:
    processes: int
    concurrency: int
    quick: bool
    seed: int
    after: float  # seconds of run after the longest fault ends
    longest: float  # the longest fault among those run: every run of a scenario lasts as long
    front: str = "async"


def run_one(scenario: Scenario, fault: str, policy: str, opts: Options, binary: str, provider: str) -> dict[str, Any]:
    """One run, from a fresh Redis to the provider's ledger; everything it started is stopped."""
    ctx = c.spawn_context()
    fault_at = scenario.fault_at_quick if opts.quick else scenario.fault_at
    duration = fault_at + opts.longest + opts.after
    server = RedisServer(binary, free_port())
    proxy: Proxy | None = None
    group: Any = None
    procs: list[Any] = []
    conns: list[Any] = []
    abort = threading.Event()
    times = FaultTimes()
    striker: threading.Thread | None = None
    result: dict[str, Any] = {"scenario": scenario.name, "fault": fault, "policy": policy, "front": opts.front}
    try:
        if fault == "sentinel":
            group = sentinel_group()
            url = group.url
        else:
            server.start()
            url = server.url
        if fault == "proxy-cut":
            proxy = Proxy(server.port).start()
            url = proxy.url
        name = f"chaos-{uuid.uuid4().hex[:8]}"
        for i in range(opts.processes):
            parent, child = ctx.Pipe()
            spec = WorkerSpec(i, scenario.name, policy, opts.concurrency, url, provider, name, opts.seed, opts.front)
            proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
        owners = []
        for i, reply in enumerate(_gather(conns, procs, "ready", 90.0)):
            if reply[0] != "ready":
                raise RuntimeError(f"worker {i} did not get ready: {reply}")
            owners.append(reply[2])
        run = Run(server, proxy, group, name, procs, owners)
        reset_provider(provider)  # full buckets, a fresh ledger: the run starts now
        t0 = time.monotonic()
        ledger = _Ledger(opts.processes, opts.concurrency)
        for conn in conns:
            conn.send(("go", t0 + duration + GRACE - 8))

        def strike() -> None:
            try:
                inject(fault, run, times, abort)
            except Exception as exc:
                times.error = f"{type(exc).__name__}: {exc}"

        striker = threading.Thread(target=strike, name="chaos-fault", daemon=True)
        _dispatch(conns, procs, ledger, t0, t0 + fault_at, t0 + duration, t0 + duration + GRACE, striker)
        if striker.ident is not None:
            striker.join(timeout=STOP_FOR + 15)
        stats = fetch_stats(provider)
        result["leases_at_end"] = run.leases()
    finally:
        abort.set()
        if striker is not None and striker.ident is not None and striker.is_alive():
            striker.join(timeout=15)
        c.stop_workers(procs, timeout=5)
        for conn in conns:
            conn.close()
        if proxy is not None:
            proxy.stop()
        if group is not None:
            group.stop()
        server.close()
    result.update(_figures(scenario, fault, opts, stats, ledger, times, t0, t0 + duration))
    return result


def _gather(conns: list[Any], procs: list[Any], what: str, timeout: float) -> list[tuple[Any, ...]]:
    deadline = time.monotonic() + timeout
    replies: list[tuple[Any, ...]] = []
    for conn, proc in zip(conns, procs, strict=True):
        while not conn.poll(0.1):
            if time.monotonic() > deadline or not proc.is_alive():
                raise RuntimeError(f"a worker process did not get {what} (exit code {proc.exitcode})")
        msg = conn.recv()
        if msg[0] == "error":
            raise RuntimeError(f"a worker process failed: {msg[1]}")
        replies.append(msg)
    return replies


@dataclass
class _Ledger:
    """The harness's books: who holds which job, what completed, what was handed out again."""

    processes: int
    concurrency: int
    next_id: int = 0
    pending: deque[int] = field(default_factory=deque)
    holding: dict[int, dict[int, float]] = field(default_factory=dict)  # process -> job -> handed at
    done: set[int] = field(default_factory=set)
    longest_job: float = 0.0
    rerun: int = 0
    duplicates: int = 0
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    died: dict[int, int | None] = field(default_factory=dict)  # process -> exit code
    failures: list[str] = field(default_factory=list)
    stopped: bool = False
    hung: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.holding = {i: {} for i in range(self.processes)}


def _dispatch(
    conns: list[Any],
    procs: list[Any],
    ledger: _Ledger,
    t0: float,
    fault_at: float,
    end: float,
    deadline: float,
    striker: threading.Thread,
) -> None:
    """Keep every live process holding ``concurrency`` jobs until ``end``, strike the fault at
    ``fault_at``, then let the fleet finish what it holds and exit, until ``deadline`` at most."""
    live = set(range(len(procs)))  # alive and not yet said bye
    while live and time.monotonic() < deadline:
        now = time.monotonic()
        if now >= fault_at and striker.ident is None:
            striker.start()
        for i in sorted(live):
            held = ledger.holding[i]
            while not ledger.stopped and len(held) < ledger.concurrency:
                if ledger.pending:
                    job = ledger.pending.popleft()
                elif now < end:
                    job = ledger.next_id
                    ledger.next_id += 1
                else:
                    break
                try:
                    conns[i].send(("job", job))
                except OSError:
                    ledger.pending.appendleft(job)
                    break
                held[job] = now
        if not ledger.stopped and now >= end and not ledger.pending:
            ledger.stopped = True
            for i in live:
                with contextlib.suppress(OSError):
                    conns[i].send(("stop",))
        ready = wait_conns([conns[i] for i in live], timeout=0.05)
        for conn in ready:
            i = conns.index(conn)
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                msg = ("died",)
            if msg[0] == "done":
                handed = ledger.holding[i].pop(int(msg[1]), None)
                if int(msg[1]) in ledger.done:
                    ledger.duplicates += 1
                ledger.done.add(int(msg[1]))
                if handed is not None:
                    ledger.longest_job = max(ledger.longest_job, time.monotonic() - handed)
            elif msg[0] == "bye":
                ledger.reports[i] = msg[1]
                live.discard(i)
            elif msg[0] == "error":
                ledger.failures.append(f"worker {i}: {msg[1]}")
            elif msg[0] == "died":
                procs[i].join(timeout=5)
                ledger.died[i] = procs[i].exitcode
                live.discard(i)
                unfinished = [j for j in ledger.holding[i] if j not in ledger.done]
                ledger.holding[i] = {}
                ledger.pending.extend(unfinished)  # handed to the others: run again
                ledger.rerun += len(unfinished)
    ledger.hung = sorted(live)


def _per_second(offsets: list[float]) -> list[int]:
    counts = [0] * (int(max(offsets, default=-1)) + 1)
    for t in offsets:
        if t >= 0:
            counts[int(t)] += 1
    return counts


def _figures(
    scenario: Scenario,
    fault: str,
    opts: Options,
    stats: dict[str, Any],
    ledger: _Ledger,
    times: FaultTimes,
    t0: float,
    end: float,
) -> dict[str, Any]:
    limits = Limits(scenario.limits.rpm, scenario.limits.tpm, scenario.max_concurrency)
    makespan, _, _, use = judge(stats, limits, scenario.latency)
    requests = int(stats["requests"]["admitted"]) + int(stats["requests"]["rejected"])
    rejected = int(stats["requests"]["rejected"])
    handed = ledger.next_id
    lost = sorted(set(range(handed)) - ledger.done)
    reports = list(ledger.reports.values())
    grants = sorted(g for r in reports for g in r["grants"])
    first_back = all_back = math.nan
    ahead, pause_back = 0, math.nan
    if times.back is not None:
        shared_after = [t for t, shared in grants if shared and t >= times.back]
        first_back = shared_after[0] - times.back if shared_after else math.inf
        firsts = []
        for r in reports:
            mine = [t for t, shared in r["grants"] if shared and t >= times.back]
            firsts.append(mine[0] - times.back if mine else math.inf)
        all_back = max(firsts, default=math.nan)
        if math.isfinite(first_back) and math.isfinite(all_back):
            # how many grants the rest of the fleet had between the first grant back and the last
            # process's first: the tickets it was queued behind (its turn), not a stall
            ahead = sum(1 for t in shared_after if t < times.back + all_back)
            # the longest gap in the fleet's grants once the first came back: a stall would show here
            back = [times.back + first_back, *(t for t, _ in grants if times.back + first_back <= t <= end), end]
            pause_back = max((b - a for a, b in itertools.pairwise(back)), default=math.nan)
    # the longest time without a grant anywhere in the fleet, from the fault to the last new job
    window = [] if math.isnan(times.at) else [times.at, *(t for t, _ in grants if times.at <= t <= end), end]
    pause = max((b - a for a, b in itertools.pairwise(window)), default=math.nan)
    errors: Counter[str] = Counter()
    logs: Counter[str] = Counter()
    for r in reports:
        errors.update(r["errors"])
        logs.update(r["log"])
    expected_deaths = {times.victim} if fault == "worker-kill" else set()
    crashed = {i: code for i, code in ledger.died.items() if i not in expected_deaths}
    return {
        "requests": requests,
        "rejected": rejected,
        "rejected_from_fault": 0 if math.isnan(times.at) else sum(stats["series"]["rejected"][int(times.at - t0) :]),
        "rejected_share": rejected / requests if requests else 0.0,
        "rejected_by": stats["requests"]["rejected_by"],
        "over_admissions": int(stats["violations"]),
        "peak_window": stats["peak_window"],
        "peak_in_flight": int(stats["peak_in_flight"]),
        "max_concurrency": scenario.max_concurrency,
        "jobs_handed": handed,
        "jobs_done": len(ledger.done),
        "jobs_rerun": ledger.rerun,
        "jobs_done_twice": ledger.duplicates,
        "jobs_lost": len(lost),
        "lost_ids": lost[:20],
        "hangs": len(ledger.hung),
        "hung_processes": ledger.hung,
        "crashed_processes": crashed,
        "longest_job_s": ledger.longest_job,
        "fault_at_s": times.at - t0 if not math.isnan(times.at) else math.nan,
        "redis_back_s": (times.back - t0) if times.back is not None else None,
        "fault_detail": times.detail,
        "fault_error": times.error,
        "longest_pause_s": pause,
        "recovery_first_s": first_back,
        "recovery_all_s": all_back,
        "grants_before_last_back": ahead,
        "longest_pause_after_back_s": pause_back,
        "outage_grants": sum(1 for r in reports for _, shared in r["grants"] if not shared),
        "worker_cpu_s": sum(r["cpu_s"] for r in reports),
        "unavailable": sum(r["unavailable"] for r in reports),
        "acquire_timeouts": sum(r["acquire_timeouts"] for r in reports),
        "worker_errors": dict(errors),
        "library_log": dict(logs),
        "failures": ledger.failures,
        "makespan_s": makespan,
        "binding": scenario.binding,
        "utilisation": use.get(scenario.binding, math.nan),
        "utilisation_by": use,
        "series": stats.get("series", {}),
        "grants_per_s": _per_second([t - t0 for t, _ in grants]),
        "processes": [
            {
                "index": r["index"],
                "jobs": r["jobs"],
                "grants_shared": sum(1 for _, shared in r["grants"] if shared),
                "grants_outage": sum(1 for _, shared in r["grants"] if not shared),
                "gave_up": r["gave_up"],
                "cpu_s": r["cpu_s"],
                "log": r["log"],
            }
            for r in sorted(reports, key=lambda r: r["index"])
        ],
    }


# --------------------------------------------------------------------------------------------------
# Output


def _row(r: dict[str, Any], baseline: float | None) -> list[Any]:
    def secs(v: float | None) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return "never" if math.isinf(v) else f"{v:.2f}"

    util = r["utilisation"]
    return [
        r["scenario"],
        r["fault"],
        r["policy"],
        r["requests"],
        f"{r['rejected']} ({r['rejected_share']:.2%})",
        r["rejected_from_fault"],
        r["over_admissions"],
        f"{r['peak_in_flight']}/{r['max_concurrency']}",
        r["jobs_done"],
        r["jobs_rerun"],
        r["jobs_lost"],
        r["hangs"],
        secs(r["longest_pause_s"]),
        f"{secs(r['recovery_first_s'])} / {secs(r['recovery_all_s'])}",
        f"{util:.1%}",
        f"{util / baseline:.2f}x" if baseline else "-",
    ]


HEADERS = [
    "scenario", "fault", "policy", "requests", "429s", "429s from fault", "over-adm", "peak/max", "jobs", "re-run",
    "lost",
    "hangs", "longest pause s", "recovery s (first/all)", "util", "vs base",
]  # fmt: skip


def _markdown(rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    out += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _verdict(results: list[dict[str, Any]]) -> list[str]:
    lines = [f"FAILED RUN: {r['scenario']} {r['fault']} {r['policy']}: {r['error']}" for r in results if "error" in r]
    results = [r for r in results if "error" not in r]
    faulted = [r for r in results if r["fault"] != "none"]
    lost = sum(r["jobs_lost"] for r in results)
    hangs = sum(r["hangs"] for r in results)
    crashed = sum(len(r["crashed_processes"]) for r in results)
    lines.append(f"jobs lost: {lost} (goal 0); hangs: {hangs} (goal 0); processes crashed: {crashed}")
    for policy in POLICIES:
        mine = [r for r in faulted if r["policy"] == policy]
        if not mine:
            continue
        worst = max(mine, key=lambda r: r["rejected_share"])
        over = [r for r in mine if r["peak_in_flight"] > r["max_concurrency"]]
        first = [r["recovery_first_s"] for r in mine if not math.isnan(r["recovery_first_s"])]
        every = [r for r in mine if not math.isnan(r["recovery_all_s"])]
        last = max(every, key=lambda r: r["recovery_all_s"], default=None)
        stall = max((r["longest_pause_after_back_s"] for r in every), default=math.nan)
        lines.append(
            f"{policy}: worst 429 share {worst['rejected_share']:.2%} ({worst['scenario']} {worst['fault']}; "
            f"goal <= 0.5%); peak in flight over max_concurrency in {len(over)} of {len(mine)} runs; "
            f"slowest recovery to the first grant {max(first, default=math.nan):.2f}s (goal <= 2s), "
            f"to every process's {last['recovery_all_s'] if last else math.nan:.2f}s "
            f"(behind {last['grants_before_last_back'] if last else 0} grants to the others); longest pause in "
            f"grants once the first came back {stall:.2f}s"
        )
    return lines


# --------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a shorter run: the fault sooner, less time after it")
    ap.add_argument("--scenario", action="append", choices=tuple(SCENARIOS))
    ap.add_argument("--fault", action="append", choices=FAULTS[1:], help="faults to run (default: all)")
    ap.add_argument("--policy", action="append", choices=POLICIES, help="outage policies (default: all)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the run without a fault")
    ap.add_argument("--processes", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8, help="workers per process")
    ap.add_argument("--front", choices=("async", "sync"), default="async",
                    help="AsyncLimiter and coroutines (default), or Limiter and threads")  # fmt: skip
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    if args.processes < 2 and "worker-kill" in (args.fault or FAULTS):
        ap.error("worker-kill needs at least 2 processes")
    binary = find_redis_server()
    if binary is None:
        raise SystemExit("chaos: needs a redis-server binary (apt-get install redis-server)")
    faults = list(args.fault or FAULTS[1:])
    skipped: dict[str, str] = {}
    if "sentinel" in faults and (why := sentinel_support()) is not None:
        faults.remove("sentinel")
        skipped["sentinel"] = why
    policies = args.policy or list(POLICIES)
    opts = Options(
        processes=args.processes,
        concurrency=args.concurrency,
        quick=args.quick,
        seed=args.seed,
        after=4.0 if args.quick else 8.0,
        longest=max((fault_length(f) for f in faults), default=0.0),
        front=args.front,
    )
    signal.signal(signal.SIGTERM, _interrupt)
    faulthandler.register(signal.SIGUSR1)  # kill -USR1 <pid>: every thread's stack on stderr
    with _env_redis(binary) as env:
        c.print_environment(env)
    print(f"# fleet: {opts.processes} processes x {opts.concurrency} workers ({opts.front} front); "
          f"faults {', '.join(faults)}; "
          f"policies {', '.join(policies)}" + (" (quick)" if opts.quick else ""))  # fmt: skip
    for fault, why in skipped.items():
        print(f"# {fault}: {why}")
    results: list[dict[str, Any]] = []
    rows: list[list[Any]] = []
    started = time.monotonic()
    for name in args.scenario or list(SCENARIOS):
        scenario = SCENARIOS[name]
        print(
            f"# {name}: provider rpm {scenario.limits.rpm:g}, tpm {scenario.limits.tpm:g} (enforced), calls "
            f"{scenario.latency.base:g}s + {scenario.latency.per_token:g}s/token; budget rpm, tpm as the "
            f"provider's, max_concurrency {scenario.max_concurrency}, burst 60; binding: {scenario.binding}"
        )
        runs = [] if args.no_baseline else [("none", "local")]
        runs += [(f, p) for f in faults for p in policies]
        baseline: float | None = None
        with simulator_process(scenario.limits, scenario.latency, seed=args.seed) as provider:
            for fault, policy in runs:
                try:
                    r = run_one(scenario, fault, policy, opts, binary, provider)
                except Exception as exc:  # a harness failure: said, and the other runs go on
                    error = f"{type(exc).__name__}: {exc}"
                    results.append({"scenario": name, "fault": fault, "policy": policy, "error": error})
                    print(f"{name:<11} {fault:<11} {policy:<6} FAILED: {error}", flush=True)
                    continue
                results.append(r)
                if fault == "none":
                    baseline = r["utilisation"]
                rows.append(_row(r, baseline))
                print(_line(r), flush=True)
    print(f"\n# total {time.monotonic() - started:.0f}s\n")
    print(_markdown(rows))
    print()
    for line in _verdict(results):
        print(line)
    if args.json:
        c.write_json(args.json, {"environment": env, "options": asdict(opts), "skipped": skipped, "runs": results})
    return 1 if any("error" in r for r in results) else 0


def _line(r: dict[str, Any]) -> str:
    extra = []
    for key in ("unavailable", "acquire_timeouts", "outage_grants"):
        if r[key]:
            extra.append(f"{key} {r[key]}")
    if r["worker_errors"]:
        extra.append(f"errors {sum(r['worker_errors'].values())}")
    if r["crashed_processes"]:
        extra.append(f"crashed {r['crashed_processes']}")
    if r["fault_error"]:
        extra.append(f"fault failed: {r['fault_error']}")
    return (
        f"{r['scenario']:<11} {r['fault']:<11} {r['policy']:<6} requests {r['requests']:5d} "
        f"429s {r['rejected']:4d} ({r['rejected_share']:6.2%}) over {r['over_admissions']} "
        f"peak {r['peak_in_flight']}/{r['max_concurrency']} jobs {r['jobs_done']} rerun {r['jobs_rerun']} "
        f"lost {r['jobs_lost']} hangs {r['hangs']} pause {r['longest_pause_s']:.2f}s "
        f"recovery {r['recovery_first_s']:.2f}/{r['recovery_all_s']:.2f}s "
        f"(ahead {r['grants_before_last_back']}, then pause {r['longest_pause_after_back_s']:.2f}s) "
        f"util {r['utilisation']:.1%} cpu {r['worker_cpu_s']:.1f}s" + (" | " + ", ".join(extra) if extra else "")
    )


@contextlib.contextmanager
def _env_redis(binary: str) -> Iterator[dict[str, Any]]:
    server = RedisServer(binary, free_port())
    try:
        server.start()
        yield c.environment(server.url)
    finally:
        server.close()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: unwind like Ctrl-C, so that everything started is stopped


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started was stopped on the way out
        print("chaos: interrupted", file=sys.stderr)
        sys.exit(130)
