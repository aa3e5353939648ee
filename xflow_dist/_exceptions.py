"""The one exception tree of xflow-dist.

    XflowError
    ├── ConfigurationError        bad budget, policy or setting (also a ValueError)
    │   ├── NoRouteError          a transport's Router has no budget for a call
    │   ├── BudgetConflictError   the fleet already uses this budget name with other limits
    │   └── PermissionDeniedError the Redis user lacks a right the limiter needs (its ACL)
    ├── InvalidCostError          negative, NaN, infinite or absurdly large cost (also a ValueError)
    │   └── CostTooLargeError     a cost no bucket of the budget can ever hold
    ├── ScriptArgumentError       a Lua script refused its arguments, changing nothing (also a ValueError)
    ├── AcquireTimeout            no grant before the deadline (also a TimeoutError)
    ├── BackendError              Redis failed or could not be reached
    │   └── BudgetUnavailableError  Redis does not answer and the outage policy is "closed"
    ├── QuotaExhaustedError       a 429 that means the account's quota (billing) is spent, not its rate
    ├── RetryException            raised by a call to have compat's auto_backoff retry it
    ├── OutsideTaskError          report_token_usage outside a compat task (also a RuntimeError)
    └── InvalidTaskError          not a coroutine where compat must own one (also a TypeError)

Every error names the budget it concerns where there is one; waits carry ``retry_after``.
"""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "BackendError",
    "BudgetConflictError",
    "BudgetUnavailableError",
    "ConfigurationError",
    "CostTooLargeError",
    "InvalidCostError",
    "InvalidTaskError",
    "NoRouteError",
    "OutsideTaskError",
    "PermissionDeniedError",
    "QuotaExhaustedError",
    "RetryException",
    "ScriptArgumentError",
    "XflowError",
]


class XflowError(Exception):
    """Root of every error raised by xflow-dist."""

    def __init__(self, message: str, *, budget: str | None = None) -> None:
        super().__init__(message)
        self.budget = budget


class ConfigurationError(XflowError, ValueError):
    """A budget, policy or setting that cannot work; raised before Redis is touched."""


class InvalidCostError(XflowError, ValueError):
    """A cost that is negative, NaN, infinite or of the wrong type."""


class CostTooLargeError(InvalidCostError):
    """A cost larger than the budget can ever hold: waiting would never end."""


class AcquireTimeout(XflowError, TimeoutError):
    """The deadline passed (or would pass) before the budget could grant the request.

    ``ticket``: the place in the queue that ``acquire(..., keep_place=True)`` kept (pass it back as
    ``ticket=`` to take it up again), or None where none was kept."""

    def __init__(
        self, message: str, *, budget: str | None = None, retry_after: float | None = None, ticket: str | None = None
    ) -> None:
        super().__init__(message, budget=budget)
        self.retry_after = retry_after
        self.ticket = ticket


class BackendError(XflowError):
    """Redis failed, was unreachable, or answered something unexpected."""


class BudgetUnavailableError(BackendError):
    """The budget's Redis does not answer and the outage policy is ``closed``: no call may go out
    until it does (see ``OutagePolicy``)."""


class BudgetNotFoundError(XflowError, LookupError):
    """No budget of that name in this Redis: never used, or idle past its grace (its keys expired).
    Raised by the operator commands (``xflow status``, ``cooldown``, ``reset``), which act by name."""


class BudgetConflictError(ConfigurationError):
    """The budget's keys in Redis hold other limits than this process's: two deployments share a name.

    ``stored`` and ``given`` describe both (rpm, tpm, burst, ...). Nothing was changed. Use the same
    limits, another budget name, or ``reconfigure()`` to change them for the whole fleet.
    """

    def __init__(self, message: str, *, budget: str | None = None, stored: str = "", given: str = "") -> None:
        super().__init__(message, budget=budget)
        self.stored = stored
        self.given = given


class PermissionDeniedError(ConfigurationError):
    """The Redis user lacks a right the limiter needs (a command, the budget's keys or its channel).

    Found before the limiter's first call, which writes nothing then. ``missing`` names the
    commands refused (``"HSET"``, ``"SCRIPT LOAD"``, ...). The rule to grant is in docs/security.md.
    """

    def __init__(self, message: str, *, budget: str | None = None, missing: tuple[str, ...] = ()) -> None:
        super().__init__(message, budget=budget)
        self.missing = missing


class ScriptArgumentError(XflowError, ValueError):
    """A Lua script refused an argument (not finite, out of range, wrong type): nothing was changed.

    The Python side checks the same bounds first, so this means a caller that bypassed them (the
    scripts are an interface of their own, see docs/lua.md) or a bug worth reporting.
    """


class QuotaExhaustedError(XflowError):
    """The provider refused a call because the account's quota is spent (OpenAI's 429 with code
    ``insufficient_quota``): waiting cannot help, so the call is not retried and the fleet is not
    paused. ``provider_message`` is the provider's own words."""

    def __init__(self, message: str, *, budget: str | None = None, provider_message: str = "") -> None:
        super().__init__(message, budget=budget)
        self.provider_message = provider_message or message


class NoRouteError(ConfigurationError):
    """A call to an LLM endpoint matched no route of a transport's Router, which has no default."""


class RetryException(XflowError):
    """Raised by a call to have ``xflow_dist.compat.auto_backoff`` retry it (XtremeFlow's name).

    ``retry_after`` is the provider's wait in seconds; None lets the decorator's backoff decide.
    """

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class OutsideTaskError(XflowError, RuntimeError):
    """A per-task call (``report_token_usage``) made outside a task started by a compat scheduler."""


class InvalidTaskError(XflowError, TypeError):
    """Not a coroutine where one is needed: ``start_task`` and ``kv_batch`` must own what they run."""
