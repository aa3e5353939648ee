"""Where acquire.lua spends its time inside Redis: the script with one part taken out at a time.

Profiling aid for throughput.py's server-bound figures. Each variant is the loaded acquire source
(prelude + acquire.lua) with acquire.lua's own calls of one prelude function made no-ops (a local
of the same name declared between the two shadows it), driven by redis-benchmark (``-c`` clients,
a fresh lease id per call, a fresh budget per run, every acquire granted at once) in interleaved
rounds:

  noop         benchmarks/noop.lua: TIME and a reply, the floor
  prelude      the prelude alone (budget block, TIME, local functions), then noop's reply
  floor        benchmarks/grant_floor.lua: only the work any grant must do (10 redis.call), not a limiter
  acquire      acquire as shipped
  -touch       without touch(): the keys' expiry (PEXPIRE of the keys this call may have made, of all six
               when the expiry moves)
  -save_state  without save_state(): HSET of the state hash
  -reap        without reap(): ZRANGEBYSCORE for expired leases
  -advance     without advance() (``-hand_over`` in older scripts): the queue's head, when empty

The cost of a part is the script's microseconds per call (INFO commandstats, measured inside Redis)
with it minus without it, from the medians of the rounds and from their minimums (the least
disturbed round: on a shared machine interference only ever adds time); differences of a few
microseconds are within the noise. Variants are measurement tools only: they are not correct limiters.
Also printed: the commands one shipped acquire runs, with their share of the time.

  python benchmarks/script_cost.py
  python benchmarks/script_cost.py --clients 8 --requests 20000 --rounds 7 --json out.json
"""

from __future__ import annotations

import argparse
import csv
import io
import shutil
import subprocess
import uuid
from typing import Any

import _common as c
import redis

from xflow_dist import Budget
from xflow_dist._core import acquire_args, budget_args, keys
from xflow_dist._scripts import lua_dir, source

#: Prelude functions acquire.lua calls at its top level, with what they cost in Redis commands.
ABLATIONS = {
    "touch": "the keys' expiry: PEXPIRE of the keys the call may have made",
    "save_state": "HSET of the state hash",
    "reap": "ZRANGEBYSCORE for expired leases",
    "hand_over": "the queue's head gets free slots (older name)",
    "advance": "the queue's head gets what fits",
}


def variants() -> tuple[dict[str, str], dict[str, str]]:
    """Source per variant, and what each removed part does."""
    prelude = (lua_dir() / "_prelude.lua").read_text(encoding="utf-8")
    op = (lua_dir() / "acquire.lua").read_text(encoding="utf-8")
    if source("acquire") != prelude + "\n" + op:
        raise SystemExit("script_cost: _scripts.source() no longer is prelude + acquire.lua; update this benchmark")
    out = {
        "noop": c.lua_source(c.HERE / "noop.lua"),
        "prelude": prelude + "\nlocal now = fmt(NOW)\nreturn {'granted', now, now, now}\n",
        "floor": c.lua_source(c.HERE / "grant_floor.lua"),
        "acquire": source("acquire"),
    }
    parts = {}
    for name, what in ABLATIONS.items():
        # A no-op local of the same name, declared between the prelude and acquire.lua, shadows the
        # prelude's function for acquire.lua's own calls (calls inside the prelude are unchanged).
        if f"local function {name}(" in prelude and f"{name}(" in op:
            out[f"-{name}"] = prelude + f"\nlocal function {name}() end\n" + op
            parts[f"-{name}"] = what
    return out, parts


def run(binary: str, admin: redis.Redis, port: str, sha: str, clients: int, requests: int) -> dict[str, float]:
    budget = Budget(f"bench-sc-{uuid.uuid4().hex[:8]}", rps=1e7, tps=1e10, max_concurrency=1_000_000, burst=60.0)
    argv = acquire_args("L__rand_int__", 1.0, 100.0, None, True, budget.lease_ttl)
    command = ["EVALSHA", sha, str(len(keys(budget))), *keys(budget), *budget_args(budget), *argv]
    c.reset_stats(admin)
    cpu0 = c.redis_cpu(admin)
    bench = [binary, "-h", "127.0.0.1", "-p", port, "-c", str(clients), "-n", str(requests), "-r", "1000000000"]
    out = subprocess.run(
        [*bench, "--csv", *command],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    cpu = c.redis_cpu(admin) - cpu0
    stats = c.commandstats(admin)
    row = list(csv.reader(io.StringIO(out.stdout)))[-1]
    return {
        "calls_per_s": float(row[1]),
        "script_usec": stats["evalsha"]["usec_per_call"],
        "redis_cpu_usec": cpu / requests * 1e6,
        "stats": stats,  # type: ignore[dict-item]
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=16, help="redis-benchmark connections (default 16)")
    ap.add_argument("--requests", type=int, default=5000, help="calls per run (default 5000)")
    ap.add_argument("--rounds", type=int, default=11, help="interleaved rounds; medians reported (default 11)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    if not 1 <= args.clients <= 64 or not 100 <= args.requests <= 200_000 or not 1 <= args.rounds <= 50:
        ap.error("--clients 1..64, --requests 100..200000, --rounds 1..50")
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise SystemExit("script_cost: needs redis-benchmark (apt-get install redis-tools)")

    srcs, parts = variants()
    server = c.start_redis()
    try:
        admin = redis.Redis.from_url(server.url)
        env = c.environment(server.url)
        c.print_environment(env)
        port = server.url.rsplit(":", 1)[1].split("/", 1)[0]
        shas = {name: admin.script_load(src) for name, src in srcs.items()}
        runs: dict[str, list[dict[str, Any]]] = {name: [] for name in srcs}
        names = list(srcs)
        for rnd in range(args.rounds):
            for name in names if rnd % 2 == 0 else names[::-1]:
                runs[name].append(run(binary, admin, port, shas[name], args.clients, args.requests))
        admin.close()
    finally:
        server.stop()

    print(
        f"# redis-benchmark -c {args.clients}, {args.requests} calls per run, {args.rounds} rounds interleaved; "
        "medians, and the least disturbed round (min)"
    )
    print()
    med = {name: c.median([r["script_usec"] for r in rs]) for name, rs in runs.items()}
    low = {name: min(r["script_usec"] for r in rs) for name, rs in runs.items()}
    rows = []
    for name, rs in runs.items():
        ablated = name.startswith("-")
        rows.append(
            [
                name,
                c.median([r["calls_per_s"] for r in rs]),
                med[name],
                low[name],
                med["acquire"] - med[name] if ablated else float("nan"),
                low["acquire"] - low[name] if ablated else float("nan"),
                c.median([r["redis_cpu_usec"] for r in rs]),
            ]
        )
    print(
        c.table(
            [
                "variant",
                "calls/s",
                "script us/call",
                "min us/call",
                "part's cost us",
                "(from mins)",
                "redis CPU us/call",
            ],
            rows,
        )
    )
    print()
    for name, what in parts.items():
        print(f"  {name}: acquire.lua without its calls of {name[1:]}() ({what})")

    # The commands one shipped acquire runs (from the acquire runs' commandstats).
    totals: dict[str, list[float]] = {}
    for r in runs["acquire"]:
        stats = r["stats"]
        n = stats["evalsha"]["calls"]
        for name, fields in stats.items():
            if name in c.HARNESS_COMMANDS or name == "evalsha":
                continue
            calls, usec = totals.setdefault(name, [0.0, 0.0])
            totals[name] = [calls + fields["calls"] / n, usec + fields["usec"] / n]
    k = len(runs["acquire"])
    inner = sorted(((name, v[0] / k, v[1] / k) for name, v in totals.items()), key=lambda t: -t[2])
    print()
    print(f"# inside one acquire (grant path): {sum(t[1] for t in inner):.0f} redis.call, of {med['acquire']:.1f} us")
    print()
    print(c.table(["command", "calls per acquire", "us per acquire"], [list(t) for t in inner]))
    print(
        f"  sum of command bodies: {sum(t[2] for t in inner):.1f} us; the rest is the EVALSHA itself, Lua and "
        "the redis.call bridge"
    )
    c.write_json(
        args.json,
        {
            "benchmark": "script_cost",
            "environment": env,
            "arguments": vars(args),
            "script_usec_median": med,
            "script_usec_min": low,
            "removed_parts": parts,
            "runs": {name: [{k2: v for k2, v in r.items() if k2 != "stats"} for r in rs] for name, rs in runs.items()},
            "inside_acquire": [{"command": t[0], "calls": t[1], "usec": t[2]} for t in inner],
        },
    )


if __name__ == "__main__":
    main()
