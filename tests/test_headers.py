"""Reading providers' rate-limit headers (facts: ../shared/PROVIDERS.md)."""

from __future__ import annotations

import datetime
import email.utils

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xflow_dist._durations import format_duration
from xflow_dist._headers import LimitFacts, parse_limit_headers, parse_retry_after
from xflow_dist.tools.simulator import SimulatorConfig, SimulatorServer

NOW = datetime.datetime(2026, 11, 24, 12, 0, 0, tzinfo=datetime.UTC)


def test_openai_headers() -> None:
    facts = parse_limit_headers(
        {
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-limit-tokens": "2000000",
            "x-ratelimit-remaining-requests": "9999",
            "x-ratelimit-remaining-tokens": "1998800",
            "x-ratelimit-reset-requests": "6ms",
            "x-ratelimit-reset-tokens": "1m30.5s",
        }
    )
    assert facts == LimitFacts(
        request_limit=10_000,
        token_limit=2_000_000,
        requests_remaining=9_999,
        tokens_remaining=1_998_800,
        requests_reset=pytest.approx(0.006),
        tokens_reset=pytest.approx(90.5),
    )


def test_header_names_are_case_insensitive() -> None:
    facts = parse_limit_headers({"X-RateLimit-Remaining-Tokens": "42", "Retry-After-Ms": "1500"})
    assert facts.tokens_remaining == 42
    assert facts.retry_after == pytest.approx(1.5)


def test_anthropic_headers_with_rfc3339_resets() -> None:
    facts = parse_limit_headers(
        {
            "anthropic-ratelimit-requests-limit": "50",
            "anthropic-ratelimit-requests-remaining": "49",
            "anthropic-ratelimit-requests-reset": "2026-11-24T12:00:01Z",
            "anthropic-ratelimit-tokens-limit": "40000",
            "anthropic-ratelimit-tokens-remaining": "39000",
            "anthropic-ratelimit-tokens-reset": "2026-11-24T12:00:30.500000+00:00",
            "anthropic-ratelimit-input-tokens-limit": "30000",
            "anthropic-ratelimit-output-tokens-remaining": "7000",
            "retry-after": "3",
        },
        now=NOW,
    )
    assert facts.request_limit == 50
    assert facts.requests_reset == pytest.approx(1.0)
    assert facts.tokens_reset == pytest.approx(30.5)
    assert facts.input_token_limit == 30_000
    assert facts.output_tokens_remaining == 7_000
    assert facts.retry_after == 3.0


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"x-ratelimit-remaining-tokens": "lots"},
        {"x-ratelimit-remaining-tokens": "-5"},
        {"x-ratelimit-remaining-tokens": "nan"},
        {"x-ratelimit-reset-tokens": "soon"},
        {"retry-after": "whenever"},
        {"anthropic-ratelimit-tokens-reset": "yesterday-ish"},
    ],
)
def test_missing_or_malformed_headers_read_as_nothing(headers: dict[str, str]) -> None:
    assert parse_limit_headers(headers, now=NOW).empty


def test_retry_after_prefers_milliseconds_then_seconds_then_a_date() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "1"}) == pytest.approx(0.25)
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    later = email.utils.format_datetime(NOW + datetime.timedelta(seconds=7), usegmt=True)
    assert parse_retry_after({"retry-after": later}, now=NOW) == pytest.approx(7.0)
    earlier = email.utils.format_datetime(NOW - datetime.timedelta(seconds=7), usegmt=True)
    assert parse_retry_after({"retry-after": earlier}, now=NOW) == 0.0
    assert parse_retry_after({}) is None


@given(st.integers(min_value=0, max_value=10**9))
def test_reset_durations_round_trip_to_the_millisecond(ms: int) -> None:
    facts = parse_limit_headers({"x-ratelimit-reset-tokens": format_duration(ms / 1000)})
    assert facts.tokens_reset == pytest.approx(ms / 1000, abs=1e-9)


@pytest.mark.parametrize("style", ["openai", "anthropic"])
def test_the_simulators_headers_read_back_as_its_limits(style: str) -> None:
    # 600 tokens a minute: the call's ~20 tokens take ~2 s to refill, so the reset stays positive
    # even read back a while after the reply (Anthropic's resets are whole seconds, rounded up)
    config = SimulatorConfig(rpm=600, tpm=600, headers=style)  # type: ignore[arg-type]
    with SimulatorServer(config) as sim:
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
        reply = httpx.post(f"{sim.url}/v1/chat/completions", json=body, timeout=10)
    facts = parse_limit_headers(reply.headers)
    assert facts.request_limit == 600
    assert facts.token_limit == 600
    assert facts.requests_remaining is not None and facts.requests_remaining < 600
    assert facts.tokens_remaining is not None and facts.tokens_remaining < 600
    assert facts.tokens_reset is not None and 0 < facts.tokens_reset <= 60
