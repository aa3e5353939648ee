"""What a shared budget is: its limits, burst and lease TTL, validated on construction."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from ._exceptions import ConfigurationError

__all__ = ["Budget", "Cap", "CooldownPolicy"]

_NAME = re.compile(r"[A-Za-z0-9._:/@+=-]{1,200}")
_CLASS = re.compile(r"[A-Za-z0-9._:-]{1,64}")

#: The greatest lead a priority class may have: places in the queue it may go ahead by.
MAX_LEAD = 1_000_000_000

#: A tenant's name (sent with each call) and the bounds of a tenant's weight.
_TENANT = re.compile(r"[A-Za-z0-9._:/@+=-]{1,128}")
MIN_WEIGHT, MAX_WEIGHT = 1e-6, 1e9
_SEGMENT = re.compile(r"[A-Za-z0-9._:@+=-]{1,128}")
#: Caps one call may pass (a tenant path's depth): the scripts take at most this many levels.
MAX_LEVELS = 8

#: Providers' buckets hold one minute of their rate: no single request may cost more.
PROVIDER_WINDOW = 60.0

#: Seconds of credit a budget that mirrors the provider's minute keeps back, by default, for the
#: trip of a grant to the provider: it arrives some time after Redis made it, and by a time that
#: varies (the event loop, the network), so two grants a rate's interval apart may reach the provider
#: closer together. A bucket that far behind the provider's absorbs that. A quarter of a second costs
#: a per-minute budget 0.4 % of its first minute and nothing after.
DISPATCH_MARGIN = 0.25

#: Bounds the scripts enforce (``lua/_prelude.lua``), checked here first: no cost, usage, rate (per
#: second) or limit (per minute) above MAX_UNITS, no duration above MAX_SECONDS (about 31.7 years),
#: no rate or limit below MIN_RATE (one request per 11.6 days).
MAX_UNITS = 1e15
MAX_SECONDS = 1e9
MIN_RATE = 1e-6


def _positive(
    budget: str | None, field_name: str, value: float | None, *, zero_ok: bool = False, top: float = MAX_SECONDS
) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"{field_name} must be a number, not {value!r}", budget=budget)
    if math.isnan(value) or math.isinf(value) or value < 0 or (value == 0 and not zero_ok) or value > top:
        bound = ("zero or more" if zero_ok else "more than zero") + ("" if math.isinf(top) else f", at most {top:g}")
        raise ConfigurationError(f"{field_name} must be finite and {bound}, not {value!r}", budget=budget)


def _per_second(budget: str, per_minute: float | None, per_second: float | None, what: str) -> float | None:
    if per_minute is not None and per_second is not None:
        raise ConfigurationError(f"give {what} per minute or per second, not both", budget=budget)
    if per_minute is not None:
        return per_minute / 60.0
    return per_second


V = TypeVar("V")


class Frozen(Mapping[str, V]):
    """A budget's priority classes (name -> lead), tenant weights (name -> weight) or caps (path ->
    Cap): immutable and hashable, like the budget."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, V]) -> None:
        self._items = dict(sorted(items.items()))

    def __getitem__(self, key: str) -> V:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(tuple(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)


def _priorities(budget: str, given: object, default: object) -> Frozen[int] | None:
    if given is None:
        if default is not None:
            raise ConfigurationError("default_priority needs priorities", budget=budget)
        return None
    if not isinstance(given, Mapping) or not given:
        raise ConfigurationError(f"priorities must be a non-empty mapping of class name to lead, not {given!r}",
                                 budget=budget)  # fmt: skip
    for name, lead in given.items():
        if not isinstance(name, str) or not _CLASS.fullmatch(name):
            raise ConfigurationError(
                f"a priority class's name must be 1-64 characters of letters, digits and ._:-, not {name!r}",
                budget=budget,
            )
        if isinstance(lead, bool) or not isinstance(lead, int) or not 0 <= lead <= MAX_LEAD:
            raise ConfigurationError(
                f"priority class {name!r} needs a lead that is a whole number from 0 to {MAX_LEAD}, not {lead!r}",
                budget=budget,
            )
    if default is not None and default not in given:
        raise ConfigurationError(f"default_priority {default!r} is not one of {sorted(given)}", budget=budget)
    return Frozen(given)


def _weight(budget: str, what: str, w: object) -> None:
    if isinstance(w, bool) or not isinstance(w, int | float) or not MIN_WEIGHT <= w <= MAX_WEIGHT:
        raise ConfigurationError(f"{what} must be a number from {MIN_WEIGHT:g} to {MAX_WEIGHT:g}, not {w!r}",
                                 budget=budget)  # fmt: skip


def _tenants(budget: str, given: object, default: object) -> Frozen[float] | None:
    _weight(budget, "default_weight", default)
    if given is None:
        return None
    if not isinstance(given, Mapping):
        raise ConfigurationError(f"tenants must be a mapping of tenant name to weight, not {given!r}", budget=budget)
    for name, w in given.items():
        if not isinstance(name, str) or not _TENANT.fullmatch(name):
            raise ConfigurationError(
                f"a tenant's name must be 1-128 characters of letters, digits and ._:/@+=-, not {name!r}",
                budget=budget,
            )
        _weight(budget, f"tenant {name!r}'s weight", w)
    return Frozen({name: float(w) for name, w in given.items()})


def most_per_call(rate: float, burst: float, floor: float) -> float:
    """The most one call may cost in a dimension of this rate and burst (a budget's or a cap's):
    a minute of the rate (providers' buckets hold one), or the burst if longer, at least ``floor``."""
    return max(floor, rate * max(burst, PROVIDER_WINDOW))


def _check_limits(limits: Budget | Cap, budget: str | None, prefix: str) -> None:
    """The rates and max concurrency of a budget, or of a cap (``prefix``: "a cap's "), checked."""
    for key in ("rpm", "rps", "tpm", "tps"):
        _positive(budget, prefix + key, getattr(limits, key), top=math.inf)
    mc = limits.max_concurrency
    if mc is not None and (isinstance(mc, bool) or not isinstance(mc, int) or not 1 <= mc <= MAX_UNITS):
        raise ConfigurationError(
            f"{prefix}max_concurrency must be a whole number from 1 to {MAX_UNITS:g}, not {mc!r}", budget=budget
        )
    for what, rate in (("requests", limits.request_rate), ("tokens", limits.token_rate)):
        if rate is not None and not MIN_RATE <= rate <= MAX_UNITS:
            raise ConfigurationError(
                f"{prefix or 'the '}{what} rate must be from {MIN_RATE:g} to {MAX_UNITS:g} per second, not {rate!r}",
                budget=budget,
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Cap:
    """The limits of one node of the hierarchy under a budget: a team, a user (see ``Budget.caps``).

    Rates per minute or per second, as on the budget; ``burst`` is seconds of credit (None: the
    budget's own credit). A cap limits only the calls that pass it; the budget still limits them all.
    """

    rpm: float | None = None
    rps: float | None = None
    tpm: float | None = None
    tps: float | None = None
    max_concurrency: int | None = None
    burst: float | None = None

    def __post_init__(self) -> None:
        _check_limits(self, None, "a cap's ")
        _positive(None, "a cap's burst", self.burst, zero_ok=True)
        if self.request_rate is None and self.token_rate is None and self.max_concurrency is None:
            raise ConfigurationError("a cap limits nothing: give it rpm/rps, tpm/tps or max_concurrency")

    @property
    def request_rate(self) -> float | None:
        return _per_second("", self.rpm, self.rps, "a cap's requests")

    @property
    def token_rate(self) -> float | None:
        return _per_second("", self.tpm, self.tps, "a cap's tokens")


class Level(NamedTuple):
    """One cap a call passes, as the scripts take it: its node (the tenant path up to it), rates per
    second (0: none), bursts in seconds, max concurrency (0: none)."""

    node: str
    request_rate: float
    request_burst: float
    token_rate: float
    token_burst: float
    max_concurrency: int


def _caps(budget: str, given: object) -> Frozen[Cap] | None:
    if given is None:
        return None
    if not isinstance(given, Mapping) or not given:
        raise ConfigurationError(
            f"caps must be a non-empty mapping of tenant path to Cap, not {given!r}", budget=budget
        )
    for path, cap in given.items():
        parts = path.split("/") if isinstance(path, str) else []
        if (
            not isinstance(path, str)
            or len(path) > 128
            or not 1 <= len(parts) <= MAX_LEVELS
            or not all(_SEGMENT.fullmatch(p) for p in parts[:-1])
            or not (_SEGMENT.fullmatch(parts[-1]) or parts[-1] == "*")
        ):
            raise ConfigurationError(
                f"a cap's path must be 1 to {MAX_LEVELS} parts joined by '/', each of letters, digits and ._:@+=- "
                f"(the last may be '*': every part there without a cap of its own), at most 128 characters, "
                f"not {path!r}",
                budget=budget,
            )
        if not isinstance(cap, Cap):
            raise ConfigurationError(f"the cap of {path!r} must be a Cap, not {cap!r}", budget=budget)
    return Frozen(given)


@dataclass(frozen=True, slots=True)
class Budget:
    """One provider limit shared by every process that uses the same ``name``.

    ``burst`` is seconds of credit per dimension: 0 paces evenly (one request every 1/rate),
    60 lets a per-minute budget spend a whole minute at once, as OpenAI's own buckets do.
    A lease not settled or heartbeaten within ``lease_ttl`` seconds is presumed dead and freed.
    A grant made to a queued waiter is provisional: its holder claims it within ``claim_window``
    seconds (never more than ``lease_ttl``) or it is taken back and refunded, so a waiter that died
    in the queue costs the fleet that window, not a lease TTL.

    Limits the provider reports (``lease.report(limit_requests=..., limit_tokens=...)``) are
    learned by the whole fleet: the rates in force are the configured ones lowered to them, or
    them alone where none is configured. ``probe=True`` grants one call at a time until the first
    call is settled or a limit is learned, so that a budget without configured rates does not
    send a first wave the provider may not hold.

    ``dispatch_margin`` (seconds) is kept back from a burst that reaches into the provider's last
    minute: the credit is ``min(burst, max(burst, 60) - dispatch_margin)`` seconds, so ``burst=60``
    holds 59.75 s by default (see ``DISPATCH_MARGIN``), and a burst of 59.75 s or less is untouched
    (the provider's bucket keeps the rest of its minute as room for the trip).

    ``overdraft=True`` is XtremeFlow's admission: a call is granted once every bucket is out of
    debt, whatever its cost, which is charged in full (the excess as debt that delays the next
    grants). A cost larger than a bucket is then granted when that bucket is full instead of
    refused, and after idle one call more than the burst starts at once. A provider that checks
    each call against what its bucket holds may refuse the call that overdraws: the compatible
    API uses it; a fleet that must see no 429 keeps the default.

    ``priorities`` names classes of traffic, each with a lead: ``{"interactive": 1000, "batch": 0}``.
    A call of a class with lead L (``acquire(..., priority="interactive")``) goes ahead of the
    waiters that arrived among the last L arrivals, and is granted at once when it then leads and
    fits; within a class the queue stays first come, first served. Aging bounds what a lower
    class gives up: a waiter is passed by at most (the greatest lead less its own) later arrivals,
    then served in turn. Calls that name no class take ``default_priority``'s lead (0 without one).

    ``tenants`` shares the budget by tenant: ``{"team-a": 1, "team-b": 2}`` weights (``{}``: every
    tenant weighs ``default_weight``). Calls say whose they are (``acquire(..., tenant="team-b")``,
    any name; untagged calls are the tenant ``""``); a tenant alone may use the whole budget, and
    while several wait each gets its weight's share of the dimension that binds (start-time fair
    queuing on the seconds of rate each call takes). With tenants, a lead moves a call ahead by
    ``lead`` calls of its own cost.

    ``caps`` makes a hierarchy under the budget: ``{"team-a": Cap(tpm=400_000), "team-a/*":
    Cap(rpm=60)}``. A call of tenant ``"team-a/alice"`` passes the cap of each part of its path,
    ``"team-a"`` then ``"team-a/alice"`` (a path's own cap, else its parent's ``"*"``), and is granted
    only when the budget and every cap it passes allow it, atomically; it is settled, refunded and
    released at each. Calls held back only by their caps do not hold the others back.
    """

    name: str
    rpm: float | None = field(default=None, kw_only=True)
    rps: float | None = field(default=None, kw_only=True)
    tpm: float | None = field(default=None, kw_only=True)
    tps: float | None = field(default=None, kw_only=True)
    max_concurrency: int | None = field(default=None, kw_only=True)
    burst: float = field(default=0.0, kw_only=True)
    lease_ttl: float = field(default=30.0, kw_only=True)
    claim_window: float = field(default=0.5, kw_only=True)
    probe: bool = field(default=False, kw_only=True)
    overdraft: bool = field(default=False, kw_only=True)
    dispatch_margin: float = field(default=DISPATCH_MARGIN, kw_only=True)
    priorities: Mapping[str, int] | None = field(default=None, kw_only=True)
    default_priority: str | None = field(default=None, kw_only=True)
    tenants: Mapping[str, float] | None = field(default=None, kw_only=True)
    default_weight: float = field(default=1.0, kw_only=True)
    caps: Mapping[str, Cap] | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise ConfigurationError(
                f"budget name must be 1-200 characters of letters, digits and ._:/@+=-, not {self.name!r}"
            )
        _check_limits(self, self.name, "")
        _positive(self.name, "burst", self.burst, zero_ok=True)
        _positive(self.name, "lease_ttl", self.lease_ttl)
        _positive(self.name, "claim_window", self.claim_window)
        if self.dispatch_margin is None:
            raise ConfigurationError("dispatch_margin must be a number of seconds, not None", budget=self.name)
        _positive(self.name, "dispatch_margin", self.dispatch_margin, zero_ok=True)
        for flag in ("probe", "overdraft"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigurationError(f"{flag} must be True or False, not {getattr(self, flag)!r}", budget=self.name)
        object.__setattr__(self, "priorities", _priorities(self.name, self.priorities, self.default_priority))
        object.__setattr__(self, "tenants", _tenants(self.name, self.tenants, self.default_weight))
        object.__setattr__(self, "caps", _caps(self.name, self.caps))

    def lead(self, priority: str | None = None) -> int:
        """The lead of class ``priority`` (None: the default class's). A name the budget does not
        define is refused before Redis is touched: a typo must not silently demote a call."""
        if priority is None:
            if self.default_priority is None or self.priorities is None:
                return 0
            return self.priorities[self.default_priority]
        if self.priorities is None or not isinstance(priority, str) or priority not in self.priorities:
            known = "none are defined" if self.priorities is None else f"it has {sorted(self.priorities)}"
            raise ConfigurationError(f"budget has no priority class {priority!r}; {known}", budget=self.name)
        return self.priorities[priority]

    def weight(self, tenant: str | None = None) -> float:
        """The weight of ``tenant`` (None: the untagged calls, tenant ``""``), or 0 where the budget
        is not shared by tenant. A tenant named on a budget without ``tenants`` is refused, as is a
        name that could not travel to Redis, before Redis is touched."""
        if self.tenants is None and (tenant is None or self.caps is None):
            if tenant is None:
                return 0.0
            raise ConfigurationError(
                f"budget is not shared by tenant (tenant {tenant!r} given): set tenants= or caps= on it",
                budget=self.name,
            )
        if tenant is None:
            return self.default_weight if self.tenants is not None else 0.0
        if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
            raise ConfigurationError(
                f"a tenant's name must be 1-128 characters of letters, digits and ._:/@+=-, not {tenant!r}",
                budget=self.name,
            )
        if self.tenants is None:
            return 0.0
        return self.tenants.get(tenant, self.default_weight)

    def levels(self, tenant: str | None) -> tuple[Level, ...]:
        """The caps a call of ``tenant`` passes, from the top of its path down (see ``caps``); a path
        with an empty part, or deeper than the scripts take, is refused before Redis is touched."""
        if self.caps is None or not tenant:
            return ()
        parts = tenant.split("/")
        if "" in parts or len(parts) > MAX_LEVELS:
            raise ConfigurationError(
                f"a tenant path under caps must be 1 to {MAX_LEVELS} non-empty parts joined by '/', not {tenant!r}",
                budget=self.name,
            )
        out = []
        for k in range(1, len(parts) + 1):
            node = "/".join(parts[:k])
            cap = self.caps.get(node) or self.caps.get("/".join([*parts[: k - 1], "*"]))
            if cap is not None:
                rr, rt = cap.request_rate, cap.token_rate
                burst = self.credit if cap.burst is None else cap.burst
                out.append(Level(node, rr or 0.0, burst, rt or 0.0, burst, cap.max_concurrency or 0))
        return tuple(out)

    @property
    def request_rate(self) -> float | None:
        """Requests per second, or None when requests are not limited."""
        return _per_second(self.name, self.rpm, self.rps, "requests")

    @property
    def token_rate(self) -> float | None:
        """Tokens per second, or None when tokens are not limited."""
        return _per_second(self.name, self.tpm, self.tps, "tokens")

    @property
    def credit(self) -> float:
        """Seconds of credit each bucket holds: the burst, less the dispatch margin where it reaches
        into the provider's last minute."""
        return max(0.0, min(self.burst, max(self.burst, PROVIDER_WINDOW) - self.dispatch_margin))

    @property
    def max_tokens_per_request(self) -> float:
        """The largest token cost that can ever be granted (infinite when tokens are unlimited)."""
        rate = self.token_rate
        return math.inf if rate is None else most_per_call(rate, self.credit, 0.0)

    @property
    def max_requests_per_acquire(self) -> float:
        """The largest request count one acquire may charge."""
        rate = self.request_rate
        return math.inf if rate is None else most_per_call(rate, self.credit, 1.0)


@dataclass(frozen=True, slots=True, kw_only=True)
class CooldownPolicy:
    """How the fleet pauses after a 429.

    A first 429 pauses exactly the provider's retry-after (or ``base`` seconds without one);
    a 429 within ``quiet`` seconds after a pause ends doubles the pause, up to ``max_backoff``.
    ``jitter`` lengthens, never shortens. No pause, retry-after and jitter included, is ever longer
    than ``max_pause``: per-minute providers ask for a minute at most, so a longer retry-after is a
    daily quota or a confused proxy, and it should not stop a whole fleet for hours.
    """

    base: float = 1.0
    max_backoff: float = 60.0
    quiet: float = 10.0
    jitter: float = 0.1
    max_pause: float = 300.0

    def __post_init__(self) -> None:
        for key in ("base", "max_backoff", "max_pause"):
            _positive(None, key, getattr(self, key))
        for key in ("quiet", "jitter"):
            _positive(None, key, getattr(self, key), zero_ok=True)
        if self.max_backoff < self.base:
            raise ConfigurationError("max_backoff must be at least base")
        if self.max_pause < self.max_backoff:
            raise ConfigurationError(
                f"max_pause ({self.max_pause:g}s) must be at least max_backoff ({self.max_backoff:g}s)"
            )
