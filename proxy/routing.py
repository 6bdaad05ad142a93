"""Routes: the model name a client sends → weighted targets (upstream + the model it serves).

Compiled once from config; picking a target is a random draw and a bisect, no allocation.
Failover (``retry``, ``circuit_breaker``) picks with :meth:`Router.pick`: first the route's targets
not tried yet and healthy, then its ``fallbacks`` routes' in order, then a healthy one tried before.
An upstream its active health check marked down (``down``, proxy/health.py) is never picked,
whichever middleware asks: the check costs a pick one lookup in a dict that is empty while all pass.
"""

from __future__ import annotations

import random
from bisect import bisect_right
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from proxy.config import RouteConfig
from proxy.errors import ModelNotFound


@dataclass(frozen=True, slots=True)
class Target:
    """Where an attempt goes. Its identity (equality, hash: ``ctx.tried``) is (upstream, model): the
    same target with another weight (rebuilt from a reloaded config) is still the one tried."""

    upstream: str
    model: str
    weight: float = field(compare=False)


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

    def pick_among(self, rng: random.Random, allowed: Callable[[Target], bool]) -> Target | None:
        """A target drawn by weight among those ``allowed`` (weight 0 never), or None."""
        candidates = [t for t in self.targets if t.weight > 0 and allowed(t)]
        if len(candidates) <= 1:
            return candidates[0] if candidates else None
        draw = rng.random() * sum(t.weight for t in candidates)
        for t in candidates:
            draw -= t.weight
            if draw < 0:
                return t
        return candidates[-1]


# An upstream's name → may it take a request now (its circuit breaker is not open)?
Healthy = Callable[[str], bool]


class Router:
    def __init__(self, routes: tuple[RouteConfig, ...], down: Mapping[str, str] | None = None) -> None:
        # Upstream name → why its health check failed: App's one live board (proxy.health.HealthBoard),
        # shared by every build, so a verdict reaches the router in force at once.
        self.down: Mapping[str, str] = {} if down is None else down
        self.routes: dict[str, Route] = {r.model: Route(r) for r in routes}
        self.models = tuple(self.routes)
        # The route and then its fallbacks, in the order failover tries them.
        self._chains: dict[str, tuple[Route, ...]] = {
            r.model: (self.routes[r.model], *(self.routes[f] for f in r.fallbacks)) for r in routes
        }

    def route(self, model: str) -> Route:
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"The model '{model}' does not exist or you do not have access to it. "
                f"Available models: {', '.join(self.models)}",
                param="model",
            )
        return route

    def upstreams_of(self, model: str) -> tuple[str, ...]:
        """The upstreams that may serve ``model``: its route's and its fallbacks' (weight > 0)."""
        seen = dict.fromkeys(t.upstream for r in self._chains[model] for t in r.targets if t.weight > 0)
        return tuple(seen)

    def pick(
        self,
        model: str,
        rng: random.Random,
        tried: Collection[Target] = (),
        healthy: Healthy | None = None,
    ) -> Target | None:
        """The target for the next attempt of a request for ``model``: a healthy one not ``tried``
        yet — the route's own targets by weight, then each fallback route's — else a healthy one
        tried before (a retry after a backoff), else None (every breaker open, or every upstream
        down by its health check). Healthy: not ``down``, and ``healthy(upstream)`` when given.

        Raises ModelNotFound for a model no route serves."""
        route = self.route(model)
        down = self.down
        if not tried:  # the common case: a plain draw, kept when it is healthy (still by weight)
            drawn = route.pick(rng)
            if (not down or drawn.upstream not in down) and (healthy is None or healthy(drawn.upstream)):
                return drawn

        def ok(upstream: str) -> bool:
            return upstream not in down and (healthy is None or healthy(upstream))

        chain = self._chains[model]
        for r in chain:
            target = r.pick_among(rng, lambda t: t not in tried and ok(t.upstream))
            if target is not None:
                return target
        for r in chain:
            target = r.pick_among(rng, lambda t: ok(t.upstream))
            if target is not None:
                return target
        return None

    def unavailable(self, model: str) -> dict[str, str]:
        """Of the upstreams that may serve ``model``, those down by their health check, with why."""
        down = self.down
        return {u: down[u] for u in self.upstreams_of(model) if u in down}
