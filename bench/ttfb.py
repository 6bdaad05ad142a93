"""Time to the first byte of a stream: an asyncio client on one keep-alive connection per server.

``first_byte_times`` times streams one at a time, the servers taking turns, from writing the request
to the first byte of the SSE body (``x-mock-chunks: 2``, ``x-mock-delay-ms: 2``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httptools

from bench.common import HOST, STREAM, TTFB_KNOBS, BenchError, request_bytes


class FirstByteClient(asyncio.Protocol):
    """One keep-alive connection; ``request`` sends ``raw`` and times the first byte of the body."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.received_ns = 0
        self.first_body_ns: int | None = None
        self.done: asyncio.Future[int] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        self.received_ns = time.perf_counter_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._finish(BenchError(f"bad HTTP response: {e}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionError("the server closed the connection"))

    def on_body(self, body: bytes) -> None:  # httptools callback
        if self.first_body_ns is None:
            self.first_body_ns = self.received_ns

    def on_message_complete(self) -> None:  # httptools callback
        self._finish(int(self.parser.get_status_code()))

    def _finish(self, outcome: int | BaseException) -> None:
        if self.done is None or self.done.done():
            return
        if isinstance(outcome, BaseException):
            self.done.set_exception(outcome)
        else:
            self.done.set_result(outcome)

    async def request(self) -> float:
        """Milliseconds from writing the request to the first byte of the response body."""
        assert self.transport is not None
        self.first_body_ns, self.done = None, asyncio.get_running_loop().create_future()
        sent = time.perf_counter_ns()
        self.transport.write(self.raw)
        status = await asyncio.wait_for(self.done, 10)
        if status != 200 or self.first_body_ns is None:
            raise BenchError(f"a stream was answered with {status} and no body")
        return (self.first_body_ns - sent) / 1e6


async def connect_first_byte_client(port: int) -> FirstByteClient:
    raw = request_bytes(port, STREAM, "".join(f"{k}: {v}\r\n" for k, v in TTFB_KNOBS))
    loop = asyncio.get_running_loop()
    _, client = await loop.create_connection(lambda: FirstByteClient(raw), HOST, port)
    return client


async def first_byte_times(ports: Sequence[int], count: int, rounds: int = 10) -> list[list[float]]:
    """``count`` streams per server, one at a time, the servers taking turns in ``rounds`` rounds.

    Taking turns spreads drift (CPU frequency, noisy neighbours) evenly over the servers, so the
    difference of their medians is the proxy's own. 20 untimed streams per server come first.
    """
    clients: list[FirstByteClient] = []
    try:
        for port in ports:
            clients.append(await connect_first_byte_client(port))
        for client in clients:
            for _ in range(20):
                await client.request()
        times: list[list[float]] = [[] for _ in clients]
        for turn in range(rounds):
            share = count * (turn + 1) // rounds - count * turn // rounds
            for client, out in zip(clients, times, strict=True):
                out += [await client.request() for _ in range(share)]
        return times
    finally:
        for client in clients:
            if client.transport is not None:
                client.transport.close()
