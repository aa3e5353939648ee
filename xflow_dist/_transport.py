"""One budgeted LLM call, written once for httpx and httpx2 and for the sync and async transports.

The two HTTP libraries share an API under different module names (openai 1.x/2.x use ``httpx``,
3.x ``httpx2``), so everything here takes the module as ``http`` and only ``xflow_dist.httpx`` and
``xflow_dist.httpx2`` bind it. ``_call_flow`` is the whole policy as a generator of steps; each
transport runs the steps with its own I/O and sends back the results.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, ClassVar, Generic, TypeVar

from . import _observe as observe
from ._async_limiter import AsyncLimiter
from ._exceptions import ConfigurationError
from ._headers import parse_retry_after
from ._lease import AsyncLease, Lease
from ._limiter import Limiter
from ._quota import quota_error, quota_in_body
from ._router import Call, Router
from ._tokens import TokenCounter, estimate_messages_tokens, estimate_text_tokens, tiktoken_counter

__all__ = ["AsyncTransportCore", "SyncTransportCore", "estimate_request"]

log = logging.getLogger("xflow_dist")

_PATHS = ("/chat/completions", "/completions", "/embeddings", "/responses")

L = TypeVar("L")


def _counter(model: object, tokenizer: TokenCounter | None) -> TokenCounter:
    if tokenizer is not None:
        return tokenizer
    return tiktoken_counter(model if isinstance(model, str) else None) or estimate_text_tokens


def _text_tokens(value: Any, count: TokenCounter) -> int:
    """Tokens of a prompt or input: a string, a list of them, or message items with text parts."""
    if isinstance(value, str):
        return count(value)
    if isinstance(value, list):
        return sum(_text_tokens(v, count) for v in value)
    if isinstance(value, Mapping):
        return sum(_text_tokens(value.get(key), count) for key in ("content", "text", "input"))
    return 0


def _bound(body: Mapping[str, Any], default: int) -> int:
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
    return default


def estimate_request(
    path: str, body: Mapping[str, Any], *, default_max_tokens: int = 1024, tokenizer: TokenCounter | None = None
) -> int:
    """What the provider charges at admission: prompt tokens plus the output bound (``max_tokens``,
    ``max_completion_tokens`` or ``max_output_tokens``, else ``default_max_tokens``) times ``n``;
    embeddings have no output. Prompt tokens are ``tokenizer``'s count if given, else tiktoken's
    for the body's model where it is installed and has the encoding, else 4 bytes a token."""
    count = _counter(body.get("model"), tokenizer)
    if path.endswith("/embeddings"):
        return max(1, _text_tokens(body.get("input"), count))
    messages = body.get("messages") if path.endswith("/chat/completions") else body.get("input")
    if isinstance(messages, list) and messages and all(isinstance(m, Mapping) for m in messages):
        prompt = estimate_messages_tokens(messages, count) if path.endswith("/chat/completions") else (
            _text_tokens(messages, count)
        )  # fmt: skip
    else:
        prompt = _text_tokens(body.get("prompt", body.get("input")), count)
    n = body.get("n", 1)
    n = n if isinstance(n, int) and not isinstance(n, bool) and n >= 1 else 1
    return prompt + _bound(body, default_max_tokens) * n


#: Request headers naming the call's priority class and tenant; the transport takes them off before sending.
PRIORITY_HEADER = "x-xflow-priority"
TENANT_HEADER = "x-xflow-tenant"

#: A transport's priority class or tenant: a name for every call, or a function of the request that names one.
Named = str | Callable[[Any], str | None] | None


def _take(request: Any, header: str) -> str | None:
    """What the request's header names, taken off the request (it is ours, not the provider's)."""
    named = request.headers.get(header)
    if named is not None:
        del request.headers[header]
    return named  # type: ignore[no-any-return]


def _named(request: Any, header: str | None, given: Named) -> str | None:
    """The header's name, else ``given``'s (a name, or a function of the request)."""
    if header is not None:
        return header
    return given(request) if callable(given) else given


def _limited(http: Any, request: Any) -> dict[str, Any] | None:
    """The JSON body of a request to budget, or None for one to pass through."""
    if request.method != "POST" or not request.url.path.endswith(_PATHS):
        return None
    try:
        body = json.loads(request.content or b"{}")
    except (ValueError, http.RequestNotRead):
        return None
    return body if isinstance(body, dict) else None


def _usage(data: bytes) -> int | None:
    """``usage.total_tokens`` of a reply or a stream event (the Responses API nests it in ``response``)."""
    try:
        doc = json.loads(data)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    usage = doc.get("usage")
    if not isinstance(usage, dict) and isinstance(doc.get("response"), dict):
        usage = doc["response"].get("usage")
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    if not isinstance(total, int | float) or isinstance(total, bool) or not math.isfinite(total) or total < 0:
        return None  # a provider's odd number is no usage: the call settles at its estimate
    return int(total)


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


def _settle_kwargs(response: Any, used: int | None) -> dict[str, Any]:
    return {"actual_tokens": used, "headers": response.headers}


def _settle_sync(lease: Lease, kwargs: dict[str, Any]) -> None:
    """Report the usage when it is known, else release at the estimate; the headers count either way."""
    used, facts = kwargs["actual_tokens"], {k: v for k, v in kwargs.items() if k != "actual_tokens"}
    if used is None:
        lease.release(**facts)
    else:
        lease.report(used, **facts)


async def _settle_async(lease: AsyncLease, kwargs: dict[str, Any]) -> None:
    used, facts = kwargs["actual_tokens"], {k: v for k, v in kwargs.items() if k != "actual_tokens"}
    if used is None:
        await lease.release(**facts)
    else:
        await lease.report(used, **facts)


# -- streamed replies: the lease is held until the stream closes, or until it is garbage --

_ORPHANS: set[asyncio.Task[None]] = set()


def _abandon_sync(inner: Any, lease: Lease, kwargs: dict[str, Any]) -> None:
    """The caller dropped a stream without closing it: close it and settle, from the collector."""
    try:
        inner.close()
    finally:
        _settle_sync(lease, kwargs)


async def _settle_orphan(inner: Any, lease: AsyncLease, kwargs: dict[str, Any]) -> None:
    try:
        await inner.aclose()
    finally:
        await _settle_async(lease, kwargs)


def _abandon_async(loop: asyncio.AbstractEventLoop, inner: Any, lease: AsyncLease, kwargs: dict[str, Any]) -> None:
    """As ``_abandon_sync``, but the settle must run on the lease's loop, which may be another thread's."""
    if loop.is_closed():
        return  # the limiter's loop is gone: the lease expires by its TTL

    def spawn() -> None:
        task = loop.create_task(_settle_orphan(inner, lease, kwargs))
        _ORPHANS.add(task)
        task.add_done_callback(_ORPHANS.discard)

    loop.call_soon_threadsafe(spawn)


def _quietly(settle: Callable[[], object]) -> None:
    """Settle on the way out of a failure: a settle that fails too is logged, the first error stands."""
    try:
        settle()
    except Exception as exc:  # the caller gets the error that ended the call
        log.warning("could not settle a lease after a failed call (it expires with its TTL): %r", exc)


async def _aquietly(settle: Awaitable[object]) -> None:
    try:
        await settle
    except Exception as exc:
        log.warning("could not settle a lease after a failed call (it expires with its TTL): %r", exc)


class _SyncLeased:
    """The reply's stream, holding its lease: the lease settles when the stream ends — read to the
    end, failed (a read error), left (the caller stopped iterating), closed, or collected."""

    def __init__(self, inner: Any, lease: Lease, response: Any) -> None:
        self._inner, self._lease = inner, lease
        self._kwargs = _settle_kwargs(response, None)
        self._scan = _UsageScanner()
        self._closed = False
        self._abandoned = weakref.finalize(self, _abandon_sync, inner, lease, self._kwargs)

    def __iter__(self) -> Iterator[bytes]:
        # An iteration, once over, cannot resume (httpx refuses to read a stream twice): settle now.
        try:
            for chunk in self._inner:
                self._scan.feed(chunk)
                yield chunk
        except BaseException:  # a read error, or the caller left (GeneratorExit): keep its exception
            _quietly(self.close)
            raise
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._abandoned.detach()
        try:
            self._inner.close()
        finally:
            _settle_sync(self._lease, {**self._kwargs, "actual_tokens": self._scan.total})


class _AsyncLeased:
    """As ``_SyncLeased``; a cancelled iteration settles too (the settle outlives a second cancel)."""

    def __init__(self, inner: Any, lease: AsyncLease, response: Any) -> None:
        self._inner, self._lease = inner, lease
        self._kwargs = _settle_kwargs(response, None)
        self._scan = _UsageScanner()
        self._closed = False
        loop = asyncio.get_running_loop()
        self._abandoned = weakref.finalize(self, _abandon_async, loop, inner, lease, self._kwargs)

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                self._scan.feed(chunk)
                yield chunk
        except BaseException:  # a read error, a cancellation, or the caller left
            await _aquietly(self.aclose())
            raise
        await self.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._abandoned.detach()
        try:
            await self._inner.aclose()
        finally:
            await _settle_async(self._lease, {**self._kwargs, "actual_tokens": self._scan.total})


@cache
def _stream_class(logic: type, base: type) -> type:
    """``logic`` bound to one library's stream base class, which its responses check for."""
    return type(f"Leased{base.__name__}", (logic, base), {})


# -- the call flow --


@dataclass(frozen=True, slots=True)
class _Acquire:
    tokens: int
    model: str = ""  # the provider reports its limits per model: the lease learns them for it
    priority: str | None = None  # the call's class (None: the budget's default)
    tenant: str | None = None  # whose call it is (None: the budget's untagged calls)


@dataclass(frozen=True, slots=True)
class _Send:
    lease: Any


@dataclass(frozen=True, slots=True)
class _Read:
    response: Any


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
    response: Any


_Step = _Acquire | _Send | _Read | _Settle | _Cooldown | _Hold


def _decoded_headers(response: Any) -> list[tuple[bytes, bytes]]:
    """The headers of a reply whose body was read (and so decoded): no encoding, no length."""
    return [(k, v) for k, v in response.headers.raw if k.lower() not in (b"content-encoding", b"content-length")]


def _call_flow(
    http: Any,
    request: Any,
    body: dict[str, Any],
    tokens: int,
    max_retries: int,
    budget: str | None = None,
    priority: str | None = None,
    tenant: str | None = None,
) -> Generator[_Step, Any, Any]:
    """One budgeted call: acquire, send, settle; on 429 settle at zero, cool the fleet down and
    retry within ``max_retries``, each attempt acquiring (and so charged) again. A 429 that says
    the quota is exhausted raises ``QuotaExhaustedError`` instead: no pause, no retry."""
    attempt = 0
    named = body.get("model")
    model = named if isinstance(named, str) else ""
    while True:
        lease = yield _Acquire(tokens, model, priority, tenant)
        response = yield _Send(lease)
        if response.status_code == 429:
            content: bytes = yield _Read(response)
            yield _Settle(lease, _settle_kwargs(response, 0))  # rejected calls use no tokens
            quota = quota_in_body(content)
            if quota is not None:
                raise quota_error(budget, quota)
            yield _Cooldown(parse_retry_after(response.headers))
            if attempt < max_retries:
                attempt += 1
                continue
            return _read_reply(http, response, content, request)
        if body.get("stream") and response.status_code < 400:
            return (yield _Hold(lease, response))
        content = yield _Read(response)
        used = _usage(content) if response.status_code < 400 else 0
        yield _Settle(lease, _settle_kwargs(response, used))
        return _read_reply(http, response, content, request)


def _read_reply(http: Any, response: Any, content: bytes, request: Any) -> Any:
    return http.Response(
        response.status_code, headers=_decoded_headers(response), content=content, request=request,
        extensions=response.extensions,
    )  # fmt: skip


class _TransportCore(Generic[L]):
    """What both transports hold: where calls go, how they are routed and estimated."""

    http: ClassVar[Any]

    def __init__(
        self,
        limiter: L | Router[L],
        transport: Any = None,
        *,
        max_retries: int = 3,
        default_max_tokens: int = 1024,
        tokenizer: TokenCounter | None = None,
        priority: Named = None,
        tenant: Named = None,
    ) -> None:
        self.router: Router[L] = limiter if isinstance(limiter, Router) else Router(default=limiter)
        for what, given in (("priority", priority), ("tenant", tenant)):
            if given is not None and not isinstance(given, str) and not callable(given):
                raise ConfigurationError(f"{what} must be a name or a function of the request, not {given!r}")
        #: Each call's priority class and tenant: the request's ``x-xflow-priority`` and
        #: ``x-xflow-tenant`` headers, else these (a name, or a function of the request), else the
        #: budget's defaults.
        self.priority = priority
        self.tenant = tenant
        self.max_retries = max_retries
        self.default_max_tokens = default_max_tokens
        self.tokenizer = tokenizer
        self._inner = transport if transport is not None else self._default_transport()

    def _default_transport(self) -> Any:
        raise NotImplementedError

    @property
    def limiter(self) -> L:
        """The default limiter (the only one, when the transport was given a limiter, not a router)."""
        if self.router.default is None:
            raise AttributeError("this transport routes calls to several limiters and has no default")
        return self.router.default

    def _plan(
        self, request: Any, body: dict[str, Any], named: tuple[str | None, str | None]
    ) -> tuple[L, Generator[_Step, Any, Any]]:
        model = body.get("model")
        call = Call(model if isinstance(model, str) else None, request.url.host, request.url.path, body)
        limiter = self.router.route(call)
        tokens = estimate_request(
            request.url.path, body, default_max_tokens=self.default_max_tokens, tokenizer=self.tokenizer
        )
        name = getattr(getattr(limiter, "budget", None), "name", None)
        priority, tenant = _named(request, named[0], self.priority), _named(request, named[1], self.tenant)
        return limiter, _call_flow(self.http, request, body, tokens, self.max_retries, name, priority, tenant)


class _Holding:
    """What the driver must give back if the call ends by an exception: the lease the flow was
    granted and has neither settled nor handed to a stream, and the reply it got for it, if any."""

    __slots__ = ("lease", "response", "since", "span")

    def __init__(self, span: Any = None) -> None:
        self.lease: Any = None
        self.response: Any = None
        self.span = span  # the call's trace span (``xflow_dist.tracing``), or None
        self.since = time.monotonic() if span is not None else 0.0

    def saw(self, step: _Step, result: Any) -> None:
        if isinstance(step, _Acquire):
            self.lease, self.response = result, None
        elif isinstance(step, _Send):
            self.response = result
        elif isinstance(step, _Hold):
            self.lease = None  # the stream settles it now
        if self.span is not None:
            self._trace(step, result)

    def _trace(self, step: _Step, result: Any) -> None:
        """The wait, the reservation, the status and the charge, as the span's attributes."""
        span, now = self.span, time.monotonic()
        if isinstance(step, _Acquire):
            span.set_attribute("xflow.wait_seconds", now - self.since)
            span.set_attribute("xflow.tokens_reserved", float(result.tokens))
        elif isinstance(step, _Send):
            span.set_attribute("http.response.status_code", int(result.status_code))
        elif isinstance(step, _Settle):
            used = step.kwargs.get("actual_tokens")
            span.set_attribute("xflow.tokens_charged", float(step.lease.tokens if used is None else used))
        elif isinstance(step, _Cooldown):
            span.add_event(
                "xflow.cooldown", {"xflow.retry_after": -1.0 if step.retry_after is None else step.retry_after}
            )
        self.since = now

    def owed(self, http: Any, step: _Step, exc: BaseException) -> tuple[Any, dict[str, Any] | None]:
        """The lease to settle and how: None to cancel it (the request surely never left: the
        connection to the provider could not be made, or no pooled one came free), else the
        settle's keywords, at the estimate with the reply's headers if one came."""
        lease = self.lease
        if lease is None or lease.closed:
            return None, None
        if isinstance(step, _Send) and isinstance(exc, _never_sent(http)):
            return lease, None
        facts = _settle_kwargs(self.response, None) if self.response is not None else {"actual_tokens": None}
        return lease, facts


@cache
def _never_sent(http: Any) -> tuple[type[BaseException], ...]:
    """Errors of sending that mean the request was not written: no connection, none free, a bad URL."""
    return (http.ConnectError, http.ConnectTimeout, http.PoolTimeout, http.UnsupportedProtocol)


class SyncTransportCore(_TransportCore[Limiter]):
    """The blocking transport, for any httpx-like module set as ``http``."""

    def _default_transport(self) -> Any:
        return self.http.HTTPTransport()

    def handle_request(self, request: Any) -> Any:
        named = _take(request, PRIORITY_HEADER), _take(request, TENANT_HEADER)
        body = _limited(self.http, request)
        if body is None:
            return self._inner.handle_request(request)
        limiter, flow = self._plan(request, body, named)
        with observe.call_span(limiter.budget.name) as span:
            holding = _Holding(span)
            step = next(flow)
            try:
                while True:
                    result = self._run(limiter, step, request)
                    holding.saw(step, result)
                    step = flow.send(result)
            except StopIteration as done:
                return done.value
            except BaseException as exc:  # any error, KeyboardInterrupt or SystemExit: give the lease back
                lease, facts = holding.owed(self.http, step, exc)
                if lease is not None:
                    _quietly(lease.cancel if facts is None else lambda: _settle_sync(lease, facts))
                raise
            finally:
                flow.close()

    def _run(self, limiter: Limiter, step: _Step, request: Any) -> Any:
        if isinstance(step, _Acquire):
            lease = limiter.acquire(tokens=step.tokens, priority=step.priority, tenant=step.tenant)
            lease.model = step.model
            return lease
        if isinstance(step, _Send):
            return self._inner.handle_request(request)
        if isinstance(step, _Read):
            try:
                return step.response.read()
            finally:
                step.response.close()
        if isinstance(step, _Settle):
            return _settle_sync(step.lease, step.kwargs)
        if isinstance(step, _Cooldown):
            return limiter.cooldown(retry_after=step.retry_after)
        stream = _stream_class(_SyncLeased, self.http.SyncByteStream)(step.response.stream, step.lease, step.response)
        return self.http.Response(
            step.response.status_code, headers=step.response.headers, stream=stream, request=request,
            extensions=step.response.extensions,
        )  # fmt: skip

    def close(self) -> None:
        self._inner.close()


class AsyncTransportCore(_TransportCore[AsyncLimiter]):
    """The asyncio transport, for any httpx-like module set as ``http``."""

    def _default_transport(self) -> Any:
        return self.http.AsyncHTTPTransport()

    async def handle_async_request(self, request: Any) -> Any:
        named = _take(request, PRIORITY_HEADER), _take(request, TENANT_HEADER)
        body = _limited(self.http, request)
        if body is None:
            return await self._inner.handle_async_request(request)
        limiter, flow = self._plan(request, body, named)
        with observe.call_span(limiter.budget.name) as span:
            holding = _Holding(span)
            step = next(flow)
            try:
                while True:
                    result = await self._run(limiter, step, request)
                    holding.saw(step, result)
                    step = flow.send(result)
            except StopIteration as done:
                return done.value
            except BaseException as exc:  # a cancellation too: the settle runs (and survives a second cancel)
                lease, facts = holding.owed(self.http, step, exc)
                if lease is not None:
                    await _aquietly(lease.cancel() if facts is None else _settle_async(lease, facts))
                raise
            finally:
                flow.close()

    async def _run(self, limiter: AsyncLimiter, step: _Step, request: Any) -> Any:
        if isinstance(step, _Acquire):
            lease = await limiter.acquire(tokens=step.tokens, priority=step.priority, tenant=step.tenant)
            lease.model = step.model
            return lease
        if isinstance(step, _Send):
            return await self._inner.handle_async_request(request)
        if isinstance(step, _Read):
            try:
                return await step.response.aread()
            finally:
                await step.response.aclose()
        if isinstance(step, _Settle):
            return await _settle_async(step.lease, step.kwargs)
        if isinstance(step, _Cooldown):
            return await limiter.cooldown(retry_after=step.retry_after)
        cls = _stream_class(_AsyncLeased, self.http.AsyncByteStream)
        stream = cls(step.response.stream, step.lease, step.response)
        return self.http.Response(
            step.response.status_code, headers=step.response.headers, stream=stream, request=request,
            extensions=step.response.extensions,
        )  # fmt: skip

    async def aclose(self) -> None:
        await self._inner.aclose()
