"""A user's middleware on both seams of BuildContext, for the integration tests:
``type: "tests.integration.mirror_middleware:Mirror"`` sends a copy of each request to ``upstream``
(``ctx.sender``: straight to its pool, no chain) in a background task (``ctx.tasks``), after
``x-mirror-delay-s`` seconds when the request carries that header (the drain tests)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from proxy.chain import Handler
from proxy.config import opt, req
from proxy.direct import read_body
from proxy.http import Request, Response
from proxy.registry import BuildContext

log = logging.getLogger("llm_sidecar.mirror")
_PASSED = (b"content-type", b"x-mock-chunks")  # what the copy keeps of the client's headers


@dataclass(frozen=True)
class MirrorConfig:
    upstream: str = req("the upstream that gets a copy of each request", upstream=True)
    max_body_bytes: int = opt(1 << 20, "longest answer read from it", min=1)


class Mirror:
    Config = MirrorConfig

    def __init__(self, config: MirrorConfig, ctx: BuildContext) -> None:
        self.sender = ctx.sender(config.upstream)  # an unknown name fails the build, here
        self.tasks = ctx.tasks
        self.max_body_bytes = config.max_body_bytes

    async def __call__(self, request: Request, next: Handler) -> Response:
        # A copy taken before anything rewrites the original: values, not the shared request.
        headers = [(k, v) for k, v in request.headers if k in _PASSED]
        delay = float(request.headers.get(b"x-mirror-delay-s") or 0)
        copy = self._mirror(
            request.method, request.path, request.body, headers, request.ctx.request_id, delay
        )
        self.tasks.spawn(copy, "mirror")
        return await next(request)

    async def _mirror(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        rid: bytes,
        delay: float,
    ) -> None:
        try:
            if delay:
                await asyncio.sleep(delay)
            response = await self.sender.send(method, path, body, headers, request_id=rid)
            answer = await read_body(response, self.max_body_bytes)
            log.info("mirror %s: %d, %d bytes", rid.decode(), response.status, len(answer))
        except asyncio.CancelledError:
            log.info("mirror %s: cancelled", rid.decode())
            raise


@dataclass(frozen=True)
class UncheckedConfig:
    upstream: str = req("an upstream name the loader does not check (no upstream=True)")


class MirrorUnchecked(Mirror):
    """Names its upstream in a field the loader does not check: only the build can say it is unknown."""

    Config = UncheckedConfig  # type: ignore[assignment]

    def __init__(self, config: UncheckedConfig, ctx: BuildContext) -> None:
        super().__init__(MirrorConfig(upstream=config.upstream), ctx)
