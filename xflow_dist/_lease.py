"""A granted reservation: a concurrency slot plus what was charged, until it is settled."""

from __future__ import annotations

from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from ._core import SettleReply

if TYPE_CHECKING:
    from ._async_limiter import AsyncLimiter
    from ._budget import Level
    from ._limiter import Limiter


class _LeaseState:
    __slots__ = ("__weakref__", "_closed", "id", "levels", "lost", "model", "requests", "tokens")

    def __init__(self, lease_id: str, requests: float, tokens: float) -> None:
        self.id = lease_id
        self.requests = requests
        self.tokens = tokens
        #: True once a heartbeat found the lease expired: its slot may belong to someone else.
        self.lost = False
        #: The model (or route) whose limits the provider reports with this call: each is learned on
        #: its own, so two models under one budget do not flip it (settable; the transports set it).
        self.model = ""
        #: The caps the lease passes (``Budget.caps``), registered with it again if Redis lost it.
        self.levels: tuple[Level, ...] = ()
        self._closed = False

    @property
    def closed(self) -> bool:
        """Settled, released or cancelled: nothing more will be charged or refunded."""
        return self._closed

    def _close(self) -> bool:
        """Mark closed; True the first time only, so every way out settles exactly once."""
        first = not self._closed
        self._closed = True
        return first

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("lost" if self.lost else "held")
        return f"<{type(self).__name__} {self.id} tokens={self.tokens:g} {state}>"


class Lease(_LeaseState):
    """Held by ``with limiter.acquire(...) as lease``; leaving the block releases it."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: Limiter, lease_id: str, requests: float, tokens: float) -> None:
        super().__init__(lease_id, requests, tokens)
        self._limiter = limiter

    def report(
        self,
        actual_tokens: float,
        *,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SettleReply | None:
        """Settle with the tokens really used (refund or debt) and free the slot; once only.

        ``remaining_*`` are what the provider said it had left when it admitted the call (its
        ``x-ratelimit-remaining-*`` headers): the shared level is corrected down if it was ahead.
        ``limit_*`` are its limits per minute (``x-ratelimit-limit-*``): the whole fleet learns them,
        and the rates in force become the budget's own lowered to them, learned for ``model``
        (default: ``lease.model``) and forgotten an hour after its last report. ``headers`` (the
        reply's, OpenAI's or Anthropic's) give all four in one step; a keyword given overrides them.
        """
        argv = self._limiter._settle_args(
            self.id, actual_tokens, remaining_requests, remaining_tokens, limit_requests, limit_tokens,
            self.model if model is None else model, headers,
        )  # fmt: skip
        if not self._close():
            return None
        return self._limiter._finish(self, "settle", argv)

    def release(
        self,
        *,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SettleReply | None:
        """Settle at the estimate (the call was made, its usage unknown) and free the slot; the
        provider's word, if any, is taken as by ``report``."""
        argv = self._limiter._settle_args(
            self.id, None, remaining_requests, remaining_tokens, limit_requests, limit_tokens,
            self.model if model is None else model, headers,
        )  # fmt: skip
        if not self._close():
            return None
        return self._limiter._finish(self, "settle", argv)

    def cancel(self) -> None:
        """Give the whole reservation back: the call was never made."""
        if self._close():
            self._limiter._finish(self, "cancel", [self.id])

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


class AsyncLease(_LeaseState):
    """Held by ``async with limiter.acquire(...) as lease``; leaving the block releases it."""

    __slots__ = ("_limiter",)

    def __init__(self, limiter: AsyncLimiter, lease_id: str, requests: float, tokens: float) -> None:
        super().__init__(lease_id, requests, tokens)
        self._limiter = limiter

    async def report(
        self,
        actual_tokens: float,
        *,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SettleReply | None:
        """Settle with the tokens really used (refund or debt) and free the slot; once only.

        ``remaining_*`` are what the provider said it had left when it admitted the call (its
        ``x-ratelimit-remaining-*`` headers): the shared level is corrected down if it was ahead.
        ``limit_*`` are its limits per minute (``x-ratelimit-limit-*``): the whole fleet learns them,
        and the rates in force become the budget's own lowered to them, learned for ``model``
        (default: ``lease.model``) and forgotten an hour after its last report. ``headers`` (the
        reply's, OpenAI's or Anthropic's) give all four in one step; a keyword given overrides them.
        """
        argv = self._limiter._settle_args(
            self.id, actual_tokens, remaining_requests, remaining_tokens, limit_requests, limit_tokens,
            self.model if model is None else model, headers,
        )  # fmt: skip
        if not self._close():
            return None
        return await self._limiter._finish(self, "settle", argv)

    async def release(
        self,
        *,
        remaining_requests: float | None = None,
        remaining_tokens: float | None = None,
        limit_requests: float | None = None,
        limit_tokens: float | None = None,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> SettleReply | None:
        """Settle at the estimate (the call was made, its usage unknown) and free the slot; the
        provider's word, if any, is taken as by ``report``."""
        argv = self._limiter._settle_args(
            self.id, None, remaining_requests, remaining_tokens, limit_requests, limit_tokens,
            self.model if model is None else model, headers,
        )  # fmt: skip
        if not self._close():
            return None
        return await self._limiter._finish(self, "settle", argv)

    async def cancel(self) -> None:
        """Give the whole reservation back: the call was never made."""
        if self._close():
            await self._limiter._finish(self, "cancel", [self.id])

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.release()
