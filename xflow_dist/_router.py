"""Which budget a call spends: one client may talk to several models, each with limits of its own."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any, Generic, TypeVar

from ._exceptions import ConfigurationError, NoRouteError

__all__ = ["Call", "NoRouteError", "Router"]

L = TypeVar("L")


@dataclass(frozen=True, slots=True)
class Call:
    """What a router sees of one call: enough to choose, nothing to change."""

    model: str | None
    host: str
    path: str
    body: Mapping[str, Any]


class Router(Generic[L]):
    """Chooses a limiter for each call: ``choose(call)`` first (None passes on), then ``models``
    (exact names or ``fnmatch`` patterns such as ``"gpt-4o*"``, first match in the order given),
    then ``hosts``, then ``default``. A call nothing matches raises :class:`NoRouteError` rather
    than going out unbudgeted."""

    def __init__(
        self,
        models: Mapping[str, L] | None = None,
        hosts: Mapping[str, L] | None = None,
        *,
        choose: Callable[[Call], L | None] | None = None,
        default: L | None = None,
    ) -> None:
        self.models = dict(models or {})
        self.hosts = {h.lower(): lim for h, lim in (hosts or {}).items()}
        self.choose = choose
        self.default = default
        if not (self.models or self.hosts or choose or default is not None):
            raise ConfigurationError("a Router needs at least one of models, hosts, choose or default")

    def route(self, call: Call) -> L:
        if self.choose is not None:
            chosen = self.choose(call)
            if chosen is not None:
                return chosen
        if call.model is not None:
            exact = self.models.get(call.model)
            if exact is not None:
                return exact
            for pattern, limiter in self.models.items():
                if fnmatchcase(call.model, pattern):
                    return limiter
        by_host = self.hosts.get(call.host.lower())
        if by_host is not None:
            return by_host
        if self.default is not None:
            return self.default
        raise NoRouteError(f"no budget for model {call.model!r} at {call.host}: give the Router a default")

    def limiters(self) -> list[L]:
        """Every limiter the router can choose without asking ``choose``, each once."""
        seen: dict[int, L] = {}
        for lim in [*self.models.values(), *self.hosts.values(), self.default]:
            if lim is not None:
                seen.setdefault(id(lim), lim)
        return list(seen.values())
