"""Shared by the benchmarks: a private redis-server, worker processes, Redis stats, tables, JSON.

Every benchmark starts its own ``redis-server`` (else ``valkey-server``: ``EmbeddedRedis`` with the
fakeredis fallback refused) on a free loopback port and stops it at the end; the environment line
says which server and version ran; none touches a Redis it did not start.
Worker processes are started with ``spawn`` so each builds its own clients and event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import platform
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

import xflow_dist
from xflow_dist.tools._demo import Latency
from xflow_dist.tools._embedded import EmbeddedRedis
from xflow_dist.tools._fleet import Limits

HERE = Path(__file__).resolve().parent

#: Commands sent by the benchmark harness itself (stats, setup); never counted against the limiter.
HARNESS_COMMANDS = frozenset({"info", "config|resetstat", "config|get", "config|set", "monitor", "flushall", "echo"})

#: Commands only a client can send: they are never run from inside a Lua script.
CLIENT_ONLY = frozenset(
    {
        "evalsha",
        "eval",
        "evalsha_ro",
        "eval_ro",
        "fcall",
        "script|load",
        "script|exists",
        "subscribe",
        "unsubscribe",
        "psubscribe",
        "punsubscribe",
        "blpop",
        "brpop",
        "blmove",
        "bzpopmin",
        "client|setinfo",
        "client|setname",
        "hello",
        "auth",
        "select",
        "quit",
        "reset",
    }
)


def start_redis() -> EmbeddedRedis:
    """A real server of our own (redis-server, else valkey-server); refuse the fakeredis fallback (its
    timings mean nothing)."""
    return EmbeddedRedis(allow_fake=False).start()


def spawn_context() -> Any:
    return multiprocessing.get_context("spawn")


def source_state() -> str:
    """The commit measured, and whether the library's code differed from it (uncommitted edits)."""
    root = HERE.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "lua", "xflow_dist"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.rstrip("\n")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    if not dirty:
        return head
    paths = sorted(line[3:] for line in dirty.splitlines() if line.strip())
    shown = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    digest = hashlib.sha1()
    for path in sorted([*root.glob("lua/*.lua"), *root.glob("xflow_dist/*.py")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{head} + uncommitted changes to {shown} (content fingerprint {digest.hexdigest()[:10]})"


def environment(url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(url)
    try:
        server = client.info("server")
    finally:
        client.close()
    valkey = server.get("valkey_version")  # Valkey also answers redis_version, 7.2.4, for compatibility
    return {
        "python": platform.python_version(),
        "redis_py": redis.__version__,
        "xflow_dist": xflow_dist.__version__,
        "server": f"valkey-server {valkey}" if valkey else f"redis-server {server.get('redis_version')}",
        "redis_server": None if valkey else server.get("redis_version"),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "source": source_state(),
    }


def print_environment(env: dict[str, Any]) -> None:
    print(
        f"# python {env['python']}, redis-py {env['redis_py']}, {env['server']}, "
        f"xflow-dist {env['xflow_dist']}, {env['cpus']} CPUs, {env['platform']}"
    )
    print(f"# xflow-dist source: {env['source']}")
    print(f"# load average at start: {' '.join(str(x) for x in env['load_average'])} (1, 5, 15 min)")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return math.nan
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2.0


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A plain fixed-width table: text left-aligned, numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [all(_is_number(r[i]) for r in cells[1:]) and len(cells) > 1 for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        parts = [c.rjust(w) if numeric[i] else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        if abs(v) >= 100:
            return f"{v:,.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", "").rstrip("x%"))
    except ValueError:
        return s == "-"
    return True


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if not path:
        return
    Path(path).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"# wrote {path}")


def commandstats(client: redis.Redis) -> dict[str, dict[str, float]]:
    """INFO commandstats as {"evalsha": {"calls": .., "usec": .., ...}}; subcommands as "config|get"."""
    raw = client.info("commandstats")
    return {
        name[len("cmdstat_") :].lower(): {k: float(v) for k, v in fields.items()}
        for name, fields in raw.items()
        if name.startswith("cmdstat_")
    }


def errorstats(client: redis.Redis) -> dict[str, int]:
    """INFO errorstats as {"ERR": count}: commands refused before they ran are only counted here."""
    raw = client.info("errorstats")
    return {name[len("errorstat_") :]: int(fields["count"]) for name, fields in raw.items()}


def redis_cpu(client: redis.Redis) -> float:
    """CPU seconds (user + sys) the redis-server process has used so far, main thread included."""
    info = client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def reset_stats(client: redis.Redis) -> None:
    client.execute_command("CONFIG", "RESETSTAT")


def lua_source(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def wait_all(conns: Sequence[Any], timeout: float, what: str) -> list[Any]:
    """One message from each pipe, or fail loudly after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    replies = []
    for conn in conns:
        left = deadline - time.monotonic()
        if left <= 0 or not conn.poll(left):
            raise SystemExit(f"benchmark: timed out after {timeout:g}s waiting for workers to {what}")
        try:
            msg = conn.recv()
        except EOFError:
            raise SystemExit(f"benchmark: a worker exited before it could {what} (see its traceback above)") from None
        if isinstance(msg, tuple) and msg and msg[0] == "error":
            raise SystemExit(f"benchmark: a worker failed: {msg[1]}")
        replies.append(msg)
    return replies


def stop_workers(procs: Sequence[Any], timeout: float = 10.0) -> None:
    """Join the workers we started; terminate (by handle, never by name) any that linger."""
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(2.0)


def report_error(conn: Any, exc: BaseException) -> None:
    """From a worker: tell the parent what went wrong (it stops waiting and exits non-zero)."""
    import traceback

    with contextlib.suppress(Exception):
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


@dataclass(frozen=True)
class Scenario:
    """One fleet run's provider and job list, shared by the fleet benchmarks."""

    name: str
    limits: Limits
    latency: Latency
    jobs: int
    prompt_tokens: tuple[int, int] = (50, 400)
    max_tokens: tuple[int, int] = (64, 384)
