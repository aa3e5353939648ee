"""Every way out of a call through the httpx / httpx2 transports gives its lease back.

A fake inner transport fails (or hangs, to be cancelled) at one point of the call; a real limiter
on the suite's redis-server then shows the slot free (``in_flight == 0``) and the charge that
docs/httpx.md promises: at the estimate when the request may have reached the provider, nothing
when it surely never left, the usage when the reply carried it. The budget (600 tokens, refilling
10 a second) is full before each call, so a level near 600 means refunded, one near 600 minus the
estimate means charged.
"""

from __future__ import annotations

import asyncio
import gc
import importlib
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist._transport import estimate_request

ROOT = Path(__file__).resolve().parent.parent
BASE = "https://api.example/v1"
BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 200}
STREAM_BODY: dict[str, Any] = {**BODY, "stream": True}


def one(text: str) -> int:
    return 1


EST = estimate_request("/v1/chat/completions", BODY, tokenizer=one)  # 3 + 4 + 1 + 200
FULL = 10.0 * Budget("full", tpm=600, burst=60).credit  # 600 tokens a minute, less the dispatch margin
CHARGED = FULL - EST
USAGE_CHUNK = b'data: {"choices": [], "usage": {"total_tokens": 30}}\n\n'
USAGE_REPLY = b'{"choices": [], "usage": {"total_tokens": 30}}'


def _budget(name: str, max_concurrency: int = 4) -> Budget:
    return Budget(name, tpm=600, burst=60, max_concurrency=max_concurrency)


@dataclass(frozen=True)
class Lib:
    """One HTTP library (httpx or httpx2), its transports, and streams that fail on cue."""

    http: ModuleType
    xf: ModuleType
    Chunks: type
    AsyncChunks: type


def _lib(name: str) -> Lib:
    http = pytest.importorskip(name)

    class Chunks(http.SyncByteStream):  # type: ignore[name-defined,misc]
        """Yields ``chunks``, then raises ``fail`` (if any)."""

        def __init__(self, chunks: list[bytes], fail: BaseException | None = None) -> None:
            self.chunks, self.fail, self.closed = chunks, fail, False

        def __iter__(self) -> Iterator[bytes]:
            yield from self.chunks
            if self.fail is not None:
                raise self.fail

        def close(self) -> None:
            self.closed = True

    class AsyncChunks(http.AsyncByteStream):  # type: ignore[name-defined,misc]
        """Yields ``chunks``, then raises ``fail``, or sets ``reached`` and hangs until cancelled."""

        def __init__(
            self, chunks: list[bytes], fail: BaseException | None = None, reached: asyncio.Event | None = None
        ) -> None:
            self.chunks, self.fail, self.reached, self.closed = chunks, fail, reached, False

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in self.chunks:
                yield chunk
            if self.reached is not None:
                self.reached.set()
                await asyncio.Event().wait()
            if self.fail is not None:
                raise self.fail

        async def aclose(self) -> None:
            self.closed = True

    return Lib(http, importlib.import_module(f"xflow_dist.{name}"), Chunks, AsyncChunks)


@pytest.fixture(params=["httpx", "httpx2"])
def lib(request: pytest.FixtureRequest) -> Lib:
    return _lib(request.param)


def _level(status: Any) -> float:
    assert status.in_flight == 0, "the slot is free again"
    assert status.tokens_available is not None
    return float(status.tokens_available)


def _charged(status: Any) -> None:
    assert CHARGED - 1 <= _level(status) <= CHARGED + 20, "charged at the estimate"


def _refunded(status: Any) -> None:
    assert _level(status) >= FULL - 1, "nothing charged"


def _sync_client(lib: Lib, lim: Limiter, handler: Callable[[Any], Any], **options: Any) -> Any:
    transport = lib.xf.RateLimitedTransport(lim, lib.http.MockTransport(handler), tokenizer=one, **options)
    return lib.http.Client(transport=transport, base_url=BASE)


def _async_client(lib: Lib, lim: AsyncLimiter, handler: Callable[[Any], Any], **options: Any) -> Any:
    transport = lib.xf.AsyncRateLimitedTransport(lim, lib.http.MockTransport(handler), tokenizer=one, **options)
    return lib.http.AsyncClient(transport=transport, base_url=BASE)


def _raiser(exc: BaseException) -> Callable[[Any], Any]:
    def handler(request: Any) -> Any:
        raise exc

    return handler


# --------------------------------------------------------------------------------------------
# Sending fails: charged if the request may have left, refunded if no connection was ever made
# --------------------------------------------------------------------------------------------


def test_send_error_after_the_request_left_is_charged(lib: Lib, redis_url: str, name: str) -> None:
    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, _raiser(lib.http.ReadTimeout("slow"))) as c:
        with pytest.raises(lib.http.ReadTimeout):
            c.post("/chat/completions", json=BODY)
        _charged(lim.status())


async def test_async_send_error_after_the_request_left_is_charged(lib: Lib, redis_url: str, name: str) -> None:
    async with AsyncLimiter(_budget(name), redis_url) as lim:
        async with _async_client(lib, lim, _raiser(lib.http.ReadTimeout("slow"))) as c:
            with pytest.raises(lib.http.ReadTimeout):
                await c.post("/chat/completions", json=BODY)
        _charged(await lim.status())


@pytest.mark.parametrize("error", ["ConnectError", "ConnectTimeout", "PoolTimeout"])
def test_no_connection_means_never_sent_and_refunded(lib: Lib, redis_url: str, name: str, error: str) -> None:
    exc = getattr(lib.http, error)("no route to host")
    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, _raiser(exc)) as c:
        with pytest.raises(getattr(lib.http, error)):
            c.post("/chat/completions", json=BODY)
        _refunded(lim.status())


async def test_async_no_connection_means_never_sent_and_refunded(lib: Lib, redis_url: str, name: str) -> None:
    async with AsyncLimiter(_budget(name), redis_url) as lim:
        async with _async_client(lib, lim, _raiser(lib.http.ConnectError("refused"))) as c:
            with pytest.raises(lib.http.ConnectError):
                await c.post("/chat/completions", json=BODY)
        _refunded(await lim.status())


# --------------------------------------------------------------------------------------------
# Reading the body fails: charged at the estimate, the reply's headers still taken
# --------------------------------------------------------------------------------------------

READ_ERRORS = ["ReadTimeout", "ReadError", "RemoteProtocolError", "KeyboardInterrupt", "SystemExit"]


def _error(lib: Lib, kind: str) -> BaseException:
    if kind in ("KeyboardInterrupt", "SystemExit"):
        return {"KeyboardInterrupt": KeyboardInterrupt, "SystemExit": SystemExit}[kind]()
    return getattr(lib.http, kind)("connection reset by peer")  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", READ_ERRORS)
def test_read_error_mid_body_is_charged_at_the_estimate(lib: Lib, redis_url: str, name: str, kind: str) -> None:
    exc = _error(lib, kind)
    streams: list[Any] = []

    def handler(request: Any) -> Any:
        streams.append(lib.Chunks([b'{"choices": ['], exc))
        return lib.http.Response(200, headers={"x-ratelimit-remaining-tokens": "100"}, stream=streams[-1])

    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, handler) as c:
        with pytest.raises(type(exc)):
            c.post("/chat/completions", json=BODY)
        assert streams[0].closed
        # released at the estimate, and the provider's word (100 tokens left) was still taken
        assert lim.status().in_flight == 0
        assert 100 - 1 <= _level(lim.status()) <= 100 + 20


@pytest.mark.parametrize("kind", ["ReadTimeout", "ReadError", "RemoteProtocolError"])
async def test_async_read_error_mid_body_is_charged_at_the_estimate(
    lib: Lib, redis_url: str, name: str, kind: str
) -> None:
    exc = _error(lib, kind)

    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks([b'{"choices": ['], exc))

    async with AsyncLimiter(_budget(name), redis_url) as lim:
        async with _async_client(lib, lim, handler) as c:
            with pytest.raises(type(exc)):
                await c.post("/chat/completions", json=BODY)
        _charged(await lim.status())


def test_a_reply_with_a_malformed_usage_settles_at_the_estimate(lib: Lib, redis_url: str, name: str) -> None:
    replies = iter([b'{"usage": {"total_tokens": -5}}', b'{"usage": {"total_tokens": 1e999}}'])

    def handler(request: Any) -> Any:
        return lib.http.Response(200, content=next(replies))

    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, handler) as c:
        assert c.post("/chat/completions", json={**BODY, "max_tokens": 50}).status_code == 200
        assert c.post("/chat/completions", json={**BODY, "max_tokens": 50}).status_code == 200
        est = estimate_request("/v1/chat/completions", {**BODY, "max_tokens": 50}, tokenizer=one)
        assert FULL - 2 * est - 1 <= _level(lim.status()) <= FULL - 2 * est + 20


# --------------------------------------------------------------------------------------------
# Streams: a failed iteration, and a caller who stops iterating, settle at once
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_usage", [True, False])
def test_a_stream_that_fails_mid_iteration_settles_at_once(
    lib: Lib, redis_url: str, name: str, with_usage: bool
) -> None:
    chunks = [b'data: {"choices": []}\n\n'] + ([USAGE_CHUNK] if with_usage else [])

    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.Chunks(chunks, lib.http.ReadError("reset")))

    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, handler) as c:
        with c.stream("POST", "/chat/completions", json=STREAM_BODY) as reply:
            assert lim.status().in_flight == 1
            with pytest.raises(lib.http.ReadError):
                for _ in reply.iter_bytes():
                    pass
            status = lim.status()  # the response is still open: no close, no collection yet
        if with_usage:
            assert FULL - 30 - 1 <= _level(status) <= FULL - 30 + 20, "settled with the usage it carried"
        else:
            _charged(status)


@pytest.mark.parametrize("with_usage", [True, False])
async def test_an_async_stream_that_fails_mid_iteration_settles_at_once(
    lib: Lib, redis_url: str, name: str, with_usage: bool
) -> None:
    chunks = [b'data: {"choices": []}\n\n'] + ([USAGE_CHUNK] if with_usage else [])

    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks(chunks, lib.http.ReadTimeout("slow")))

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        async with c.stream("POST", "/chat/completions", json=STREAM_BODY) as reply:
            assert (await lim.status()).in_flight == 1
            with pytest.raises(lib.http.ReadTimeout):
                async for _ in reply.aiter_bytes():
                    pass
            status = await lim.status()
        if with_usage:
            assert FULL - 30 - 1 <= _level(status) <= FULL - 30 + 20
        else:
            _charged(status)


def test_breaking_out_of_a_stream_settles_at_once(lib: Lib, redis_url: str, name: str) -> None:
    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.Chunks([b"data: {}\n\n"] * 5))

    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, handler) as c:
        with c.stream("POST", "/chat/completions", json=STREAM_BODY) as reply:
            for _ in reply.iter_bytes():
                break  # the caller walks away; the response itself stays open
            status = lim.status()
        _charged(status)


async def test_closing_an_async_stream_iterator_settles_at_once(lib: Lib, redis_url: str, name: str) -> None:
    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks([b"data: {}\n\n"] * 5))

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        async with c.stream("POST", "/chat/completions", json=STREAM_BODY) as reply:
            chunks = reply.aiter_bytes()
            await anext(chunks)
            await chunks.aclose()  # as `async for ...: break` does once the iterator is collected
            for _ in range(200):  # the inner generators close on the loop's next turns
                if (await lim.status()).in_flight == 0:
                    break
                await asyncio.sleep(0.01)
            status = await lim.status()
        _charged(status)


# --------------------------------------------------------------------------------------------
# Cancellation (asyncio.wait_for around an SDK call cancels the task at any await)
# --------------------------------------------------------------------------------------------


async def _cancel_when(reached: asyncio.Event, call: Any) -> None:
    task = asyncio.ensure_future(call)
    await asyncio.wait_for(reached.wait(), timeout=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _until_free(lim: AsyncLimiter) -> Any:
    for _ in range(500):  # bounded: 5 s
        status = await lim.status()
        if status.in_flight == 0:
            return status
        await asyncio.sleep(0.01)
    return await lim.status()


async def test_cancelled_while_queued_for_the_budget_costs_nothing(lib: Lib, redis_url: str, name: str) -> None:
    async with AsyncLimiter(_budget(name, max_concurrency=1), redis_url) as lim:
        async with _async_client(lib, lim, lambda request: lib.http.Response(200, content=USAGE_REPLY)) as c:
            holder = await lim.acquire()
            task = asyncio.ensure_future(c.post("/chat/completions", json=BODY))
            for _ in range(500):
                if (await lim.status()).queued == 1:
                    break
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            status = await lim.status()
            assert (status.queued, status.in_flight) == (0, 1)
            await holder.release()
        _refunded(await lim.status())


async def test_cancelled_while_sending_is_charged(lib: Lib, redis_url: str, name: str) -> None:
    reached = asyncio.Event()

    async def handler(request: Any) -> Any:
        reached.set()
        await asyncio.Event().wait()

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        await _cancel_when(reached, c.post("/chat/completions", json=BODY))
        _charged(await lim.status())


async def test_cancelled_while_reading_the_body_is_charged(lib: Lib, redis_url: str, name: str) -> None:
    reached = asyncio.Event()

    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks([b'{"choices": ['], reached=reached))

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        await _cancel_when(reached, c.post("/chat/completions", json=BODY))
        _charged(await lim.status())


async def test_wait_for_timing_out_mid_body_gives_the_slot_back(lib: Lib, redis_url: str, name: str) -> None:
    reached = asyncio.Event()

    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks([b'{"choices": ['], reached=reached))

    async with AsyncLimiter(_budget(name, max_concurrency=1), redis_url) as lim, _async_client(lib, lim, handler) as c:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c.post("/chat/completions", json=BODY), timeout=1.0)
        assert reached.is_set(), "the timeout came before the read: this test did not test the read"
        _charged(await lim.status())
        await (await lim.acquire(timeout=1)).release()  # the only slot is free again


async def test_cancelled_while_iterating_a_stream_settles_at_once(lib: Lib, redis_url: str, name: str) -> None:
    reached = asyncio.Event()

    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks([USAGE_CHUNK], reached=reached))

    async def consume(reply: Any) -> None:
        async for _ in reply.aiter_bytes():
            pass

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        async with c.stream("POST", "/chat/completions", json=STREAM_BODY) as reply:
            await _cancel_when(reached, consume(reply))
            status = await lim.status()  # the response is still open
        assert FULL - 30 - 1 <= _level(status) <= FULL - 30 + 20, "settled with the usage scanned so far"


async def test_cancelled_while_settling_the_settle_still_lands(
    lib: Lib, redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = asyncio.Event()
    real_run = AsyncLimiter._run
    stalled: list[str] = []

    async def run(self: AsyncLimiter, op: str, argv: list[str]) -> Any:
        if op == "settle" and not stalled:  # the first settle hangs before reaching Redis
            stalled.append(op)
            reached.set()
            await asyncio.Event().wait()
        return await real_run(self, op, argv)

    monkeypatch.setattr(AsyncLimiter, "_run", run)
    async with AsyncLimiter(_budget(name), redis_url) as lim:
        async with _async_client(lib, lim, lambda request: lib.http.Response(200, content=USAGE_REPLY)) as c:
            await _cancel_when(reached, c.post("/chat/completions", json=BODY))
        status = await _until_free(lim)  # the settle went out again, in the background
        assert FULL - 30 - 1 <= _level(status) <= FULL - 30 + 20, "settled with the reply's usage"


async def test_cancelled_during_the_cooldown_after_a_429_owes_nothing(
    lib: Lib, redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    reached = asyncio.Event()

    async def cooldown(self: AsyncLimiter, retry_after: float | None = None) -> Any:
        reached.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(AsyncLimiter, "cooldown", cooldown)

    def handler(request: Any) -> Any:
        return lib.http.Response(429, headers={"retry-after-ms": "100"}, content=b"{}")

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        await _cancel_when(reached, c.post("/chat/completions", json=BODY))
        _refunded(await lim.status())  # the 429 settled at zero before the cooldown


# --------------------------------------------------------------------------------------------
# Garbage collection and process exit
# --------------------------------------------------------------------------------------------


def test_a_dropped_stream_settles_when_collected(lib: Lib, redis_url: str, name: str) -> None:
    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.Chunks([b"data: {}\n\n"] * 3))

    with Limiter(_budget(name), redis_url) as lim, _sync_client(lib, lim, handler) as c:
        reply = c.send(c.build_request("POST", "/chat/completions", json=STREAM_BODY), stream=True)
        assert lim.status().in_flight == 1
        del reply
        gc.collect()
        _charged(lim.status())


async def test_a_dropped_async_stream_settles_when_collected(lib: Lib, redis_url: str, name: str) -> None:
    def handler(request: Any) -> Any:
        return lib.http.Response(200, stream=lib.AsyncChunks([b"data: {}\n\n"] * 3))

    async with AsyncLimiter(_budget(name), redis_url) as lim, _async_client(lib, lim, handler) as c:
        reply = await c.send(c.build_request("POST", "/chat/completions", json=STREAM_BODY), stream=True)
        assert (await lim.status()).in_flight == 1
        del reply
        gc.collect()
        _charged(await _until_free(lim))


EXIT_SCRIPT = """
import sys, {lib}
from xflow_dist import Budget, Limiter
from xflow_dist.{lib} import RateLimitedTransport

class Chunks({lib}.SyncByteStream):
    def __iter__(self):
        yield b"data: {{}}\\n\\n"

lim = Limiter(Budget(sys.argv[2], tpm=600, burst=60, max_concurrency=4), sys.argv[1])
inner = {lib}.MockTransport(lambda request: {lib}.Response(200, stream=Chunks()))
client = {lib}.Client(transport=RateLimitedTransport(lim, inner, tokenizer=lambda t: 1), base_url="{base}")
body = {body!r}
KEEP = client.send(client.build_request("POST", "/chat/completions", json=body), stream=True)
print(lim.status().in_flight, flush=True)
{exit}
"""


@pytest.mark.parametrize("how", ["return", "sys.exit(3)"])
def test_a_stream_still_open_at_process_exit_settles(lib: Lib, redis_url: str, name: str, how: str) -> None:
    script = EXIT_SCRIPT.format(lib=lib.http.__name__, base=BASE, body=STREAM_BODY, exit="" if how == "return" else how)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), redis_url, name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == (0 if how == "return" else 3), done.stderr
    assert done.stdout.split() == ["1"], "the stream held its lease until the exit"
    with Limiter(_budget(name), redis_url) as lim:
        _charged(lim.status())


def test_a_private_memory_budget_goes_with_its_last_limiter() -> None:
    """Every outage's local share and every compat scheduler names a memory:// budget of its own:
    the server goes with the last limiter that held it, so a long-lived process does not pile them up."""
    import gc
    import secrets

    from xflow_dist import _memory

    name = f"private-{secrets.token_hex(8)}"
    with Limiter(Budget("private", rps=10), f"memory://{name}") as limiter:
        limiter.acquire().release()
        assert name in _memory._servers
    del limiter
    gc.collect()
    assert name not in _memory._servers
