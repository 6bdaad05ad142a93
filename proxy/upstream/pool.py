"""A bounded pool of keep-alive HTTP/1.1 connections to one upstream.

The pool's decisions are synchronous (``_take_idle``, ``release``, ``discard``); only connecting
and waiting for a free slot await. Limits: ``max_connections`` open (idle ones included), ``max_pending``
waiters for ``pool_timeout_s``. Idle connections older than ``idle_timeout_s`` are
closed (keep it under the backend's own keep-alive timeout: uvicorn's default is 5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections import deque

from proxy.config import UpstreamConfig, parse_upstream_url
from proxy.errors import UpstreamClosed, UpstreamConnectError, UpstreamConnectTimeout, UpstreamUnavailable
from proxy.http import Request, Response
from proxy.upstream.base import connection_tokens, request_drop_set
from proxy.upstream.h1 import H1Connection

log = logging.getLogger("llm_sidecar.upstream")


class H1Pool:
    def __init__(self, name: str, cfg: UpstreamConfig, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.cfg = cfg
        self.loop = loop
        addr = parse_upstream_url(cfg.url)
        self._host = addr.host
        self._port = addr.port
        self._ssl: ssl.SSLContext | None = ssl.create_default_context() if addr.scheme == "https" else None
        self._prefix = addr.prefix
        auth = b"\r\nauthorization: Bearer " + cfg.api_key.encode() if cfg.api_key else b""
        # The request line's end, host and our credential: " HTTP/1.1\r\nhost: ...[\r\nauthorization: ...]"
        self._after_target = b" HTTP/1.1\r\nhost: " + addr.host_header + auth
        self._drop = request_drop_set(bool(cfg.api_key))
        self._idle: deque[H1Connection] = deque()
        self._waiters: deque[asyncio.Future[H1Connection | None]] = deque()
        self._open = 0  # connected or connecting
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    # -- the seam: proxy.upstream.base.Upstream ----------------------------------------------------
    async def send(self, request: Request, body: bytes) -> Response:
        data = self._serialize(request, body)
        head_only = request.method == "HEAD"
        for attempt in (0, 1):
            now = self.loop.time()
            conn = self._take_idle(now)  # no coroutine when one is idle
            if conn is None:
                conn = await self._acquire()
                now = self.loop.time()
            try:
                waiter = conn.start(data, head_only, now)
                try:
                    return await waiter
                except asyncio.CancelledError:
                    conn.cancel(waiter)
                    raise
            except UpstreamClosed as e:
                if e.stale and attempt == 0:
                    # A keep-alive connection the upstream had closed: it never saw this request.
                    # Its idle siblings are likely dead too (backend restart): drop them, retry once.
                    self._drop_idle()
                    continue
                raise
        raise AssertionError("unreachable")

    def stats(self) -> dict[str, int]:
        return {"open": self._open, "idle": len(self._idle), "pending": len(self._waiters)}

    async def close(self) -> None:
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._drop_idle()
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_exception(UpstreamUnavailable(f"upstream {self.name!r} is shutting down"))

    def _drop_idle(self) -> None:
        while self._idle:
            self._idle.pop().abort()

    # -- request serialization ---------------------------------------------------------------------
    def _serialize(self, request: Request, body: bytes) -> bytes:
        drop = self._drop
        headers = request.headers
        method = request.method
        lines = [method.encode() + b" " + self._prefix + request.raw_target + self._after_target]
        for kv in headers:
            if kv[0] not in drop:
                lines.append(b": ".join(kv))
            elif kv[0] == b"connection":  # rare: the names it lists are hop-by-hop too
                drop = drop | connection_tokens(headers)
                lines[1:] = [b": ".join(kv) for kv in headers if kv[0] not in drop]
                break
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(b"content-length: %d\r\n" % len(body))
            lines.append(body)  # joined: the CRLF of the line above, then the empty line's, the body
        else:
            lines.append(b"\r\n")  # joined: the last line's CRLF, then the empty line's
        return b"\r\n".join(lines)

    # -- pool decisions ----------------------------------------------------------------------------
    async def _acquire(self) -> H1Connection:
        conn = self._take_idle(self.loop.time())
        if conn is not None:
            return conn
        if self._open < self.cfg.max_connections:
            self._open += 1
            return await self._connect()
        if len(self._waiters) >= self.cfg.max_pending:
            raise UpstreamUnavailable(f"upstream {self.name!r} is saturated: too many requests waiting")
        waiter: asyncio.Future[H1Connection | None] = self.loop.create_future()
        self._waiters.append(waiter)
        timer = self.loop.call_later(self.cfg.pool_timeout_s, _expire, waiter)
        try:
            got = await waiter
        except BaseException as e:
            self._abandon(waiter)
            if isinstance(e, asyncio.TimeoutError):
                raise UpstreamUnavailable(
                    f"no connection to upstream {self.name!r} became free "
                    f"within {self.cfg.pool_timeout_s:g} s"
                ) from None
            raise
        finally:
            timer.cancel()
        if got is None:  # a connection closed and its slot was handed to us: open a new one
            return await self._connect()
        return got

    def _abandon(self, waiter: asyncio.Future[H1Connection | None]) -> None:
        """A waiter leaves (timeout, client gone): give back whatever it was handed meanwhile."""
        if not waiter.done() or waiter.cancelled():
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)
            return
        if waiter.exception() is not None:
            return
        got = waiter.result()
        if got is None:
            self._open -= 1
            self._hand_slot()
        else:
            self.release(got)

    def _take_idle(self, now: float) -> H1Connection | None:
        idle = self._idle
        deadline = now - self.cfg.idle_timeout_s
        while idle:
            conn = idle.pop()  # most recently used first: the warmest
            if not conn.closed and conn.idle_since >= deadline:
                return conn
            conn.abort()
        return None

    def release(self, conn: H1Connection) -> None:
        """The connection finished an exchange cleanly and may be reused."""
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                w.set_result(conn)
                return
        if self._closing:
            conn.abort()
            return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.cfg.idle_timeout_s + 0.1, self._sweep)

    def discard(self, conn: H1Connection) -> None:
        """The connection is closed (by us or the peer)."""
        self._open -= 1
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._hand_slot()

    def _hand_slot(self) -> None:
        """A connection slot is free: give it to the first waiter, which will connect."""
        if self._closing:
            return
        while self._waiters:
            w = self._waiters.popleft()
            if not w.done():
                self._open += 1
                w.set_result(None)
                return

    def _sweep(self) -> None:
        """Close idle connections past idle_timeout_s, so we never reuse one the backend dropped."""
        self._sweeper = None
        deadline = self.loop.time() - self.cfg.idle_timeout_s
        while self._idle and self._idle[0].idle_since < deadline:
            self._idle.popleft().abort()
        if self._idle:
            self._sweeper = self.loop.call_later(self.cfg.idle_timeout_s / 2 + 0.1, self._sweep)

    async def _connect(self) -> H1Connection:
        """Open a new connection. The caller already holds the slot (``_open`` counts it)."""
        conn = H1Connection(self, self.loop)
        try:
            await asyncio.wait_for(
                self.loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl else None,
                ),
                self.cfg.connect_timeout_s,
            )
        except TimeoutError:
            self._connect_failed(conn)
            raise UpstreamConnectTimeout(f"connecting to upstream {self.name!r} timed out") from None
        except (OSError, ssl.SSLError) as e:
            self._connect_failed(conn)
            log.warning("cannot connect to upstream %s (%s:%d): %s", self.name, self._host, self._port, e)
            reason = e.strerror or type(e).__name__ if isinstance(e, OSError) else type(e).__name__
            raise UpstreamConnectError(f"upstream {self.name!r} is unreachable ({reason})") from None
        except BaseException:
            self._connect_failed(conn)
            raise
        return conn

    def _connect_failed(self, conn: H1Connection) -> None:
        conn.closed = True
        self.discard(conn)


def _expire(waiter: asyncio.Future[H1Connection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
