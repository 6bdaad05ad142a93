"""``log.access_log: true``: one log line per request that reached the chain, at its response head.

``<request id> <client> "<METHOD> <path>" <status> <target> <ms>`` where ``<target>`` is the
``upstream/model`` that served it (``-`` when answered by the sidecar) and ``<ms>`` the time from
the complete request to the response head (for a stream: time to first byte, not its length).
Errors raised down the chain are logged with their status, then re-raised for the front to answer.
Requests the front rejects before the chain (malformed, oversize, timeouts) are not logged here.
"""

from __future__ import annotations

import logging

from proxy.chain import Handler
from proxy.clock import Clock
from proxy.errors import ProxyError
from proxy.http import Request, Response

log = logging.getLogger("llm_sidecar.access")


class AccessLog:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    async def __call__(self, request: Request, next: Handler) -> Response:
        try:
            response = await next(request)
        except ProxyError as e:
            self._line(request, e.status)
            raise
        except Exception:
            self._line(request, 500)
            raise
        self._line(request, response.status)
        return response

    def _line(self, request: Request, status: int) -> None:
        ctx = request.ctx
        target = ctx.target
        served_by = f"{target.upstream}/{target.model}" if target is not None else "-"
        ms = (self.clock.now() - ctx.started) * 1000
        log.info(
            '%s %s "%s %s" %d %s %.1fms',
            ctx.request_id.decode(),
            ctx.client,
            request.method,
            request.path,
            status,
            served_by,
            ms,
        )
