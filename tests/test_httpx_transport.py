"""The httpx transports against the simulated provider, over loopback."""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Iterator

import httpx
import pytest
import tiktoken
from _helpers import full_tokens

from xflow_dist import AsyncLimiter, Budget, ConfigurationError, Limiter, _tokens
from xflow_dist._transport import _usage
from xflow_dist.httpx import (
    AsyncRateLimitedTransport,
    Call,
    NoRouteError,
    RateLimitedTransport,
    Router,
    estimate_request,
)
from xflow_dist.tools.simulator import SimulatorConfig, SimulatorServer

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 50}


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(rpm=600, tpm=60_000, latency_base=0.01, latency_per_token=0.0)) as s:
        yield s


def test_estimate_is_prompt_plus_output_bound_times_n() -> None:
    body = {**CHAT, "n": 2}
    assert estimate_request("/v1/chat/completions", body) == estimate_request("/v1/chat/completions", CHAT) + 50
    assert estimate_request("/v1/embeddings", {"input": ["abcd", "efgh"]}) == 2
    assert estimate_request("/v1/completions", {"prompt": "abcd"}, default_max_tokens=7) == 1 + 7


async def test_async_chat_settles_with_the_replys_usage(sim: SimulatorServer, redis_url: str, name: str) -> None:
    async with AsyncLimiter(Budget(name, tpm=60_000, burst=60), redis_url) as lim:
        transport = AsyncRateLimitedTransport(lim)
        async with httpx.AsyncClient(transport=transport, base_url=sim.url) as client:
            reply = await client.post("/v1/chat/completions", json=CHAT)
            assert reply.status_code == 200
            used = reply.json()["usage"]["total_tokens"]
            status = await lim.status()
        # charged the estimate, settled to the usage: the bucket lacks exactly what was used
        assert status.in_flight == 0
        assert full_tokens(lim.budget) - status.tokens_available == pytest.approx(used, abs=40)


async def test_a_429_with_no_retry_left_still_pauses_the_fleet(redis_url: str, name: str) -> None:
    # a provider with 2 requests a minute, the second spent by a client outside the fleet: the budget
    # cannot know it, lets the next call go, and the provider answers 429
    with SimulatorServer(SimulatorConfig(rpm=2, tpm=60_000, latency_base=0.0, latency_per_token=0.0)) as s:
        async with AsyncLimiter(Budget(name, rpm=600, burst=60), redis_url) as lim:
            transport = AsyncRateLimitedTransport(lim, max_retries=0)
            async with httpx.AsyncClient(transport=transport, base_url=s.url) as client, httpx.AsyncClient() as outside:
                codes = [(await client.post("/v1/chat/completions", json=CHAT)).status_code]
                codes.append((await outside.post(f"{s.url}/v1/chat/completions", json=CHAT)).status_code)
                codes.append((await client.post("/v1/chat/completions", json=CHAT)).status_code)
                status = await lim.status()
        assert codes == [200, 200, 429]
        assert status.in_flight == 0
        assert status.cooldown_remaining > 0  # the whole fleet waits for the provider now
        assert s.stats()["requests"]["rejected"] == 1


async def test_retry_after_a_429_succeeds_once_the_provider_allows(redis_url: str, name: str) -> None:
    # 20 a minute: the provider's bucket gains one call every 3 s, so the 20 calls that empty it never
    # race its refill, however slow the machine (at 60 a minute, 60 calls had a second)
    with SimulatorServer(SimulatorConfig(rpm=20, tpm=60_000, latency_base=0.0, latency_per_token=0.0)) as s:
        lim = AsyncLimiter(Budget(name, rpm=6_000, burst=60), redis_url)
        async with lim, httpx.AsyncClient(transport=AsyncRateLimitedTransport(lim), base_url=s.url) as client:
            for _ in range(20):  # the provider's whole minute
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            reply = await client.post("/v1/chat/completions", json=CHAT)  # 429, cooldown up to 3 s, retried
            assert reply.status_code == 200
        stats = s.stats()["requests"]
        assert stats["rejected"] >= 1
        assert stats["completed"] == 21


async def test_a_stream_holds_its_lease_until_closed_and_settles_with_its_usage(
    sim: SimulatorServer, redis_url: str, name: str
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    async with AsyncLimiter(Budget(name, tpm=60_000, burst=60, max_concurrency=2), redis_url) as lim:
        async with httpx.AsyncClient(transport=AsyncRateLimitedTransport(lim), base_url=sim.url) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                assert (await lim.status()).in_flight == 1
                lines = [line async for line in reply.aiter_lines() if line.startswith("data: {")]
            usage = json.loads(lines[-1][6:])["usage"]["total_tokens"]
            status = await lim.status()
        assert status.in_flight == 0
        assert full_tokens(lim.budget) - status.tokens_available == pytest.approx(usage, abs=40)


async def test_an_abandoned_stream_gives_its_slot_back(sim: SimulatorServer, redis_url: str, name: str) -> None:
    body = {**CHAT, "max_tokens": 200, "stream": True}
    async with AsyncLimiter(Budget(name, tpm=60_000, burst=60, max_concurrency=1), redis_url) as lim:
        async with httpx.AsyncClient(transport=AsyncRateLimitedTransport(lim), base_url=sim.url) as client:
            async with client.stream("POST", "/v1/chat/completions", json=body) as reply:
                async for _ in reply.aiter_bytes():
                    break  # the caller walks away after the first chunk
            status = await lim.status()
        assert status.in_flight == 0


async def test_other_requests_pass_through_untouched(sim: SimulatorServer, redis_url: str, name: str) -> None:
    lim = AsyncLimiter(Budget(name, rpm=1), redis_url)
    async with lim, httpx.AsyncClient(transport=AsyncRateLimitedTransport(lim), base_url=sim.url) as client:
        for _ in range(3):  # a budget of one request a minute would block these if they counted
            assert (await client.get("/stats")).status_code == 200
        assert (await lim.status()).requests_available == pytest.approx(0.0, abs=0.1)


def test_sync_transport(sim: SimulatorServer, redis_url: str, name: str) -> None:
    with Limiter(Budget(name, tpm=60_000, burst=60), redis_url) as lim:
        with httpx.Client(transport=RateLimitedTransport(lim), base_url=sim.url) as client:
            reply = client.post("/v1/embeddings", json={"model": "e", "input": "some text to embed"})
            assert reply.status_code == 200
            with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as streamed:
                assert lim.status().in_flight == 1
                assert sum(1 for _ in streamed.iter_lines()) > 1
        assert lim.status().in_flight == 0


def test_responses_api_input_items_and_nested_usage_are_understood() -> None:
    items = {"model": "m", "input": [{"role": "user", "content": [{"type": "input_text", "text": "abcdabcd"}]}]}
    assert estimate_request("/v1/responses", {**items, "max_output_tokens": 5}) == 2 + 5
    assert _usage(b'{"type": "response.completed", "response": {"usage": {"total_tokens": 42}}}') == 42
    assert _usage(b'{"usage": {"total_tokens": true}}') is None


@pytest.fixture
def byte_tokenizer(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A real tiktoken encoding in which every byte is a token: offline, and easy to count."""
    encoding = tiktoken.Encoding(
        "bytes", pat_str=r"[\s\S]", mergeable_ranks={bytes([i]): i for i in range(256)}, special_tokens={}
    )
    monkeypatch.setattr(tiktoken, "encoding_for_model", lambda model: encoding)
    monkeypatch.setattr(_tokens, "_tiktoken_failed", False)
    _tokens.tiktoken_counter.cache_clear()
    yield
    _tokens.tiktoken_counter.cache_clear()


@pytest.mark.usefixtures("byte_tokenizer")
def test_tiktoken_counts_the_prompt_when_it_has_the_models_encoding() -> None:
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "twelve bytes"}], "max_tokens": 10}
    assert estimate_request("/v1/chat/completions", body) == 3 + 4 + 12 + 10  # priming, framing, text, bound
    assert estimate_request("/v1/embeddings", {"model": "e", "input": ["abc", "de"]}) == 5


def test_without_tiktokens_encoding_the_heuristic_stands_in(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(model: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "encoding_for_model", offline)
    monkeypatch.setattr(_tokens, "_tiktoken_failed", False)
    _tokens.tiktoken_counter.cache_clear()
    try:
        assert estimate_request("/v1/embeddings", {"model": "e", "input": "twelve bytes"}) == 3
        assert _tokens._tiktoken_failed  # and it is not asked again
    finally:
        _tokens.tiktoken_counter.cache_clear()


def test_a_tokenizer_given_to_the_transport_is_used(redis_url: str, name: str) -> None:
    seen: list[str] = []

    def count(text: str) -> int:
        seen.append(text)
        return 100

    body = {"model": "m", "input": "hello"}
    assert estimate_request("/v1/embeddings", body, tokenizer=count) == 100
    assert seen == ["hello"]


def test_the_router_tries_choose_then_models_then_hosts_then_default() -> None:
    def choose(call: Call) -> str | None:
        return "chosen" if call.body.get("user") == "vip" else None

    router = Router({"gpt-4o": "exact", "gpt-4o*": "pattern"}, {"api.example.com": "host"}, choose=choose)
    call = Call("gpt-4o", "other.host", "/v1/chat/completions", {})
    assert router.route(call) == "exact"
    assert router.route(Call("gpt-4o-mini", "other.host", "/v1/chat/completions", {})) == "pattern"
    assert router.route(Call("o3", "API.example.com", "/v1/chat/completions", {})) == "host"
    assert router.route(Call("gpt-4o", "x", "/v1/chat/completions", {"user": "vip"})) == "chosen"
    with pytest.raises(NoRouteError, match="o3"):
        router.route(Call("o3", "other.host", "/v1/chat/completions", {}))
    assert Router({"a": "x"}, default="d").route(Call(None, "h", "/", {})) == "d"
    with pytest.raises(ConfigurationError):
        Router()


def test_an_unrouted_call_is_refused_before_it_spends_or_goes_out(
    sim: SimulatorServer, redis_url: str, name: str
) -> None:
    with Limiter(Budget(name, rpm=60, burst=60), redis_url) as lim:
        transport = RateLimitedTransport(Router({"only-this": lim}))
        with httpx.Client(transport=transport, base_url=sim.url) as client, pytest.raises(NoRouteError):
            client.post("/v1/chat/completions", json=CHAT)
        assert lim.status().requests_available == pytest.approx(lim.budget.credit, abs=0.1)  # 1/s: full
    assert sim.stats()["requests"]["completed"] == 0


def _wait_until(check: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.02)
    return False


def test_a_stream_the_caller_drops_unclosed_settles_when_collected(
    sim: SimulatorServer, redis_url: str, name: str
) -> None:
    body = {**CHAT, "max_tokens": 200, "stream": True}
    lim = Limiter(Budget(name, tpm=60_000, burst=60, max_concurrency=1), redis_url)
    with lim, httpx.Client(transport=RateLimitedTransport(lim), base_url=sim.url) as client:
        reply = client.send(client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        chunks = reply.iter_bytes()
        next(chunks)
        assert lim.status().in_flight == 1
        del reply, chunks  # never closed: the caller just forgets it
        gc.collect()
        assert _wait_until(lambda: lim.status().in_flight == 0)
        assert lim.acquire(tokens=1, timeout=5).release() is not None  # and the slot is usable again


async def test_an_async_stream_dropped_unclosed_settles_on_its_loop(
    sim: SimulatorServer, redis_url: str, name: str
) -> None:
    body = {**CHAT, "max_tokens": 200, "stream": True}
    lim = AsyncLimiter(Budget(name, tpm=60_000, burst=60, max_concurrency=1), redis_url)
    async with lim, httpx.AsyncClient(transport=AsyncRateLimitedTransport(lim), base_url=sim.url) as client:
        reply = await client.send(client.build_request("POST", "/v1/chat/completions", json=body), stream=True)
        assert (await lim.status()).in_flight == 1
        del reply
        gc.collect()
        for _ in range(500):  # bounded: up to 10 s
            if (await lim.status()).in_flight == 0:
                break
            await asyncio.sleep(0.02)
        assert (await lim.status()).in_flight == 0
