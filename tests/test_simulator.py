"""The simulated provider: Go durations, the token heuristic, the strict ledger, and the HTTP surface."""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from xflow_dist import ConfigurationError
from xflow_dist._durations import format_duration, parse_duration
from xflow_dist._tokens import estimate_messages_tokens, estimate_text_tokens
from xflow_dist.tools.simulator import ProviderLedger, SimulatorConfig, SimulatorServer, main
from xflow_dist.tools.simulator._limits import _WindowCheck

ROOT = Path(__file__).resolve().parent.parent
WALL = 1_700_000_000.0  # 2023-11-14T22:13:20Z


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def chat(content: str = "abcdefgh", **extra: Any) -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def serve() -> Iterator[Callable[..., SimulatorServer]]:
    started: list[SimulatorServer] = []

    def start(clock: Callable[[], float] | None = None, **config: Any) -> SimulatorServer:
        server = SimulatorServer(
            SimulatorConfig(**{"latency_base": 0.0, "latency_per_token": 0.0, **config}),
            clock=clock or time.monotonic,
            wall_clock=lambda: WALL,
        )
        started.append(server.start())
        return server

    yield start
    for server in started:
        server.stop()


# ------------------------------------------------------------------------------------------------------------------
# Durations


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.0015, "1.5ms"),
        (1e-9, "1ns"),
        (1.5e-6, "1.5\u00b5s"),
        (1, "1s"),
        (1.09, "1.09s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
        (-2.5, "-2.5s"),
    ],
)
def test_format_duration_matches_go(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("0", 0.0),
        ("250ms", 0.25),
        ("1h2m", 3720.0),
        (".5s", 0.5),
        ("5.s", 5.0),
        ("1us", 1e-6),
        ("1\u03bcs", 1e-6),
        ("100ns", 1e-7),
        ("1h2m3s4ms5us6ns", 3723.004005006),
        ("+3s", 3.0),
        ("-1m", -60.0),
    ],
)
def test_parse_duration_accepts_what_go_accepts(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds, abs=1e-12)


@pytest.mark.parametrize("text", ["", "1", "s", ".s", "1x", "1 s", " 1s", "1s ", "--1s", "1.2.3s", "1d", "one s"])
def test_parse_duration_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_format_duration_rejects_non_finite(bad: float) -> None:
    with pytest.raises(ValueError, match="finite"):
        format_duration(bad)


@given(st.floats(min_value=-1e7, max_value=1e7, allow_nan=False, allow_infinity=False))
def test_duration_round_trip_is_exact_to_the_millisecond(seconds: float) -> None:
    assert abs(parse_duration(format_duration(seconds)) - seconds) < 1e-3


@given(st.integers(min_value=0, max_value=10**12))
def test_whole_milliseconds_round_trip_exactly(ms: int) -> None:
    assert round(parse_duration(format_duration(ms / 1000)) * 1000) == ms


# ------------------------------------------------------------------------------------------------------------------
# Token heuristic


@pytest.mark.parametrize(("text", "tokens"), [("", 1), ("abc", 1), ("abcd", 1), ("abcde", 2), ("\u00e9" * 4, 2)])
def test_estimate_text_tokens_is_a_quarter_of_the_utf8_bytes(text: str, tokens: int) -> None:
    assert estimate_text_tokens(text) == tokens


def test_estimate_messages_tokens_adds_openai_framing() -> None:
    assert estimate_messages_tokens([{"role": "user", "content": "abcdefgh"}]) == 3 + 4 + 2
    parts = [
        {"type": "text", "text": "abcd"},
        {"type": "image_url", "image_url": {"url": "https://example.invalid/cat.png"}},
        {"type": "text", "text": "efgh"},
    ]
    two: list[dict[str, Any]] = [{"role": "system", "content": "x"}, {"role": "user", "content": parts}]
    assert estimate_messages_tokens(two) == 3 + (4 + 1) + (4 + 2)
    assert estimate_messages_tokens([{"role": "assistant", "content": None, "tool_calls": []}]) == 3 + 4
    with pytest.raises(ValueError, match="content"):
        estimate_messages_tokens([{"role": "user", "content": 42}])


# ------------------------------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpm": 0},
        {"tpm": -1},
        {"rpm": math.inf},
        {"max_concurrency": 0},
        {"max_concurrency": 1.5},
        {"latency_base": -0.1},
        {"completion_ratio": (0.8, 0.2)},
        {"completion_ratio": (0.1, 1.5)},
        {"default_max_tokens": 0},
        {"headers": "azure"},
        {"seed": "x"},
    ],
)
def test_config_is_validated_on_construction(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        SimulatorConfig(**kwargs)


def test_only_loopback_hosts_by_default() -> None:
    with pytest.raises(ConfigurationError, match="loopback"):
        SimulatorServer(host="192.0.2.1")
    assert main(["--host", "192.0.2.1"]) == 2


def test_the_command_line_reports_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["--port", str(busy.getsockname()[1])]) == 1


# ------------------------------------------------------------------------------------------------------------------
# The ledger, driven by a fake clock


def test_admission_charges_both_buckets_and_completion_refunds_the_unused_part() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=60, tpm=600, clock=clock)
    first = ledger.try_admit(10, 100)
    assert first.admitted and first.ticket is not None and first.cost == 110
    assert (first.levels.requests, first.levels.tokens) == (59, 490)
    assert first.levels.requests_reset == pytest.approx(1.0)
    assert first.levels.tokens_reset == pytest.approx(11.0)
    assert ledger.complete(first.ticket, 30) == 70
    assert ledger.levels().tokens == 560
    stats = ledger.stats()
    assert stats["tokens"] == {"charged": 110, "refunded": 70, "settled": 40, "prompt": 10, "completion": 30}
    assert stats["requests"]["admitted"] == stats["requests"]["completed"] == 1


def test_a_refund_never_lifts_the_bucket_above_capacity() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=60, tpm=600, clock=clock)
    grant = ledger.try_admit(0, 100)
    assert grant.ticket is not None
    clock.advance(60)
    ledger.complete(grant.ticket, 0)
    assert ledger.levels().tokens == 600


def test_rejections_charge_nothing_and_give_the_exact_request_wait() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=60, tpm=10_000, clock=clock)
    for _ in range(60):
        assert ledger.try_admit(1).admitted
    refused = ledger.try_admit(1)
    assert not refused.admitted and refused.reason == "requests"
    assert refused.retry_after == pytest.approx(1.0)
    assert ledger.levels().tokens == 10_000 - 60
    clock.advance(0.25)
    assert ledger.try_admit(1).retry_after == pytest.approx(0.75)
    clock.advance(0.75)
    assert ledger.try_admit(1).admitted
    assert ledger.stats()["requests"]["rejected"] == 2


def test_token_wait_is_exact_and_waiting_it_is_enough() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=1000, tpm=6000, clock=clock)
    assert ledger.try_admit(5000).admitted
    refused = ledger.try_admit(500, 1000)
    assert refused.reason == "tokens"
    assert refused.retry_after == pytest.approx(5.0)
    assert refused.levels.tokens == 1000
    clock.advance(refused.retry_after or 0)
    assert ledger.try_admit(500, 1000).admitted


def test_a_cost_above_the_token_capacity_is_always_rejected() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=60, tpm=600, clock=clock)
    refused = ledger.try_admit(500, 101)
    assert refused.reason == "too_large" and refused.retry_after is None
    clock.advance(3600)
    assert ledger.try_admit(500, 101).reason == "too_large"
    assert ledger.try_admit(500, 100).admitted
    assert ledger.stats()["requests"]["rejected_by"]["too_large"] == 2


def test_concurrency_wait_is_until_the_earliest_in_flight_request_ends() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=600, tpm=6000, max_concurrency=2, clock=clock)
    slow = ledger.try_admit(1, hold=5.0)
    fast = ledger.try_admit(1, hold=3.0)
    refused = ledger.try_admit(1, hold=1.0)
    assert refused.reason == "concurrency" and refused.retry_after == pytest.approx(3.0)
    clock.advance(1)
    assert ledger.try_admit(1).retry_after == pytest.approx(2.0)
    assert slow.ticket is not None and fast.ticket is not None
    ledger.complete(slow.ticket, 0)
    assert ledger.try_admit(1).admitted
    assert ledger.stats()["peak_in_flight"] == 2


def test_the_longest_wait_names_the_reason() -> None:
    ledger = ProviderLedger(rpm=1, tpm=60, clock=FakeClock())
    assert ledger.try_admit(60).admitted
    refused = ledger.try_admit(30)
    assert refused.reason == "requests" and refused.retry_after == pytest.approx(60.0)


def test_series_and_times_are_seconds_since_the_start() -> None:
    clock = FakeClock()
    ledger = ProviderLedger(rpm=60, tpm=6000, clock=clock)
    clock.advance(0.5)
    a = ledger.try_admit(10, 10)
    clock.advance(1.0)
    b = ledger.try_admit(10, 10)
    clock.advance(0.7)
    assert a.ticket is not None and b.ticket is not None
    ledger.complete(a.ticket, 5)
    ledger.complete(b.ticket, 10)
    ledger.try_admit(6000, 1)
    stats = ledger.stats()
    assert stats["series"] == {"requests": [1, 1], "tokens": [0, 0, 35], "rejected": [0, 0, 1]}
    assert stats["first_admission"] == pytest.approx(0.5)
    assert stats["last_completion"] == pytest.approx(2.2)
    assert stats["violations"] == 0


def test_random_workload_never_breaks_any_window_bound() -> None:
    rng = random.Random(7)
    clock = FakeClock()
    ledger = ProviderLedger(rpm=120, tpm=5000, max_concurrency=8, clock=clock)
    events: list[tuple[float, int, float]] = []  # (time, requests delta, tokens delta)
    open_tickets: list[tuple[int, int]] = []
    for _ in range(3000):
        clock.advance(rng.choice([0.0, 0.0, 0.01, 0.1, 0.5, 2.0]))
        if open_tickets and rng.random() < 0.4:
            ticket, reserved = open_tickets.pop(rng.randrange(len(open_tickets)))
            refund = ledger.complete(ticket, rng.randint(0, reserved))
            events.append((clock.now, 0, -refund))
            continue
        prompt, reserved = rng.randint(1, 400), rng.randint(0, 800)
        grant = ledger.try_admit(prompt, reserved, hold=rng.random())
        if grant.admitted:
            assert grant.ticket is not None
            open_tickets.append((grant.ticket, reserved))
            events.append((clock.now, 1, prompt + reserved))
    stats = ledger.stats()
    assert stats["violations"] == 0
    assert stats["requests"]["admitted"] > 100 and stats["requests"]["rejected"] > 100
    # Brute force over every window that starts at an event: net charge <= capacity + rate * length.
    for i, (start, _, _) in enumerate(events[:400]):
        net_r = net_t = 0.0
        for t, dr, dt in events[i:]:
            net_r, net_t = net_r + dr, net_t + dt
            assert net_r <= 120 + 2 * (t - start) + 1e-6
            assert net_t <= 5000 + 5000 / 60 * (t - start) + 1e-6
    assert stats["peak_window"]["requests"] <= 240 and stats["peak_window"]["tokens"] <= 10_000


def test_the_window_check_is_not_vacuous() -> None:
    check = _WindowCheck(100, 0.0)
    assert check.record(0.0, 100)
    assert check.record(30.0, 50)
    assert not check.record(30.0, 1)  # 151 in (0, 30]: more than 100 + 100/60 * 30
    assert check.record(90.0, 1)


# ------------------------------------------------------------------------------------------------------------------
# HTTP: headers, bodies, usage


def test_success_headers_openai(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), rpm=60, tpm=6000)
    with httpx.Client(base_url=server.url) as client:
        reply = client.post("/v1/chat/completions", json=chat(max_tokens=100))
    assert reply.status_code == 200
    h = reply.headers
    assert h["x-ratelimit-limit-requests"] == "60" and h["x-ratelimit-limit-tokens"] == "6000"
    assert h["x-ratelimit-remaining-requests"] == "59"
    assert h["x-ratelimit-remaining-tokens"] == str(6000 - 9 - 100)
    assert h["x-ratelimit-reset-requests"] == "1s"
    assert h["x-ratelimit-reset-tokens"] == "1.09s"
    assert "retry-after" not in h and not any(k.startswith("anthropic-") for k in h)


def test_success_headers_anthropic(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), rpm=60, tpm=6000, headers="anthropic")
    with httpx.Client(base_url=server.url) as client:
        h = client.post("/v1/chat/completions", json=chat(max_tokens=100)).headers
    assert h["anthropic-ratelimit-requests-limit"] == "60"
    assert h["anthropic-ratelimit-requests-remaining"] == "59"
    assert h["anthropic-ratelimit-requests-reset"] == "2023-11-14T22:13:21Z"
    for kind in ("tokens", "input-tokens", "output-tokens"):
        assert h[f"anthropic-ratelimit-{kind}-limit"] == "6000"
        assert h[f"anthropic-ratelimit-{kind}-remaining"] == "5891"
        assert h[f"anthropic-ratelimit-{kind}-reset"] == "2023-11-14T22:13:22Z"
    assert not any(k.startswith("x-ratelimit") for k in h)


def test_usage_is_openai_shaped_and_deterministic(serve: Callable[..., SimulatorServer]) -> None:
    def completions(server: SimulatorServer) -> list[int]:
        with httpx.Client(base_url=server.url) as client:
            bodies = [client.post("/v1/chat/completions", json=chat(max_tokens=100)).json() for _ in range(3)]
        for body in bodies:
            assert body["object"] == "chat.completion" and body["model"] == "sim-model"
            (choice,) = body["choices"]
            usage = body["usage"]
            assert usage["prompt_tokens"] == 9
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            assert 30 <= usage["completion_tokens"] <= 100
            assert estimate_text_tokens(choice["message"]["content"]) == usage["completion_tokens"]
        return [body["usage"]["completion_tokens"] for body in bodies]

    first, again = completions(serve()), completions(serve())
    assert first == again
    assert len(set(first)) > 1  # repeats of one body draw different lengths


def test_a_429_for_requests_has_the_openai_body_and_exact_waits(serve: Callable[..., SimulatorServer]) -> None:
    clock = FakeClock()
    server = serve(clock, rpm=2, tpm=6000)
    with httpx.Client(base_url=server.url) as client:
        assert client.post("/v1/chat/completions", json=chat(max_tokens=10)).status_code == 200
        assert client.post("/v1/chat/completions", json=chat(max_tokens=10)).status_code == 200
        refused = client.post("/v1/chat/completions", json=chat(max_tokens=10))
        assert refused.status_code == 429
        error = refused.json()["error"]
        assert error["type"] == "requests" and error["code"] == "rate_limit_exceeded" and error["param"] is None
        assert "requests per min" in error["message"]
        h = refused.headers
        assert (h["retry-after"], h["retry-after-ms"]) == ("30", "30000")
        assert h["x-ratelimit-remaining-requests"] == "0" and h["x-ratelimit-reset-requests"] == "1m0s"
        clock.advance(12.3455)
        h = client.post("/v1/chat/completions", json=chat(max_tokens=10)).headers
        assert (h["retry-after"], h["retry-after-ms"]) == ("18", "17654.5")
        clock.advance(17.6545)
        assert client.post("/v1/chat/completions", json=chat(max_tokens=10)).status_code == 200
    stats = server.stats()
    assert stats["requests"]["admitted"] == 3 and stats["requests"]["rejected"] == 2


def test_a_429_for_tokens_names_tokens_and_charges_nothing(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), rpm=600, tpm=600, completion_ratio=(1.0, 1.0))
    with httpx.Client(base_url=server.url) as client:
        ok = client.post("/v1/chat/completions", json=chat(max_tokens=491))  # 9 + 491 = 500, no refund
        assert ok.headers["x-ratelimit-remaining-tokens"] == "100"
        refused = client.post("/v1/chat/completions", json=chat(max_tokens=141))  # 150: 50 short at 10/s
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "tokens"
        assert (refused.headers["retry-after"], refused.headers["retry-after-ms"]) == ("5", "5000")
        assert refused.headers["x-ratelimit-remaining-tokens"] == "100"
        too_large = client.post("/v1/chat/completions", json=chat(max_tokens=592))  # 601 > 600
        assert too_large.status_code == 429 and "retry-after" not in too_large.headers
        assert "Request too large" in too_large.json()["error"]["message"]
    assert server.stats()["tokens"]["charged"] == 500


def test_malformed_bodies_get_400_and_are_not_charged(serve: Callable[..., SimulatorServer]) -> None:
    server = serve()
    bad: list[Any] = [
        b"not json",
        b"[1, 2]",
        {"messages": [{"role": "user", "content": "x"}]},
        {"model": "m", "messages": []},
        {"model": "m", "messages": ["hello"]},
        chat(max_tokens=0),
        chat(max_tokens="ten"),
        chat(n=0),
        chat(stream="yes"),
        chat(stream_options={"include_usage": True}),
    ]
    with httpx.Client(base_url=server.url) as client:
        for body in bad:
            kwargs: dict[str, Any] = {"content": body} if isinstance(body, bytes) else {"json": body}
            reply = client.post("/v1/chat/completions", **kwargs)
            assert reply.status_code == 400, body
            assert reply.json()["error"]["type"] == "invalid_request_error"
            assert "x-ratelimit-remaining-requests" in reply.headers
        assert client.post("/v1/embeddings", json={"model": "e", "input": []}).status_code == 400
    assert server.stats()["requests"]["admitted"] == 0


def test_n_choices_and_max_completion_tokens(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), tpm=6000)
    with httpx.Client(base_url=server.url) as client:
        reply = client.post("/v1/chat/completions", json=chat(max_completion_tokens=50, n=3))
    body = reply.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert reply.headers["x-ratelimit-remaining-tokens"] == str(6000 - 9 - 150)
    assert body["usage"]["completion_tokens"] == sum(
        estimate_text_tokens(c["message"]["content"]) for c in body["choices"]
    )


# ------------------------------------------------------------------------------------------------------------------
# Streaming and embeddings


def _events(client: httpx.Client, body: dict[str, Any]) -> tuple[httpx.Headers, list[Any]]:
    with client.stream("POST", "/v1/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        text = reply.read().decode()
    blocks = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in blocks)
    payloads = [block.removeprefix("data: ") for block in blocks]
    assert payloads[-1] == "[DONE]"
    return reply.headers, [json.loads(p) for p in payloads[:-1]]


def test_streaming_without_usage(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(latency_base=0.01, latency_per_token=0.0001)
    with httpx.Client(base_url=server.url) as client:
        headers, chunks = _events(client, chat(max_tokens=40, stream=True))
    assert "x-ratelimit-remaining-tokens" in headers
    assert all(c["object"] == "chat.completion.chunk" and "usage" not in c for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert 12 <= estimate_text_tokens(text) <= 40
    assert server.stats()["tokens"]["completion"] == estimate_text_tokens(text)


def test_streaming_with_usage_ends_with_a_usage_chunk(serve: Callable[..., SimulatorServer]) -> None:
    server = serve()
    with httpx.Client(base_url=server.url) as client:
        _, chunks = _events(client, chat(max_tokens=40, stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert last["choices"] == [] and all(c["usage"] is None for c in content)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content)
    usage = last["usage"]
    assert usage == {
        "prompt_tokens": 9,
        "completion_tokens": estimate_text_tokens(text),
        "total_tokens": 9 + estimate_text_tokens(text),
    }
    stats = server.stats()
    assert stats["tokens"]["settled"] == usage["total_tokens"] and stats["in_flight"] == 0


def test_embeddings_charge_prompt_tokens_only(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), tpm=6000)
    with httpx.Client(base_url=server.url) as client:
        many = client.post("/v1/embeddings", json={"model": "e", "input": ["abcdefgh", "x"]})
        one = client.post("/v1/embeddings", json={"model": "e", "input": "abcd", "dimensions": 4})
    assert many.status_code == 200 and many.headers["x-ratelimit-remaining-tokens"] == "5997"
    body = many.json()
    assert body["object"] == "list" and [d["index"] for d in body["data"]] == [0, 1]
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    for item in [*body["data"], *one.json()["data"]]:
        assert math.fsum(x * x for x in item["embedding"]) == pytest.approx(1.0)
    assert len(one.json()["data"][0]["embedding"]) == 4
    assert server.stats()["tokens"] == {"charged": 4, "refunded": 0, "settled": 4, "prompt": 4, "completion": 0}


# ------------------------------------------------------------------------------------------------------------------
# /stats, /reset, concurrency, bursts


def test_stats_and_reset_over_http_and_from_python(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), rpm=60, tpm=6000)
    with httpx.Client(base_url=server.url) as client:
        client.post("/v1/chat/completions", json=chat(max_tokens=10))
        stats = client.get("/stats").json()
        assert stats["limits"] == {"rpm": 60, "tpm": 6000, "max_concurrency": None}
        assert stats["requests"]["admitted"] == 1 and stats["series"]["requests"] == [1]
        assert stats["violations"] == 0 and stats["in_flight"] == 0 and stats["peak_in_flight"] == 1
        fresh = client.post("/reset", json={"rpm": 5, "max_concurrency": 3}).json()
        assert fresh["limits"] == {"rpm": 5, "tpm": 6000, "max_concurrency": 3}
        assert fresh["requests"]["admitted"] == 0 and fresh["levels"]["requests"] == 5
        assert client.post("/reset", json={"rpm": -1}).status_code == 400
        assert client.post("/reset", json={"burst": 1}).status_code == 400
        assert client.post("/reset").json()["limits"]["rpm"] == 5
        reply = client.post("/v1/chat/completions", json=chat(max_tokens=10))
        assert reply.headers["x-ratelimit-limit-requests"] == "5"
    assert server.reset(max_concurrency=None, tpm=1000)["limits"] == {"rpm": 5, "tpm": 1000, "max_concurrency": None}
    assert server.stats()["requests"]["admitted"] == 0


async def test_concurrency_limit_rejects_until_a_request_completes(serve: Callable[..., SimulatorServer]) -> None:
    server = serve(FakeClock(), max_concurrency=1, latency_base=0.5)
    async with httpx.AsyncClient(base_url=server.url) as client:
        slow = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(max_tokens=10)))
        for _ in range(500):
            if (await client.get("/stats")).json()["in_flight"] == 1:
                break
            await asyncio.sleep(0.005)
        refused = await client.post("/v1/chat/completions", json=chat("other", max_tokens=10))
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "requests"
        assert refused.headers["retry-after-ms"] == "500" and refused.headers["retry-after"] == "1"
        assert (await slow).status_code == 200
        assert (await client.post("/v1/chat/completions", json=chat(max_tokens=10))).status_code == 200
    stats = server.stats()
    assert stats["peak_in_flight"] == 1 and stats["requests"]["rejected_by"]["concurrency"] == 1


async def test_a_burst_over_the_limits_gets_429s_and_never_over_admits(
    serve: Callable[..., SimulatorServer],
) -> None:
    server = serve(rpm=20, tpm=1_000_000, latency_base=0.02)
    limits = httpx.Limits(max_connections=50)
    async with httpx.AsyncClient(base_url=server.url, limits=limits) as client:
        started = time.monotonic()
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=chat(f"q{i}", max_tokens=20)) for i in range(40))
        )
        elapsed = time.monotonic() - started
        ok = sum(r.status_code == 200 for r in replies)
        assert {r.status_code for r in replies} == {200, 429}
        stats = (await client.get("/stats")).json()
        assert stats["requests"]["admitted"] == ok <= 20 + math.ceil(20 / 60 * elapsed)
        assert stats["requests"]["rejected"] == 40 - ok
        assert stats["violations"] == 0

        server.reset(rpm=10_000, tpm=3000)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(client.post("/v1/chat/completions", json=chat(f"t{i}", max_tokens=400)) for i in range(40))
        )
        elapsed = time.monotonic() - started
        stats = (await client.get("/stats")).json()
    tokens = stats["tokens"]
    assert any(r.status_code == 429 for r in replies) and stats["requests"]["rejected_by"]["tokens"] > 0
    assert tokens["charged"] - tokens["refunded"] <= 3000 + 3000 / 60 * elapsed
    assert stats["peak_window"]["tokens"] <= 3000 + 3000 / 60 * elapsed
    assert stats["violations"] == 0


# ------------------------------------------------------------------------------------------------------------------
# The package boundary and the command line


def test_importing_xflow_dist_does_not_import_aiohttp() -> None:
    code = "import sys, xflow_dist; assert 'aiohttp' not in sys.modules and 'xflow_dist.tools' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_the_command_line_prints_its_url_and_stops_cleanly(sig: signal.Signals) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xflow_dist.tools.simulator", "--port", "0", "--rpm", "5", "--latency-base", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
        env=env,
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=30), "no listening line within 30 s"
        line = proc.stdout.readline().decode()
        match = re.fullmatch(r"xflow-simulator listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        with httpx.Client(base_url=match.group(1)) as client:
            assert client.post("/v1/chat/completions", json=chat(max_tokens=5)).status_code == 200
            assert client.get("/stats").json()["limits"]["rpm"] == 5
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err.decode()
    assert out == b"" and err == b""


def test_the_ledger_books_the_concurrency_drain_and_hand_overs() -> None:
    """Two slots, three calls: the third starts 0.5 s after the first frees its slot (a hand-over of
    0.5 s); the run's last admission is then, and the slots were busy 2 x 1 s of the 1 s before it
    but for the half second one stood free."""
    clock = FakeClock()
    ledger = ProviderLedger(rpm=6_000, tpm=1_000_000, max_concurrency=2, clock=clock)
    a = ledger.try_admit(10, hold=2.0)
    b = ledger.try_admit(10, hold=2.0)
    clock.advance(1.0)
    ledger.complete(a.ticket, 5)  # the limit was full: a slot freed at 1.0
    clock.advance(0.5)
    c = ledger.try_admit(10, hold=1.0)  # taken again at 1.5
    clock.advance(1.0)
    ledger.complete(b.ticket, 5)
    ledger.complete(c.ticket, 5)
    stats = ledger.stats()
    assert stats["handovers"] == {"count": 1, "median": pytest.approx(0.5), "p90": pytest.approx(0.5)}
    assert stats["last_admission"] == pytest.approx(1.5)
    assert stats["busy_before_last_admission"] == pytest.approx(2 * 1.0 + 1 * 0.5)
