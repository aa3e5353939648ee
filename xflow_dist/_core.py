"""The I/O-free core shared by both fronts: key names, script arguments, replies, validation."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._budget import MAX_SECONDS, MAX_UNITS, Budget, CooldownPolicy, Level, most_per_call
from ._exceptions import (
    BackendError,
    BudgetConflictError,
    CostTooLargeError,
    InvalidCostError,
    ScriptArgumentError,
    XflowError,
)

#: Seconds the keys of a budget outlive the last thing they still have to remember.
IDLE_GRACE = 10.0

#: Seconds a limit learned from the provider is remembered after its last report (then forgotten).
LEARN_MEMORY = 3600.0


def keys(budget: Budget) -> list[str]:
    """The eight keys of a budget, in the order every script expects (see ``lua/_prelude.lua``)."""
    return key_names(budget.name)


def key_names(name: str) -> list[str]:
    """``keys`` of the budget called ``name``."""
    tag = f"{{xflow:{name}}}"
    return [
        f"{tag}:state",
        f"{tag}:leases",
        f"{tag}:lease_data",
        f"{tag}:queue",
        f"{tag}:tickets",
        f"{tag}:learned",
        f"{tag}:tenants",
        f"{tag}:caps",
    ]


def channel(budget: Budget) -> str:
    """The pub/sub channel on which grants to queued tickets and cooldowns are announced."""
    return f"{{xflow:{budget.name}}}:events"


def budget_args(budget: Budget, seen: bool = False, give_up: float = 0.0) -> list[str]:
    """ARGV[1..11], the budget block every script starts with; ``seen``: the caller knows the budget's
    keys cannot have expired, so that their absence means they were lost; ``give_up``: the Redis time
    after which the caller no longer waits for the reply, 0 for none (see ``lua/_prelude.lua``)."""
    return [
        _num(budget.request_rate or 0.0),
        _num(budget.credit),
        _num(budget.token_rate or 0.0),
        _num(budget.credit),
        str(budget.max_concurrency or 0),
        _num(budget.lease_ttl),
        _num(IDLE_GRACE),
        channel(budget),
        _num(min(budget.claim_window, budget.lease_ttl)),
        "1" if seen else "0",
        moment(give_up),
    ]


def moment(t: float) -> str:
    """A moment of Redis time as the scripts take it: ``0`` for none."""
    return f"{t:.6f}" if t > 0 else "0"


#: Where each script's reply holds the Redis time it ran at (``now``).
NOW_AT = {
    "acquire": 2,
    "settle": 2,
    "cancel": 1,
    "extend": 2,
    "rejoin": 1,
    "renew": 0,
    "cooldown": 2,
    "clear_cooldown": 2,
    "configure": 1,
    "status": 0,
}


def _num(x: float) -> str:
    return repr(float(x))


def validate_cost(budget: Budget, requests: float, tokens: float) -> tuple[float, float]:
    """Refuse a cost that is not a finite non-negative number or that can never fit."""
    for what, value in (("requests", requests), ("tokens", tokens)):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidCostError(f"{what} must be a number, not {value!r}", budget=budget.name)
        if math.isnan(value) or math.isinf(value) or value < 0 or value > MAX_UNITS:
            raise InvalidCostError(
                f"{what} must be finite, zero or more and at most {MAX_UNITS:g}, not {value!r}", budget=budget.name
            )
    if budget.overdraft:  # any cost is granted once the buckets are out of debt
        return float(requests), float(tokens)
    if tokens > budget.max_tokens_per_request:
        raise CostTooLargeError(
            f"{tokens:g} tokens can never fit budget {budget.name!r}: it grants at most "
            f"{budget.max_tokens_per_request:g} tokens to one request",
            budget=budget.name,
        )
    if requests > budget.max_requests_per_acquire:
        raise CostTooLargeError(
            f"{requests:g} requests can never fit budget {budget.name!r}: it grants at most "
            f"{budget.max_requests_per_acquire:g} at once",
            budget=budget.name,
        )
    return float(requests), float(tokens)


class Place(NamedTuple):
    """Where a call goes in the queue: its priority class's lead, and its tenant with the tenant's
    weight (0: the budget is not shared by tenant) and the caps its path passes. Checked by
    ``place_of`` before Redis is touched."""

    lead: int = 0
    tenant: str = ""
    weight: float = 0.0
    levels: tuple[Level, ...] = ()
    reserve: bool = False  # the top class with a lead: granted now for its fit time (see acquire.lua)
    book: bool = False  # queued, reserved for its fit time at the head shortly before (see acquire.lua)


#: A call of a budget with no classes, tenant shares or caps: first come, first served, booked once queued.
ANYWHERE = Place(book=True)


def place_of(budget: Budget, priority: str | None, tenant: str | None) -> Place:
    """The place of a call of class ``priority`` by ``tenant`` (None: the budget's defaults)."""
    if priority is None and tenant is None and budget.priorities is None and budget.tenants is None:
        return ANYWHERE  # (the compatible schedulers' hot path: no lookup)
    weight = budget.weight(tenant)
    levels = budget.levels(tenant)
    lead = budget.lead(priority)
    reserve = lead > 0 and budget.priorities is not None and lead == max(budget.priorities.values())
    book = budget.priorities is None and not weight and not levels  # (see acquire.lua: no class passes it)
    return Place(lead, tenant or "" if weight or levels else "", weight, levels, reserve, book)


def check_levels(budget: Budget, place: Place, requests: float, tokens: float) -> None:
    """Refuse a cost one of the call's caps can never hold (as ``validate_cost`` does the budget's)."""
    if budget.overdraft:
        return
    for lv in place.levels:
        for what, cost, rate, burst, floor in (
            ("requests", requests, lv.request_rate, lv.request_burst, 1.0),
            ("tokens", tokens, lv.token_rate, lv.token_burst, 0.0),
        ):
            most = most_per_call(rate, burst, floor)
            if rate > 0 and cost > most:
                raise CostTooLargeError(
                    f"{cost:g} {what} can never fit the cap of {lv.node!r} under budget {budget.name!r}: it grants "
                    f"at most {most:g} {what} to one call",
                    budget=budget.name,
                )


def acquire_args(
    lease_id: str,
    requests: float,
    tokens: float,
    max_wait: float | None,
    may_queue: bool,
    ticket_ttl: float,
    probe: bool = False,
    overdraft: bool = False,
    lead: int = 0,
    tenant: str = "",
    weight: float = 0.0,
    levels: tuple[Level, ...] = (),
    reserve: bool = False,
    book: bool = False,
) -> list[str]:
    """The operation arguments of ``acquire.lua``; a max wait beyond the scripts' bound is no bound at
    all. A priority class's ``lead``, a ``tenant`` with its ``weight`` (a budget shared by tenant), the
    caps it passes, ``reserve`` and ``book`` are sent only when there are some (ARGV[19..] are
    optional); ``book`` only where the call may queue."""
    book = book and may_queue
    args = [
        lease_id,
        _num(requests),
        _num(tokens),
        "-1" if max_wait is None or max_wait > MAX_SECONDS else _num(max(0.0, max_wait)),
        "1" if may_queue else "0",
        _num(ticket_ttl),
        "1" if probe else "0",
        "1" if overdraft else "0",
    ]
    if lead or weight or levels or reserve or book:
        args.append(str(lead))
    if weight or levels or reserve or book:
        args += [tenant, _num(weight)]
    if levels or reserve or book:
        args += level_args(levels)
    if reserve or book:
        args.append("1" if reserve else "0")
    if book:
        args.append("1")
    return args


def level_args(levels: tuple[Level, ...]) -> list[str]:
    """The caps a call passes as ``acquire.lua`` and ``rejoin.lua`` take them: their count, then six
    arguments each."""
    args = [str(len(levels))]
    for lv in levels:
        args += [lv.node, _num(lv.request_rate), _num(lv.request_burst), _num(lv.token_rate),
                 _num(lv.token_burst), str(lv.max_concurrency)]  # fmt: skip
    return args


def _opt(x: float | None) -> str:
    return "-1" if x is None else _num(x)


def settle_args(
    lease_id: str,
    actual_tokens: float | None,
    remaining_requests: float | None = None,
    remaining_tokens: float | None = None,
    limit_requests: float | None = None,
    limit_tokens: float | None = None,
    memory: float = LEARN_MEMORY,
    model: str = "",
) -> list[str]:
    """ARGV[10..17] of ``settle.lua``: the usage, what the provider said it had left and its limits
    (per minute), learned for ``model`` (each model's own limits; the tightest live one is in force).
    ``lease_id=""`` only learns (``limiter.learn``)."""
    return [
        lease_id,
        _opt(actual_tokens),
        _opt(remaining_requests),
        _opt(remaining_tokens),
        _opt(limit_requests),
        _opt(limit_tokens),
        _num(memory),
        model,
    ]


def cooldown_args(policy: CooldownPolicy, retry_after: float | None, draw: float | None = None) -> list[str]:
    """ARGV[10..16] of ``cooldown.lua``; the jitter draw is made here so scripts stay deterministic."""
    return [
        "-1" if retry_after is None else _num(retry_after),
        _num(policy.base),
        _num(policy.max_backoff),
        _num(policy.quiet),
        _num(policy.jitter),
        _num(random.random() if draw is None else draw),
        _num(policy.max_pause),
    ]


def validate_retry_after(budget: Budget, retry_after: float | None) -> float | None:
    if retry_after is None:
        return None
    if isinstance(retry_after, bool) or not isinstance(retry_after, int | float):
        raise InvalidCostError(f"retry_after must be a number, not {retry_after!r}", budget=budget.name)
    if math.isnan(retry_after) or math.isinf(retry_after) or retry_after < 0:
        raise InvalidCostError(f"retry_after must be finite and zero or more, not {retry_after!r}", budget=budget.name)
    return min(float(retry_after), MAX_SECONDS)  # longer is no different: the scripts' bound


#: The error replies of the scripts (lua/_prelude.lua): a refused argument, other stored limits.
_BADARG = re.compile(r"XFLOW_BADARG (.*)", re.S)
_CONFLICT = re.compile(r"XFLOW_CONFLICT stored (.*?); given (.*)", re.S)
#: A call run after its give-up moment (``lua/_prelude.lua``, Late calls): Redis time, then that moment.
LATE = re.compile(r"XFLOW_LATE (\S+) (\S+)")
_LIMIT_NAMES = (
    "request rate",
    "request burst",
    "token rate",
    "token burst",
    "max concurrency",
    "lease TTL",
    "claim window",
)


def describe_limits(text: str) -> str:
    """The seven numbers of a budget's stored limits (``cf``), as a person reads a Budget."""
    try:
        rreq, breq, rtok, btok, conc, ttl, claim = (float(w) for w in text.split())
    except ValueError:
        return repr(text)

    def g(x: float) -> str:
        return f"{round(x, 9):g}"

    parts = [f"rpm={g(rreq * 60)}" if rreq > 0 else "rpm=None", f"tpm={g(rtok * 60)}" if rtok > 0 else "tpm=None"]
    # the scripts hold the credit: the burst less the dispatch margin (Budget.credit)
    parts += [f"credit={g(breq)}s"] if breq == btok else [f"request credit={g(breq)}s", f"token credit={g(btok)}s"]
    parts += [f"max_concurrency={int(conc) if conc > 0 else None}", f"lease_ttl={g(ttl)}", f"claim_window={g(claim)}"]
    return ", ".join(parts)


def late_error(budget: Budget, op: str, exc: Exception) -> BackendError:
    """A call Redis ran too late twice: a failure that may pass, as a timeout is (raise it from one)."""
    return BackendError(
        f"{op} on budget {budget.name!r} failed: Redis ran it after its client's give-up moment ({exc})",
        budget=budget.name,
    )


def script_error(budget: Budget, op: str, exc: Exception) -> XflowError:
    """The error for a failed script call: a refused argument, a limits conflict, else the backend's."""
    message = str(exc)
    conflict = _CONFLICT.search(message)
    if conflict:
        stored, given = describe_limits(conflict[1]), describe_limits(conflict[2])
        return BudgetConflictError(
            f"budget {budget.name!r} is in use with other limits: Redis holds ({stored}), this process has "
            f"({given}); use the same limits, another budget name, or reconfigure() to change them for the "
            "whole fleet",
            budget=budget.name,
            stored=stored,
            given=given,
        )
    bad = _BADARG.search(message)
    if bad:
        return ScriptArgumentError(
            f"{op} on budget {budget.name!r} refused its arguments: {bad[1]}", budget=budget.name
        )
    return BackendError(f"{op} on budget {budget.name!r} failed: {exc}", budget=budget.name)


def _strings(raw: Any, size: int, op: str) -> list[str]:
    if not isinstance(raw, list | tuple) or len(raw) < size:
        raise BackendError(f"unexpected reply from {op}: {raw!r}")
    return [x.decode() if isinstance(x, bytes) else str(x) for x in raw]


@dataclass(frozen=True, slots=True)
class AcquireReply:
    """What ``acquire.lua`` decided; ``wait`` is how long a queued ticket sleeps before it comes back."""

    kind: str  # "granted" | "queued" | "refused" | "too_large"
    now: float
    start: float = 0.0
    expiry: float = 0.0
    wait: float = 0.0
    retry_after: float | None = None
    most: float = 0.0  # too_large: the most one grant of ``dimension`` may cost under the learned limits
    dimension: str = ""


def decode_acquire(raw: Any) -> AcquireReply:
    kind, *rest = _strings(raw, 3, "acquire")
    if kind == "granted":
        start, now, expiry = map(float, rest[:3])
        return AcquireReply(kind, now, start=start, expiry=expiry)
    if kind == "queued":
        return AcquireReply(kind, float(rest[1]), wait=float(rest[0]))
    if kind == "refused":
        wait = float(rest[0])
        return AcquireReply(kind, float(rest[1]), retry_after=None if wait < 0 else wait)
    if kind == "too_large" and len(rest) >= 3:
        return AcquireReply(kind, float(rest[1]), most=float(rest[0]), dimension=rest[2])
    raise BackendError(f"unexpected reply from acquire: {raw!r}")


def queued(raw: Any) -> bool:
    """An acquire reply that queued its ticket (undecoded: the fronts only look, the flow decodes)."""
    return isinstance(raw, list | tuple) and bool(raw) and raw[0] in (b"queued", "queued")


def reserved(raw: Any) -> bool:
    """An acquire reply that granted a reservation: its call starts later (see acquire.lua)."""
    if not (isinstance(raw, list | tuple) and len(raw) >= 3 and raw[0] in (b"granted", "granted")):
        return False
    try:
        return float(raw[1]) > float(raw[2])
    except (TypeError, ValueError):
        return False


def adopted(raw: Any) -> bool:
    """A rejoin reply that added the lease anew (Redis did not hold it)."""
    return isinstance(raw, list | tuple) and bool(raw) and raw[0] in (b"adopted", "adopted")


def too_large_error(budget: Budget, requests: float, tokens: float, reply: AcquireReply) -> CostTooLargeError:
    """The error for a cost the learned limits can never grant."""
    cost = requests if reply.dimension == "requests" else tokens
    return CostTooLargeError(
        f"{cost:g} {reply.dimension or 'tokens'} can never fit budget {budget.name!r}: under the limits learned from "
        f"the provider it grants at most {reply.most:g} to one request",
        budget=budget.name,
    )


def _limit(text: str) -> float | None:
    value = float(text)
    return value if value > 0 else None


@dataclass(frozen=True, slots=True)
class SettleReply:
    """What a settle did: ``refunded`` tokens (negative: debt charged), and the limits in force after
    it, per minute (None: that dimension is not limited), learned ones included."""

    settled: bool
    refunded: float
    now: float
    rpm: float | None = None
    tpm: float | None = None


def decode_settle(raw: Any) -> SettleReply:
    fields = _strings(raw, 3, "settle")
    kind, refunded, now = fields[:3]
    rpm, tpm = (_limit(fields[3]), _limit(fields[4])) if len(fields) >= 5 else (None, None)
    return SettleReply(kind == "settled", float(refunded), float(now), rpm, tpm)


def decode_configure(raw: Any) -> str | None:
    """The limits the budget had before (described), or None where none were stored."""
    previous = _strings(raw, 3, "configure")[2]
    return describe_limits(previous) if previous else None


def decode_cancel(raw: Any) -> str:
    return _strings(raw, 2, "cancel")[0]


def decode_extend(raw: Any) -> float | None:
    """The new expiry (Redis time), or None when the lease is lost."""
    kind, expiry, _ = _strings(raw, 3, "extend")[:3]
    return float(expiry) if kind == "extended" else None


@dataclass(frozen=True, slots=True)
class CooldownReply:
    """A fleet-wide pause: ``until`` is Redis time, ``remaining`` seconds from now; ``started``:
    this call began the pause (none was in force), rather than meeting one."""

    until: float
    now: float
    level: int
    started: bool = False

    @property
    def remaining(self) -> float:
        return max(0.0, self.until - self.now)


def decode_cooldown(raw: Any) -> CooldownReply:
    fields = _strings(raw, 4, "cooldown")
    _, until, now, level = fields[:4]
    return CooldownReply(float(until), float(now), int(level), len(fields) > 4 and fields[4] == "1")


def decode_clear_cooldown(raw: Any) -> CooldownReply:
    """The pause ``clear_cooldown.lua`` ended, as it stood: ``remaining`` is what was cut short
    (0: there was none)."""
    kind, until, now, level = _strings(raw, 4, "clear_cooldown")[:4]
    if kind != "cleared":
        raise BackendError(f"unexpected reply from clear_cooldown: {raw!r}")
    return CooldownReply(float(until), float(now), int(level))


@dataclass(frozen=True, slots=True)
class Status:
    """A snapshot of one budget. A level below zero is debt left by a cost above the burst credit.

    ``rpm`` / ``tpm`` are the limits in force (the configured ones lowered to the learned ones),
    ``learned_rpm`` / ``learned_tpm`` what the provider last reported; all per minute, None where
    there is none. ``probing``: the budget grants one call at a time until it learns its limits.
    """

    budget: str
    now: float
    requests_available: float | None
    tokens_available: float | None
    in_flight: int
    queued: int
    cooldown_remaining: float
    backoff_level: int
    rpm: float | None = None
    tpm: float | None = None
    learned_rpm: float | None = None
    learned_tpm: float | None = None
    probing: bool = False
    mode: str = "shared"
    outage_for: float = 0.0
    outage_grants: int = 0


def decode_status(budget: Budget, raw: Any) -> Status:
    fields = _strings(raw, 12, "status")
    now, req, tok, in_flight, queued, cooldown, level = fields[:7]
    rpm, tpm, learned_rpm, learned_tpm = (_limit(x) for x in fields[7:11])
    return Status(
        budget=budget.name,
        now=float(now),
        requests_available=None if rpm is None else float(req),
        tokens_available=None if tpm is None else float(tok),
        in_flight=int(in_flight),
        queued=int(queued),
        cooldown_remaining=float(cooldown),
        backoff_level=int(level),
        rpm=rpm,
        tpm=tpm,
        learned_rpm=learned_rpm,
        learned_tpm=learned_tpm,
        probing=fields[11] == "1",
    )
