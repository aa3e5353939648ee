"""The budget's operations in pure Python, for ``memory://``: the scripts of ``lua/``, decision for decision.

A process that shares its budget with nobody needs neither Redis nor a Lua interpreter, and should
not pay for them on every call. ``memory://`` runs each operation here instead, on the same state
(a TAT per bucket, the cooldown, leases, one queue of tickets, learned limits), rounded exactly
where the scripts round it: six decimals where they store ``%.6f``, 14 significant digits where Lua
turns a number into text. Every reply, every event and every expiry is therefore the one the script
would give at the same clock; tests/test_model.py runs every step of its state machine on both and
compares them byte for byte. The comments name the Lua function each piece mirrors; the rules
themselves are documented once, in ``lua/_prelude.lua`` and each operation's header.

Not thread-safe by itself: ``_memory`` calls it under one lock, as Redis runs one script at a time.
"""

from __future__ import annotations

import heapq
import math
import re
import time
from collections.abc import Callable
from itertools import islice
from typing import Any

from redis.exceptions import ResponseError

MAX_UNITS, MAX_SECONDS, MIN_RATE, MAX_TEXT = 1e15, 1e9, 1e-6, 256
RECOVERY_WINDOWS = 3
LATE_CREDIT = 0.0625

UNITS, UNITS_OR_UNSET, COUNT = "a number in [0, 1e15]", "-1 or a number in [0, 1e15]", "a whole number in [0, 1e15]"
RATE, LIMIT_OR_UNSET = "0 or a rate in [1e-6, 1e15]", "-1 or a limit in [1e-6, 1e15]"
SECONDS, POSITIVE_SECONDS = "seconds in [0, 1e9]", "seconds in (0, 1e9]"
SECONDS_OR_UNSET, FACTOR, DRAW = "-1 or seconds in [0, 1e9]", "a number in [0, 1e9]", "a number in [0, 1)"
FLAG = '"0" or "1"'
LEVEL_COUNT = "a whole number in [0, 8]"
NODE = "1 to 256 bytes, no space, comma or control character"
MAX_LEVELS, MAX_SCAN = 8, 32
TEXT = "1 to 256 bytes, no space or control character"
TEXT_OR_EMPTY = '"" or 1 to 256 bytes, no space or control character'
CHECKED = "checked before"

_NUMBER_CHARS = re.compile(r"[0-9.eE+\-]+")
_SPACE_OR_CONTROL = re.compile(rb"[\s\x00-\x1f\x7f]")
_SPACE_COMMA_OR_CONTROL = re.compile(rb"[\s,\x00-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

Spec = tuple[tuple[Any, ...], ...]

_BLOCK = (
    ("request rate", RATE),
    ("request burst", SECONDS),
    ("token rate", RATE),
    ("token burst", SECONDS),
    ("max concurrency", COUNT),
    ("lease ttl", POSITIVE_SECONDS),
    ("idle grace", SECONDS),
    ("channel", TEXT),
    ("claim window", POSITIVE_SECONDS),
    ("seen", FLAG),
)
_LIMITS = (0, 1, 2, 3, 4, 5, 8)  # the block's arguments stored as the budget's limits (`cf`)
_BLOCKS: dict[tuple[str, ...], list[Any]] = {}  # budget blocks that passed their checks, and their values

_SPECS: dict[str, Spec] = {
    "acquire": (
        ("id", TEXT),
        ("requests", UNITS),
        ("tokens", UNITS),
        ("max wait", SECONDS_OR_UNSET),
        ("may queue", FLAG),
        ("ticket ttl", POSITIVE_SECONDS),
        ("probe", FLAG, "0"),
        ("overdraft", FLAG, "0"),
        ("lead", COUNT, "0"),
        ("tenant", TEXT_OR_EMPTY, ""),
        ("weight", RATE, "0"),
    ),
    "settle": (
        ("id", TEXT_OR_EMPTY),
        ("actual tokens", UNITS_OR_UNSET),
        ("remaining requests", UNITS_OR_UNSET),
        ("remaining tokens", UNITS_OR_UNSET),
        ("request limit", LIMIT_OR_UNSET),
        ("token limit", LIMIT_OR_UNSET),
        ("limit memory", SECONDS),
        ("model", TEXT_OR_EMPTY, ""),
        ("census", FLAG, "0"),
    ),
    "cancel": (("id", TEXT),),
    "extend": (("id", TEXT),),
    "rejoin": (
        ("id", TEXT_OR_EMPTY),
        ("requests", UNITS),
        ("tokens", UNITS),
        ("spent requests", UNITS),
        ("spent tokens", UNITS),
        ("hold", SECONDS, "0"),
    ),
    "cooldown": (
        ("retry after", SECONDS_OR_UNSET),
        ("base backoff", POSITIVE_SECONDS),
        ("max backoff", POSITIVE_SECONDS),
        ("quiet period", SECONDS),
        ("jitter fraction", FACTOR),
        ("jitter draw", DRAW),
        ("max pause", POSITIVE_SECONDS),
    ),
    "clear_cooldown": (),
    "configure": (),
    "status": (),
}


MAX_RENEW = 1000  # ticket ids one renew.lua call takes


def _renewal_spec(spec: Spec, n_argv: int, at: int) -> Spec:
    """renewal_spec(): ``spec``, then the ticket TTL at ARGV[at] and 1 to MAX_RENEW ids (as many as
    given, within that)."""
    ids = max(at + 1, min(n_argv, at + MAX_RENEW)) - at
    return (*spec, ("ticket ttl", POSITIVE_SECONDS), *(("id", TEXT),) * ids)


_LEVEL_ARGS = (
    ("node", NODE),
    ("request rate", RATE),
    ("request burst", SECONDS),
    ("token rate", RATE),
    ("token burst", SECONDS),
    ("max concurrency", COUNT),
)


def _level_spec(spec: Spec, argv: list[str], at: int) -> Spec:
    """level_spec(): ``spec``, then the count of levels at ARGV[at] and six arguments for each it
    announces (none where it is not a count)."""
    n = _value_of(LEVEL_COUNT, argv[at - 1]) if len(argv) >= at else 0
    levels = tuple((f"{name} of level {i}", kind) for i in range(1, int(n or 0) + 1) for name, kind in _LEVEL_ARGS)
    return (*spec, ("levels", LEVEL_COUNT, "0"), *levels)


def _levels(level_args: tuple[Any, ...]) -> list[_Level] | None:
    """levels_at(): the checked six arguments of each level."""
    return [_Level(*level_args[i : i + 6]) for i in range(0, len(level_args), 6)] or None


def fmt(x: float) -> str:
    """Lua's ``string.format('%.6f', x)``."""
    return f"{x:.6f}"


def r6(x: float) -> float:
    """What ``tonumber(fmt(x))`` reads back: the state keeps six decimals."""
    return float(f"{x:.6f}")


def g14(x: float) -> str:
    """Lua's ``tostring(x)`` (and ``x .. ''``): ``%.14g``."""
    return f"{x:.14g}"


def _lua_number(s: str) -> float | None:
    """Lua's ``tonumber`` for the strings value_of() lets through to it."""
    try:
        return float(s)
    except ValueError:
        return None


def _value_of(kind: str, s: str) -> Any:
    """value_of() of _prelude.lua: the value, or None."""
    if kind == CHECKED:
        return float(s)
    if kind == FLAG:
        return s == "1" if s in ("0", "1") else None
    if kind is TEXT or kind is TEXT_OR_EMPTY:
        b = s.encode()
        if len(b) <= MAX_TEXT and (b or kind is TEXT_OR_EMPTY) and not _SPACE_OR_CONTROL.search(b):
            return s
        return None
    if kind is NODE:
        b = s.encode()
        return s if 0 < len(b) <= MAX_TEXT and not _SPACE_COMMA_OR_CONTROL.search(b) else None
    if len(s) > 40 or not _NUMBER_CHARS.fullmatch(s) or s[0] == "+":
        return None
    x = _lua_number(s)
    if x is None or x != x:
        return None
    if kind is UNITS:
        ok = 0 <= x <= MAX_UNITS
    elif kind is UNITS_OR_UNSET:
        ok = x == -1 or 0 <= x <= MAX_UNITS
    elif kind is COUNT:
        ok = 0 <= x <= MAX_UNITS and x == math.floor(x)
    elif kind is LEVEL_COUNT:
        ok = 0 <= x <= MAX_LEVELS and x == math.floor(x)
    elif kind is RATE:
        ok = x == 0 or MIN_RATE <= x <= MAX_UNITS
    elif kind is LIMIT_OR_UNSET:
        ok = x == -1 or MIN_RATE <= x <= MAX_UNITS
    elif kind is SECONDS or kind is FACTOR:
        ok = 0 <= x <= MAX_SECONDS
    elif kind is POSITIVE_SECONDS:
        ok = 0 < x <= MAX_SECONDS
    elif kind is SECONDS_OR_UNSET:
        ok = x == -1 or 0 <= x <= MAX_SECONDS
    else:  # DRAW
        ok = 0 <= x < 1
    return x if ok else None


def _quoted(raw: str) -> str:
    """``string.format('%q', raw:sub(1, 40)):gsub('%c', '?')``."""
    s = raw.encode()[:40].decode(errors="replace")
    out = ['"']
    for ch in s:
        if ch in '"\\\n':
            out.append("\\" + ch)
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\0":
            out.append("\\000")
        else:
            out.append(ch)
    out.append('"')
    return _CONTROL.sub("?", "".join(out))


def _checked(
    argv: list[str], first: int, spec: Spec, kinds: tuple[str, ...] | None = None, more: bool = False
) -> list[Any]:
    """checked(): the values of ARGV[first..] (1-based), else raise the XFLOW_BADARG refusal."""
    values = []
    n_argv = len(argv)
    n = first
    for arg in spec:
        raw = argv[n - 1] if n <= n_argv else (arg[2] if len(arg) > 2 else None)
        kind = kinds[n - first] if kinds else arg[1]
        value = _value_of(kind, raw) if raw is not None else None
        if value is None:
            got = _quoted(raw) if raw is not None else "nothing"
            raise ResponseError(f"XFLOW_BADARG ARGV[{n}] {arg[0]}: got {got}, expected {kind}")
        values.append(value)
        n += 1
    last = first + len(spec) - 1
    if not more and n_argv > last:
        raise ResponseError(f"XFLOW_BADARG ARGV[{last + 1}]: unexpected, this script takes {last} arguments")
    return values


class _Level:
    """One cap a call passes, as its ticket and lease keep it (level_of())."""

    __slots__ = ("br", "bt", "mc", "node", "rr", "rt")

    def __init__(self, node: str, rr: float, br: float, rt: float, bt: float, mc: float) -> None:
        self.node, self.rr, self.br, self.rt, self.bt, self.mc = node, rr, br, rt, bt, mc

    def __repr__(self) -> str:  # (what memory://'s DUMP shows of a ticket or a lease)
        return f"n{self.rr!r},{self.br!r},{self.rt!r},{self.bt!r},{self.mc!r},{self.node}"


class _Lease:
    """One lease_data entry: what it was charged and the levels and counters just after."""

    __slots__ = ("cq", "creq", "ct", "ctok", "kr", "kt", "levels", "provisional", "snap_req", "snap_tok", "start")

    def __init__(
        self,
        creq: float,
        ctok: float,
        start: str,
        snap_req: float | None,
        snap_tok: float | None,
        kr: float,
        kt: float,
        cq: float,
        ct: float,
        provisional: bool,
        levels: list[_Level] | None = None,
    ) -> None:
        self.creq, self.ctok, self.start = creq, ctok, start
        self.snap_req, self.snap_tok = snap_req, snap_tok
        self.kr, self.kt, self.cq, self.ct = kr, kt, cq, ct
        self.provisional = provisional
        self.levels = levels


class _Ticket:
    __slots__ = ("alive", "book", "creq", "ctok", "fin", "fit", "inc", "levels", "overdraft", "tag", "tenant", "ttl")

    def __init__(
        self,
        creq: float,
        ctok: float,
        alive: float,
        ttl: float,
        fit: float,
        overdraft: bool,
        tag: float | None = None,
        inc: float = 0.0,
        tenant: str = "",
        fin: float = 0.0,
        levels: list[_Level] | None = None,
        book: bool = False,
    ) -> None:
        self.creq, self.ctok, self.alive, self.ttl, self.fit, self.overdraft = creq, ctok, alive, ttl, fit, overdraft
        # queued by a tenant (fair queuing): its place ("v"), the turn it was charged, whose it is and
        # the tenant's finish tag it set
        self.tag, self.inc, self.tenant, self.fin = tag, inc, tenant, fin
        self.levels = levels
        self.book = book  # reserved at the head within its horizon (see advance())


class _Leases:
    """The leases ZSET: id -> expiry, with its first and last by (expiry, id) as Redis orders them."""

    __slots__ = ("_high", "_low", "by_id")

    def __init__(self) -> None:
        self.by_id: dict[str, float] = {}
        self._low: list[tuple[float, str]] = []
        self._high: list[tuple[float, str]] = []  # negated expiry: the last expiry on top

    def __len__(self) -> int:
        return len(self.by_id)

    def add(self, lid: str, expiry: float) -> None:
        if self.by_id.get(lid) == expiry:
            return
        self.by_id[lid] = expiry
        heapq.heappush(self._low, (expiry, lid))
        heapq.heappush(self._high, (-expiry, lid))
        if len(self._low) > 2 * len(self.by_id) + 32:
            self._low = [(e, i) for i, e in self.by_id.items()]
            heapq.heapify(self._low)
            self._high = [(-e, i) for i, e in self.by_id.items()]
            heapq.heapify(self._high)

    def remove(self, lid: str) -> None:
        self.by_id.pop(lid, None)

    def first(self) -> tuple[str, float] | None:
        low, by_id = self._low, self.by_id
        while low and by_id.get(low[0][1]) != low[0][0]:
            heapq.heappop(low)
        return (low[0][1], low[0][0]) if low else None

    def last_expiry(self) -> float | None:
        high, by_id = self._high, self.by_id
        while high and by_id.get(high[0][1]) != -high[0][0]:
            heapq.heappop(high)
        return -high[0][0] if high else None

    def due(self, now: float) -> list[str]:
        """ZRANGEBYSCORE -inf now, in order."""
        out = []
        low, by_id = self._low, self.by_id
        while low and low[0][0] <= now:
            e, lid = heapq.heappop(low)
            if by_id.get(lid) == e:
                out.append(lid)
        for lid in out:  # popped here, removed by the caller
            heapq.heappush(low, (by_id[lid], lid))
        return out

    def ids_from(self, t: float) -> list[str]:
        """ZRANGEBYSCORE t +inf, in order (a cooldown's rare scan: no index for it)."""
        after = sorted((e, lid.encode(), lid) for lid, e in self.by_id.items() if e >= t)
        return [lid for _, _, lid in after]

    def count_after(self, t: float) -> int:
        return sum(1 for e in self.by_id.values() if e > t)


class _Budget:
    """The eight keys of one budget. ``state`` holds the state HASH's fields as the scripts wrote them."""

    __slots__ = ("caps", "data", "expire_at", "learned", "leases", "queue", "state", "tenants", "tickets")

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}
        self.leases = _Leases()
        self.data: dict[str, _Lease] = {}
        self.queue: dict[str, float] = {}  # id -> place, in order of (place, id) as the ZSET is
        self.tickets: dict[str, _Ticket] = {}
        self.learned: dict[str, list[float]] = {}  # model -> [rpm, rpm until, tpm, tpm until]
        self.tenants: dict[str, float] = {}  # tenant -> finish tag
        self.caps: dict[str, tuple[float, float, float]] = {}  # node -> (request TAT, token TAT, leases held)
        self.expire_at: float | None = None

    def empty(self) -> bool:
        return not (
            self.state
            or self.leases.by_id
            or self.data
            or self.queue
            or self.tickets
            or self.learned
            or self.tenants
            or self.caps
        )


class _State:
    """load_state()'s table."""

    __slots__ = (
        "ca",
        "cl",
        "cq",
        "cr",
        "ct",
        "cu",
        "kr",
        "kt",
        "la",
        "lost",
        "lr",
        "lt",
        "lu",
        "pb",
        "qa",
        "reserved",
        "rf",
        "rt",
        "seq",
        "stored",
        "tf",
        "tt",
        "vt",
        "xa",
    )
    rt: float
    tt: float
    cu: float
    cl: float
    cr: float
    seq: int
    qa: float
    kr: float
    kt: float
    cq: float
    ct: float
    lr: float
    lt: float
    lu: float
    pb: int
    la: float
    xa: float
    vt: float
    ca: float
    rf: float
    tf: float
    reserved: bool
    stored: bool
    lost: bool


class Engine:
    """Every budget of one ``memory://`` server. ``run`` is EVALSHA of one operation; what it
    publishes goes to ``publish(channel, message)``; ``numsub(channel)`` is PUBSUB NUMSUB's count."""

    def __init__(
        self,
        publish: Callable[[str, str], None],
        clock: Callable[[], float] = time.time,
        numsub: Callable[[str], int] = lambda _channel: 0,
    ) -> None:
        self.budgets: dict[str, _Budget] = {}
        self.publish = publish
        self.clock = clock
        self.numsub = numsub

    # --- the keyspace, as the few commands ``_memory`` offers see it ---

    def _live(self, key: str, at: float) -> _Budget | None:
        b = self.budgets.get(key)
        if b is not None and b.expire_at is not None and b.expire_at < at:
            del self.budgets[key]
            return None
        return b

    def flush(self) -> None:
        self.budgets.clear()

    def existing_keys(self, keys_of: Callable[[str], list[str]]) -> list[str]:
        """Every key that exists now (``keys_of`` names the eight keys of a budget from its first)."""
        at = self.clock()
        out: list[str] = []
        for first in list(self.budgets):
            b = self._live(first, at)
            if b is None:
                continue
            parts = (b.state, b.leases.by_id, b.data, b.queue, b.tickets, b.learned, b.tenants, b.caps)
            out.extend(k for k, part in zip(keys_of(first), parts, strict=True) if part)
        return out

    def pttl(self, first: str) -> int:
        at = self.clock()
        b = self._live(first, at)
        if b is None or b.empty():
            return -2
        if b.expire_at is None:
            return -1
        return max(0, round((b.expire_at - at) * 1000))

    def pexpiretime(self, first: str) -> int:
        b = self._live(first, self.clock())
        if b is None or b.empty():
            return -2
        return -1 if b.expire_at is None else int(b.expire_at * 1000)

    def learned_models(self, first: str) -> list[str]:
        b = self._live(first, self.clock())
        return list(b.learned) if b is not None else []

    # --- one operation ---

    def run(self, op: str, keys: list[str], argv: list[str]) -> list[str]:
        t = self.clock()
        now_us = round(t * 1_000_000)
        now = now_us // 1_000_000 + (now_us % 1_000_000) / 1000000
        b = self._live(keys[0], t)
        if b is None:
            b = self.budgets[keys[0]] = _Budget()
        try:
            return _Call(self, b, t, now, argv).run(op)
        finally:
            if b.empty():
                self.budgets.pop(keys[0], None)


class _Call:
    """One script's run: its clock, its budget block and what it changes."""

    def __init__(self, engine: Engine, b: _Budget, t: float, now: float, argv: list[str]) -> None:
        self.engine, self.b, self.t, self.now, self.argv = engine, b, t, now, argv
        self.reaped_req = 0.0
        self.reaped_tok = 0.0
        self.nodes: dict[str, list[Any]] = {}  # NODES: node -> [rt, tt, n, dirty]
        self.granted: set[str] = set()  # GRANTED: the tickets advance() granted in this call
        self.arriving: str | None = None  # ARRIVING: the ticket acquire() queues in this call

    # --- the budget block (prelude) ---

    def run(self, op: str) -> list[str]:
        argv = self.argv
        stored = self.b.state.get("cf")
        config = " ".join([argv[i] for i in _LIMITS]) if len(argv) >= 9 else None
        same = config is not None and config == stored
        head = tuple(argv[:10])
        block = _BLOCKS.get(head)
        if block is None:  # checked once per distinct block: a budget sends the same one every time
            kinds = tuple(CHECKED if same and i in _LIMITS else kind for i, (_, kind) in enumerate(_BLOCK))
            block = _checked(argv, 1, _BLOCK, kinds, more=True)
            if len(_BLOCKS) >= 256:
                _BLOCKS.clear()
            _BLOCKS[head] = block
        (
            self.cfg_rate_req,
            self.burst_req,
            self.cfg_rate_tok,
            self.burst_tok,
            self.max_conc,
            self.lease_ttl,
            self.idle_grace,
            self.channel,
            self.claim_window,
            self.seen,
        ) = block
        self.stored, self.config = stored, config
        self.rate_req, self.rate_tok, self.probing = self.cfg_rate_req, self.cfg_rate_tok, False
        # the give-up moment changes with every call: checked apart from the block kept above
        raw = argv[10] if len(argv) > 10 else None
        give_up = 0.0 if raw == "0" else _checked(argv, 11, (("give up", UNITS),), more=True)[0]
        if give_up > 0 and self.now > give_up:  # its client has given up on it (Late calls)
            raise ResponseError(f"XFLOW_LATE {self.now:.6f} {give_up:.6f}")
        if op == "configure":
            _checked(argv, 12, ())
            return self.configure()
        if op == "renew":
            spec = _renewal_spec((), len(argv), 12)
        elif op == "settle" and len(argv) >= 21:  # with tickets to renew
            spec = _renewal_spec(_SPECS[op], len(argv), 21)
        elif op in ("acquire", "rejoin"):
            spec = _level_spec(_SPECS[op], argv, 23 if op == "acquire" else 18)
            if op == "acquire":
                spec = (*spec, ("reserve", FLAG, "0"), ("book", FLAG, "0"))
        else:
            spec = _SPECS[op]
        values = _checked(argv, 12, spec)
        if stored is not None and stored != config:
            mine = [block[i] for i in _LIMITS]
            words = stored.split()
            if len(words) != 7 or any(_lua_number(w) != m for w, m in zip(words, mine, strict=False)):
                raise ResponseError(f"XFLOW_CONFLICT stored {stored}; given {config}")
        reply: list[str] = getattr(self, op)(*values)
        return reply

    # --- _prelude.lua ---

    def apply_limits(self, st: _State) -> None:
        self.rate_req = _effective(self.cfg_rate_req, st.lr)
        self.rate_tok = _effective(self.cfg_rate_tok, st.lt)
        self.probing = st.pb == 1

    def given_back(self, tat: float, rate: float, amount: float, floor: float = 0.0) -> float:
        """given_back(): the TAT once ``amount`` is given back (never below what the reservations
        hold, ``floor``), or (below 0) charged as debt."""
        if rate <= 0 or amount == 0:
            return tat
        if amount < 0:
            return max(tat, self.now) - amount / rate
        if tat > self.now:
            return max(self.now, min(tat, floor), tat - amount / rate)
        return tat

    def refund(self, st: _State, creq: float, ctok: float) -> None:
        st.rt = self.given_back(st.rt, self.rate_req, creq, st.rf)
        st.tt = self.given_back(st.tt, self.rate_tok, ctok, st.tf)

    def dim_fit(self, tat: float, cost: float, rate: float, burst: float, overdraft: bool) -> float:
        if rate <= 0 or cost <= 0:
            return self.now
        return max(self.now, tat - _slack_of(cost, rate, burst, overdraft))

    def fit_time(self, st: _State, creq: float, ctok: float, overdraft: bool) -> float:
        return max(
            self.now,
            st.cu,
            self.dim_fit(st.rt, creq, self.rate_req, self.burst_req, overdraft),
            self.dim_fit(st.tt, ctok, self.rate_tok, self.burst_tok, overdraft),
        )

    def slot_free(self) -> bool:
        if self.max_conc <= 0 and not self.probing:
            return True
        n = len(self.b.leases)
        return (self.max_conc <= 0 or n < self.max_conc) and not (self.probing and n > 0)

    def charged_from(
        self, st: _State, tat: float, fit: float, cost: float, rate: float, burst: float, overdraft: bool
    ) -> float:
        now = self.now
        slack = _slack_of(cost, rate, burst, overdraft)
        if fit < 0 or fit >= now or st.cu >= fit - 0.000001 or tat - slack < fit - 0.000001:
            return max(tat, now)
        return max(tat, fit, now - LATE_CREDIT, now - cost / rate)

    def charge(self, st: _State, creq: float, ctok: float, fit: float, overdraft: bool) -> None:
        st.cq = st.cq + creq
        st.ct = st.ct + ctok
        if self.rate_req > 0:
            st.rt = (
                self.charged_from(st, st.rt, fit, creq, self.rate_req, self.burst_req, overdraft) + creq / self.rate_req
            )
        if self.rate_tok > 0:
            st.tt = (
                self.charged_from(st, st.tt, fit, ctok, self.rate_tok, self.burst_tok, overdraft) + ctok / self.rate_tok
            )

    def level(self, tat: float, rate: float, burst: float, at: float | None = None) -> float:
        if rate <= 0:
            return 0
        return rate * burst - rate * max(0, tat - (self.now if at is None else at))

    def snapshot(self, tat: float, rate: float, burst: float, at: float) -> float | None:
        return None if rate <= 0 else r6(self.level(tat, rate, burst, at))

    def node(self, name: str) -> list[Any]:
        n = self.nodes.get(name)
        if n is None:
            rt, tt, held = self.b.caps.get(name, (0.0, 0.0, 0))
            n = self.nodes[name] = [rt, tt, held, False]
        return n

    def level_fit(
        self,
        levels: list[_Level],
        creq: float,
        ctok: float,
        overdraft: bool,
        holders: list[tuple[str, float, bool]] | None = None,
    ) -> tuple[float, bool]:
        fit, slot = self.now, True
        for lv in levels:
            n = self.node(lv.node)
            f = max(
                self.dim_fit(n[0], creq, lv.rr, lv.br, overdraft), self.dim_fit(n[1], ctok, lv.rt, lv.bt, overdraft)
            )
            full = lv.mc > 0 and n[2] >= lv.mc
            if full:
                slot = False
            fit = max(fit, f)
            if holders is not None:
                holders.append((lv.node, f, full))
        return fit, slot

    def charge_levels(self, levels: list[_Level], creq: float, ctok: float) -> None:
        now = self.now
        for lv in levels:
            n = self.node(lv.node)
            if lv.rr > 0 and creq > 0:
                n[0] = max(n[0], now) + creq / lv.rr
            if lv.rt > 0 and ctok > 0:
                n[1] = max(n[1], now) + ctok / lv.rt
            n[2] = n[2] + 1
            n[3] = True

    def release_levels(self, levels: list[_Level] | None, creq: float, ctok: float) -> None:
        for lv in levels or ():
            n = self.node(lv.node)
            n[2] = max(0, n[2] - 1)
            n[0], n[1] = self.given_back(n[0], lv.rr, creq), self.given_back(n[1], lv.rt, ctok)
            n[3] = True

    def grant(
        self,
        st: _State,
        lid: str,
        creq: float,
        ctok: float,
        fit: float | None,
        provisional: bool,
        overdraft: bool,
        levels: list[_Level] | None = None,
        start: float | None = None,
    ) -> None:
        """grant(): ``start``, a reservation's later start (None: now)."""
        start = self.now if start is None else start
        if start > self.now:  # charged from its start in every bucket
            if self.rate_req > 0 and creq > 0:
                st.rt = max(st.rt, start)
            if self.rate_tok > 0 and ctok > 0:
                st.tt = max(st.tt, start)
        self.charge(st, creq, ctok, -1 if fit is None else fit, overdraft)
        if start > self.now:  # what it holds of each bucket, no refund gives back before then
            st.reserved = True
            if self.rate_req > 0 and creq > 0:
                st.rf = max(st.rf, start) + creq / self.rate_req
            if self.rate_tok > 0 and ctok > 0:
                st.tf = max(st.tf, start) + ctok / self.rate_tok
        if levels:
            self.charge_levels(levels, creq, ctok)
        lease = _Lease(
            float(g14(creq)),
            float(g14(ctok)),
            fmt(start),
            self.snapshot(st.rt, self.rate_req, self.burst_req, start),
            self.snapshot(st.tt, self.rate_tok, self.burst_tok, start),
            r6(st.kr),
            r6(st.kt),
            r6(st.cq),
            r6(st.ct),
            provisional,
            levels,
        )
        expiry = start + (self.claim_window if provisional else self.lease_ttl)
        self.b.leases.add(lid, expiry)
        self.b.data[lid] = lease
        st.la = max(st.la, expiry)

    def claim(self, st: _State, lid: str, held: _Lease | None) -> bool:
        if held is None or not held.provisional:
            return False
        self.b.leases.add(lid, self.now + self.lease_ttl)
        st.la = max(st.la, self.now + self.lease_ttl)
        held.provisional = False
        return True

    def prolong(self, st: _State, lid: str) -> float | None:
        expiry = self.b.leases.by_id.get(lid)
        if expiry is None:
            return None
        self.claim(st, lid, self.b.data.get(lid))
        new_expiry: float = max(expiry, self.now + self.lease_ttl)
        self.b.leases.add(lid, new_expiry)
        st.la = max(st.la, new_expiry)
        return new_expiry

    def rescale(
        self, tat: float, r1: float, r2: float, burst: float, charged: float, burst2: float | None = None
    ) -> tuple[float, float]:
        now = self.now
        burst2 = burst if burst2 is None else burst2
        if r2 <= 0 or (r1 == r2 and burst == burst2):
            return tat, 0
        if r1 <= 0:
            capacity = r2 * burst2
            return now + _ceil_us(min(capacity, charged) / r2), 0
        debt = max(0, tat - now)
        if burst2 != burst:
            owed = debt * r1
            before = r1 * burst - owed
            after = min(before, r2 * burst2 - owed)
            return now + _ceil_us(burst2 - after / r2), before - after
        if r2 < r1:
            return now + _ceil_us(debt * r1 / r2), (r1 - r2) * burst
        return now + _ceil_us(burst - (burst - debt) * r1 / r2), 0

    def live_limits(self, st: _State) -> tuple[float, float]:
        now = self.now
        if st.lu <= now:
            return 0, 0
        lr: float = 0
        lt: float = 0
        for r, ru, t, tu in self.b.learned.values():
            if r > 0 and ru > now and (lr == 0 or r < lr):
                lr = r
            if t > 0 and tu > now and (lt == 0 or t < lt):
                lt = t
        return lr, lt

    def relimit(self, st: _State, lr: float, lt: float) -> None:
        if lr == st.lr and lt == st.lt:
            return
        old_req, old_tok = self.rate_req, self.rate_tok
        st.lr, st.lt = lr, lt
        self.apply_limits(st)
        st.rt, drop = self.rescale(st.rt, old_req, self.rate_req, self.burst_req, st.cq)
        st.kr = st.kr + drop
        st.tt, drop = self.rescale(st.tt, old_tok, self.rate_tok, self.burst_tok, st.ct)
        st.kt = st.kt + drop
        self.refloor(st)

    def refloor(self, st: _State) -> None:
        """refloor(): a bucket rescaled while a reservation waits keeps its new TAT from refunds."""
        if st.rf > self.now and st.rt > st.rf:
            st.rf, st.reserved = st.rt, True
        if st.tf > self.now and st.tt > st.tf:
            st.tf, st.reserved = st.tt, True

    def load_state(self) -> _State:
        fields = self.b.state
        st = _State()
        if fields:
            get = fields.get
            st.rt, st.tt, st.cu, st.cl, st.cr = get("rt", 0), get("tt", 0), get("cu", 0), get("cl", 0), get("cr", 0)
            st.seq, st.qa, st.kr, st.kt, st.cq = get("seq", 0), get("qa", 0), get("kr", 0), get("kt", 0), get("cq", 0)
            st.ct, st.lr, st.lt, st.lu, st.pb = get("ct", 0), get("lr", 0), get("lt", 0), get("lu", 0), get("pb", 0)
            st.la, st.xa, st.vt, st.ca = get("la", 0), get("xa", 0), get("vt", 0), get("ca", 0)
            st.rf, st.tf = get("rf", 0), get("tf", 0)
            if "rt" in fields and "la" not in fields:  # a state an older version made
                st.la = self.b.leases.last_expiry() or 0
        else:
            st.rt = st.tt = st.cu = st.cl = st.cr = st.seq = st.qa = st.kr = st.kt = st.cq = st.ct = 0
            st.lr = st.lt = st.lu = st.pb = st.la = st.xa = st.vt = st.ca = st.rf = st.tf = 0
        st.stored = st.lr > 0 or st.lt > 0 or st.lu > 0 or st.pb > 0
        st.lost = st.reserved = False
        self.apply_limits(st)
        if self.seen and "rt" not in fields:
            st.lost = True
            st.rt, st.tt = self.now + self.burst_req, self.now + self.burst_tok
            st.cu = self.now + RECOVERY_WINDOWS * self.claim_window
        if self.reaped_req > 0 or self.reaped_tok > 0:
            self.refund(st, self.reaped_req, self.reaped_tok)
            self.reaped_req = self.reaped_tok = 0.0
        self.relimit(st, *self.live_limits(st))
        return st

    def save_state(self, st: _State) -> None:
        f = self.b.state
        f["rt"], f["tt"], f["cu"] = r6(st.rt), r6(st.tt), r6(st.cu)
        f["cl"], f["cr"], f["seq"], f["qa"] = st.cl, r6(st.cr), st.seq, r6(st.qa)
        f["kr"], f["kt"], f["cq"], f["ct"], f["la"] = r6(st.kr), r6(st.kt), r6(st.cq), r6(st.ct), r6(st.la)
        f["cf"] = self.config
        if st.stored or st.lr > 0 or st.lt > 0 or st.lu > 0 or st.pb > 0:
            f["lr"], f["lt"], f["lu"], f["pb"] = r6(st.lr), r6(st.lt), r6(st.lu), st.pb
        if st.vt > 0:
            f["vt"] = r6(st.vt)
        if st.reserved:
            f["rf"], f["tf"] = r6(st.rf), r6(st.tf)
        caps, now = self.b.caps, self.now
        for name, n in self.nodes.items():
            if n[3]:
                if n[0] <= now and n[1] <= now and n[2] <= 0:
                    caps.pop(name, None)  # full and unused: as good as absent
                else:
                    caps[name] = (r6(n[0]), r6(n[1]), n[2])
                    st.ca = max(st.ca, now, n[0], n[1])
        if st.ca > 0:
            f["ca"] = r6(st.ca)
        if st.lost:
            st.lost = False
            self.engine.publish(self.channel, "l " + fmt(self.now))

    def learn(self, st: _State, per_min_req: float, per_min_tok: float, memory: float, model: str) -> None:
        if per_min_req <= 0 and per_min_tok <= 0:
            return
        now = self.now
        learned = self.b.learned
        e = list(learned.get(model, (0, 0, 0, 0)))
        until = now + memory
        if per_min_req > 0:
            e[0], e[1] = per_min_req, until
        if per_min_tok > 0:
            e[2], e[3] = per_min_tok, until
        learned[model] = [r6(x) for x in e]
        for name in [m for m, w in learned.items() if w[1] <= now and w[3] <= now]:
            del learned[name]
        st.lu = max(st.lu, until)
        if st.pb == 1:
            st.pb = 2
        self.relimit(st, *self.live_limits(st))

    def reap(self) -> None:
        b = self.b
        for lid in b.leases.due(self.now):
            held = b.data.get(lid)
            if held is not None:
                back_req, back_tok = (held.creq, held.ctok) if held.provisional else (0.0, 0.0)
                self.reaped_req, self.reaped_tok = self.reaped_req + back_req, self.reaped_tok + back_tok
                self.release_levels(held.levels, back_req, back_tok)
            b.leases.remove(lid)
            b.data.pop(lid, None)

    def save_ticket(self, st: _State, lid: str, t: _Ticket) -> None:
        st.qa = max(st.qa, t.alive)
        t.creq, t.ctok = float(g14(t.creq)), float(g14(t.ctok))
        t.alive, t.ttl, t.fit = r6(t.alive), r6(t.ttl), r6(t.fit)
        if t.tag is not None:
            t.tag, t.inc, t.fin = r6(t.tag), r6(t.inc), r6(t.fin)
        self.b.tickets[lid] = t

    def ticket(self, lid: str) -> _Ticket:
        t = self.b.tickets.get(lid)
        if t is None:
            return _Ticket(0, 0, 0, 0, -1, False)
        return _Ticket(
            t.creq, t.ctok, t.alive, t.ttl, t.fit, t.overdraft, t.tag, t.inc, t.tenant, t.fin, t.levels, t.book
        )

    def dequeue(self, lid: str) -> None:
        self.b.queue.pop(lid, None)
        self.b.tickets.pop(lid, None)

    def drop(self, st: _State, lid: str, t: _Ticket) -> None:
        """drop(): a ticket leaves without a grant; its tenant gets its turn back."""
        if t.tag is not None and t.fin > st.vt:
            f = self.b.tenants.get(t.tenant)
            if f is not None:
                self.b.tenants[t.tenant] = r6(f - t.inc)
        self.dequeue(lid)

    def unclaimed(self) -> tuple[str, float] | None:
        """unclaimed(): the lease that expires first, if a grant not claimed yet, with its expiry."""
        first = self.b.leases.first()
        data = self.b.data.get(first[0]) if first else None
        return first if first is not None and data is not None and data.provisional else None

    def own_channel(self, lid: str) -> str:
        """own_channel(): the channel the ticket's process holds beside the budget's."""
        return f"{self.channel}:{_owner_of(lid)}"

    def connected(self, lid: str) -> bool:
        """connected(): the ticket's process holds its own channel."""
        return self.engine.numsub(self.own_channel(lid)) > 0

    def inbox(self, lid: str, live: bool) -> str:
        """inbox(): where the notices about a ticket go, its process's channel if ``live`` (connected)."""
        return self.own_channel(lid) if live else self.channel

    def announce(self, st: _State, lid: str, t: _Ticket, fit: float) -> None:
        if abs(fit - t.fit) > 0.0000005:
            t.fit = fit
            t.alive = max(t.alive, fit + t.ttl)
            self.save_ticket(st, lid, t)
            self.engine.publish(self.inbox(lid, self.connected(lid)), f"h {lid} {fmt(fit)} {fmt(self.now)}")

    def horizon(self, t: _Ticket) -> float:
        """horizon(): two refill times of its cost, at most a second."""
        h = 0.0
        if self.rate_req > 0:
            h = max(h, t.creq / self.rate_req)
        if self.rate_tok > 0:
            h = max(h, t.ctok / self.rate_tok)
        return min(1.0, 2 * h)

    def advance(self, st: _State) -> tuple[bool, set[str] | None]:
        b = self.b
        rank = 0
        held: set[str] | None = None
        while True:
            head = next(islice(b.queue, rank, None), None)
            if head is None:
                return True, held
            t = self.ticket(head)
            passed = held is not None and t.levels is not None and any(lv.node in held for lv in t.levels)
            if t.alive < self.now:
                self.drop(st, head, t)
            elif passed:
                rank += 1
            elif not self.slot_free():
                first = self.unclaimed()
                if first is not None:
                    at = first[1]
                    target, tk = head, t
                    owner = _owner_of(first[0])
                    if _owner_of(head) == owner:
                        for lid in islice(b.queue, rank + 1, rank + 16):
                            if _owner_of(lid) != owner:
                                target, tk = lid, self.ticket(lid)
                                break
                    self.announce(st, target, tk, at)
                return False, held
            else:
                fit = self.fit_time(st, t.creq, t.ctok, t.overdraft)
                lfit, lslot, holders = self.now, True, list[tuple[str, float, bool]]()
                if t.levels:
                    lfit, lslot = self.level_fit(t.levels, t.creq, t.ctok, t.overdraft, holders)
                if not lslot or lfit > fit:  # only its caps hold it: pass over it and their tickets
                    held = held if held is not None else set()
                    held.update(n for n, f, full in holders if (lslot and f >= lfit) or (not lslot and full))
                    if lslot:
                        self.announce(st, head, t, lfit)
                    elif (first := self.unclaimed()) is not None:
                        self.announce(st, head, t, first[1])
                    rank += 1
                elif fit <= self.now:
                    self.dequeue(head)
                    firm = self.connected(head)
                    self.grant(st, head, t.creq, t.ctok, t.fit, not firm, t.overdraft, t.levels)
                    self.granted.add(head)
                    if t.tag is not None:
                        st.vt = max(st.vt, t.tag)
                    self.engine.publish(self.inbox(head, firm), f"g {head} {fmt(self.now)}" + (" f" if firm else ""))
                elif (
                    t.book
                    and head != self.arriving
                    and not t.levels
                    and fit > st.cu
                    and fit - self.now <= self.horizon(t)
                    and self.connected(head)
                ):
                    # booked: reserved for its fit time, firm; its waiter starts then, no come-back
                    self.dequeue(head)
                    self.grant(st, head, t.creq, t.ctok, t.fit, False, t.overdraft, None, fit)
                    self.granted.add(head)
                    if t.tag is not None:
                        st.vt = max(st.vt, t.tag)
                    self.engine.publish(self.inbox(head, True), f"g {head} {fmt(self.now)} f {fmt(fit)}")
                else:
                    self.announce(st, head, t, fit)
                    owner = _owner_of(head)
                    for lid in islice(b.queue, rank + 1, rank + 16):
                        if _owner_of(lid) != owner:
                            self.announce(st, lid, self.ticket(lid), fit + self.claim_window)
                            break
                    return False, held
            if rank >= MAX_SCAN:
                return False, held

    def touch(self, st: _State) -> None:
        now = self.now
        horizon = max(now, st.rt, st.tt, st.cu, st.cr, st.lu, st.qa, st.la, st.ca)
        due = math.ceil((now + min(horizon - now, 1e11) + self.idle_grace) * 1000)
        if due > st.xa:
            st.xa = due + math.ceil(self.idle_grace * 500)
            self.b.state["xa"] = float(st.xa)
        # every key expires at xa (the Lua sets it on the keys it may have made, the others have it)
        self.b.expire_at = st.xa / 1000.0

    def finish(self, st: _State, reply: list[str]) -> list[str]:
        self.save_state(st)
        self.touch(st)
        return reply

    # --- the operations ---

    def acquire(
        self,
        lid: str,
        creq: float,
        ctok: float,
        max_wait: float,
        may_queue: bool,
        ticket_ttl: float,
        probe: bool,
        overdraft: bool,
        lead: float = 0,
        tenant: str = "",
        weight: float = 0,
        n_levels: float = 0,
        *level_args: Any,
    ) -> list[str]:
        b, now = self.b, self.now
        # (the flags follow the levels)
        levels, reserve, book = _levels(level_args[:-2]), bool(level_args[-2]), bool(level_args[-1])
        self.reap()
        st = self.load_state()
        if probe and st.pb == 0:
            st.pb = 1
            if st.lr > 0 or st.lt > 0:
                st.pb = 2
            self.apply_limits(st)
        open_, held_caps = self.advance(st)

        held = b.data.get(lid)
        if held is not None:
            self.claim(st, lid, held)
            return self.finish(st, ["granted", held.start, fmt(now), fmt(b.leases.by_id[lid])])

        if lid in b.queue:
            t = self.ticket(lid)
            t.ttl = ticket_ttl  # the caller's: a parked waiter keeps its place that long
            t.alive = max(now, t.fit) + t.ttl
            self.save_ticket(st, lid, t)
            return self.finish(st, ["queued", fmt(self.wait_hint(lid)), fmt(now)])

        most_req = _most(self.rate_req, self.burst_req, 1)
        most_tok = _most(self.rate_tok, self.burst_tok, 0)
        if not overdraft and most_req >= 0 and creq > most_req:
            return self.finish(st, ["too_large", fmt(most_req), fmt(now), "requests"])
        if not overdraft and most_tok >= 0 and ctok > most_tok:
            return self.finish(st, ["too_large", fmt(most_tok), fmt(now), "tokens"])
        for lv in levels or ():
            lreq, ltok = _most(lv.rr, lv.br, 1), _most(lv.rt, lv.bt, 0)
            if not overdraft and lreq >= 0 and creq > lreq:
                return self.finish(st, ["too_large", fmt(lreq), fmt(now), "requests", lv.node])
            if not overdraft and ltok >= 0 and ctok > ltok:
                return self.finish(st, ["too_large", fmt(ltok), fmt(now), "tokens", lv.node])

        waiting = len(b.queue)
        seq = st.seq + 1
        score: float = seq
        first = waiting == 0
        tag: float | None = None
        cost = 0.0
        if weight > 0:
            tag, cost = self.tenant_tag(st, tenant), self.virtual_cost(creq, ctok)
            score = r6(tag - lead * cost)
        elif lead > 0:
            score = seq - lead - 0.5
        if not first and (weight > 0 or lead > 0):
            first = score < next(iter(b.queue.values()))
        if not first and open_:  # every ticket waits for its caps alone
            first = not any(lv.node in (held_caps or ()) for lv in levels or ())
        lfit, lslot = now, True  # what its caps allow
        if first and levels:
            lfit, lslot = self.level_fit(levels, creq, ctok, overdraft)
        if first and lslot and self.slot_free():
            fit = max(self.fit_time(st, creq, ctok, overdraft), lfit)
            if fit > now and (not may_queue or (max_wait >= 0 and fit - now > max_wait)):
                return self.finish(st, ["refused", fmt(fit - now), fmt(now)])
            # a reservation (see acquire.lua): what it holds of the buckets no refund gives back
            start = fit if reserve and not levels and fit > now and fit > st.cu else now
            if fit <= start:
                self.grant(st, lid, creq, ctok, None, False, overdraft, levels, start)
                if tag is not None:
                    self.queued_tag(tenant, tag, cost, weight)
                    st.vt = max(st.vt, score)
                if waiting:  # it passed the queue: counted as an arrival (or its tenant's tag moved on)
                    if tag is None:
                        st.seq = seq
                    self.advance(st)
                return self.finish(st, ["granted", fmt(start), fmt(now), fmt(start + self.lease_ttl)])
        elif not may_queue:
            return self.finish(st, ["refused", "-1", fmt(now)])

        if tag is not None:
            self.queued_tag(tenant, tag, cost, weight)
        else:
            st.seq = seq
        self.enqueue(lid, score)
        queued = _Ticket(creq, ctok, now + ticket_ttl, ticket_ttl, -1, overdraft, levels=levels)
        queued.book = book and not levels
        if tag is not None:  # its place, its turn, whose, and the finish tag it set
            queued.tag, queued.inc, queued.tenant, queued.fin = score, cost / weight, tenant, tag + cost / weight
        self.save_ticket(st, lid, queued)
        self.arriving = lid
        self.advance(st)
        if lid in self.granted:  # granted just now, behind tickets only their caps hold: claimed at once
            self.claim(st, lid, b.data.get(lid))
            return self.finish(st, ["granted", fmt(now), fmt(now), fmt(now + self.lease_ttl)])
        return self.finish(st, ["queued", fmt(self.wait_hint(lid)), fmt(now)])

    def tenant_tag(self, st: _State, tenant: str) -> float:
        """tenant_tag(): finish tags the virtual time passed are dropped, then the tenant's, or vt."""
        tenants, vt = self.b.tenants, st.vt
        for name in [n for n, f in tenants.items() if f <= vt]:
            del tenants[name]
        return max(vt, tenants.get(tenant, 0.0))

    def virtual_cost(self, creq: float, ctok: float) -> float:
        c = 0.0
        if self.rate_req > 0:
            c = max(c, creq / self.rate_req)
        if self.rate_tok > 0:
            c = max(c, ctok / self.rate_tok)
        if c == 0 and self.max_conc > 0:
            c = 1 / self.max_conc
        return c

    def queued_tag(self, tenant: str, tag: float, cost: float, weight: float) -> None:
        self.b.tenants[tenant] = r6(tag + cost / weight)

    def enqueue(self, lid: str, score: float) -> None:
        """ZADD: in order of (place, id), ids compared as bytes."""
        queue = self.b.queue
        if queue:
            last_id, last = next(reversed(queue.items()))
            if (score, lid.encode()) < (last, last_id.encode()):
                items = sorted([*queue.items(), (lid, score)], key=lambda kv: (kv[1], kv[0].encode()))
                queue.clear()
                queue.update(items)
                return
        queue[lid] = score

    def wait_hint(self, lid: str) -> float:
        b, now = self.b, self.now
        t = self.ticket(lid)
        head = next(iter(b.queue), None)
        hint = t.ttl / 2
        if (head == lid or t.levels) and t.fit > now:
            hint = t.fit - now
        first = b.leases.first()
        if head == lid and first is not None:
            hint = min(hint, first[1] - now)
        return max(0.001, hint)

    def settle(
        self,
        lid: str,
        actual: float,
        seen_req: float,
        seen_tok: float,
        limit_req: float,
        limit_tok: float,
        memory: float,
        model: str,
        census: bool = False,
        ttl: float | None = None,
        *ids: str,
    ) -> list[str]:
        b, now = self.b, self.now
        self.reap()
        st = self.load_state()
        self.learn(st, limit_req, limit_tok, memory, model)
        held = b.data.get(lid) if lid != "" else None
        reply = ["unknown", "0", fmt(now)]
        if lid == "":
            st.rt, st.kr = self.corrected(st.rt, self.rate_req, self.burst_req, st.kr, seen_req)
            st.tt, st.kt = self.corrected(st.tt, self.rate_tok, self.burst_tok, st.kt, seen_tok)
            reply = ["learned", "0", fmt(now)]
        elif held is not None:
            b.leases.remove(lid)
            del b.data[lid]
            if st.pb == 1:
                st.pb = 2
                self.apply_limits(st)
            st.rt, st.kr = self.corrected(
                st.rt, self.rate_req, self.burst_req, st.kr, seen_req, held.snap_req, held.kr, st.cq, held.cq
            )
            st.tt, st.kt = self.corrected(
                st.tt, self.rate_tok, self.burst_tok, st.kt, seen_tok, held.snap_tok, held.kt, st.ct, held.ct
            )
            diff = held.ctok - actual if actual >= 0 else 0.0
            st.tt = self.given_back(st.tt, self.rate_tok, diff, st.tf)
            self.release_levels(held.levels, 0, diff)
            reply = ["settled", fmt(diff) if actual >= 0 else "0", fmt(now)]
        reply.append(fmt(self.rate_req * 60))
        reply.append(fmt(self.rate_tok * 60))
        if census or ttl is not None:
            reply.append(str(self.engine.numsub(self.channel)) if census else "0")
        self.advance(st)
        if ttl is not None:
            self.renew_tickets(st, ttl, ids, reply)
        return self.finish(st, reply)

    def corrected(
        self,
        tat: float,
        rate: float,
        burst: float,
        k: float,
        seen: float,
        snap: float | None = None,
        k0: float = 0,
        c: float = 0,
        c0: float = 0,
    ) -> tuple[float, float]:
        if seen < 0 or rate <= 0:
            return tat, k
        if snap is not None:
            ahead = snap - (k - k0) - (c - c0) - (seen + 1)
        else:
            ahead = self.level(tat, rate, burst) - (seen + 1)
        if ahead > 0:
            return max(tat, self.now) + ahead / rate, k + ahead
        return tat, k

    def cancel(self, lid: str) -> list[str]:
        b, now = self.b, self.now
        self.reap()
        st = self.load_state()
        reply = ["unknown", fmt(now)]
        if lid in b.queue:
            self.drop(st, lid, self.ticket(lid))
            reply = ["dequeued", fmt(now)]
        else:
            held = b.data.get(lid)
            if held is not None:
                b.leases.remove(lid)
                del b.data[lid]
                self.refund(st, held.creq, held.ctok)
                self.release_levels(held.levels, held.creq, held.ctok)
                reply = ["cancelled", fmt(now)]
        self.advance(st)
        return self.finish(st, reply)

    def extend(self, lid: str) -> list[str]:
        self.reap()
        st = self.load_state()
        self.advance(st)
        reply = ["lost", "0", fmt(self.now)]
        new_expiry = self.prolong(st, lid)
        if new_expiry is not None:
            reply = ["extended", fmt(new_expiry), fmt(self.now)]
        return self.finish(st, reply)

    def renew(self, ttl: float, *ids: str) -> list[str]:
        self.reap()
        st = self.load_state()
        self.advance(st)
        reply = [fmt(self.now)]
        self.renew_tickets(st, ttl, ids, reply)
        return self.finish(st, reply)

    def renew_tickets(self, st: _State, ttl: float, ids: tuple[str, ...], reply: list[str]) -> None:
        b = self.b
        head = next(iter(b.queue), None)
        for lid in ids:
            status = "-"
            if lid in b.queue:
                t = self.ticket(lid)
                t.alive = max(t.alive, max(self.now, t.fit) + ttl)
                self.save_ticket(st, lid, t)
                status = "h" + fmt(self.wait_hint(lid)) if lid == head else "q"
            elif lid in b.data:
                status = "g"
            reply.append(status)

    def rejoin(
        self,
        lid: str,
        creq: float,
        ctok: float,
        spent_req: float,
        spent_tok: float,
        hold: float,
        n_levels: float = 0,
        *level_args: Any,
    ) -> list[str]:
        b, now = self.b, self.now
        levels = _levels(level_args)
        self.reap()
        st = self.load_state()
        if (spent_req > 0 or spent_tok > 0) and not st.lost:
            self.charge(st, spent_req, spent_tok, -1, False)
        if hold > 0:
            st.cu = max(st.cu, now + hold)
        reply = ["charged", fmt(now)]
        if lid != "":
            if self.prolong(st, lid) is not None:
                reply = ["extended", fmt(now)]
            else:
                b.leases.add(lid, now + self.lease_ttl)
                st.la = max(st.la, now + self.lease_ttl)
                b.data[lid] = _Lease(
                    float(g14(creq)),
                    float(g14(ctok)),
                    fmt(now),
                    None,
                    None,
                    r6(st.kr),
                    r6(st.kt),
                    r6(st.cq),
                    r6(st.ct),
                    False,
                    levels,
                )
                if levels:
                    self.charge_levels(levels, 0, 0)  # its slot at each cap, charged nothing there
                reply = ["adopted", fmt(now)]
        self.advance(st)
        return self.finish(st, reply)

    def cooldown(
        self,
        retry_after: float,
        base: float,
        max_backoff: float,
        quiet: float,
        jitter: float,
        draw: float,
        max_pause: float,
    ) -> list[str]:
        now = self.now
        self.reap()
        st = self.load_state()
        level: float = 0
        if st.cu > now:
            level = st.cl
        elif st.cr > now:
            level = st.cl + 1
        backoff: float = 0
        if retry_after < 0 or level > 0:
            backoff = min(max_backoff, base * 2.0**level)
        pause = min(max_pause, max(retry_after, backoff) * (1 + jitter * draw))
        started = st.cu <= now
        st.cu = max(st.cu, now + pause)
        if self.rate_req > 0:
            st.rt = max(st.rt, now + self.burst_req)
        if self.rate_tok > 0:
            st.tt = max(st.tt, now + self.burst_tok)
        # reservations still to start start no sooner than the pause's end: charged then, floored
        held_req = held_tok = 0.0
        for lid in self.b.leases.ids_from(-math.inf):
            lease = self.b.data.get(lid)
            if lease is not None and float(lease.start) > now:
                held_req, held_tok = held_req + lease.creq, held_tok + lease.ctok
        if self.rate_req > 0 and held_req > 0:
            st.rt = max(st.rt, max(now + self.burst_req, st.cu) + held_req / self.rate_req)
            st.rf, st.reserved = max(st.rf, st.rt), True
        if self.rate_tok > 0 and held_tok > 0:
            st.tt = max(st.tt, max(now + self.burst_tok, st.cu) + held_tok / self.rate_tok)
            st.tf, st.reserved = max(st.tf, st.tt), True
        st.cl = level
        st.cr = st.cu + quiet
        self.advance(st)
        reply = self.finish(st, ["cooldown", fmt(st.cu), fmt(now), g14(level), "1" if started else "0"])
        self.engine.publish(self.channel, f"c {fmt(now)} {fmt(st.cu)}")
        return reply

    def clear_cooldown(self) -> list[str]:
        now = self.now
        self.reap()
        st = self.load_state()
        was_until, was_level = st.cu, st.cl
        if st.cu > now:
            st.cu = now
        if st.cr > now:
            st.cr = now
        st.cl = 0
        self.advance(st)
        reply = self.finish(st, ["cleared", fmt(was_until), fmt(now), g14(was_level)])
        self.engine.publish(self.channel, f"c {fmt(now)} {fmt(now)}")
        return reply

    def configure(self) -> list[str]:
        previous = self.stored or ""
        old = [_lua_number(w) for w in previous.split()]
        self.reap()
        st = self.load_state()
        if previous != self.config and len(old) == 7:
            o = [x if x is not None else 0.0 for x in old]  # stored limits were checked when stored
            st.rt, drop = self.rescale(st.rt, _effective(o[0], st.lr), self.rate_req, o[1], st.cq, self.burst_req)
            st.kr = st.kr + drop
            st.tt, drop = self.rescale(st.tt, _effective(o[2], st.lt), self.rate_tok, o[3], st.ct, self.burst_tok)
            st.kt = st.kt + drop
            self.refloor(st)
        self.advance(st)
        return self.finish(st, ["unchanged" if previous == self.config else "configured", fmt(self.now), previous])

    def status(self) -> list[str]:
        st = self.load_state()
        b = self.b
        return [
            fmt(self.now),
            fmt(self.level(st.rt, self.rate_req, self.burst_req)),
            fmt(self.level(st.tt, self.rate_tok, self.burst_tok)),
            str(b.leases.count_after(r6(self.now))),
            str(len(b.queue)),
            fmt(max(0, st.cu - self.now)),
            g14(st.cl),
            fmt(self.rate_req * 60),
            fmt(self.rate_tok * 60),
            fmt(st.lr),
            fmt(st.lt),
            "1" if self.probing else "0",
        ]


def _effective(configured: float, per_minute: float) -> float:
    learned = per_minute / 60
    if learned > 0 and (configured <= 0 or learned < configured):
        return learned
    return configured


def _slack_of(cost: float, rate: float, burst: float, overdraft: bool) -> float:
    if overdraft:
        return burst
    return max(0, burst - cost / rate)


def _ceil_us(x: float) -> float:
    return math.ceil(x * 1000000 - 0.001) / 1000000


def _most(rate: float, burst: float, floor: float) -> float:
    if rate <= 0:
        return -1
    return max(floor, rate * max(burst, 60))


def _owner_of(lid: str) -> str:
    dot = lid.find(".")
    return lid[:dot] if dot > 0 else lid
