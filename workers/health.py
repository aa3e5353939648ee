"""The image's HEALTHCHECK: healthy while the budget's Redis (``XFLOW_REDIS_URL``) answers a PING.

Every role of the image (worker, producer, simulator) runs it; a container without
``XFLOW_REDIS_URL`` (the simulator) has no Redis to depend on and is healthy. The role's own
checks (a Celery ping of the worker, the simulator's ``/stats``) are in docker-compose.yml and the
Kubernetes probes. Exit 0: healthy; 1: not, with one line saying why (the URL's password masked).
"""

from __future__ import annotations

import os
import sys

import redis

from xflow_dist._backend import sync_client
from xflow_dist._exceptions import XflowError
from xflow_dist._redact import redact_text, redact_url


def main() -> int:
    url = os.environ.get("XFLOW_REDIS_URL")
    if not url:
        return 0
    try:
        client, _ = sync_client(url, io_timeout=3.0)  # any URL a limiter takes (Sentinel, Cluster, TLS)
        try:
            client.ping()
        finally:
            client.close()
    except (redis.RedisError, OSError, XflowError) as exc:
        print(f"unhealthy: Redis at {redact_url(url)}: {redact_text(str(exc))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
