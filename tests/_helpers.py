"""Small helpers shared by tests (importable because pytest puts ``tests/`` on sys.path)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from xflow_dist import Budget, CooldownPolicy
from xflow_dist._core import (
    acquire_args,
    budget_args,
    cooldown_args,
    decode_acquire,
    decode_cooldown,
    decode_extend,
    decode_settle,
    decode_status,
    keys,
    settle_args,
)
from xflow_dist._scripts import register


def budget_keys(client: redis.Redis, budget_name: str) -> list[bytes]:
    """Every key of one budget that exists now."""
    return sorted(client.scan_iter(match=f"{{xflow:{budget_name}}}*"))


class Ops:
    """Direct calls of the Lua scripts for one budget, as the fronts make them."""

    def __init__(self, client: redis.Redis, budget: Budget) -> None:
        self.client = client
        self.budget = budget
        self.scripts = register(client)

    def run(self, op: str, argv: list[str]) -> Any:
        return self.scripts[op](keys=keys(self.budget), args=budget_args(self.budget) + argv)

    def acquire(
        self,
        tokens: float = 0,
        requests: float = 1,
        *,
        max_wait: float | None = None,
        queue: bool = True,
        lease_id: str | None = None,
        ticket_ttl: float = 30.0,
    ) -> tuple[str, Any]:
        lid = lease_id or uuid.uuid4().hex
        argv = acquire_args(lid, requests, tokens, max_wait, queue, ticket_ttl, self.budget.probe)
        return lid, decode_acquire(self.run("acquire", argv))

    def settle(self, lid: str, actual: float | None = None, **facts: float) -> Any:
        """``facts``: remaining_requests, remaining_tokens, limit_requests, limit_tokens."""
        argv = settle_args(
            lid,
            actual,
            facts.get("remaining_requests"),
            facts.get("remaining_tokens"),
            facts.get("limit_requests"),
            facts.get("limit_tokens"),
        )
        return decode_settle(self.run("settle", argv))

    def cancel(self, lid: str) -> str:
        return str(self.run("cancel", [lid])[0].decode())

    def extend(self, lid: str) -> float | None:
        return decode_extend(self.run("extend", [lid]))

    def cooldown(self, retry_after: float | None, draw: float = 0.0, policy: CooldownPolicy | None = None) -> Any:
        return decode_cooldown(self.run("cooldown", cooldown_args(policy or CooldownPolicy(), retry_after, draw)))

    def status(self) -> Any:
        return decode_status(self.budget, self.run("status", []))

    def redis_now(self) -> float:
        sec, usec = self.client.time()
        return float(sec + usec / 1e6)

    def wait_redis_until(self, t: float) -> None:
        """Let Redis time pass ``t``, checking the server's own clock (bounded)."""
        for _ in range(2_000):
            if self.redis_now() > t:
                return
            time.sleep(0.005)
        raise AssertionError("Redis time did not advance")


def ops(rclient: redis.Redis, name: str, **limits: Any) -> Ops:
    return Ops(rclient, Budget(name, **limits))
