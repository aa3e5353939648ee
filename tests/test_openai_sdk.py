"""The real ``openai`` SDK (3.x, on httpx2) through the transports, against the simulated provider."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
from _helpers import full_tokens
from openai.types.chat import ChatCompletionMessageParam

from xflow_dist import AsyncLimiter, Budget, Limiter
from xflow_dist.httpx2 import AsyncRateLimitedTransport, RateLimitedTransport, Router
from xflow_dist.tools.simulator import SimulatorConfig, SimulatorServer

README = Path(__file__).resolve().parent.parent / "README.md"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hi"}]


@pytest.fixture
def sim() -> Iterator[SimulatorServer]:
    with SimulatorServer(SimulatorConfig(rpm=600, tpm=60_000, latency_base=0.01, latency_per_token=0.0)) as s:
        yield s


def _readme_block(heading: str) -> str:
    section = README.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```python\n(.*?)```", section, re.S)
    assert found, f"no python block under {heading!r}"
    return found.group(1)


def test_the_readme_example_runs_against_the_simulator(
    redis_url: str, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = _readme_block("With the OpenAI SDK")
    code = code.replace("redis://localhost:6379/0", redis_url).replace('"openai:team-a"', repr(name))
    out = io.StringIO()
    # the provider's limits are the README budget's: its remaining-headers agree with the budget
    with SimulatorServer(SimulatorConfig(rpm=500, tpm=200_000, latency_base=0.01, latency_per_token=0.0)) as sim:
        monkeypatch.setenv("OPENAI_BASE_URL", f"{sim.url}/v1")
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {})
        completed = sim.stats()["requests"]["completed"]
    used = int(out.getvalue().split()[-1])
    assert used > 0
    assert completed == 1
    with Limiter(Budget(name, rpm=500, tpm=200_000, max_concurrency=16, burst=60), redis_url) as lim:
        status = lim.status()
    assert status.in_flight == 0
    assert full_tokens(lim.budget) - status.tokens_available == pytest.approx(used, abs=40)  # settled to the usage


async def test_async_sdk_stream_holds_its_lease_and_settles_with_the_usage_chunk(
    sim: SimulatorServer, redis_url: str, name: str
) -> None:
    async with AsyncLimiter(Budget(name, tpm=60_000, burst=60, max_concurrency=4), redis_url) as lim:
        http = httpx2.AsyncClient(transport=AsyncRateLimitedTransport(lim))
        async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", http_client=http) as client:
            stream = await client.chat.completions.create(
                model="m", messages=HI, max_tokens=40, stream=True, stream_options={"include_usage": True}
            )
            assert (await lim.status()).in_flight == 1
            chunks = [chunk async for chunk in stream]
        status = await lim.status()
    assert chunks[-1].usage is not None
    assert status.in_flight == 0
    assert full_tokens(lim.budget) - status.tokens_available == pytest.approx(chunks[-1].usage.total_tokens, abs=40)


def test_a_router_gives_each_model_its_own_budget(sim: SimulatorServer, redis_url: str, name: str) -> None:
    # six requests a minute each: what a call spends stands out against a refill of 0.1 a second
    with (
        Limiter(Budget(f"{name}-big", rpm=6, burst=60), redis_url) as big,
        Limiter(Budget(f"{name}-mini", rpm=6, burst=60), redis_url) as mini,
    ):
        router = Router(models={"gpt-4o": big, "gpt-4o-mini*": mini})
        http = httpx2.Client(transport=RateLimitedTransport(router))
        with openai.OpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", http_client=http) as client:
            for model in ("gpt-4o", "gpt-4o-mini", "gpt-4o-mini-2024-07-18"):
                client.chat.completions.create(model=model, messages=HI, max_tokens=10)
        spent_big = 6 - big.status().requests_available
        spent_mini = 6 - mini.status().requests_available
    assert spent_big == pytest.approx(1, abs=0.3)
    assert spent_mini == pytest.approx(2, abs=0.3)
    assert sim.stats()["requests"]["completed"] == 3


def test_a_429_the_transport_cannot_retry_reaches_the_sdk_and_pauses_the_fleet(redis_url: str, name: str) -> None:
    # 2 requests a minute, the second spent by a client outside the fleet: the budget cannot know it,
    # lets the next call go, and the provider answers 429 (waiting on the budget alone would take 20-60 s)
    config = SimulatorConfig(rpm=2, tpm=60_000, latency_base=0.0, latency_per_token=0.0)
    with SimulatorServer(config) as s, Limiter(Budget(name, rpm=600, burst=60), redis_url) as lim:
        http = httpx2.Client(transport=RateLimitedTransport(lim, max_retries=0))
        with openai.OpenAI(base_url=f"{s.url}/v1", api_key="sk-test", http_client=http, max_retries=0) as client:
            client.chat.completions.create(model="m", messages=HI, max_tokens=10)
            chat = {"model": "m", "messages": HI, "max_tokens": 10}
            assert httpx2.post(f"{s.url}/v1/chat/completions", json=chat).status_code == 200  # outside the fleet
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="m", messages=HI, max_tokens=10)
        status = lim.status()
    assert status.cooldown_remaining > 0
    assert status.in_flight == 0
