"""A pool of multiplexed HTTP/2 connections to one upstream (``protocol: h2c | h2``).

Many requests share few connections: a request takes a stream slot on the first open connection
below the peer's SETTINGS_MAX_CONCURRENT_STREAMS; a new connection opens only when every one is
full, up to ``max_connections``; beyond that requests wait (``max_pending``, ``pool_timeout_s`` →
503). The decisions are synchronous (``_take_slot``, ``stream_done``, ``_serve_waiters``); only
connecting and waiting await. A stream the upstream never processed (GOAWAY above it,
REFUSED_STREAM, a dropped idle connection) is sent again on another connection, at most
``MAX_ATTEMPTS`` times in all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque

from proxy.config import UpstreamConfig, parse_upstream_url
from proxy.errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamProtocolError,
    UpstreamUnavailable,
)
from proxy.http import Request, Response
from proxy.upstream.base import connection_tokens, request_drop_set
from proxy.upstream.h2_conn import H2UpstreamConnection, Retry

log = logging.getLogger("llm_sidecar.upstream")

MAX_ATTEMPTS = 3


class AlpnDeclined(UpstreamProtocolError):
    """TLS came up, but the upstream did not choose h2 in ALPN."""


class H2Pool:
    def __init__(
        self,
        name: str,
        cfg: UpstreamConfig,
        loop: asyncio.AbstractEventLoop,
        alpn: tuple[str, ...] = ("h2",),
    ) -> None:
        self.name = name
        self.cfg = cfg
        self.loop = loop
        addr = parse_upstream_url(cfg.url)
        self._host = addr.host
        self._port = addr.port
        self._ssl: ssl.SSLContext | None = None
        if addr.scheme == "https":
            self._ssl = ssl.create_default_context()
            self._ssl.set_alpn_protocols(list(alpn))
        self._pseudo = [(b":scheme", addr.scheme.encode()), (b":authority", addr.host_header)]
        self._prefix = addr.prefix
        self._auth = [(b"authorization", b"Bearer " + cfg.api_key.encode())] if cfg.api_key else []
        self._drop = request_drop_set(bool(cfg.api_key))
        self._conns: list[H2UpstreamConnection] = []  # connecting or open, in opening order
        self._waiters: deque[asyncio.Future[H2UpstreamConnection]] = deque()
        self._connecting: set[asyncio.Task[None]] = set()
        self._closing = False
        self.opened = 0  # connections opened in all (a stat)

    # -- the seam: proxy.upstream.base.Upstream ----------------------------------------------------
    async def send(self, request: Request, body: bytes) -> Response:
        headers = self._headers(request, body)
        for _ in range(MAX_ATTEMPTS):
            conn = await self._acquire()
            try:
                status, response_headers, response_body = await conn.request(headers, body)
            except Retry:
                continue
            return Response(status, response_headers, response_body)
        raise UpstreamUnavailable(
            f"upstream {self.name!r} refused the request {MAX_ATTEMPTS} times "
            "(HTTP/2 GOAWAY or REFUSED_STREAM)"
        )

    def stats(self) -> dict[str, int]:
        return {
            "open": len(self._conns),
            "streams": sum(c.active for c in self._conns),
            "pending": len(self._waiters),
            "opened": self.opened,
        }

    async def close(self) -> None:
        self._closing = True
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(UpstreamUnavailable(f"upstream {self.name!r} is shutting down"))
        for conn in list(self._conns):
            conn.goaway = True
            if not conn.streams:
                conn.close()

    # -- request headers ---------------------------------------------------------------------------
    def _headers(self, request: Request, body: bytes) -> list[tuple[bytes, bytes]]:
        drop = self._drop
        headers = request.headers
        if b"connection" in (k for k, _ in headers):
            drop = drop | connection_tokens(headers)
        path = self._prefix + request.raw_target
        out = [(b":method", request.method.encode()), *self._pseudo, (b":path", path)]
        out.extend(self._auth)
        out.extend(kv for kv in headers if kv[0] not in drop)
        if body or request.method in ("POST", "PUT", "PATCH"):
            out.append((b"content-length", b"%d" % len(body)))
        return out

    # -- pool decisions ----------------------------------------------------------------------------
    async def _acquire(self) -> H2UpstreamConnection:
        """A connection with a stream slot reserved for the caller (``stream_done`` frees it)."""
        while True:
            conn = self._take_slot()
            if conn is None:
                conn = await self._wait()
            if not conn.ready.done():
                try:
                    await asyncio.shield(conn.ready)
                except asyncio.CancelledError:
                    self.stream_done(conn)
                    raise
            exc = conn.ready.exception()
            if exc is not None:
                raise exc
            if conn.active <= conn.capacity:
                return conn
            self.stream_done(conn)  # its SETTINGS allow fewer streams than were counted on it

    def _take_slot(self) -> H2UpstreamConnection | None:
        for conn in self._conns:
            if not conn.goaway and conn.active < conn.capacity:
                conn.active += 1
                return conn
        if len(self._conns) < self.cfg.max_connections and not self._closing:
            conn = self._open()
            conn.active += 1
            return conn
        return None

    async def _wait(self) -> H2UpstreamConnection:
        if len(self._waiters) >= self.cfg.max_pending:
            raise UpstreamUnavailable(f"upstream {self.name!r} is saturated: too many requests waiting")
        waiter: asyncio.Future[H2UpstreamConnection] = self.loop.create_future()
        self._waiters.append(waiter)
        timer = self.loop.call_later(self.cfg.pool_timeout_s, _expire, waiter)
        try:
            return await waiter
        except BaseException as e:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.stream_done(waiter.result())  # handed a slot as we left: give it back
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            if isinstance(e, TimeoutError):
                raise UpstreamUnavailable(
                    f"no HTTP/2 stream to upstream {self.name!r} became free "
                    f"within {self.cfg.pool_timeout_s:g} s"
                ) from None
            raise
        finally:
            timer.cancel()

    def _serve_waiters(self) -> None:
        waiters = self._waiters
        while waiters:
            while waiters and waiters[0].done():
                waiters.popleft()
            if not waiters:
                return
            conn = self._take_slot()
            if conn is None:
                return
            waiters.popleft().set_result(conn)

    # -- called by the connections -----------------------------------------------------------------
    def stream_done(self, conn: H2UpstreamConnection) -> None:
        """A slot on ``conn`` is free (its stream is over, or a reservation was given back)."""
        conn.active -= 1
        if conn.closed:
            return
        if conn.goaway:
            if conn.active <= 0 and not conn.streams:
                conn.close()
            return
        if self._waiters:
            self._serve_waiters()
        if conn.active == 0:
            conn.became_idle()

    def capacity_changed(self, conn: H2UpstreamConnection) -> None:
        if self._waiters:
            self._serve_waiters()

    def went_away(self, conn: H2UpstreamConnection) -> None:
        if self._waiters:
            self._serve_waiters()

    def connection_lost(self, conn: H2UpstreamConnection) -> None:
        with contextlib.suppress(ValueError):
            self._conns.remove(conn)
        if self._waiters:
            self._serve_waiters()

    # -- connecting ----------------------------------------------------------------------------------
    def _open(self) -> H2UpstreamConnection:
        conn = H2UpstreamConnection(self, self.loop)
        self._conns.append(conn)
        self.opened += 1
        task = self.loop.create_task(self._connect(conn))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)
        return conn

    async def _connect(self, conn: H2UpstreamConnection) -> None:
        timeout = self.cfg.connect_timeout_s
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                timeout,
            )
        except TimeoutError:
            conn.close_for(UpstreamConnectTimeout(f"connecting to upstream {self.name!r} timed out"))
            return
        except (OSError, ssl.SSLError) as e:
            log.warning("cannot connect to upstream %s (%s:%d): %s", self.name, self._host, self._port, e)
            reason = e.strerror or type(e).__name__ if isinstance(e, OSError) else type(e).__name__
            conn.close_for(UpstreamConnectError(f"upstream {self.name!r} is unreachable ({reason})"))
            return
        if conn.closed:
            return
        if self._ssl is not None and conn.transport is not None:
            ssl_object = conn.transport.get_extra_info("ssl_object")
            chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            if chosen != "h2":
                conn.close_for(
                    AlpnDeclined(
                        f"upstream {self.name!r} does not speak HTTP/2 over TLS (ALPN chose {chosen!r}); "
                        "set its protocol to http1 or auto"
                    )
                )
                return
        conn.start_timer()
        # The connection is ready once the peer's SETTINGS arrive (its stream limit); bound that.
        self.loop.call_later(timeout, _no_settings, conn, self.name)


def _no_settings(conn: H2UpstreamConnection, name: str) -> None:
    if not conn.ready.done():
        conn.close_for(UpstreamProtocolError(f"upstream {name!r} sent no HTTP/2 SETTINGS (is it HTTP/2?)"))


def _expire(waiter: asyncio.Future[H2UpstreamConnection]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
