"""XtremeFlow's API over a shared budget: ``TaskScheduler``, ``RequestRateScheduler``,
``TokenRateScheduler``, ``report_token_usage``, ``auto_backoff``, ``RetryException``,
``kv_batch`` and ``async_pipeline``, with the same signatures and timing as XtremeFlow 0.4.4.

Give a scheduler ``redis=`` (a URL or a ``redis.asyncio.Redis``) and ``name=`` and every process
that names the same budget shares it; without them the budget is the scheduler's own, in its event
loop, as XtremeFlow's was (the scripts' decisions on floats: ``LocalLimiter``). See
``docs/compat.md`` for what differs.
"""

from __future__ import annotations

from .._exceptions import RetryException
from ._kvbatch import kv_batch
from ._pipeline import async_pipeline
from ._scheduler import (
    ExecutionContext,
    RequestRateScheduler,
    TaskScheduler,
    TokenRateScheduler,
    auto_backoff,
    get_context,
    report_token_usage,
)

__all__ = [
    "ExecutionContext",
    "RequestRateScheduler",
    "RetryException",
    "TaskScheduler",
    "TokenRateScheduler",
    "async_pipeline",
    "auto_backoff",
    "get_context",
    "kv_batch",
    "report_token_usage",
]
