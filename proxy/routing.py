"""Routes: the model name a client sends → weighted targets (upstream + the model it serves).

Compiled once from config; picking a target is a random draw and a bisect, no allocation.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from dataclasses import dataclass
from itertools import accumulate

from proxy.config import RouteConfig
from proxy.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Target:
    upstream: str
    model: str
    weight: float


class Route:
    __slots__ = ("_cumulative", "_total", "model", "targets")

    def __init__(self, cfg: RouteConfig) -> None:
        self.model = cfg.model
        self.targets = tuple(Target(t.upstream, t.model, t.weight) for t in cfg.targets)
        self._cumulative = tuple(accumulate(t.weight for t in self.targets))
        self._total = self._cumulative[-1]

    def pick(self, rng: random.Random) -> Target:
        """A target drawn by weight (targets of weight 0 are never drawn)."""
        if len(self.targets) == 1:
            return self.targets[0]
        i = bisect_right(self._cumulative, rng.random() * self._total)
        return self.targets[min(i, len(self.targets) - 1)]


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...]) -> None:
        self.routes: dict[str, Route] = {r.model: Route(r) for r in routes}
        self.models = tuple(self.routes)

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it. "
                f"Available models: {', '.join(self.models)}",
                param="model",
            )
        return route
