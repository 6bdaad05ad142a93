"""Finds middleware classes by their YAML ``type``: a built-in name or ``package.module:Class``.

``proxy`` never imports ``middleware`` statically: built-ins are named here as import strings.
A middleware class has a ``Config`` attribute (a frozen dataclass the loader builds from the YAML
entry) and is constructed as ``Class(config, build_context)``; see middleware/headers.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from proxy.clock import Clock
from proxy.direct import Senders, UpstreamSender
from proxy.metrics import MetricsScope
from proxy.routing import Router
from proxy.tasks import BackgroundTasks

BUILTIN: Final[Mapping[str, str]] = MappingProxyType(
    {
        "headers": "middleware.headers:HeadersMiddleware",
        "auth": "middleware.auth:Auth",
        "rate_limit": "middleware.rate_limit:RateLimit",
        "retry": "middleware.retry:Retry",
        "circuit_breaker": "middleware.circuit_breaker:CircuitBreaker",
    }
)


@dataclass(frozen=True)
class BuildContext:
    """What a middleware may use when it is constructed."""

    clock: Clock
    rng: random.Random
    route_models: tuple[str, ...]
    router: Router | None = None  # target selection and failover (None only in unit tests)
    upstreams: tuple[str, ...] = ()  # the configured upstream names
    # On a reload: the instance this one replaces, when it had the same type and the same config.
    # Take over its state (buckets, breakers, budgets) rather than starting afresh; it keeps
    # serving its own requests in flight, and is not closed (its state lives on here).
    previous: Any = None
    # Where its counters come from (``scope.counter(name, help, labels)``): rendered on /metrics.
    metrics: MetricsScope = field(default_factory=MetricsScope)
    # The process's bounded group for work not awaited by a request (``tasks.spawn(coro, name)``;
    # False when full): shutdown drains it. The same group for every build (it outlives reloads).
    tasks: BackgroundTasks = field(default_factory=lambda: BackgroundTasks(MetricsScope()))
    # This build's pools by upstream name, for :meth:`sender` (None only in unit tests).
    senders: Senders | None = None

    def sender(self, upstream: str) -> UpstreamSender:
        """Send requests straight to ``upstream``'s pool, without the chain (proxy/direct.py).
        Ask at build time (in ``__init__``): an unknown name raises ValueError there, which stops
        the start (or rejects the reload) with the middleware named."""
        if self.senders is None:
            raise ValueError("no upstream pools in this context (BuildContext.senders)")
        return self.senders.get(upstream)


def resolve(type_name: str) -> Any:
    """The middleware class for ``type_name``. Raises ValueError with a message for the user."""
    spec = BUILTIN.get(type_name)
    if spec is None:
        if ":" not in type_name:
            raise ValueError(
                f"unknown middleware type {type_name!r}; built-in: {', '.join(sorted(BUILTIN))}; "
                "or 'package.module:Class' for your own"
            )
        spec = type_name
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module itself failing on import
        raise ValueError(
            f"cannot import {module_name!r} for middleware {type_name!r}: {type(e).__name__}: {e}"
        ) from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
    cfg = getattr(cls, "Config", None)
    if cfg is None or not dataclasses.is_dataclass(cfg):
        raise ValueError(f"{spec} must have a 'Config' dataclass attribute (see middleware/headers.py)")
    if not isinstance(cls, type) or not inspect.iscoroutinefunction(cls.__call__):
        raise ValueError(f"{spec} is not callable as 'async def __call__(self, request, next)'")
    signature = inspect.signature(cls.__call__)
    try:  # the chain calls it as (request, next), positionally (see proxy.chain.compose)
        signature.bind(None, None, None)
    except TypeError:
        raise ValueError(
            f"{spec}.__call__{signature} must take (request, next) as its two positional parameters: "
            "async def __call__(self, request, next)"
        ) from None
    return cls
