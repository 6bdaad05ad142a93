"""The pool for an upstream, by its ``protocol``; and ``auto`` on TLS, which lets ALPN choose."""

from __future__ import annotations

import asyncio
import logging

from proxy.config import UpstreamConfig, parse_upstream_url
from proxy.http import Request, Response
from proxy.upstream.base import Upstream
from proxy.upstream.h2_pool import AlpnDeclined, H2Pool
from proxy.upstream.pool import H1Pool

log = logging.getLogger("llm_sidecar.upstream")


def make_upstream(name: str, cfg: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> Upstream:
    """``http1`` (and ``auto`` on cleartext): H1Pool; ``h2c`` / ``h2``: H2Pool; ``auto`` on https:
    an :class:`AlpnPool`."""
    tls = parse_upstream_url(cfg.url).scheme == "https"
    if cfg.protocol == "http1" or (cfg.protocol == "auto" and not tls):
        return H1Pool(name, cfg, loop)
    if cfg.protocol == "auto":
        return AlpnPool(name, cfg, loop)
    return H2Pool(name, cfg, loop)


class AlpnPool:
    """``protocol: auto`` on https: offer h2 and http/1.1 in ALPN; the upstream's first answer
    decides, for the life of the process, between an HTTP/2 and an HTTP/1.1 pool."""

    def __init__(self, name: str, cfg: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self._h2 = H2Pool(name, cfg, loop, alpn=("h2", "http/1.1"))
        self._h1 = H1Pool(name, cfg, loop)
        self._chosen: Upstream | None = None

    async def send(self, request: Request, body: bytes) -> Response:
        chosen = self._chosen
        if chosen is not None:
            return await chosen.send(request, body)
        try:
            response = await self._h2.send(request, body)
        except AlpnDeclined:
            if self._chosen is None:
                log.info("upstream %s: ALPN chose http1", self.name)
                self._chosen = self._h1
            return await self._h1.send(request, body)
        if self._chosen is None:
            log.info("upstream %s: ALPN chose h2", self.name)
            self._chosen = self._h2
        return response

    @property
    def protocol(self) -> str:
        """What ALPN chose so far: ``h2``, ``http1``, or ``auto`` before the first connection."""
        return "h2" if self._chosen is self._h2 else "http1" if self._chosen is self._h1 else "auto"

    def stats(self) -> dict[str, int]:
        return (self._chosen or self._h2).stats()

    async def close(self) -> None:
        await self._h2.close()
        await self._h1.close()
