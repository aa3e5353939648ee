"""Small helpers shared by tests (importable because pytest puts ``tests/`` on sys.path)."""

from __future__ import annotations

import redis


def budget_keys(client: redis.Redis, budget_name: str) -> list[bytes]:
    """Every key of one budget that exists now."""
    return sorted(client.scan_iter(match=f"{{xflow:{budget_name}}}*"))
