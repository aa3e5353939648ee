"""What the two fronts share without I/O: checked inputs, script arguments, decisions."""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from typing import Generic, TypeVar

from ._budget import Budget, CooldownPolicy
from ._core import (
    AcquireReply,
    acquire_args,
    budget_args,
    cooldown_args,
    keys,
    settle_args,
    too_large_error,
    validate_cost,
    validate_retry_after,
)
from ._exceptions import ConfigurationError, InvalidCostError
from ._headers import LimitFacts

L = TypeVar("L")


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


class LimiterBase:
    """Inputs checked and script arguments built once for both fronts."""

    def __init__(
        self,
        budget: Budget,
        *,
        cooldown_policy: CooldownPolicy | None = None,
        ticket_ttl: float | None = None,
    ) -> None:
        if not isinstance(budget, Budget):
            raise ConfigurationError(f"budget must be a Budget, not {budget!r}")
        if cooldown_policy is not None and not isinstance(cooldown_policy, CooldownPolicy):
            raise ConfigurationError(f"cooldown_policy must be a CooldownPolicy, not {cooldown_policy!r}")
        ttl = _check_seconds("ticket_ttl", ticket_ttl)
        if ttl == 0 or (ttl is not None and math.isinf(ttl)):
            raise ConfigurationError(f"ticket_ttl must be finite and more than zero, not {ticket_ttl!r}")
        self.budget = budget
        self.cooldown_policy = cooldown_policy or CooldownPolicy()
        self.ticket_ttl = ttl or budget.lease_ttl
        self._keys = keys(budget)
        self._budget_args = budget_args(budget)

    def _argv(self, argv: list[str]) -> list[str]:
        return self._budget_args + argv

    def _prepare(self, requests: float, tokens: float, timeout: float | None) -> tuple[str, float, float]:
        requests, tokens = validate_cost(self.budget, requests, tokens)
        _check_seconds("timeout", timeout)
        return uuid.uuid4().hex, requests, tokens

    def _try_args(self, lease_id: str, requests: float, tokens: float) -> list[str]:
        return acquire_args(lease_id, requests, tokens, 0.0, False, self.ticket_ttl, self.budget.probe)

    def _check_facts(
        self,
        remaining_requests: float | None,
        remaining_tokens: float | None,
        limit_requests: float | None,
        limit_tokens: float | None,
    ) -> None:
        for what, value, zero_ok in (
            ("remaining_requests", remaining_requests, True),
            ("remaining_tokens", remaining_tokens, True),
            ("limit_requests", limit_requests, False),
            ("limit_tokens", limit_tokens, False),
        ):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
                or (value == 0 and not zero_ok)
            ):
                bound = "zero or more" if zero_ok else "more than zero (per minute)"
                raise InvalidCostError(f"{what} must be finite and {bound}, not {value!r}", budget=self.budget.name)

    def _check_model(self, model: str) -> None:
        if not isinstance(model, str) or len(model) > 256:
            raise InvalidCostError(
                f"model must be a string of at most 256 characters, not {model!r}", budget=self.budget.name
            )

    def _learn_args(
        self,
        facts: LimitFacts | None,
        limit_requests: float | None,
        limit_tokens: float | None,
        remaining_requests: float | None,
        remaining_tokens: float | None,
        model: str = "",
    ) -> list[str]:
        """``settle.lua`` without a lease: learn the limits (and cap the levels at the remaining);
        ``model`` names whose limits they are, so two models on one budget each keep their own."""
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
        self._check_model(model)
        return settle_args("", None, remaining_requests, remaining_tokens, limit_requests, limit_tokens, model=model)

    def _settle_args(
        self,
        lease_id: str,
        actual_tokens: float | None,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        model: str = "",
    ) -> list[str]:
        self._check_facts(remaining_requests, remaining_tokens, limit_requests, limit_tokens)
        self._check_model(model)
        if actual_tokens is not None and (
            isinstance(actual_tokens, bool)
            or not isinstance(actual_tokens, int | float)
            or math.isnan(actual_tokens)
            or math.isinf(actual_tokens)
            or actual_tokens < 0
        ):
            raise InvalidCostError(
                f"actual_tokens must be finite and zero or more, not {actual_tokens!r}",
                budget=self.budget.name,
            )
        return settle_args(
            lease_id, actual_tokens, remaining_requests, remaining_tokens, limit_requests, limit_tokens, model=model
        )

    def _cooldown_args(self, retry_after: float | None) -> list[str]:
        return cooldown_args(self.cooldown_policy, validate_retry_after(self.budget, retry_after))

    def _refused(self, reply: AcquireReply, requests: float, tokens: float) -> Decision[L]:
        if reply.kind == "too_large":
            raise too_large_error(self.budget, requests, tokens, reply)
        return Decision(False, None, reply.retry_after)

    @property
    def heartbeat_interval(self) -> float:
        """Leases are extended this often: three chances before the TTL runs out."""
        return self.budget.lease_ttl / 3.0
