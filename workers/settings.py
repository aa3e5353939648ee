"""The fleet's settings: the library's ``XFLOW_*`` settings plus the broker and the provider."""

from __future__ import annotations

from pydantic import Field, SecretStr

from xflow_dist.settings import Settings


class WorkerSettings(Settings):
    """``XFLOW_BROKER_URL`` (default: ``XFLOW_REDIS_URL``), ``XFLOW_RESULT_BACKEND`` (default: the
    broker), ``XFLOW_QUEUE``, ``XFLOW_PROVIDER_URL`` (an OpenAI-compatible base URL ending in
    ``/v1``), ``XFLOW_API_KEY``, ``XFLOW_MODEL``, ``XFLOW_VISIBILITY_TIMEOUT`` (seconds before the
    broker hands an unacknowledged task to another worker: longer than any task runs),
    ``XFLOW_MAX_RETRIES`` (429s a task may retry), ``XFLOW_BASELINE_RATE_LIMIT`` (Celery's own
    per-worker ``rate_limit`` of the comparison task ``workers.chat_baseline``, e.g. ``"120/m"``),
    ``XFLOW_METRICS_PORT`` (serve Prometheus metrics of the node on that port, ``/metrics``)."""

    broker_url: str | None = None
    result_backend: str | None = None
    queue: str = "xflow"
    provider_url: str = "http://127.0.0.1:8080/v1"
    api_key: SecretStr | None = None
    model: str = "gpt-4o-mini"
    http_timeout: float = Field(default=120.0, gt=0)
    visibility_timeout: float = Field(default=3600.0, gt=0)
    max_retries: int = Field(default=5, ge=0)
    baseline_rate_limit: str | None = None
    metrics_port: int | None = Field(default=None, ge=0, le=65_535)

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.broker
