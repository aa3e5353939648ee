"""Enqueue a job list for the fleet and (with ``--wait``) report how it went: ``python -m workers.producer``.

Jobs come from a JSON-lines file (``{"prompt": ..., "max_tokens": ...}`` or ``{"messages": ...}``
per line) or are made up (``--jobs N``, deterministic by ``--seed``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xflow_dist.tools._fleet import make_jobs


def load_jobs(path: Path | None, count: int, seed: int) -> list[dict[str, Any]]:
    """Jobs from ``path`` (JSON lines), else ``count`` synthetic ones."""
    if path is not None:
        jobs = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                job = json.loads(line)
                job.setdefault("id", number)
                jobs.append(job)
        return jobs
    return [{"id": j.id, "prompt": j.prompt, "max_tokens": j.max_tokens} for j in make_jobs(count, seed=seed)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.producer", description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--jobs", type=int, default=300, help="synthetic jobs to make (default 300)")
    parser.add_argument("--file", type=Path, help="a JSON-lines job list instead")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("chat", "chat_baseline"), default="chat")
    parser.add_argument("--wait", action="store_true", help="wait for every result and report")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait at most (with --wait)")
    args = parser.parse_args(argv)

    from .app import app

    jobs = load_jobs(args.file, args.jobs, args.seed)
    started = time.monotonic()
    results = [app.send_task(f"workers.{args.task}", args=[job]) for job in jobs]
    print(f"enqueued {len(results)} jobs ({args.task}) in {time.monotonic() - started:.2f}s", flush=True)
    if not args.wait:
        return 0
    done = failed = tokens = 0
    deadline = time.monotonic() + args.timeout
    pending = list(results)
    while pending and time.monotonic() < deadline:
        still = []
        for result in pending:
            if not result.ready():
                still.append(result)
            elif result.successful():
                done += 1
                usage = (result.result or {}).get("usage") or {}
                tokens += int(usage.get("total_tokens", 0))
            else:
                failed += 1
                print(f"job failed: {result.result!r}", file=sys.stderr)
        pending = still
        if pending:
            time.sleep(0.5)
    elapsed = time.monotonic() - started
    print(f"done {done}, failed {failed}, pending {len(pending)}; {tokens} tokens in {elapsed:.1f}s", flush=True)
    return 0 if done == len(jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
