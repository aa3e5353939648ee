"""Settings read from ``XFLOW_*`` environment variables, for the edges: workers and the CLI.

The library never reads the environment itself; a worker or a command builds one ``Settings``
(``Settings.load()``) and hands plain objects (``Budget``, ``CooldownPolicy``, a Redis URL) down.
Nested fields use ``__``: ``XFLOW_BUDGET__TPM=2000000``, ``XFLOW_COOLDOWN__BASE=2``; several
budgets at once go in ``XFLOW_BUDGETS`` as JSON. Needs pydantic-settings
(``pip install 'xflow-dist[settings]'``, also in the ``celery`` extra).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Literal, Self

try:
    from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
    from pydantic_settings import BaseSettings, SettingsConfigDict
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("xflow_dist.settings needs pydantic-settings: pip install 'xflow-dist[settings]'") from exc

from ._budget import DISPATCH_MARGIN, Budget, CooldownPolicy
from ._exceptions import ConfigurationError
from ._redact import redact_url

if TYPE_CHECKING:
    from .celery import TaskPolicy

__all__ = ["BudgetSettings", "CelerySettings", "CooldownSettings", "Settings", "mask_url"]


class BudgetSettings(BaseModel):
    """One budget as the environment describes it; ``to_budget`` gives the validated ``Budget``.
    A budget of ``XFLOW_BUDGETS`` is named by its key; the default one by ``name`` (else "default")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    rpm: float | None = None
    rps: float | None = None
    tpm: float | None = None
    tps: float | None = None
    max_concurrency: int | None = None
    burst: float = 0.0
    lease_ttl: float = 30.0
    dispatch_margin: float = DISPATCH_MARGIN

    @model_validator(mode="after")
    def _valid(self) -> BudgetSettings:
        self.to_budget()  # ConfigurationError is a ValueError: pydantic reports it with the field path
        return self

    def to_budget(self, name: str | None = None) -> Budget:
        return Budget(
            name or self.name or "default",
            rpm=self.rpm,
            rps=self.rps,
            tpm=self.tpm,
            tps=self.tps,
            max_concurrency=self.max_concurrency,
            burst=self.burst,
            lease_ttl=self.lease_ttl,
            dispatch_margin=self.dispatch_margin,
        )


class CooldownSettings(BaseModel):
    """How the fleet pauses after a 429 (see ``CooldownPolicy``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: float = 1.0
    max_backoff: float = 60.0
    quiet: float = 10.0
    jitter: float = 0.1
    max_pause: float = 300.0

    @model_validator(mode="after")
    def _valid(self) -> CooldownSettings:
        self.to_policy()
        return self

    def to_policy(self) -> CooldownPolicy:
        return CooldownPolicy(
            base=self.base, max_backoff=self.max_backoff, quiet=self.quiet, jitter=self.jitter, max_pause=self.max_pause
        )


class CelerySettings(BaseModel):
    """How rate-limited Celery tasks wait (see ``xflow_dist.celery.TaskPolicy``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_wait: float = Field(default=2.0, ge=0)
    max_countdown: float | None = Field(default=None, gt=0)


class Settings(BaseSettings):
    """Everything a worker or the CLI needs to reach the shared budgets.

    ``XFLOW_REDIS_URL``, ``XFLOW_BUDGET__*`` (the default budget), ``XFLOW_BUDGETS`` (JSON: name
    to the same fields), ``XFLOW_COOLDOWN__*``, ``XFLOW_CELERY__*``, ``XFLOW_OUTAGE``. Unknown ``XFLOW_*`` variables
    are ignored (other tools share the prefix); a bad value raises ``ConfigurationError``.
    """

    model_config = SettingsConfigDict(env_prefix="XFLOW_", env_nested_delimiter="__", extra="ignore", frozen=True)

    redis_url: str = "redis://localhost:6379/0"
    budget: BudgetSettings = BudgetSettings()
    budgets: dict[str, BudgetSettings] = Field(default_factory=dict)
    cooldown: CooldownSettings = CooldownSettings()
    celery: CelerySettings = CelerySettings()
    #: What a limiter does while Redis does not answer: "local", "open" or "closed" (docs/reliability.md).
    outage: Literal["local", "open", "closed"] = "local"

    @field_validator("budgets")
    @classmethod
    def _named(cls, budgets: dict[str, BudgetSettings]) -> dict[str, BudgetSettings]:
        for name, budget in budgets.items():
            budget.to_budget(name)  # the key must be a valid budget name
        return budgets

    @property
    def default_budget_name(self) -> str:
        return self.budget.name or "default"

    @classmethod
    def load(cls, **overrides: Any) -> Self:
        """Read the environment (``overrides`` win); bad values raise ``ConfigurationError``."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            problems = "; ".join(
                f"XFLOW_{'__'.join(str(p) for p in err['loc']).upper()}: {err['msg']}" for err in exc.errors()
            )
            raise ConfigurationError(f"bad xflow settings: {problems}") from exc

    def get_budget(self, name: str | None = None) -> Budget:
        """The budget called ``name`` (from ``XFLOW_BUDGETS``, or the default one); None: the default."""
        if name is None or name == self.default_budget_name:
            return self.budget.to_budget()
        if name in self.budgets:
            return self.budgets[name].to_budget(name)
        known = sorted({self.default_budget_name, *self.budgets})
        raise ConfigurationError(f"no budget {name!r} in the settings (known: {', '.join(known)})", budget=name)

    def all_budgets(self) -> list[Budget]:
        """The default budget and every named one."""
        named = [s.to_budget(n) for n, s in sorted(self.budgets.items()) if n != self.default_budget_name]
        return [self.budget.to_budget(), *named]

    def cooldown_policy(self) -> CooldownPolicy:
        return self.cooldown.to_policy()

    def task_policy(self) -> TaskPolicy:
        """The Celery tasks' policy (imports ``xflow_dist.celery``, so needs celery)."""
        from .celery import TaskPolicy

        return TaskPolicy(
            max_wait=self.celery.max_wait,
            max_countdown=self.celery.max_countdown,
            cooldown=self.cooldown_policy(),
            outage=self.outage,
        )

    def describe(self) -> str:
        """The effective settings as JSON, passwords masked in every URL (a worker's broker and
        result backend too) and secrets as pydantic shows them: safe to print or log."""
        return json.dumps(_masked(self.model_dump(mode="json")), indent=2, sort_keys=True)

    def __repr_args__(self) -> Any:
        """``repr`` and ``str`` show URLs with their passwords masked."""
        for key, value in super().__repr_args__():
            yield key, redact_url(value) if isinstance(value, str) else value


def _masked(data: Any) -> Any:
    if isinstance(data, str):
        return redact_url(data)
    if isinstance(data, dict):
        return {key: _masked(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_masked(value) for value in data]
    return data


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (``xflow_dist._redact.redact_url``)."""
    return redact_url(url)
