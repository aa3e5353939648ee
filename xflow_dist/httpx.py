"""httpx transports that put every LLM call through a shared budget (first step of issue 4).

``AsyncRateLimitedTransport`` / ``RateLimitedTransport`` wrap any httpx transport. A POST to an
OpenAI-compatible endpoint (chat completions, completions, embeddings, responses) is estimated,
acquires that cost, goes out, and settles with the reply's ``usage`` and the provider's
``x-ratelimit-remaining-*``; a 429 starts the fleet-wide cooldown and is retried within a bound,
each retry acquiring again. A streamed reply holds its lease until the stream is closed, and
settles with the usage chunk when the stream carried one, else at the estimate. Other requests
pass through untouched. Not yet here: a router to several budgets, tiktoken.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Generator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from ._async_limiter import AsyncLimiter
from ._headers import parse_limit_headers, parse_retry_after
from ._lease import AsyncLease, Lease
from ._limiter import Limiter
from ._tokens import estimate_messages_tokens, estimate_text_tokens

__all__ = ["AsyncRateLimitedTransport", "RateLimitedTransport", "estimate_request"]

_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses")


def _text_tokens(value: Any) -> int:
    if isinstance(value, str):
        return estimate_text_tokens(value)
    if isinstance(value, list):
        return sum(_text_tokens(v) for v in value)
    return 0


def estimate_request(path: str, body: Mapping[str, Any], *, default_max_tokens: int = 1024) -> int:
    """What the provider charges at admission: prompt tokens (the documented heuristic of
    ``_tokens``) plus the output bound (``max_tokens``, ``max_completion_tokens`` or
    ``max_output_tokens``, else ``default_max_tokens``) times ``n``; embeddings have no output."""
    if path.endswith("/embeddings"):
        return max(1, _text_tokens(body.get("input")))
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        prompt = estimate_messages_tokens(messages) if isinstance(messages, list) else 0
    else:
        prompt = _text_tokens(body.get("prompt", body.get("input")))
    bound = body.get("max_tokens", body.get("max_completion_tokens", body.get("max_output_tokens")))
    out = bound if isinstance(bound, int) and not isinstance(bound, bool) and bound >= 0 else default_max_tokens
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    return prompt + out * n


def _limited(request: httpx.Request) -> dict[str, Any] | None:
    """The JSON body of a request to budget, or None for one to pass through."""
    if request.method != "POST" or not request.url.path.endswith(_PATHS):
        return None
    try:
        body = json.loads(request.content or b"{}")
    except (ValueError, httpx.RequestNotRead):
        return None
    return body if isinstance(body, dict) else None


def _usage(data: bytes) -> int | None:
    try:
        usage = json.loads(data).get("usage") or {}
    except (ValueError, AttributeError):
        return None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return int(total) if isinstance(total, int | float) else None


class _UsageScanner:
    """Finds the last ``usage`` in a server-sent event stream, chunk by chunk."""

    def __init__(self) -> None:
        self._buffer = b""
        self.total: int | None = None

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:") and b'"usage"' in line:
                found = _usage(line[5:].strip())
                if found is not None:
                    self.total = found


def _settle_kwargs(response: httpx.Response, used: int | None) -> dict[str, Any]:
    facts = parse_limit_headers(response.headers)
    return {
        "actual_tokens": used,
        "remaining_requests": facts.requests_remaining,
        "remaining_tokens": facts.tokens_remaining,
    }


class _AsyncLeasedStream(httpx.AsyncByteStream):
    def __init__(self, inner: httpx.AsyncByteStream, lease: AsyncLease, response: httpx.Response) -> None:
        self._inner, self._lease, self._response = inner, lease, response
        self._scan = _UsageScanner()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._scan.feed(chunk)
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._inner.aclose()
        finally:
            await _settle_async(self._lease, _settle_kwargs(self._response, self._scan.total))


class _LeasedStream(httpx.SyncByteStream):
    def __init__(self, inner: httpx.SyncByteStream, lease: Lease, response: httpx.Response) -> None:
        self._inner, self._lease, self._response = inner, lease, response
        self._scan = _UsageScanner()

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._inner:
            self._scan.feed(chunk)
            yield chunk

    def close(self) -> None:
        try:
            self._inner.close()
        finally:
            _settle_sync(self._lease, _settle_kwargs(self._response, self._scan.total))


def _decoded_headers(response: httpx.Response) -> list[tuple[bytes, bytes]]:
    """The headers of a reply whose body was read (and so decoded): no encoding, no length."""
    return [(k, v) for k, v in response.headers.raw if k.lower() not in (b"content-encoding", b"content-length")]


def _with_stream(response: httpx.Response, stream: Any, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        response.status_code, headers=response.headers, stream=stream, request=request,
        extensions=response.extensions,
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class _Acquire:
    tokens: int


@dataclass(frozen=True, slots=True)
class _Send:
    lease: Any


@dataclass(frozen=True, slots=True)
class _Read:
    response: httpx.Response


@dataclass(frozen=True, slots=True)
class _Settle:
    lease: Any
    kwargs: dict[str, Any]


@dataclass(frozen=True, slots=True)
class _Cooldown:
    retry_after: float | None


@dataclass(frozen=True, slots=True)
class _Hold:
    """Hand the caller a streamed reply whose lease settles when the stream closes."""

    lease: Any
    response: httpx.Response


_Step = _Acquire | _Send | _Read | _Settle | _Cooldown | _Hold


def _call_flow(
    request: httpx.Request, body: dict[str, Any], max_retries: int, default_max_tokens: int
) -> Generator[_Step, Any, httpx.Response]:
    """One budgeted call, written once for both transports: they run each step and send back
    its result (the lease, the reply, the body read, the wrapped stream)."""
    tokens = estimate_request(request.url.path, body, default_max_tokens=default_max_tokens)
    attempt = 0
    while True:
        lease = yield _Acquire(tokens)
        response: httpx.Response = yield _Send(lease)
        if response.status_code == 429:
            content: bytes = yield _Read(response)
            yield _Settle(lease, {"actual_tokens": 0})  # rejected calls use no tokens
            yield _Cooldown(parse_retry_after(response.headers))
            if attempt < max_retries:
                attempt += 1
                continue
            return _read_reply(response, content, request)
        if body.get("stream") and response.status_code < 400:
            held: httpx.Response = yield _Hold(lease, response)
            return held
        content = yield _Read(response)
        used = _usage(content) if response.status_code < 400 else 0
        yield _Settle(lease, _settle_kwargs(response, used))
        return _read_reply(response, content, request)


def _read_reply(response: httpx.Response, content: bytes, request: httpx.Request) -> httpx.Response:
    return httpx.Response(
        response.status_code, headers=_decoded_headers(response), content=content, request=request,
        extensions=response.extensions,
    )  # fmt: skip


async def _settle_async(lease: AsyncLease, kwargs: dict[str, Any]) -> None:
    if kwargs.get("actual_tokens") is None:
        await lease.release()
    else:
        await lease.report(**kwargs)


def _settle_sync(lease: Lease, kwargs: dict[str, Any]) -> None:
    if kwargs.get("actual_tokens") is None:
        lease.release()
    else:
        lease.report(**kwargs)


class AsyncRateLimitedTransport(httpx.AsyncBaseTransport):
    """``httpx.AsyncClient(transport=AsyncRateLimitedTransport(limiter))``: every LLM call shares
    ``limiter``'s budget. ``max_retries`` bounds the retries of 429s (each waits out the cooldown)."""

    def __init__(
        self,
        limiter: AsyncLimiter,
        transport: httpx.AsyncBaseTransport | None = None,
        *,
        max_retries: int = 3,
        default_max_tokens: int = 1024,
    ) -> None:
        self.limiter = limiter
        self._inner = transport or httpx.AsyncHTTPTransport()
        self.max_retries = max_retries
        self.default_max_tokens = default_max_tokens

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = _limited(request)
        if body is None:
            return await self._inner.handle_async_request(request)
        flow = _call_flow(request, body, self.max_retries, self.default_max_tokens)
        step = next(flow)
        try:
            while True:
                step = flow.send(await self._run(step, request))
        except StopIteration as done:
            reply: httpx.Response = done.value
            return reply

    async def _run(self, step: _Step, request: httpx.Request) -> Any:
        if isinstance(step, _Acquire):
            return await self.limiter.acquire(tokens=step.tokens)
        if isinstance(step, _Send):
            try:
                return await self._inner.handle_async_request(request)
            except BaseException:
                await step.lease.release()  # the attempt may have reached the provider: it is charged
                raise
        if isinstance(step, _Read):
            content = await step.response.aread()
            await step.response.aclose()
            return content
        if isinstance(step, _Settle):
            return await _settle_async(step.lease, step.kwargs)
        if isinstance(step, _Cooldown):
            return await self.limiter.cooldown(retry_after=step.retry_after)
        stream = step.response.stream
        assert isinstance(stream, httpx.AsyncByteStream)
        return _with_stream(step.response, _AsyncLeasedStream(stream, step.lease, step.response), request)

    async def aclose(self) -> None:
        await self._inner.aclose()


class RateLimitedTransport(httpx.BaseTransport):
    """``httpx.Client(transport=RateLimitedTransport(limiter))``: the blocking twin."""

    def __init__(
        self,
        limiter: Limiter,
        transport: httpx.BaseTransport | None = None,
        *,
        max_retries: int = 3,
        default_max_tokens: int = 1024,
    ) -> None:
        self.limiter = limiter
        self._inner = transport or httpx.HTTPTransport()
        self.max_retries = max_retries
        self.default_max_tokens = default_max_tokens

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        body = _limited(request)
        if body is None:
            return self._inner.handle_request(request)
        flow = _call_flow(request, body, self.max_retries, self.default_max_tokens)
        step = next(flow)
        try:
            while True:
                step = flow.send(self._run(step, request))
        except StopIteration as done:
            reply: httpx.Response = done.value
            return reply

    def _run(self, step: _Step, request: httpx.Request) -> Any:
        if isinstance(step, _Acquire):
            return self.limiter.acquire(tokens=step.tokens)
        if isinstance(step, _Send):
            try:
                return self._inner.handle_request(request)
            except BaseException:
                step.lease.release()
                raise
        if isinstance(step, _Read):
            content = step.response.read()
            step.response.close()
            return content
        if isinstance(step, _Settle):
            return _settle_sync(step.lease, step.kwargs)
        if isinstance(step, _Cooldown):
            return self.limiter.cooldown(retry_after=step.retry_after)
        stream = step.response.stream
        assert isinstance(stream, httpx.SyncByteStream)
        return _with_stream(step.response, _LeasedStream(stream, step.lease, step.response), request)

    def close(self) -> None:
        self._inner.close()
