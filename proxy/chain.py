"""The middleware chain: ``async def __call__(request, next) -> Response``, composed once at load."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Protocol

from proxy.http import Request, Response

Handler = Callable[[Request], Awaitable[Response]]


class Middleware(Protocol):
    async def __call__(self, request: Request, next: Handler) -> Response: ...


def compose(middleware: Sequence[Middleware], terminal: Handler) -> Handler:
    """Wrap ``terminal`` so the first middleware in the list runs first. Done once, not per request."""
    handler = terminal
    for mw in reversed(middleware):
        handler = partial(mw.__call__, next=handler)
    return handler
