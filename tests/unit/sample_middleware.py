"""A tiny middleware for the config loader tests: ``type: "tests.unit.sample_middleware:Sample"``."""

from __future__ import annotations

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
