"""Telling a provider's "quota exhausted" 429 (billing: no credit left) from a rate limit. I/O-free.

Waiting cannot help such a call, so it must neither pause the fleet nor be retried. It is told by
the body, never by the message text: OpenAI (and the services that copy its errors) answer
``{"error": {"code": "insufficient_quota", "type": "insufficient_quota", "message": ...}}``.
Anthropic's 429 is always a rate limit (``rate_limit_error``; an empty credit balance is a 400), and
Azure's bodies differ (see PROVIDERS.md): neither is told apart, both stay rate limits.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from ._exceptions import QuotaExhaustedError

#: ``error.code`` / ``error.type`` values that mean the account's quota, not its rate, is spent.
QUOTA_CODES = frozenset({"insufficient_quota"})

_MAX_MESSAGE = 500


def quota_message(doc: Any) -> str | None:
    """The provider's message if a parsed error body (or its ``error`` object alone, as openai's
    ``APIError.body`` keeps it) says the quota is exhausted, else None."""
    if not isinstance(doc, Mapping):
        return None
    err = doc.get("error", doc)
    if not isinstance(err, Mapping):
        return None
    if err.get("code") not in QUOTA_CODES and err.get("type") not in QUOTA_CODES:
        return None
    message = err.get("message")
    return message[:_MAX_MESSAGE] if isinstance(message, str) and message else "insufficient_quota"


def quota_in_body(content: bytes | str) -> str | None:
    """As ``quota_message``, for a body not yet parsed (anything but JSON: None)."""
    try:
        return quota_message(json.loads(content))
    except (ValueError, UnicodeDecodeError):
        return None


def quota_in_exception(exc: BaseException) -> str | None:
    """The provider's message if ``exc`` is a 429 whose body says the quota is exhausted: openai's
    ``RateLimitError`` (its ``body``), or an ``HTTPStatusError`` of httpx / httpx2 (its response's body)."""
    if isinstance(exc, QuotaExhaustedError):
        return exc.provider_message
    response = getattr(exc, "response", None)
    status = getattr(exc, "status_code", None)
    if status is None and response is not None:
        status = getattr(response, "status_code", None)
    if status != 429:
        return None
    found = quota_message(getattr(exc, "body", None))
    if found is None:
        for attr in ("code", "type"):
            value = getattr(exc, attr, None)
            if isinstance(value, str) and value in QUOTA_CODES:
                found = str(getattr(exc, "message", None) or exc)[:_MAX_MESSAGE]
                break
    if found is None and response is not None:
        try:
            content = response.content  # httpx raises if the body was never read: then no verdict
        except Exception:
            return None
        if isinstance(content, bytes | str):
            found = quota_in_body(content)
    return found


def quota_error(budget: str | None, message: str) -> QuotaExhaustedError:
    """The error raised for such a 429: the fleet goes on, this call cannot."""
    where = f" (budget {budget!r})" if budget else ""
    return QuotaExhaustedError(
        f"the provider's quota is exhausted{where}: {message} -- a billing limit, not a rate limit: "
        "not retried, and the fleet is not paused",
        budget=budget,
        provider_message=message,
    )
