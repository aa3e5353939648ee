"""The httpx transports against the simulated provider, over loopback."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist.httpx import AsyncRateLimitedTransport, RateLimitedTransport, estimate_request
from xflow_dist.simulator import SimulatorConfig, SimulatorServer

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
        assert 60_000 - status.tokens_available == pytest.approx(used, abs=40)


async def test_a_429_with_no_retry_left_still_pauses_the_fleet(redis_url: str, name: str) -> None:
    # a provider with 2 requests a minute, a budget that believes in 600: the third call gets a 429
    with SimulatorServer(SimulatorConfig(rpm=2, tpm=60_000, latency_base=0.0, latency_per_token=0.0)) as s:
        async with AsyncLimiter(Budget(name, rpm=600, burst=60), redis_url) as lim:
            transport = AsyncRateLimitedTransport(lim, max_retries=0)
            async with httpx.AsyncClient(transport=transport, base_url=s.url) as client:
                codes = [(await client.post("/v1/chat/completions", json=CHAT)).status_code for _ in range(3)]
                status = await lim.status()
        assert codes == [200, 200, 429]
        assert status.in_flight == 0
        assert status.cooldown_remaining > 0  # the whole fleet waits for the provider now
        assert s.stats()["requests"]["rejected"] == 1


async def test_retry_after_a_429_succeeds_once_the_provider_allows(redis_url: str, name: str) -> None:
    with SimulatorServer(SimulatorConfig(rpm=60, tpm=60_000, latency_base=0.0, latency_per_token=0.0)) as s:
        lim = AsyncLimiter(Budget(name, rpm=6_000, burst=60), redis_url)
        async with lim, httpx.AsyncClient(transport=AsyncRateLimitedTransport(lim), base_url=s.url) as client:
            for _ in range(60):  # the provider's whole minute
                assert (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200
            reply = await client.post("/v1/chat/completions", json=CHAT)  # 429, cooldown ~1 s, retried
            assert reply.status_code == 200
        stats = s.stats()["requests"]
        assert stats["rejected"] >= 1
        assert stats["completed"] == 61


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
        assert 60_000 - status.tokens_available == pytest.approx(usage, abs=40)


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
