"""The one exception tree of xflow-dist.

    XflowError
    ├── ConfigurationError        bad budget, policy or setting (also a ValueError)
    ├── InvalidCostError          negative, NaN or infinite cost (also a ValueError)
    │   └── CostTooLargeError     a cost no bucket of the budget can ever hold
    ├── AcquireTimeout            no grant before the deadline (also a TimeoutError)
    └── BackendError              Redis failed or could not be reached

Every error names the budget it concerns where there is one; waits carry ``retry_after``.
"""

from __future__ import annotations

__all__ = [
    "AcquireTimeout",
    "BackendError",
    "ConfigurationError",
    "CostTooLargeError",
    "InvalidCostError",
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
    """The deadline passed (or would pass) before the budget could grant the request."""

    def __init__(self, message: str, *, budget: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, budget=budget)
        self.retry_after = retry_after


class BackendError(XflowError):
    """Redis failed, was unreachable, or answered something unexpected."""
