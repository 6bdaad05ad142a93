"""A TCP fault proxy for integration tests: put it between the sidecar and a backend.

It runs its own asyncio event loop in a background thread, so sync tests (the openai SDK) can use it::

    with MockProcess() as mock, FaultProxy(("127.0.0.1", mock.port)) as fp:
        config = minimal_config(fp.url)             # the sidecar talks to fp.url, not mock.url
        fp.set(mode="reset")                        # every connection and request: TCP RST
        fp.set(mode="pass", reset_ratio=0.05, seed=7)
        assert fp.stats()["forwarded"] == mock.stats()["requests"]

Modes (``set(mode=...)``; the other settings keep their values unless given):

- ``pass``: forward both ways (re-listens on the same port after ``refuse``).
- ``reset``: a new connection is answered with a TCP RST (SO_LINGER 0, then close) at once; a request
  on an open connection too, before any byte of it goes upstream.
- ``refuse``: the listening socket is closed (connects get ECONNREFUSED) and every open connection
  is reset, as when the backend's process dies.
- ``blackhole``: accept and read, never forward and never answer (upstream bytes are dropped too).
- ``delay``: wait ``delay_s`` before forwarding each upstream→client chunk.
- ``drip``: send upstream→client bytes ``drip_bytes`` at a time, ``drip_gap_s`` apart.
- ``truncate``: forward only the first ``truncate_bytes`` of each response (the upstream bytes after
  the latest request), then close both connections (FIN, not RST).

A client's EOF closes both connections (no half-close), so a client that goes away is seen upstream
at once.

``reset_ratio`` (with ``seed``) applies in every mode that forwards: each client→upstream chunk is,
with that seeded probability, answered by resetting the client connection instead of being forwarded,
so that request never reaches the backend. A client that writes one whole request per ``write``
(the sidecar's keep-alive pool does) makes a chunk one request.

:meth:`FaultProxy.stats` counts ``connections`` (accepted), ``open`` (now), ``requests`` (client→upstream
chunks seen), ``forwarded`` (of those, sent upstream), ``resets`` (RSTs sent to clients: ``reset`` mode,
``reset_ratio``, ``refuse``), ``upstream_connects``, ``upstream_errors`` (connects that failed: the
client gets an RST), ``truncated`` (responses cut). Buffers are bounded (one chunk of ``chunk_size``
per direction, with backpressure); :meth:`stop` (or leaving the ``with``) closes every socket and
ends the thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections.abc import Coroutine
from dataclasses import asdict, dataclass, field, replace
from types import TracebackType
from typing import Any, Literal, TypeVar, get_args

import uvloop

Mode = Literal["pass", "reset", "blackhole", "delay", "drip", "truncate", "refuse"]
MODES: tuple[str, ...] = get_args(Mode)
T = TypeVar("T")
_CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Settings:
    """What the proxy does now; :meth:`FaultProxy.set` replaces it field by field."""

    mode: Mode = "pass"
    delay_s: float = 0.1
    drip_bytes: int = 8
    drip_gap_s: float = 0.01
    truncate_bytes: int = 0
    reset_ratio: float = 0.0


@dataclass(slots=True)
class Counters:
    """What :meth:`FaultProxy.stats` returns, field by field (see the module docstring)."""

    connections: int = 0
    open: int = 0
    requests: int = 0
    forwarded: int = 0
    resets: int = 0
    upstream_connects: int = 0
    upstream_errors: int = 0
    truncated: int = 0


@dataclass(eq=False)
class _Conn:
    """One client connection and, once a request is forwarded, its upstream connection."""

    writer: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    pump: asyncio.Task[None] | None = None
    budget: int = 0  # truncate: response bytes still to forward
    done: asyncio.Event = field(default_factory=asyncio.Event)


class FaultProxy:
    """A fault-injecting TCP proxy on ``host`` (port 0: a free one) in front of ``target``."""

    def __init__(
        self, target: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0, chunk_size: int = 65536
    ) -> None:
        self.target = target
        self.host = host
        self.chunk_size = chunk_size
        self._port = port
        self._settings = Settings()
        self._rng = random.Random(0)
        self._counters = Counters()
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle (any thread) -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._thread is not None:
            raise RuntimeError("fault proxy already started")
        loop = uvloop.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        try:
            self._call(self._listen())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Close the listener and every connection, then end the loop and its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(_CALL_TIMEOUT_S)
            loop.close()
            self._loop = self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # ---- addresses and control (any thread) -------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("fault proxy not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://HOST:PORT`` of the proxy, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    def set(
        self,
        *,
        mode: Mode | None = None,
        delay_s: float | None = None,
        drip_bytes: int | None = None,
        drip_gap_s: float | None = None,
        truncate_bytes: int | None = None,
        reset_ratio: float | None = None,
        seed: int | None = None,
    ) -> None:
        """Change the given settings (the others stay); ``seed`` restarts the ``reset_ratio`` rolls."""
        if mode is not None and mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if reset_ratio is not None and not 0 <= reset_ratio <= 1:
            raise ValueError(f"reset_ratio: expected 0..1, got {reset_ratio}")
        if drip_bytes is not None and drip_bytes < 1:
            raise ValueError(f"drip_bytes: expected >= 1, got {drip_bytes}")
        given = {
            "mode": mode,
            "delay_s": delay_s,
            "drip_bytes": drip_bytes,
            "drip_gap_s": drip_gap_s,
            "truncate_bytes": truncate_bytes,
            "reset_ratio": reset_ratio,
        }
        changes: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
        self._call(self._apply(replace(self._settings, **changes), seed))

    @property
    def settings(self) -> Settings:
        return self._settings

    def stats(self) -> dict[str, int]:
        """The counters (see the module docstring), as a new dict."""
        return self._call(self._snapshot())

    def reset_stats(self) -> None:
        self._call(self._zero())

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("fault proxy not started")
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CALL_TIMEOUT_S)

    # ---- the loop's side --------------------------------------------------------------------------

    async def _snapshot(self) -> dict[str, int]:
        return asdict(self._counters)

    async def _zero(self) -> None:
        self._counters = Counters(open=self._counters.open)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._accept, self.host, self._port, reuse_address=True, limit=self.chunk_size
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _apply(self, settings: Settings, seed: int | None) -> None:
        if seed is not None:
            self._rng = random.Random(seed)
        self._settings = settings
        if settings.mode == "refuse":
            if self._server is not None:
                self._server.close()  # closes the listening socket now; connections are ours to end
                self._server = None
            for conn in list(self._conns):
                self._rst(conn)
        elif self._server is None:
            await self._listen()

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for _ in range(3):  # handlers of connections accepted just now start (and can be cancelled)
            await asyncio.sleep(0)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0)  # let the transports' connection_lost callbacks run

    def _rst(self, conn: _Conn) -> None:
        """Reset the client connection (SO_LINGER 0, then close) and drop the upstream one."""
        if conn.done.is_set():
            return
        self._counters.resets += 1
        sock = conn.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.writer.transport.abort()
        self._finish(conn)

    def _finish(self, conn: _Conn) -> None:
        """Close both sides (FIN where not already reset); idempotent."""
        if conn.done.is_set():
            return
        conn.done.set()
        if not conn.writer.transport.is_closing():
            conn.writer.close()
        if conn.upstream is not None:
            conn.upstream.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn(writer)
        self._conns.add(conn)
        self._counters.connections += 1
        self._counters.open += 1
        try:
            if self._settings.mode in ("reset", "refuse"):
                self._rst(conn)
                return
            await self._client_to_upstream(conn, reader)
        except (ConnectionError, OSError):
            pass
        finally:
            self._finish(conn)
            if conn.pump is not None:
                conn.pump.cancel()
                await asyncio.gather(conn.pump, return_exceptions=True)
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()
            self._conns.discard(conn)
            self._counters.open -= 1
            self._tasks.discard(task)

    async def _client_to_upstream(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        while not conn.done.is_set():
            data = await reader.read(self.chunk_size)
            if not data or conn.done.is_set():
                break
            self._counters.requests += 1
            s = self._settings
            if s.mode in ("reset", "refuse") or (s.reset_ratio > 0 and self._rng.random() < s.reset_ratio):
                self._rst(conn)
                return
            if s.mode == "blackhole":
                continue
            if conn.upstream is None and not await self._connect(conn):
                return
            assert conn.upstream is not None
            conn.budget = s.truncate_bytes
            conn.upstream.write(data)
            self._counters.forwarded += 1
            await conn.upstream.drain()

    async def _connect(self, conn: _Conn) -> bool:
        try:
            up_reader, conn.upstream = await asyncio.open_connection(*self.target, limit=self.chunk_size)
        except OSError:
            self._counters.upstream_errors += 1
            self._rst(conn)
            return False
        self._counters.upstream_connects += 1
        conn.pump = asyncio.get_running_loop().create_task(self._upstream_to_client(conn, up_reader))
        return True

    async def _upstream_to_client(self, conn: _Conn, reader: asyncio.StreamReader) -> None:
        try:
            while not conn.done.is_set():
                data = await reader.read(self.chunk_size)
                if not data:
                    break
                s = self._settings
                if s.mode == "blackhole":
                    continue
                cut = s.mode == "truncate" and len(data) >= conn.budget
                if s.mode == "truncate":
                    data, conn.budget = data[: conn.budget], max(0, conn.budget - len(data))
                if s.mode == "delay":
                    await asyncio.sleep(s.delay_s)
                await self._send(conn, data, s)
                if cut:
                    self._counters.truncated += 1
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            self._finish(conn)  # upstream closed (or the response was cut): close the client

    async def _send(self, conn: _Conn, data: bytes, s: Settings) -> None:
        if s.mode != "drip":
            if data:
                conn.writer.write(data)
                await conn.writer.drain()
            return
        for at in range(0, len(data), s.drip_bytes):
            if at:
                await asyncio.sleep(s.drip_gap_s)
            conn.writer.write(data[at : at + s.drip_bytes])
            await conn.writer.drain()
