"""The fleet's tasks: one chat completion per job, against an OpenAI-compatible endpoint.

``workers.chat`` shares the budget (``xflow_dist.celery``): it acquires the job's estimate before
it runs, calls through ``RateLimitedTransport`` (which settles the lease with the reply's usage and
the provider's headers) and, on a 429, retries after the fleet-wide cooldown.
``workers.chat_baseline`` is the comparison: Celery's own per-worker ``rate_limit`` and an
exponential backoff with full jitter on 429.
"""

from __future__ import annotations

import os
import random
import threading
from typing import Any

import httpx
from celery.signals import worker_process_init, worker_ready  # type: ignore[import-untyped]

from xflow_dist.celery import rate_limited_task
from xflow_dist.httpx import estimate_request

from .app import app, settings

#: A job: ``{"id": ..., "prompt": "...", "max_tokens": 256}`` (or ``"messages"`` instead of ``"prompt"``).
Job = dict[str, Any]

_local = threading.local()
_lock = threading.Lock()
_inner: tuple[int, httpx.HTTPTransport] | None = None


def body(job: Job) -> dict[str, Any]:
    """The chat completion request of a job."""
    messages = job.get("messages") or [{"role": "user", "content": job["prompt"]}]
    return {"model": settings.model, "messages": messages, "max_tokens": int(job.get("max_tokens", 256))}


def estimate(job: Job) -> int:
    """What the provider charges at admission: the transport's own estimate of the request."""
    return estimate_request("/chat/completions", body(job))


def _warm(**_: Any) -> None:
    """Load the tokenizer and build the connection pool (its TLS context) when a worker process
    starts, not between a task's grant and its call: the provider would see that call late."""
    estimate({"prompt": "warm up", "max_tokens": 1})
    _transport()


def _headers() -> dict[str, str]:
    key = settings.api_key
    return {"authorization": f"Bearer {key.get_secret_value()}"} if key is not None else {}


def _transport() -> httpx.HTTPTransport:
    """One connection pool per worker process (made after the fork), shared by its threads."""
    global _inner
    with _lock:
        if _inner is None or _inner[0] != os.getpid():
            _inner = (os.getpid(), httpx.HTTPTransport())
        return _inner[1]


@rate_limited_task(
    app,
    name="workers.chat",
    budget=settings.get_budget(),
    cost=estimate,
    policy=settings.task_policy(),
    max_retries=settings.max_retries,
)
def chat(self: Any, job: Job) -> dict[str, Any]:
    """One budgeted chat completion; returns the job id, the usage and the answer."""
    with httpx.Client(
        base_url=settings.provider_url, transport=self.transport(_transport()), timeout=settings.http_timeout
    ) as http:
        reply = http.post("/chat/completions", json=body(job), headers=_headers())
        reply.raise_for_status()  # a 429 here: the task retries after the fleet-wide cooldown
        data = reply.json()
    return _outcome(self, job, data)


@app.task(name="workers.ready")  # type: ignore[untyped-decorator]
def ready() -> int:
    """A no-op that says which process ran it: a fleet is up when every process has answered."""
    return os.getpid()


def _outcome(task: Any, job: Job, data: dict[str, Any]) -> dict[str, Any]:
    """What a task returns: the job, the usage (which settles the lease), the answer, the node."""
    return {
        "id": job.get("id"),
        "usage": data.get("usage"),
        "text": data["choices"][0]["message"]["content"],
        "node": task.request.hostname,
    }


def _client() -> httpx.Client:
    client: httpx.Client | None = getattr(_local, "client", None)
    if client is None or getattr(_local, "pid", None) != os.getpid():
        client = httpx.Client(base_url=settings.provider_url, timeout=settings.http_timeout)
        _local.client, _local.pid = client, os.getpid()
    return client


@app.task(bind=True, name="workers.chat_baseline", max_retries=None, rate_limit=settings.baseline_rate_limit)  # type: ignore[untyped-decorator]
def chat_baseline(self: Any, job: Job) -> dict[str, Any]:
    """The comparison: no shared budget, Celery's per-worker ``rate_limit``, backoff on 429."""
    reply = _client().post("/chat/completions", json=body(job), headers=_headers())
    if reply.status_code == 429:
        delay = min(8.0, 0.5 * 2**self.request.retries) * random.random()
        raise self.retry(countdown=delay)
    reply.raise_for_status()
    return _outcome(self, job, reply.json())


worker_process_init.connect(_warm, weak=False)  # each prefork child
worker_ready.connect(_warm, weak=False)  # the solo and threads pools run tasks in the main process
