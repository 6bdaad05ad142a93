"""A middleware with a readiness check, for the /readyz tests:
``type: "tests.integration.ready_middleware:FlagFile"``: not ready while ``flag`` exists."""

from __future__ import annotations

import os
from dataclasses import dataclass

from proxy.chain import Handler
from proxy.config import req
from proxy.http import Request, Response
from proxy.registry import BuildContext


@dataclass(frozen=True)
class FlagFileConfig:
    flag: str = req("while this file exists, readiness reports its first line", min_len=1)


class FlagFile:
    Config = FlagFileConfig

    def __init__(self, config: FlagFileConfig, context: BuildContext) -> None:
        self.flag = config.flag

    async def __call__(self, request: Request, next: Handler) -> Response:
        return await next(request)

    def readiness(self) -> list[str]:
        if not os.path.exists(self.flag):
            return []
        with open(self.flag) as f:
            return [f.readline().strip()]
