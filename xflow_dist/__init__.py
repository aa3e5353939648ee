"""xflow-dist: one exact LLM rate-limit budget shared by a whole fleet through Redis."""

from __future__ import annotations

from ._async_limiter import AsyncLimiter
from ._base import Decision
from ._budget import Budget, Cap, CooldownPolicy
from ._core import CooldownReply, SettleReply, Status
from ._exceptions import (
    AcquireTimeout,
    BackendError,
    BudgetConflictError,
    BudgetNotFoundError,
    BudgetUnavailableError,
    ConfigurationError,
    CostTooLargeError,
    InvalidCostError,
    NoRouteError,
    PermissionDeniedError,
    QuotaExhaustedError,
    ScriptArgumentError,
    XflowError,
)
from ._headers import LimitFacts, parse_limit_headers, parse_retry_after
from ._lease import AsyncLease, Lease
from ._limiter import Limiter
from ._outage import OutagePolicy

__version__ = "0.1.0"  # the one source of the version: pyproject.toml reads it ([tool.hatch.version])

__all__ = [
    "AcquireTimeout",
    "AsyncLease",
    "AsyncLimiter",
    "BackendError",
    "Budget",
    "BudgetConflictError",
    "BudgetNotFoundError",
    "BudgetUnavailableError",
    "Cap",
    "ConfigurationError",
    "CooldownPolicy",
    "CooldownReply",
    "CostTooLargeError",
    "Decision",
    "InvalidCostError",
    "Lease",
    "LimitFacts",
    "Limiter",
    "NoRouteError",
    "OutagePolicy",
    "PermissionDeniedError",
    "QuotaExhaustedError",
    "ScriptArgumentError",
    "SettleReply",
    "Status",
    "XflowError",
    "__version__",
    "parse_limit_headers",
    "parse_retry_after",
]
