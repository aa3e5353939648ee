"""The Lua operations: read once from the package, registered per client as redis-py Scripts.

Each ``lua/<op>.lua`` is prefixed with ``lua/_prelude.lua`` (the budget block and the bucket
maths every operation shares). redis-py's ``Script`` runs EVALSHA and reloads on NOSCRIPT; on a
Redis Cluster each is also retried while its budget's slot is being migrated (``_cluster``).
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

from ._backend import IO_TIMEOUT
from ._cluster import ride_out_migrations

OPS = ("acquire", "cancel", "clear_cooldown", "configure", "cooldown", "extend", "rejoin", "renew", "settle", "status")


def lua_dir() -> Path:
    """``xflow_dist/lua`` in an installed wheel, else the checkout's top-level ``lua/``."""
    packaged = Path(str(resources.files("xflow_dist"))) / "lua"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "lua"


@functools.cache
def source(op: str) -> str:
    """The full text sent to Redis for one operation."""
    if op not in OPS:
        raise KeyError(op)
    folder = lua_dir()
    prelude = (folder / "_prelude.lua").read_text(encoding="utf-8")
    return prelude + "\n" + (folder / f"{op}.lua").read_text(encoding="utf-8")


def register(client: Any, io_timeout: float = IO_TIMEOUT) -> dict[str, Any]:
    """One Script (or AsyncScript) per operation, bound to ``client``; on a cluster, a slot migration is
    waited out for up to ``io_timeout`` seconds."""
    return ride_out_migrations(client, {op: client.register_script(source(op)) for op in OPS}, io_timeout)
