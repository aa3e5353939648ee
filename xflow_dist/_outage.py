"""What a limiter does while its Redis does not answer: the outage policy, shared by both fronts.

``local`` (the default) keeps each process on its own share of the budget: the limits and the
concurrency divided by the number of processes it last saw using the budget (the subscribers of its
events channel), in an in-process bucket that starts empty, since the shared one may just have been
spent. When Redis answers again the process charges the shared buckets with what its share let through
and re-registers every lease it still holds, so that the fleet goes back to one budget that counts every
call made meanwhile.
A share counts on the slots its process held in Redis when the outage began staying held there
until the way back. So while it is out a process sends no settle or cancel of a shared lease
(``defers``: the way back sends them once its share's calls are registered), Redis runs no call its
process gave up on (``lua/_prelude.lua``, Late calls), and the share grants nothing until every call
sent before the outage was found is past its give-up moment (``opens``): none of them can free a slot
after that.
``open`` lets calls through unlimited (counted and logged); ``closed`` refuses them with
``BudgetUnavailableError`` at once. Each switch is logged once and shows in ``status().mode``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from ._budget import Budget, _positive
from ._core import Status
from ._exceptions import BackendError, BudgetUnavailableError, ConfigurationError

MODES = ("local", "open", "closed")

#: A waiter on a share asks it for at most this long at a time, then looks whether Redis is back.
SHARE_SLICE = 0.25


@dataclass(frozen=True, slots=True, kw_only=True)
class OutagePolicy:
    """What acquire does while the budget's Redis does not answer (see the module docstring).

    ``fleet_size`` is the number of processes a process assumes when it never saw the fleet in Redis
    (it started during the outage); ``probe_interval`` how often Redis is tried meanwhile.
    """

    mode: str = "local"
    fleet_size: int = 1
    probe_interval: float = 0.25

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigurationError(f"outage mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        n = self.fleet_size
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 1_000_000:
            raise ConfigurationError(f"fleet_size must be a whole number from 1 to 1000000, not {n!r}")
        _positive(None, "probe_interval", self.probe_interval, top=60.0)


def outage_policy(value: OutagePolicy | str | None) -> OutagePolicy:
    """The limiters' ``outage=`` argument: a policy, or a mode's name."""
    if value is None:
        return OutagePolicy()
    if isinstance(value, OutagePolicy):
        return value
    if isinstance(value, str):
        return OutagePolicy(mode=value)
    raise ConfigurationError(f"outage must be an OutagePolicy or one of {', '.join(MODES)}, not {value!r}")


def share(budget: Budget, mode: str, processes: int) -> Budget:
    """The budget one process keeps during an outage: its share of every limit, or none (``open``).

    Shares are rounded down, so the fleet together never exceeds the budget; a process whose share
    of the concurrency rounds to nothing gets none (see ``no_slot``).
    """
    if mode == "open":
        return Budget(budget.name, lease_ttl=budget.lease_ttl)
    n = max(1, processes)
    conc = None if budget.max_concurrency is None else max(1, budget.max_concurrency // n)
    return Budget(
        budget.name,
        rps=None if budget.request_rate is None else budget.request_rate / n,
        tps=None if budget.token_rate is None else budget.token_rate / n,
        max_concurrency=conc,
        burst=budget.burst,
        lease_ttl=budget.lease_ttl,
        claim_window=budget.claim_window,
        overdraft=budget.overdraft,
        dispatch_margin=budget.dispatch_margin,
    )


def no_slot(budget: Budget, mode: str, processes: int) -> bool:
    """True where this process's share of the concurrency is zero (more processes than slots)."""
    return mode == "local" and budget.max_concurrency is not None and budget.max_concurrency < max(1, processes)


def emptying_cost(local: Budget) -> tuple[float, float]:
    """A share's full capacity (requests, tokens): charged once at the start, it leaves the buckets
    empty, as the shared ones may be."""
    req = 0.0 if local.request_rate is None else local.request_rate * local.credit
    tok = 0.0 if local.token_rate is None else local.token_rate * local.credit
    return req, tok


def spent(local: Budget, status: Status, elapsed: float) -> tuple[float, float]:
    """What a share let through, per dimension: its capacity less its level, less what it has not yet
    earned back of the emptying charge it started with ``elapsed`` seconds ago (that charge stood for
    credit the shared bucket may have spent before the outage, which the shared bucket itself knows).

    The shared buckets kept time through the outage; charged this on the way back, they hold what they
    held, refilled, less the calls the fleet's shares let through.
    """
    req = 0.0
    tok = 0.0
    if local.request_rate is not None and status.requests_available is not None:
        cap = local.request_rate * local.credit
        unearned = max(0.0, cap - local.request_rate * elapsed)
        req = max(0.0, cap - status.requests_available - unearned)
    if local.token_rate is not None and status.tokens_available is not None:
        cap = local.token_rate * local.credit
        unearned = max(0.0, cap - local.token_rate * elapsed)
        tok = max(0.0, cap - status.tokens_available - unearned)
    return req, tok


def hold_after(exc: BaseException, reply_wait: float | None) -> float:
    """How long a share waits before its first grant (``Outage.opens``): a reply timeout when the
    outage was found by one (Redis stalled: what was sent may still run there, up to its give-up
    moment), nothing when Redis refused or dropped the connection (what it had read, it ran then)."""
    cause = exc.__cause__ or exc
    return (reply_wait or 0.0) if isinstance(cause, redis.TimeoutError | TimeoutError) else 0.0


def reason(exc: BaseException) -> str:
    """What failed, for the log and the error: the Redis error under a BackendError."""
    cause = exc.__cause__ or exc
    return f"{type(cause).__name__}: {cause}"


def diverted(budget: Budget) -> BackendError:
    """What a waiter raises to leave the shared queue once another call found Redis out: a transient
    failure, so that it takes the outage path."""
    error = BackendError("Redis does not answer (found by another call)", budget=budget.name)
    error.__cause__ = redis.ConnectionError("outage")
    return error


@dataclass
class Outage:
    """One outage as a process lives it: since when, why, on what share, what it let through."""

    mode: str
    reason: str
    processes: int
    local: Any  # the Limiter or AsyncLimiter on the share (memory://), None when closed
    budget: Budget | None
    back: Any  # an Event set when Redis answers again (threading or asyncio)
    since: float = field(default_factory=time.monotonic)
    grants: int = 0
    let_through: tuple[float, float] = (0.0, 0.0)  # requests and tokens granted, counted under open
    waiting: int = 0
    ended: bool = False
    shadows: dict[str, Any] = field(default_factory=dict)  # shared lease id -> its slot in the share
    #: The share grants nothing before this (monotonic): the give-up moment of the last call that may
    #: have been sent before the outage was found (see ``hold_after``).
    opens: float = 0.0

    def defers(self) -> bool:
        """Settles and cancels of shared leases wait for the way back (a ``local`` share is running)."""
        return self.mode == "local" and self.local is not None and not self.ended

    def closed_for(self) -> float:
        """Seconds until the share may grant (0: it may now)."""
        return max(0.0, self.opens - time.monotonic())

    def granted(self, requests: float, tokens: float) -> None:
        """One more call the outage let through: under ``open`` its cost is kept, for the way back
        to charge (an unlimited share has no level to tell it)."""
        self.grants += 1
        if self.mode == "open":
            req, tok = self.let_through
            self.let_through = (req + requests, tok + tokens)

    def to_charge(self, level: Status | None) -> tuple[float, float]:
        """What to charge the shared buckets on the way back: the share's spending (``local``),
        every call's cost at its estimate (``open``), nothing (``closed``)."""
        if self.mode == "open":
            return self.let_through
        if self.mode == "local" and self.budget is not None and level is not None:
            return spent(self.budget, level, time.monotonic() - self.since)
        return (0.0, 0.0)

    def unavailable(self, name: str) -> BudgetUnavailableError:
        return BudgetUnavailableError(
            f"budget {name!r} is unavailable: its Redis does not answer ({self.reason}); the outage "
            f"policy is {self.mode!r}",
            budget=name,
        )

    def describe(self) -> str:
        if self.mode == "closed":
            return "refusing every call"
        if self.mode == "open":
            return "letting every call through unlimited"
        return f"running on a local share (1/{self.processes} of the budget)"

    def status(self, name: str, local: Status | None) -> Status:
        """``status()`` during the outage: the share's levels, marked with the mode."""
        since = time.monotonic() - self.since
        if local is None:
            return Status(name, math.nan, None, None, 0, 0, 0.0, 0, mode=self.mode, outage_for=since)
        return Status(
            name,
            local.now,
            local.requests_available,
            local.tokens_available,
            local.in_flight,
            local.queued,
            0.0,
            0,
            rpm=local.rpm,
            tpm=local.tpm,
            mode=self.mode,
            outage_for=since,
            outage_grants=self.grants,
        )
