"""What the two fronts share without I/O: checked inputs, script arguments, decisions."""

from __future__ import annotations

import atexit
import contextlib
import logging
import math
import os
import re
import time
import uuid
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis

from . import _observe as observe
from ._acl import Rights
from ._backend import IO_TIMEOUT, reply_timeout
from ._budget import MAX_SECONDS, MAX_UNITS, MIN_RATE, Budget, CooldownPolicy, Level
from ._cluster import in_transition, is_cluster
from ._core import (
    ANYWHERE,
    IDLE_GRACE,
    LATE,
    NOW_AT,
    AcquireReply,
    CooldownReply,
    Place,
    SettleReply,
    acquire_args,
    budget_args,
    channel,
    check_levels,
    cooldown_args,
    decode_acquire,
    decode_clear_cooldown,
    decode_settle,
    keys,
    level_args,
    moment,
    settle_args,
    too_large_error,
    validate_cost,
    validate_retry_after,
)
from ._exceptions import BackendError, ConfigurationError, InvalidCostError
from ._headers import LimitFacts, parse_limit_headers
from ._outage import Outage, OutagePolicy, outage_policy
from ._renewals import renewal_args

L = TypeVar("L")

log = logging.getLogger("xflow_dist")


@dataclass(frozen=True, slots=True)
class Decision(Generic[L]):
    """The answer of ``try_acquire``: a lease, or how long until one would be granted.

    ``retry_after`` is exact for rate limits and None when the refusal was for a concurrency slot
    (no one can know when a call ends). A decision is true when granted.
    """

    granted: bool
    lease: L | None = None
    retry_after: float | None = None

    def __bool__(self) -> bool:
        return self.granted


def _check_seconds(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value) or value < 0:
        raise ConfigurationError(f"{name} must be None or seconds, zero or more, not {value!r}")
    return float(value)


def transient(exc: BaseException) -> bool:
    """A Redis failure that may pass (a cut connection, a timeout, a cluster replacing a master or
    moving a slot), as opposed to a refusal.

    Every operation is idempotent by its id (acquire renews or claims, settle and cancel happen
    once, extend only lengthens), so a transient failure may be retried without double counting.
    """
    cause = exc.__cause__ if isinstance(exc, BackendError) else exc
    if isinstance(cause, redis.AuthenticationError | redis.exceptions.AuthorizationError):
        return False  # a wrong password is no outage: it does not pass
    return isinstance(cause, redis.ConnectionError | redis.TimeoutError | OSError) or (
        cause is not None and in_transition(cause)
    )


#: Every limiter alive in this process: restarted in a forked child, closed at interpreter exit.
_LIVE: weakref.WeakSet[LimiterBase] = weakref.WeakSet()

#: Clients a forked child inherited from its parent: kept referenced so that no finalizer closes them.
_INHERITED: list[Any] = []


#: This process's part of every lease id ("<process>.<unique>"): when a grant goes unclaimed, the
#: scripts wake a waiter of another process first (the whole process may be dead). New after a fork.
_PROCESS = [uuid.uuid4().hex[:12]]


def gate_size(client: Any) -> int | None:
    """How many script calls may be in flight on ``client`` at once, or None for no gate.

    Beyond its pool's connections, a call waits for one only ``io_timeout``, then fails as if Redis
    were down: a burst of callers in one process (a thousand tasks started at once) would put the
    limiter in its outage policy while Redis answers every call. So callers queue before the pool
    instead, for as long as their own deadline allows, leaving two connections to the events
    subscriber and the probe. A Cluster client (one pool per node) and ``memory://`` have no gate.
    """
    size = getattr(getattr(client, "connection_pool", None), "max_connections", None)
    if not isinstance(size, int) or size <= 0 or size > 1_000_000:
        return None
    return max(1, size - 2)


#: What a ticket given back to ``acquire(ticket=...)`` looks like: an id ``new_id`` made.
_TICKET = re.compile(r"[0-9A-Za-z_-]{1,64}\.[0-9a-f]{32}")


def new_id() -> str:
    """A lease (and ticket) id: ``<process>.<unique>``."""
    return f"{_PROCESS[0]}.{uuid.uuid4().hex}"


def away_id() -> str:
    """The id of a ticket that may leave this process (``keep_place``): its own "process", which no
    limiter holds connected, so that a grant made while it is away waits for a claim."""
    return f"{uuid.uuid4().hex[:12]}.{uuid.uuid4().hex}"


def own_channel(events: str) -> str:
    """This process's own channel beside a budget's ``events`` channel: held subscribed, it tells the
    scripts the process is connected, grants to its tickets need no claim (``connected()``), and the
    notices about its tickets come on it (``inbox()``)."""
    return f"{events}:{_PROCESS[0]}"


def left(deadline: float | None) -> float | None:
    """Seconds to a monotonic deadline, never below zero (None: no deadline)."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _after_fork_in_child() -> None:
    _PROCESS[0] = uuid.uuid4().hex[:12]
    for limiter in list(_LIVE):
        limiter._after_fork()


def _close_at_exit() -> None:
    for limiter in list(_LIVE):
        try:
            limiter._close_at_exit()
        except Exception as exc:  # exiting anyway: what is not given back expires with its TTL
            log.warning("xflow_dist: closing %r at exit failed: %s", limiter, exc)


os.register_at_fork(after_in_child=_after_fork_in_child)
atexit.register(_close_at_exit)

#: Retries of a settle, cancel or give-back start this long after the failure, doubling to RETRY_MAX.
RETRY_FIRST = 0.05
RETRY_MAX = 1.0

#: Seconds between two counts of the processes using a budget (see ``OutagePolicy``).
CENSUS_INTERVAL = 2.0


class LimiterBase:
    """Inputs checked and script arguments built once for both fronts."""

    def __init__(
        self,
        budget: Budget,
        *,
        cooldown_policy: CooldownPolicy | None = None,
        ticket_ttl: float | None = None,
        io_timeout: float = IO_TIMEOUT,
        outage: OutagePolicy | str | None = None,
    ) -> None:
        if not isinstance(budget, Budget):
            raise ConfigurationError(f"budget must be a Budget, not {budget!r}")
        if cooldown_policy is not None and not isinstance(cooldown_policy, CooldownPolicy):
            raise ConfigurationError(f"cooldown_policy must be a CooldownPolicy, not {cooldown_policy!r}")
        ttl = _check_seconds("ticket_ttl", ticket_ttl)
        if ttl == 0 or (ttl is not None and ttl > MAX_SECONDS):
            raise ConfigurationError(
                f"ticket_ttl must be more than zero and at most {MAX_SECONDS:g}, not {ticket_ttl!r}"
            )
        io = _check_seconds("io_timeout", io_timeout)
        if not io or math.isinf(io):
            raise ConfigurationError(f"io_timeout must be finite and more than zero, not {io_timeout!r}")
        self.io_timeout = io
        self.budget = budget
        self.cooldown_policy = cooldown_policy or CooldownPolicy()
        self.ticket_ttl = ttl or budget.lease_ttl
        self.outage_policy = outage_policy(outage)
        self._keys = keys(budget)
        self._blocks = (budget_args(budget)[:-1], budget_args(budget, seen=True)[:-1])  # give up: per call
        #: Redis time less ``time.monotonic()``, from the last reply. Read with the reply, after Redis
        #: read its clock, it runs low, and so do the give-up moments made from it: on the safe side.
        self._offset: float | None = None
        #: How long the client waits for a reply (None: no bound known); see ``_backend.reply_timeout``.
        self._reply_wait: float | None = None
        self._rights = Rights(budget.name, self._keys, channel(budget))  # proven before the first call
        self._warned_capped = False
        #: Until then (monotonic) the budget's keys cannot have expired: this process saw them.
        self._fresh_until = -math.inf
        #: Processes using the budget as last counted in Redis (0: never counted).
        self._fleet = 0
        #: When the next count is due (monotonic): the first settle sent after it carries the count
        #: (settle.lua's census), else the events reader asks on its own once the count is a whole
        #: interval late (a process that settles nothing, or a cluster: see ``_census_in_scripts``).
        self._census_at = time.monotonic()
        #: Whether a script can count the budget's processes: a cluster node counts its own subscribers only.
        self._census_in_scripts = True
        #: True for a limiter the library runs for itself (an outage's local share): the limiter that
        #: uses it reports its grants, timeouts and 429s, never twice (its settles it reports itself).
        self._quiet = False
        #: The outage under way (Redis does not answer), or None.
        self._outage: Outage | None = None

    def _argv(self, op: str, argv: list[str], riders: list[str] | None = None) -> list[str]:
        """The budget block (saying whether this process has seen the keys, and when it gives up on
        the reply) and ``argv``; a settle sent when the count of processes is due asks for it, and one
        sent with ``riders`` renews those queued tickets (``_renewals``), so that neither costs a call
        of its own in a busy process."""
        at = time.monotonic()
        seen = self._holding() or at < self._fresh_until
        wait, offset = self._reply_wait, self._offset
        give_up = "0" if wait is None or offset is None else moment(at + offset + wait)
        if op == "settle":
            census = at >= self._census_at and self._census_in_scripts
            if census:
                self._census_asked()
            if census or riders:
                argv = [*argv, "1" if census else "0"]
            if riders:
                argv = [*argv, *renewal_args(self.ticket_ttl, riders)]
        return [*self._blocks[seen], give_up, *argv]

    def _census_asked(self) -> None:
        """A count of the processes is asked for (by a settle, or by the events reader): the next
        is due an interval from now."""
        self._census_at = time.monotonic() + CENSUS_INTERVAL

    def _counted(self, processes: int) -> None:
        """The processes counted in Redis; a count of none, which cannot have seen this process,
        leaves the last count (or the policy's ``fleet_size``) standing."""
        self._fleet = processes or self._fleet

    def _census_overdue(self) -> bool:
        """Whether the events reader should count the processes itself: no settle brought the count
        within an interval of its due time (on a cluster, at once)."""
        late = CENSUS_INTERVAL if self._census_in_scripts else 0.0
        return time.monotonic() >= self._census_at + late

    def _answered(self, op: str, reply: Any, riders: list[str] | None = None) -> None:
        """A script ran: the keys live at least the idle grace from now (margin for the reply's way),
        and its reply's Redis time sets the clock offset; a settle's reply also carries the census it
        asked for and what became of the tickets it renewed."""
        at = time.monotonic()
        if op != "status":  # status.lua writes nothing: the keys may still not exist
            self._fresh_until = at + IDLE_GRACE * 0.8
        with contextlib.suppress(KeyError, IndexError, TypeError, ValueError):
            self._offset = float(reply[NOW_AT[op]]) - at
        if op == "settle" and len(reply) > 5:  # the census a settle asked for ("0": not asked)
            self._counted(int(reply[5]))
        if riders:
            self._renewed(riders, reply[6:])

    def _riders(self, op: str) -> list[str]:
        """Queued tickets of this process that a call of ``op`` about to be sent renews on its way:
        a settle takes the ones due soon (overridden by the fronts, which keep them)."""
        return []

    def _renewed(self, ids: list[str], statuses: Any | None) -> None:
        """Tell the waiters of ``ids`` what their renewal found (None: the call that carried it failed);
        overridden by the fronts, which keep the waiters."""

    def _late(self, exc: Exception) -> bool:
        """True for a call Redis ran after its give-up moment while the client still waited (its
        clock was behind Redis's); the refusal's Redis time sets the clock offset."""
        late = LATE.match(str(exc))
        if late is None:
            return False
        self._offset = float(late[1]) - time.monotonic()
        return True

    def _bind(self, client: Any, owns: bool) -> None:
        """Use ``client`` (at the start, and again in a forked child)."""
        self._client, self._owns = client, owns
        self._reply_wait = reply_timeout(client, owns, self.io_timeout)
        self._census_in_scripts = not is_cluster(client)

    def _holding(self) -> bool:
        """This process holds a lease or a ticket of the budget, so its keys must exist (overridden)."""
        return False

    @property
    def processes(self) -> int:
        """The processes an outage shares the budget among: the last count, else the policy's guess."""
        return self._fleet or self.outage_policy.fleet_size

    def _adopt(self, budget: Budget) -> Budget:
        """Make ``budget`` (the same name, other limits) this limiter's; returns the one it replaces."""
        if not isinstance(budget, Budget):
            raise ConfigurationError(f"budget must be a Budget, not {budget!r}")
        if budget.name != self.budget.name:
            raise ConfigurationError(
                f"reconfigure changes the limits of budget {self.budget.name!r}, not {budget.name!r}",
                budget=self.budget.name,
            )
        old, self.budget = self.budget, budget
        self._blocks = (budget_args(budget)[:-1], budget_args(budget, seen=True)[:-1])
        return old

    def _prepare(
        self,
        requests: float,
        tokens: float,
        timeout: float | None,
        ticket: str | None = None,
        away: bool = False,
        place: Place = ANYWHERE,
    ) -> tuple[str, float, float]:
        requests, tokens = validate_cost(self.budget, requests, tokens)
        check_levels(self.budget, place, requests, tokens)
        _check_seconds("timeout", timeout)
        if ticket is None:
            # A ticket that may leave this process (keep_place) is its own process for the queue:
            # when its turn comes while it is away, the waiter behind it is told to come back a
            # claim window later, as behind the ticket of a dead process (ids are "<process>.<unique>").
            return (away_id() if away else new_id()), requests, tokens
        if not isinstance(ticket, str) or not _TICKET.fullmatch(ticket):
            raise InvalidCostError(f"ticket must be an id that acquire gave (AcquireTimeout.ticket), not {ticket!r}",
                                   budget=self.budget.name)  # fmt: skip
        return ticket, requests, tokens

    def _park_args(self, lease_id: str, requests: float, tokens: float, seconds: float, place: Place) -> list[str]:
        """Renew a ticket for ``seconds`` away plus its usual TTL (or claim its grant); a ticket
        Redis lost joins again at the ``place`` of a new arrival."""
        return acquire_args(
            lease_id, requests, tokens, None, True, min(MAX_SECONDS, seconds + self.ticket_ttl),
            self.budget.probe, self.budget.overdraft, *place._replace(reserve=False, book=False),
        )  # fmt: skip  (a parked ticket's holder is away: it takes no grant for later)

    def _try_args(self, lease_id: str, requests: float, tokens: float, place: Place) -> list[str]:
        return acquire_args(
            lease_id, requests, tokens, 0.0, False, self.ticket_ttl, self.budget.probe, self.budget.overdraft, *place
        )

    def _check_facts(
        self,
        remaining_requests: float | None,
        remaining_tokens: float | None,
        limit_requests: float | None,
        limit_tokens: float | None,
    ) -> None:
        for what, value, low in (
            ("remaining_requests", remaining_requests, 0.0),
            ("remaining_tokens", remaining_tokens, 0.0),
            ("limit_requests", limit_requests, MIN_RATE),
            ("limit_tokens", limit_tokens, MIN_RATE),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or not low <= value <= MAX_UNITS
            ):
                bound = f"from {low:g} to {MAX_UNITS:g}" + (" (per minute)" if low else "")
                raise InvalidCostError(f"{what} must be finite, {bound}, not {value!r}", budget=self.budget.name)

    def _check_model(self, model: str) -> None:
        if not isinstance(model, str) or len(model) > 256:
            raise InvalidCostError(
                f"model must be a string of at most 256 characters, not {model!r}", budget=self.budget.name
            )

    def _facts(
        self,
        facts: LimitFacts | None,
        headers: Mapping[str, str] | None,
        remaining_requests: float | None,
        remaining_tokens: float | None,
        limit_requests: float | None,
        limit_tokens: float | None,
    ) -> tuple[float | None, float | None, float | None, float | None]:
        """The provider's word as the scripts take it: parsed ``facts`` (or raw ``headers``, parsed
        here), each overridden by the caller's own keyword; checked before Redis is touched."""
        if headers is not None:
            if facts is not None:
                raise InvalidCostError("give facts or headers, not both", budget=self.budget.name)
            if not isinstance(headers, Mapping):
                raise InvalidCostError(f"headers must be a mapping, not {headers!r}", budget=self.budget.name)
            facts = parse_limit_headers(headers)
        if facts is not None:
            if not isinstance(facts, LimitFacts):
                raise InvalidCostError(f"facts must be a LimitFacts, not {facts!r}", budget=self.budget.name)
            # A provider's odd header (a limit of 0) is no fact to learn; a caller's own argument is checked.
            if limit_requests is None:
                limit_requests = facts.request_limit or None
            if limit_tokens is None:
                limit_tokens = facts.token_limit or None
            if remaining_requests is None:
                remaining_requests = facts.requests_remaining
            if remaining_tokens is None:
                remaining_tokens = facts.tokens_remaining
        self._check_facts(remaining_requests, remaining_tokens, limit_requests, limit_tokens)
        return remaining_requests, remaining_tokens, limit_requests, limit_tokens

    def _learn_args(
        self,
        facts: LimitFacts | None,
        limit_requests: float | None,
        limit_tokens: float | None,
        remaining_requests: float | None,
        remaining_tokens: float | None,
        model: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        """``settle.lua`` without a lease: learn the limits (and cap the levels at the remaining);
        ``model`` names whose limits they are, so two models on one budget each keep their own."""
        word = self._facts(facts, headers, remaining_requests, remaining_tokens, limit_requests, limit_tokens)
        self._check_model(model)
        return settle_args("", None, *word, model=model)

    def _settle_args(
        self,
        lease_id: str,
        actual_tokens: float | None,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        model: str = "",
        headers: Mapping[str, str] | None = None,
    ) -> list[str]:
        word = self._facts(None, headers, remaining_requests, remaining_tokens, limit_requests, limit_tokens)
        self._check_model(model)
        if actual_tokens is not None and (
            isinstance(actual_tokens, bool)
            or not isinstance(actual_tokens, int | float)
            or math.isnan(actual_tokens)
            or math.isinf(actual_tokens)
            or not 0 <= actual_tokens <= MAX_UNITS
        ):
            raise InvalidCostError(
                f"actual_tokens must be finite, from 0 to {MAX_UNITS:g}, not {actual_tokens!r}",
                budget=self.budget.name,
            )
        return settle_args(lease_id, actual_tokens, *word, model=model)

    @staticmethod
    def _rejoin_args(
        lease_id: str,
        requests: float,
        tokens: float,
        spent: tuple[float, float] = (0.0, 0.0),
        hold: float = 0.0,
        levels: tuple[Level, ...] = (),
    ) -> list[str]:
        """``rejoin.lua``: register a lease held (id "" for none) with the caps it passes, charge what
        was spent outside, and hold new grants ``hold`` seconds (the way back from an outage)."""
        spent_req, spent_tok = (repr(float(x)) for x in spent)
        args = [lease_id, repr(float(requests)), repr(float(tokens)), spent_req, spent_tok, repr(float(hold))]
        return args + level_args(levels) if levels else args

    @property
    def comeback_hold(self) -> float:
        """How long a process back from an outage holds new grants: long enough for every other
        process's probe (one that was waiting on a frozen Redis gives up after ``io_timeout``) to
        come back and register its share's calls."""
        return self.io_timeout + 2 * self.outage_policy.probe_interval

    def _cooldown_args(self, retry_after: float | None) -> list[str]:
        """The script's arguments, a retry-after beyond the policy's ``max_pause`` capped to it
        (said once per limiter at warning, then at debug: a fleet may see it on every 429)."""
        retry_after = validate_retry_after(self.budget, retry_after)
        cap = self.cooldown_policy.max_pause
        if retry_after is not None and retry_after > cap:
            level = logging.DEBUG if self._warned_capped else logging.WARNING
            self._warned_capped = True
            log.log(
                level,
                "budget %s: the provider asked for a %.0fs pause; capped at max_pause=%gs (CooldownPolicy)",
                self.budget.name, retry_after, cap,
            )  # fmt: skip
            retry_after = cap
        return cooldown_args(self.cooldown_policy, retry_after)

    def _cleared(self, raw: object) -> CooldownReply:
        """The reply of ``clear_cooldown.lua``: the pause it ended."""
        reply = decode_clear_cooldown(raw)
        if reply.remaining > 0:
            log.info("budget %s: cooldown cleared %.3fs early", self.budget.name, reply.remaining)
        return reply

    # -- what both fronts tell the observers (``_observe``: metrics, traces) -------------------------

    def _tried(self, decision: Decision[L], requests: float, tokens: float) -> Decision[L]:
        """``try_acquire``'s answer, reported."""
        if observe.OBSERVERS and not self._quiet:
            if decision:
                observe.granted(self.budget.name, time.monotonic(), requests, tokens)
            else:
                observe.refused(self.budget.name)
        return decision

    def _finished(self, estimate: float, op: str, raw: Any) -> SettleReply | None:
        """A settle's reply (None for a cancel), reported. An outage's share reports its own
        settles: they are the fleet's."""
        if op != "settle":
            if observe.OBSERVERS:
                observe.settled(self.budget.name, estimate, estimate)
            return None
        reply = decode_settle(raw)
        if observe.OBSERVERS and reply.settled:
            observe.settled(self.budget.name, estimate, reply.refunded)
        return reply

    def _cooled(self, reply: CooldownReply) -> CooldownReply:
        """A 429's pause, reported."""
        if observe.OBSERVERS and not self._quiet:
            observe.rate_limited(self.budget.name, reply.started)
        return reply

    def _parked(self, raw: Any, requests: float, tokens: float) -> bool:
        """Whether ``park``'s acquire found the ticket granted (then claimed); a cost that can never
        fit raises."""
        reply = decode_acquire(raw)
        if reply.kind == "too_large":
            raise too_large_error(self.budget, requests, tokens, reply)
        return reply.kind == "granted"

    def _refused(self, reply: AcquireReply, requests: float, tokens: float) -> Decision[L]:
        if reply.kind == "too_large":
            raise too_large_error(self.budget, requests, tokens, reply)
        return Decision(False, None, reply.retry_after)

    def _after_fork(self) -> None:
        """In a forked child: forget the parent's threads, sockets and leases (overridden)."""

    def _close_at_exit(self) -> None:
        """At interpreter exit: give back what is still held (overridden)."""

    @property
    def retry_window(self) -> float:
        """How long a failed settle or give-back is retried: past it the lease or ticket is gone anyway."""
        return max(self.budget.lease_ttl, self.ticket_ttl)

    @property
    def heartbeat_interval(self) -> float:
        """Leases are extended this often: three chances before the TTL runs out."""
        return self.budget.lease_ttl / 3.0
