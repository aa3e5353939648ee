"""The Lua operations: read once from the package, registered per client as redis-py Scripts.

Each ``lua/<op>.lua`` is prefixed with ``lua/_prelude.lua`` (the budget block and the bucket
maths every operation shares). redis-py's ``Script`` runs EVALSHA and reloads on NOSCRIPT.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any

OPS = ("acquire", "cancel", "clear_cooldown", "configure", "cooldown", "extend", "rejoin", "settle", "status")


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


def register(client: Any) -> dict[str, Any]:
    """One Script (or AsyncScript) per operation, bound to ``client``."""
    return {op: client.register_script(source(op)) for op in OPS}
