from __future__ import annotations

import math

import pytest

from xflow_dist import Budget, ConfigurationError, CooldownPolicy, CostTooLargeError, InvalidCostError
from xflow_dist._core import budget_args, validate_cost


def test_per_minute_limits_become_per_second_rates() -> None:
    b = Budget("openai:team-a", rpm=600, tpm=120_000, max_concurrency=4)
    assert b.request_rate == pytest.approx(10.0)
    assert b.token_rate == pytest.approx(2_000.0)
    assert b.burst == 0.0


def test_unlimited_dimensions_are_none() -> None:
    b = Budget("x", max_concurrency=2)
    assert b.request_rate is None
    assert b.token_rate is None
    assert b.max_tokens_per_request == math.inf
    assert b.probe is False  # learned limits only lower what is configured; the probe is opt-in


@pytest.mark.parametrize("bad", ["", "a b", "{tag}", "x" * 201, "tab\t", "é", None, 3])
def test_bad_names_are_refused(bad: object) -> None:
    with pytest.raises(ConfigurationError, match="budget name"):
        Budget(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rpm": 0},
        {"rpm": -1},
        {"tps": math.nan},
        {"tpm": math.inf},
        {"rpm": "10"},
        {"rpm": True},
        {"burst": -1},
        {"burst": math.nan},
        {"lease_ttl": 0},
        {"max_concurrency": 0},
        {"max_concurrency": 2.5},
        {"rpm": 10, "rps": 1},
        {"tpm": 10, "tps": 1},
        {"probe": "yes"},
        {"probe": 1},
        {"overdraft": "yes"},
    ],
)
def test_bad_limits_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        Budget("x", **kwargs)  # type: ignore[arg-type]


def test_errors_name_the_budget() -> None:
    with pytest.raises(ConfigurationError) as info:
        Budget("team-b", rpm=-5)
    assert info.value.budget == "team-b"
    assert isinstance(info.value, ValueError)


def test_largest_cost_is_a_minute_or_the_credit_whichever_is_more() -> None:
    assert Budget("x", tps=100).max_tokens_per_request == pytest.approx(6_000)
    assert Budget("x", tps=100, burst=120).max_tokens_per_request == pytest.approx(11_975)  # the credit: 119.75 s
    assert Budget("x", tps=100, burst=120, dispatch_margin=0).max_tokens_per_request == pytest.approx(12_000)


@pytest.mark.parametrize("tokens", [-1, math.nan, math.inf, -math.inf, "5", None, True])
def test_bad_costs_are_refused(tokens: object) -> None:
    with pytest.raises(InvalidCostError):
        validate_cost(Budget("x", tps=10), 1, tokens)  # type: ignore[arg-type]


def test_cost_that_can_never_fit_is_refused() -> None:
    b = Budget("x", tpm=1_000)
    assert validate_cost(b, 1, 1_000) == (1.0, 1_000.0)
    with pytest.raises(CostTooLargeError, match="never fit"):
        validate_cost(b, 1, 1_001)


@pytest.mark.parametrize(
    "kwargs",
    [{"base": 0}, {"base": -1}, {"max_backoff": math.inf}, {"jitter": -0.1}, {"base": 5, "max_backoff": 1}],
)
def test_bad_cooldown_policy_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigurationError):
        CooldownPolicy(**kwargs)


@pytest.mark.parametrize(
    ("burst", "margin", "credit"),
    [
        (60, None, 59.75),  # the README's per-minute budget: a quarter second kept back for the trip
        (59.8, None, 59.75),
        (59.75, None, 59.75),  # the provider's bucket keeps a quarter second of room already
        (30, None, 30),
        (0.5, None, 0.5),
        (0, None, 0),
        (120, None, 119.75),
        (60, 0.0, 60),
        (60, 1.0, 59),
        (0.5, 1.0, 0.5),
    ],
)
def test_the_dispatch_margin_comes_off_a_burst_that_reaches_into_the_providers_last_minute(
    burst: float, margin: float | None, credit: float
) -> None:
    kwargs = {} if margin is None else {"dispatch_margin": margin}
    b = Budget("x", rpm=600, burst=burst, **kwargs)
    assert b.credit == pytest.approx(credit)
    assert budget_args(b)[1] == budget_args(b)[3] == repr(float(b.credit))  # what the scripts hold


@pytest.mark.parametrize("margin", [-0.1, math.nan, math.inf, "0.25", None, True])
def test_a_bad_dispatch_margin_is_refused(margin: object) -> None:
    with pytest.raises(ConfigurationError, match="dispatch_margin"):
        Budget("x", rpm=600, burst=60, dispatch_margin=margin)  # type: ignore[arg-type]
