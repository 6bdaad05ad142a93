"""An open-loop load at a fixed rate, for the steady-rate rows (a sidecar mostly idle between requests).

wrk is closed-loop: it sends the next request when the last answer came, so it measures saturation.
A sidecar usually lives far below that, where every request is its own wake-up of the loop. This
client sends request *i* at ``start + i / rate`` whatever the answers do (open loop), on ``conns``
keep-alive connections in turn; a request whose connection is still busy at its time waits for it
and counts as late (the row says how many, so an overloaded run is visible, not hidden).

Runs in this process (the load CPU) on an event loop of its own; the caller reads the proxy's CPU
time before and after.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass

from bench.common import HOST, BenchError, request_bytes

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_CHUNKED_END = b"\r\n0\r\n\r\n"


@dataclass(frozen=True)
class SteadyResult:
    requests: int
    late: int  # sent after their scheduled time because their connection was still busy
    errors: int  # non-200 answers
    seconds: float


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes) -> bool:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    length = _LENGTH.search(head)
    if length is not None:
        await reader.readexactly(int(length.group(1)))
    else:  # chunked (a stream): read to the last chunk
        await reader.readuntil(_CHUNKED_END)
    return head.startswith(b"HTTP/1.1 200")


async def _run(port: int, raw: bytes, rate: float, seconds: float, conns: int) -> SteadyResult:
    streams = [await asyncio.open_connection(HOST, port) for _ in range(conns)]
    locks = [asyncio.Lock() for _ in range(conns)]
    total = int(rate * seconds)
    late = errors = 0
    loop = asyncio.get_running_loop()

    async def one(i: int, due: float) -> None:
        nonlocal late, errors
        lock = locks[i % conns]
        if lock.locked():
            late += 1
        async with lock:
            reader, writer = streams[i % conns]
            if not await asyncio.wait_for(_exchange(reader, writer, raw), 30):
                errors += 1

    start = loop.time()
    tasks = []
    for i in range(total):
        due = start + i / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    for _, writer in streams:
        writer.close()
    return SteadyResult(total, late, errors, elapsed)


def run_steady(
    port: int, rate: float, seconds: float, conns: int = 16, stream: bool = False, extra: str = ""
) -> SteadyResult:
    """``rate`` requests a second for ``seconds`` to 127.0.0.1:``port`` (non-streaming chat, or
    ``stream``: the 20-chunk stream 20 ms apart, as a model sends tokens)."""
    from bench.common import SHORT, STREAM

    body = STREAM if stream else SHORT
    headers = extra + ("x-mock-chunks: 20\r\nx-mock-delay-ms: 20\r\n" if stream else "")
    raw = request_bytes(port, body, headers)
    began = time.monotonic()
    try:
        return asyncio.run(_run(port, raw, rate, seconds, conns))
    except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        took = time.monotonic() - began
        raise BenchError(f"steady load to port {port} failed after {took:.1f} s: {e}") from e
