"""A tiny middleware for the config loader tests: ``type: "tests.unit.sample_middleware:Sample"``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from proxy.chain import Handler
from proxy.config import opt, req
from proxy.http import Request, Response
from proxy.registry import BuildContext


@dataclass(frozen=True)
class SampleConfig:
    header: str = req("response header to add", min_len=1)
    ratio: float = opt(0.5, "share of responses that get the header", min=0.0, max=1.0)
    tags: tuple[str, ...] = opt((), "labels, in order")
    per_model: dict[str, int] = field(default_factory=dict, metadata={"help": "model → count"})
    extra: dict[str, Any] = field(default_factory=dict, metadata={"help": "free-form options"})

    def validate(self) -> list[tuple[str, str]]:
        if self.header != self.header.lower():
            return [("header", "must be lower-case")]
        return []


class Sample:
    Config = SampleConfig

    def __init__(self, config: SampleConfig, context: BuildContext) -> None:
        self.config = config

    async def __call__(self, request: Request, next: Handler) -> Response:
        response = await next(request)
        response.headers.append((self.config.header.encode(), b"1"))
        return response


@dataclass(frozen=True)
class CancelsConfig:
    when: str = req("the x-test header value on which the chain raises CancelledError", min_len=1)


class Cancels:
    """Raises CancelledError from inside the chain (a bug in user code, the client still there)."""

    Config = CancelsConfig

    def __init__(self, config: CancelsConfig, context: BuildContext) -> None:
        self.when = config.when.encode()

    async def __call__(self, request: Request, next: Handler) -> Response:
        if request.headers.get(b"x-test") == self.when:
            raise asyncio.CancelledError
        return await next(request)


@dataclass(frozen=True)
class NoOptions:
    pass


class OtherNames:
    """A user's middleware whose parameters are not called ``request`` and ``next``."""

    Config = NoOptions

    def __init__(self, config: NoOptions, context: BuildContext) -> None:
        pass

    async def __call__(self, req: Request, handler: Handler) -> Response:
        response = await handler(req)
        response.headers.append((b"x-other-names", b"1"))
        return response


class TakesOnlyTheRequest:
    """Cannot be called as ``(request, next)``: refused when the config is loaded."""

    Config = NoOptions

    def __init__(self, config: NoOptions, context: BuildContext) -> None:
        pass

    async def __call__(self, request: Request) -> Response:
        raise AssertionError("never called")


class NextByKeywordOnly:
    """``next`` keyword-only: cannot be called as ``(request, next)`` either."""

    Config = NoOptions

    def __init__(self, config: NoOptions, context: BuildContext) -> None:
        pass

    async def __call__(self, request: Request, *, next: Handler) -> Response:
        raise AssertionError("never called")
