"""Start N Celery worker nodes of ``workers.app`` and keep them running: ``python -m workers.fleet``.

Each node is one ``celery worker`` process with its own pool (``--concurrency`` children for
prefork), as if each ran on a host of its own; all share the budget through Redis. Ctrl-C or
SIGTERM asks every node for a warm shutdown (running tasks finish), then kills what is left.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def node_command(
    index: int,
    *,
    concurrency: int = 4,
    pool: str = "prefork",
    loglevel: str = "warning",
    app: str = "workers.app",
) -> list[str]:
    """The command of node ``index``: a ``celery worker`` with a name of its own."""
    return [
        sys.executable, "-m", "celery", "-A", app, "worker",
        "--pool", pool, "--concurrency", str(concurrency), "--hostname", f"xflow{index}@%h",
        "--loglevel", loglevel, "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]  # fmt: skip


def node_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a node: this one, the checkout importable, and ``extra``."""
    env = {**os.environ, **(extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def start_nodes(
    count: int,
    *,
    concurrency: int,
    pool: str,
    loglevel: str,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> list[subprocess.Popen[bytes]]:
    """Start ``count`` nodes, each in a session of its own (so that a node and its children can be
    signalled together). ``quiet`` drops their standard output (the banner); logs go to stderr."""
    return [
        subprocess.Popen(
            node_command(i, concurrency=concurrency, pool=pool, loglevel=loglevel),
            env=node_env(env),
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL if quiet else None,
        )
        for i in range(count)
    ]


def stop_nodes(nodes: Sequence[subprocess.Popen[bytes]], *, grace: float = 30.0) -> None:
    """Warm shutdown (SIGTERM to each node), then SIGKILL to the process groups still alive."""
    for node in nodes:
        if node.poll() is None:
            node.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for node in nodes:
        try:
            node.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.fleet", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--nodes", type=int, default=2, help="worker nodes (default 2)")
    parser.add_argument("-c", "--concurrency", type=int, default=4, help="pool size of each node (default 4)")
    parser.add_argument("--pool", choices=("prefork", "threads", "solo"), default="prefork")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.concurrency < 1:
        parser.error("--nodes and --concurrency must be at least 1")
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    nodes = start_nodes(args.nodes, concurrency=args.concurrency, pool=args.pool, loglevel=args.loglevel)
    print(f"started {args.nodes} nodes x {args.concurrency} ({args.pool}): pids {[n.pid for n in nodes]}", flush=True)
    try:
        while not stop and all(n.poll() is None for n in nodes):
            time.sleep(0.5)
    finally:
        stop_nodes(nodes)
    codes = [n.returncode for n in nodes]
    print(f"nodes stopped: exit codes {codes}", flush=True)
    return 0 if stop else 1


if __name__ == "__main__":
    sys.exit(main())
