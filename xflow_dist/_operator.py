"""What an operator does to budgets by name, with no ``Budget`` at hand: list, inspect, pause, reset.

A running fleet stores its limits with its budget (the ``cf`` field of the state: see
``lua/_prelude.lua``); every call here reads them and sends them back as the budget block, so it
never conflicts with the fleet's configuration and never needs it repeated on the command line. A
budget whose keys do not exist (never used, or idle past its grace) has nothing to show.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from ._backend import RedisLike, sync_client
from ._budget import CooldownPolicy
from ._core import IDLE_GRACE, _num, cooldown_args, decode_clear_cooldown, decode_cooldown, decode_status, key_names
from ._exceptions import BackendError, BudgetNotFoundError, ConfigurationError
from ._redact import redact_text, redact_url
from ._scripts import register

_TAG = "{xflow:"
_STATE = "}:state"


@dataclass(frozen=True)
class _Named:
    """The one attribute ``decode_status`` reads of a budget."""

    name: str


class Operator:
    """Budgets of one Redis, by name. ``close()`` (or ``with``) releases the connection."""

    def __init__(self, redis_url: RedisLike) -> None:
        self._client, self._owns = sync_client(redis_url)
        self._url = redis_url if isinstance(redis_url, str) else "the client given"
        self._scripts = register(self._client)

    def close(self) -> None:
        if self._owns:
            self._client.close()

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            where = redact_url(self._url) if isinstance(self._url, str) else self._url
            raise BackendError(f"{what} at {where} failed: {redact_text(str(exc))}") from exc

    def budgets(self) -> list[str]:
        """The names of the budgets whose keys exist, sorted (SCAN, never KEYS)."""
        found = self._call("SCAN", lambda: list(self._client.scan_iter(match=f"{_TAG}*{_STATE}", count=1000)))
        names = {k.decode() if isinstance(k, bytes) else k for k in found}
        return sorted(n[len(_TAG) : -len(_STATE)] for n in names if n.startswith(_TAG) and n.endswith(_STATE))

    def _block(self, name: str) -> list[str]:
        if not name or any(c.isspace() for c in name):
            raise ConfigurationError(f"a budget name has no spaces and is not empty, not {name!r}")
        stored = self._call("HGET", self._client.hget, key_names(name)[0], "cf")
        if stored is None:
            raise BudgetNotFoundError(f"no budget {name!r} here (never used, or idle past its grace)", budget=name)
        words = (stored.decode() if isinstance(stored, bytes) else str(stored)).split()
        if len(words) != 7:
            raise BackendError(f"budget {name!r} stores limits this version cannot read: {stored!r}", budget=name)
        rate_req, burst_req, rate_tok, burst_tok, conc, ttl, claim = words
        channel = f"{_TAG}{name}}}:events"
        # "not seen": keys that vanished since (expired, flushed) are then made fresh, never taken for
        # a lost state with its hold and its notice to the fleet, which only a fleet's own call may say;
        # no give-up moment: an operator's command has no local share that a late run could undercut
        return [rate_req, burst_req, rate_tok, burst_tok, conc, ttl, _num(IDLE_GRACE), channel, claim, "0", "0"]

    def _run(self, op: str, name: str, argv: list[str]) -> Any:
        block = self._block(name)
        return self._call(op, self._scripts[op], keys=key_names(name), args=[*block, *argv])

    def status(self, name: str) -> dict[str, Any]:
        """The budget's snapshot from Redis, as ``limiter.status()`` gives it, plus its stored limits."""
        block = self._block(name)
        raw = self._call("status", self._scripts["status"], keys=key_names(name), args=block)
        s = decode_status(_Named(name), raw)  # type: ignore[arg-type]
        return {
            "budget": name,
            "requests_available": s.requests_available,
            "tokens_available": s.tokens_available,
            "in_flight": s.in_flight,
            "queued": s.queued,
            "cooldown_remaining": s.cooldown_remaining,
            "backoff_level": s.backoff_level,
            "rpm": s.rpm,
            "tpm": s.tpm,
            "learned_rpm": s.learned_rpm,
            "learned_tpm": s.learned_tpm,
            "probing": s.probing,
            "max_concurrency": int(float(block[4])) or None,
            "burst_seconds": float(block[1]) if float(block[0]) > 0 else float(block[3]),
        }

    def set_cooldown(self, name: str, seconds: float) -> float:
        """Pause the whole fleet for ``seconds`` (as a 429 with that retry-after would); the seconds left."""
        if not 0 < seconds <= 86_400:
            raise ConfigurationError(f"a cooldown is more than 0 and at most 86400 seconds, not {seconds!r}")
        policy = CooldownPolicy(jitter=0.0, max_pause=max(300.0, seconds))
        reply = decode_cooldown(self._run("cooldown", name, cooldown_args(policy, seconds, 0.0)))
        return reply.until - reply.now

    def clear_cooldown(self, name: str) -> float:
        """End the fleet's pause now; the seconds that were left of it (0: none)."""
        reply = decode_clear_cooldown(self._run("clear_cooldown", name, []))
        return max(0.0, reply.until - reply.now)

    def reset(self, name: str) -> int:
        """Delete the budget's keys: the next call starts it afresh, full. The keys deleted."""
        self._block(name)  # refuses a name that does not exist
        return int(self._call("DEL", self._client.delete, *key_names(name)))
