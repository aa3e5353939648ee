"""Fair sharing under load: priority classes (a saturating batch class and a light interactive class)
and tenant shares (three tenants weighing 1:2:5, and one alone) on one key.

The budget is the README's quickstart budget, verbatim (``rpm=500, tpm=200_000, burst=60``), with
two classes: ``priorities={"interactive": 10_000, "batch": 0}``. Each call costs 300 tokens, so
requests bind (one request every 120 ms).

  * ``--batch-procs`` processes of ``--threads`` threads each acquire as ``batch`` without pause,
    so the queue is never empty: they spend the initial burst first; the measured window starts
    once the bucket is empty.
  * one process makes ``interactive`` calls, each ``uniform(5, 15)`` request intervals after the
    previous one returned (a light class, about a tenth of the rate), and stamps how long each
    ``acquire()`` took (CLOCK_MONOTONIC, one clock for every process of the machine). Before each
    call it times a ``status()`` call: one script round trip under the same load.

Goals (issue 13): the interactive p99 wait within one request interval plus a Redis round trip (the
p99 of those timed calls); the batch class keeps at least 95 % of the rest of the rate (the rate
times the window, less the interactive grants in it). The same fleet on a budget without classes
runs first, as the baseline: there an interactive call waits behind the whole batch queue.

Tenants: the same budget with ``tenants={"a": 1, "b": 2, "c": 5}``, one process of ``--threads``
threads per tenant acquiring without pause. Where requests bind every call costs 300 tokens; where
tokens bind the calls are of 1,200 (a), 600 (b) and 900 (c) tokens, so that shares of calls and of
tokens differ; where slots bind the budget has ``max_concurrency=4`` and every call of 300 tokens
holds its slot 0.8 s (5 calls/s, under the rates), so the shares of the slots' time are those of
the calls. Goals: while all three are backlogged, each gets its weight's share of the binding
dimension within 2 points; tenant a alone uses at least 99 % of the rate. Each window opens once the
initial burst is spent.

  python benchmarks/fairness.py                  # classes: baseline 30 s, 120 s; tenants: 4 x 60 s
  python benchmarks/fairness.py --only tenants --tenant-seconds 30 --json out.json
"""

from __future__ import annotations

import argparse
import random
import threading
import time
import uuid
from typing import Any

import _common as c

from xflow_dist import AcquireTimeout, Budget, Limiter

RPM, TPM, BURST = 500, 200_000, 60  # the README's quickstart budget, and its recommended burst
COST = 300  # tokens a call: 150,000 a minute at the full request rate, so requests bind
CLASSES = {"interactive": 10_000, "batch": 0}
WEIGHTS = {"a": 1, "b": 2, "c": 5}
SIZES = {
    "requests": {"a": 300, "b": 300, "c": 300},
    "tokens": {"a": 1200, "b": 600, "c": 900},
    "slots": {"a": 300, "b": 300, "c": 300},
}
SLOTS, HOLD = 4, 0.8  # where slots bind: 4 of them, each call holding one 0.8 s (5 calls/s, under the rates)


def tenant_budget(name: str, binding: str) -> Budget:
    """The quickstart budget shared by tenant; where slots bind, with ``SLOTS`` of them."""
    slots = SLOTS if binding == "slots" else None
    return Budget(name, rpm=RPM, tpm=TPM, burst=BURST, tenants=WEIGHTS, max_concurrency=slots)


def make_budget(name: str, classes: bool) -> Budget:
    return Budget(name, rpm=RPM, tpm=TPM, burst=BURST, priorities=CLASSES if classes else None)


def _over(stop: Any) -> bool:
    """The window closed: ``stop`` holds its end (monotonic) once it opened, 0 before."""
    at = stop.value
    return bool(at) and time.monotonic() >= at


def _backlog(
    lim: Limiter,
    stop: Any,
    tokens: int,
    threads: int,
    before: float,
    priority: str | None = None,
    tenant: str | None = None,
    hold: float = 0.0,
) -> tuple[list[tuple[float, int]], list[float]]:
    """Acquire ``tokens`` as ``priority`` and ``tenant`` back to back from ``threads`` threads until the window
    closes, each call waiting at most ``before`` seconds while it has not opened and holding its lease
    ``hold`` seconds: every grant's time and tokens, and the times of the calls that timed out."""
    grants: list[tuple[float, int]] = []
    gave_up: list[float] = []
    lock = threading.Lock()

    def loop() -> None:
        while not _over(stop):
            left = stop.value - time.monotonic() if stop.value else before
            try:
                lease = lim.acquire(tokens=tokens, timeout=max(0.001, left), priority=priority, tenant=tenant)
            except AcquireTimeout:  # the window closed, or it has not opened yet: look again
                with lock:
                    gave_up.append(time.monotonic())
                continue
            with lock:
                grants.append((time.monotonic(), tokens))
            if hold:
                time.sleep(hold)  # the call's length: what holds the slot
            lease.release()

    pool = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(timeout=1800 + 120)
    return grants, gave_up


def batch_worker(conn: Any, url: str, name: str, classes: bool, threads: int, stop: Any) -> None:
    """Acquire as batch, back to back, from ``threads`` threads until the window closes."""
    try:
        with Limiter(make_budget(name, classes), url) as lim:
            grants, _ = _backlog(lim, stop, COST, threads, 5.0, priority="batch" if classes else None)
        conn.send(("batch", [at for at, _ in grants]))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def interactive_worker(conn: Any, url: str, name: str, classes: bool, stop: Any, seed: int) -> None:
    """Light interactive calls while the window is open."""
    try:
        rng = random.Random(seed)
        interval = 60.0 / RPM
        samples: list[tuple[float, float, float]] = []  # (asked, granted, status round trip)
        priority = "interactive" if classes else None
        with Limiter(make_budget(name, classes), url) as lim:
            lim.status()  # connected and subscribed-ready before the window
            for _ in range(60_000):  # until the window opens (at most 600 s)
                if stop.value:
                    break
                time.sleep(0.01)
            while True:
                time.sleep(rng.uniform(5, 15) * interval)
                if _over(stop):
                    break
                before = time.monotonic()
                lim.status()
                asked = time.monotonic()
                with lim.acquire(tokens=COST, priority=priority, timeout=120):
                    granted = time.monotonic()
                samples.append((asked, granted, asked - before))
        conn.send(("interactive", samples))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def run(url: str, classes: bool, seconds: float, batch_procs: int, threads: int, seed: int) -> dict[str, Any]:
    ctx = c.spawn_context()
    name = f"bench-fair-{uuid.uuid4().hex[:8]}"
    watch = Limiter(make_budget(name, classes), url)
    stop = ctx.Value("d", 0.0)  # the window's end (monotonic), set when it opens
    conns, procs = [], []
    try:
        for i in range(batch_procs + 1):
            parent, child = ctx.Pipe()
            if i < batch_procs:
                p = ctx.Process(target=batch_worker, args=(child, url, name, classes, threads, stop))
            else:
                p = ctx.Process(target=interactive_worker, args=(child, url, name, classes, stop, seed))
            p.start()
            conns.append(parent)
            procs.append(p)
        for _ in range(6000):  # the initial burst spent: the window opens on an empty bucket
            s = watch.status()
            if s.requests_available is not None and s.requests_available < 1 and s.queued >= batch_procs:
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the batch class never drained the burst")
        opened = time.monotonic()
        closed = opened + seconds
        stop.value = closed
        results = c.wait_all(conns, timeout=seconds + 180, what="report their figures")
    finally:
        watch.close()
        c.stop_workers(procs)
    batch = [t for kind, grants in results if kind == "batch" for t in grants]
    samples = [s for kind, got in results if kind == "interactive" for s in got]
    window = closed - opened
    interactive_in = sum(1 for asked, granted, _ in samples if opened <= granted <= closed)
    batch_in = sum(1 for t in batch if opened <= t <= closed)
    rest = RPM / 60.0 * window - interactive_in
    waits = [(granted - asked) * 1000 for asked, granted, _ in samples]
    rtts = [rtt * 1000 for _, _, rtt in samples]
    interval_ms = 60_000 / RPM
    return {
        "classes": classes,
        "window_s": round(window, 3),
        "interactive_calls": len(samples),
        "interactive_wait_ms": {
            "median": c.median(waits),
            "p90": c.percentile(waits, 90),
            "p99": c.percentile(waits, 99),
            "max": max(waits) if waits else float("nan"),
        },
        "round_trip_ms": {"median": c.median(rtts), "p99": c.percentile(rtts, 99)},
        "goal_ms": interval_ms + c.percentile(rtts, 99),
        "over_goal": sum(1 for w in waits if w > interval_ms + c.percentile(rtts, 99)),
        "batch_grants": batch_in,
        "interactive_grants": interactive_in,
        "batch_share_of_rest": batch_in / rest if rest > 0 else float("nan"),
        "utilisation": (batch_in + interactive_in) / (RPM / 60.0 * window),
        "waits_ms": waits,
    }


def tenant_worker(
    conn: Any, url: str, name: str, binding: str, tenant: str, tokens: int, threads: int, stop: Any
) -> None:
    """Acquire as ``tenant``, ``tokens`` a call, back to back from ``threads`` threads, until the
    window closes: every grant's time and tokens. No call gives up before the window closes (a
    ticket given up still costs its tenant its turn: see docs/concepts/waiting.md), and any that
    timed out is counted."""
    try:
        hold = HOLD if binding == "slots" else 0.0
        with Limiter(tenant_budget(name, binding), url) as lim:
            # before the window opens, a wait as long as the whole run may be
            grants, gave_up = _backlog(lim, stop, tokens, threads, 1800.0, tenant=tenant, hold=hold)
        conn.send((tenant, grants, gave_up))
    except BaseException as exc:
        c.report_error(conn, exc)
        raise


def run_tenants(url: str, binding: str, tenants: str, seconds: float, threads: int) -> dict[str, Any]:
    """``tenants`` backlogged (one process each) with the call sizes of ``binding``: what each got."""
    ctx = c.spawn_context()
    name = f"bench-tenants-{uuid.uuid4().hex[:8]}"
    sizes = SIZES[binding]
    watch = Limiter(tenant_budget(name, binding), url)
    stop = ctx.Value("d", 0.0)
    conns, procs = [], []
    try:
        for tenant in tenants:
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=tenant_worker, args=(child, url, name, binding, tenant, sizes[tenant], threads, stop)
            )
            p.start()
            conns.append(parent)
            procs.append(p)
        smallest = min(sizes[t] for t in tenants)
        for _ in range(6000):  # the initial burst spent (the binding bucket, or every slot held): the window opens
            st = watch.status()
            spent = (st.requests_available or 0) < 1 or (st.tokens_available or 0) < smallest
            if binding == "slots":
                spent = st.in_flight >= SLOTS
            if spent and st.queued >= len(tenants):
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the tenants never drained the burst")
        opened = time.monotonic()
        closed = opened + seconds
        stop.value = closed
        results = c.wait_all(conns, timeout=seconds + 180, what="report their grants")
    finally:
        watch.close()
        c.stop_workers(procs)
    window = closed - opened
    used: dict[str, dict[str, float]] = {}
    gave_up: dict[str, int] = {}
    times: dict[str, list[float]] = {}  # every grant, seconds from the window's opening
    for tenant, grants, quits in results:
        inside = [(at, n) for at, n in grants if opened <= at <= closed]
        used[tenant] = {"requests": float(len(inside)), "tokens": float(sum(n for _, n in inside))}
        gave_up[tenant] = sum(1 for at in quits if at < closed)
        times[tenant] = sorted(round(at - opened, 4) for at, _ in grants)
    # where slots bind every call holds one for HOLD seconds: shares of the slots' time are those of the calls
    dim = "requests" if binding == "slots" else binding
    total = sum(u[dim] for u in used.values())
    weight = sum(WEIGHTS[t] for t in tenants)
    rate = SLOTS / HOLD if binding == "slots" else (RPM if dim == "requests" else TPM) / 60.0
    return {
        "binding": binding,
        "tenants": tenants,
        "window_s": round(window, 3),
        "used": used,
        "gave_up": gave_up,
        "shares": {t: used[t][dim] / total if total else float("nan") for t in tenants},
        "want": {t: WEIGHTS[t] / weight for t in tenants},
        "utilisation": total / (rate * window),
        "grant_times": times,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="measured window with classes (default 120)")
    ap.add_argument("--baseline-seconds", type=float, default=30.0, help="window without classes (default 30)")
    ap.add_argument("--batch-procs", type=int, default=3, help="batch processes (default 3)")
    ap.add_argument("--threads", type=int, default=8, help="threads per batch process (default 8)")
    ap.add_argument("--seed", type=int, default=13, help="the interactive arrivals' seed (default 13)")
    ap.add_argument("--tenant-seconds", type=float, default=60.0, help="each tenants window (default 60)")
    ap.add_argument("--only", choices=("classes", "tenants", "both"), default="both", help="which part to run")
    ap.add_argument("--json", metavar="FILE", help="also write the figures (and every wait) as JSON")
    args = ap.parse_args()
    if not (5 <= args.seconds <= 1800 and 5 <= args.baseline_seconds <= 1800 and 5 <= args.tenant_seconds <= 1800):
        ap.error("--seconds, --baseline-seconds and --tenant-seconds: 5..1800")
    if not (1 <= args.batch_procs <= 16 and 1 <= args.threads <= 64):
        ap.error("--batch-procs 1..16, --threads 1..64")

    server = c.start_redis()
    payload: dict[str, Any] = {}
    try:
        env = c.environment(server.url)
        payload["environment"] = env
        c.print_environment(env)
        if args.only in ("classes", "both"):
            print(
                f"# Budget(rpm={RPM}, tpm={TPM:,}, burst={BURST}), {COST} tokens a call (requests bind: one every "
                f"{60_000 / RPM:.0f} ms); {args.batch_procs} batch processes x {args.threads} threads back to back, "
                "1 interactive process, a call every uniform(5, 15) intervals"
            )
            baseline = run(server.url, False, args.baseline_seconds, args.batch_procs, args.threads, args.seed)
            ranked = run(server.url, True, args.seconds, args.batch_procs, args.threads, args.seed)
            report_classes(baseline, ranked)
            payload.update(baseline=baseline, classes=ranked)
        if args.only in ("tenants", "both"):
            print()
            print(
                f"# Budget(rpm={RPM}, tpm={TPM:,}, burst={BURST}, tenants={WEIGHTS}); one process of "
                f"{args.threads} threads per tenant back to back; calls of {SIZES['requests']['a']} tokens where "
                f"requests bind, of {SIZES['tokens']} tokens where tokens bind; where slots bind, "
                f"max_concurrency={SLOTS} and each call holds its slot {HOLD:g} s; {args.tenant_seconds:g} s windows"
            )
            runs = [
                run_tenants(server.url, "requests", "abc", args.tenant_seconds, args.threads),
                run_tenants(server.url, "tokens", "abc", args.tenant_seconds, args.threads),
                run_tenants(server.url, "slots", "abc", args.tenant_seconds, args.threads),
                run_tenants(server.url, "requests", "a", args.tenant_seconds, args.threads),
            ]
            report_tenants(runs)
            payload["tenants"] = runs
    finally:
        server.stop()
    c.write_json(args.json, payload)


def report_classes(baseline: dict[str, Any], ranked: dict[str, Any]) -> None:
    print()
    rows = []
    for r in (baseline, ranked):
        w = r["interactive_wait_ms"]
        rows.append(
            [
                "classes" if r["classes"] else "one FIFO queue (baseline)",
                r["window_s"],
                r["interactive_calls"],
                w["median"],
                w["p90"],
                w["p99"],
                w["max"],
                r["round_trip_ms"]["p99"],
                f"{100 * r['batch_share_of_rest']:.1f} %",
                f"{100 * r['utilisation']:.1f} %",
            ]
        )
    print(
        c.table(
            [
                "queue",
                "window s",
                "interactive calls",
                "wait median ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                "round trip p99 ms",
                "batch share of the rest",
                "utilisation",
            ],
            rows,
        )
    )
    print()
    p99, goal = ranked["interactive_wait_ms"]["p99"], ranked["goal_ms"]
    share = ranked["batch_share_of_rest"]
    ratio = baseline["interactive_wait_ms"]["p99"] / p99 if p99 > 0 else float("nan")
    met = "met" if p99 <= goal else "MISSED"
    print(f"# interactive p99 wait {p99:.1f} ms, goal {goal:.1f} ms (an interval + a round trip's p99): {met}")
    print(f"#   {ranked['over_goal']} of {ranked['interactive_calls']} calls over it")
    kept = "met" if share >= 0.95 else "MISSED"
    print(f"# batch keeps {100 * share:.1f} % of the rest of the rate (goal >= 95 %): {kept}")
    print(f"# the baseline's interactive p99 is {ratio:.1f}x the classes' (same fleet, one FIFO queue)")


def report_tenants(runs: list[dict[str, Any]]) -> None:
    print()
    rows = []
    for r in runs:
        for t in r["tenants"]:
            u = r["used"][t]
            rows.append(
                [
                    f"{r['binding']} bind" + ("" if len(r["tenants"]) > 1 else ", alone"),
                    t,
                    WEIGHTS[t],
                    int(u["requests"]),
                    int(u["tokens"]),
                    f"{100 * r['shares'][t]:.1f} %",
                    f"{100 * r['want'][t]:.1f} %",
                    f"{100 * (r['shares'][t] - r['want'][t]):+.1f}",
                    f"{100 * r['utilisation']:.1f} %",
                    r["gave_up"][t],
                ]
            )
    print(
        c.table(
            ["run", "tenant", "weight", "requests", "tokens", "share of the binding", "its weight's", "points off",
             "utilisation", "timed out"],
            rows,
        )
    )  # fmt: skip
    print()
    off = max(abs(r["shares"][t] - r["want"][t]) for r in runs if len(r["tenants"]) > 1 for t in r["tenants"])
    alone = [r for r in runs if len(r["tenants"]) == 1]
    print(f"# every backlogged tenant within {100 * off:.1f} points of its share (goal 2): "
          f"{'met' if off <= 0.02 else 'MISSED'}")  # fmt: skip
    for r in alone:
        print(f"# tenant {r['tenants']} alone: {100 * r['utilisation']:.1f} % of the rate (goal >= 99 %): "
              f"{'met' if r['utilisation'] >= 0.99 else 'MISSED'}")  # fmt: skip


if __name__ == "__main__":
    main()
