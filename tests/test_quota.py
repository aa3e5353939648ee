"""A 429 that means "quota exhausted" (billing) raises ``QuotaExhaustedError``: no fleet pause, no retry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import openai
import pytest
from _helpers import full_tokens

from xflow_dist import AsyncLimiter, Budget, CooldownPolicy, Limiter, QuotaExhaustedError, XflowError
from xflow_dist._quota import quota_in_body, quota_in_exception, quota_message
from xflow_dist.compat import RequestRateScheduler, auto_backoff
from xflow_dist.httpx import AsyncRateLimitedTransport, RateLimitedTransport
from xflow_dist.httpx2 import RateLimitedTransport as RateLimitedTransport2

QUOTA = {
    "error": {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
}
RATE = {"error": {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10}


def test_the_body_tells_quota_from_rate() -> None:
    assert quota_message(QUOTA) == QUOTA["error"]["message"]
    assert quota_message(QUOTA["error"]) == QUOTA["error"]["message"]  # openai's APIError.body
    assert quota_message({"error": {"type": "insufficient_quota"}}) == "insufficient_quota"
    assert quota_message(RATE) is None
    # Anthropic's 429 is a rate limit; a message that merely mentions quota is no verdict
    assert quota_message({"type": "error", "error": {"type": "rate_limit_error", "message": "quota"}}) is None
    assert quota_in_body(b"not json") is None
    assert quota_in_body(b"[1, 2]") is None


def test_exceptions_are_read_by_status_and_body() -> None:
    request = httpx2.Request("POST", "https://api.example/v1/chat/completions")
    response = httpx2.Response(429, json=QUOTA, request=request)
    sdk = openai.RateLimitError("quota", response=response, body=QUOTA["error"])
    assert quota_in_exception(sdk) == QUOTA["error"]["message"]
    plain = httpx.HTTPStatusError(
        "429", request=httpx.Request("POST", "https://x/"), response=httpx.Response(429, json=QUOTA)
    )
    assert quota_in_exception(plain) == QUOTA["error"]["message"]
    limited = openai.RateLimitError("rate", response=httpx2.Response(429, json=RATE, request=request), body=RATE)
    assert quota_in_exception(limited) is None
    other = httpx.HTTPStatusError(
        "400", request=httpx.Request("POST", "https://x/"), response=httpx.Response(400, json=QUOTA)
    )
    assert quota_in_exception(other) is None  # only a 429 is in question
    assert quota_in_exception(ValueError("insufficient_quota")) is None


def test_the_error_carries_the_budget_and_the_providers_words() -> None:
    err = QuotaExhaustedError("spent", budget="b", provider_message="no credit")
    assert isinstance(err, XflowError) and err.budget == "b" and err.provider_message == "no credit"


def _replies(*bodies: dict[str, Any]) -> Iterator[httpx.Response]:
    for body in bodies:
        yield httpx.Response(429, headers={"retry-after": "7"}, json=body)


def test_the_sync_transport_raises_without_pause_or_retry(redis_url: str, name: str) -> None:
    sent: list[int] = []
    replies = _replies(QUOTA, QUOTA, QUOTA)

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(1)
        return next(replies)

    with Limiter(Budget(name, tpm=60_000, burst=60), redis_url) as lim:
        transport = RateLimitedTransport(lim, httpx.MockTransport(handler), max_retries=3)
        client = httpx.Client(transport=transport, base_url="https://api.example/v1")
        with client, pytest.raises(QuotaExhaustedError) as caught:
            client.post("/chat/completions", json=CHAT)
        status = lim.status()
    assert caught.value.budget == name
    assert caught.value.provider_message == QUOTA["error"]["message"]
    assert len(sent) == 1, "not retried"
    assert status.cooldown_remaining == 0, "the fleet is not paused"
    assert status.in_flight == 0
    assert status.tokens_available == pytest.approx(full_tokens(lim.budget), abs=5), "the refused call: charged nothing"


def test_the_httpx2_transport_raises_too(redis_url: str, name: str) -> None:
    inner = httpx2.MockTransport(lambda request: httpx2.Response(429, json=QUOTA))
    with Limiter(Budget(name, rpm=600, burst=60), redis_url) as lim:
        http = httpx2.Client(transport=RateLimitedTransport2(lim, inner), base_url="https://api.example/v1")
        with http, pytest.raises(QuotaExhaustedError):
            http.post("/chat/completions", json=CHAT)
        assert lim.status().cooldown_remaining == 0


async def test_the_async_transport_raises_and_a_rate_429_still_pauses(redis_url: str, name: str) -> None:
    replies = _replies(QUOTA, RATE)
    inner = httpx.MockTransport(lambda request: next(replies))
    async with AsyncLimiter(Budget(name, rpm=600, burst=60), redis_url) as lim:
        transport = AsyncRateLimitedTransport(lim, inner, max_retries=0)
        async with httpx.AsyncClient(transport=transport, base_url="https://api.example/v1") as client:
            with pytest.raises(QuotaExhaustedError):
                await client.post("/chat/completions", json=CHAT)
            assert (await lim.status()).cooldown_remaining == 0
            reply = await client.post("/chat/completions", json=CHAT)  # a rate limit: the fleet waits
            assert reply.status_code == 429
            status = await lim.status()
    assert 6.0 <= status.cooldown_remaining <= 7.0 * 1.1 + 0.1
    assert status.in_flight == 0


def test_the_openai_sdk_sees_the_error_at_once(redis_url: str, name: str) -> None:
    calls: list[int] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        return httpx2.Response(429, json=QUOTA)

    with Limiter(Budget(name, rpm=600, burst=60), redis_url) as lim:
        http = httpx2.Client(transport=RateLimitedTransport2(lim, httpx2.MockTransport(handler)))
        client = openai.OpenAI(base_url="https://api.example/v1", api_key="sk-test", http_client=http)
        with client, pytest.raises(QuotaExhaustedError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert lim.status().cooldown_remaining == 0
    assert len(calls) == 1, "neither the transport nor the SDK (3.x) retried"


async def test_compat_auto_backoff_does_not_retry_a_quota_429(redis_url: str, name: str) -> None:
    attempts = 0
    request = httpx2.Request("POST", "https://api.example/v1/chat/completions")

    @auto_backoff(retry_for=openai.RateLimitError, max_retries=3, base_retry_after=5.0)
    async def call() -> None:
        nonlocal attempts
        attempts += 1
        response = httpx2.Response(429, json=QUOTA, request=request)
        raise openai.RateLimitError("quota", response=response, body=QUOTA["error"])

    async with RequestRateScheduler(max_rps=10, burst_ratio=1, redis=redis_url, name=name) as s:
        with pytest.raises(QuotaExhaustedError) as caught:
            await (await s.start_task(call()))
        status = await s.limiter.status()
    assert attempts == 1
    assert status.cooldown_remaining == 0
    assert isinstance(caught.value.__cause__, openai.RateLimitError)
    assert caught.value.budget == name


# -- Celery --------------------------------------------------------------------------------


@pytest.fixture
def app(redis_url: str) -> Iterator[Any]:
    celery = pytest.importorskip("celery")
    from xflow_dist.celery import _close_all

    application = celery.Celery("test-quota", set_as_current=False)
    application.conf.update(task_always_eager=True, xflow_redis_url=redis_url)
    yield application
    _close_all()
    application.close()


def _openai_quota() -> BaseException:
    request = httpx2.Request("POST", "https://api.example/v1/chat/completions")
    return openai.RateLimitError(
        "quota", response=httpx2.Response(429, json=QUOTA, request=request), body=QUOTA["error"]
    )


def _httpx_quota() -> BaseException:
    request = httpx.Request("POST", "https://api.example/v1/chat/completions")
    return httpx.HTTPStatusError("429", request=request, response=httpx.Response(429, json=QUOTA, request=request))


@pytest.mark.parametrize("make", [_openai_quota, _httpx_quota])
def test_a_celery_task_fails_at_once_without_pausing_the_fleet(app: Any, name: str, make: Any) -> None:
    from xflow_dist.celery import TaskPolicy, rate_limited_task

    attempts: list[int] = []
    policy = TaskPolicy(cooldown=CooldownPolicy(base=0.2, max_backoff=1.0, jitter=0.0))

    @rate_limited_task(
        app, shared=False, budget=Budget(name, tps=100, burst=10), cost=300, policy=policy, max_retries=3
    )
    def work(self: Any) -> None:
        attempts.append(self.request.retries)
        raise make()

    result = work.apply()
    assert result.failed() and isinstance(result.result, QuotaExhaustedError)
    assert attempts == [0], "not retried"
    status = work.limiter.status()
    assert status.cooldown_remaining == 0, "the fleet is not paused"
    assert status.in_flight == 0
    assert status.tokens_available == pytest.approx(1_000, abs=5), "settled at zero tokens"


def test_a_celery_tasks_transport_raises_the_same(app: Any, name: str) -> None:
    from xflow_dist.celery import rate_limited_task

    inner = httpx.MockTransport(lambda request: httpx.Response(429, json=QUOTA))

    @rate_limited_task(app, shared=False, budget=Budget(name, tps=100, burst=10), cost=300, max_retries=3)
    def work(self: Any) -> None:
        with httpx.Client(base_url="https://api.example/v1", transport=self.transport(inner)) as http:
            http.post("/chat/completions", json=CHAT).raise_for_status()

    result = work.apply()
    assert result.failed() and isinstance(result.result, QuotaExhaustedError)
    assert result.result.budget == name
    status = work.limiter.status()
    assert status.cooldown_remaining == 0 and status.in_flight == 0
    assert status.tokens_available == pytest.approx(1_000, abs=5)
