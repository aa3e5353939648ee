"""The Celery application: ``celery -A workers.app worker``. Configured from ``XFLOW_*`` only.

Acknowledged late and rejected when a worker dies, so a task whose worker is killed runs again
elsewhere (at least once); the broker's visibility timeout bounds how long that takes.
"""

from __future__ import annotations

from celery import Celery  # type: ignore[import-untyped]

from xflow_dist.celery import serve_metrics

from .settings import WorkerSettings

settings = WorkerSettings.load()

app = Celery("xflow-workers", broker=settings.broker, backend=settings.backend, include=["workers.tasks"])
_restore_every = max(1, min(10, int(settings.visibility_timeout / 5)))
app.conf.update(
    task_default_queue=settings.queue,
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    broker_connection_retry_on_startup=True,
    broker_transport_options={
        "visibility_timeout": settings.visibility_timeout,
        # look for the messages of dead workers every few seconds, not every 100 s (10 x 10)
        "unacked_restore_interval": _restore_every,
        "unacked_restore_throttle": 1,
    },
    result_expires=3600,
    worker_send_task_events=False,
    xflow_redis_url=settings.redis_url,
)
if settings.metrics_port is not None:  # the node's counters and the budget's gauges, for Prometheus
    serve_metrics(settings.metrics_port, redis=settings.redis_url)
