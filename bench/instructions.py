"""User-space instructions per request of the sidecar, counted by callgrind: a figure that does not
move with the machine's load, for before/after comparisons of hot-path changes on a busy machine.

    python -m bench.instructions [--middleware off|rate_limit] [--conns 8] [--requests 1000] [--out F]
                                 [--extra 'admin: {enabled: false}']

Starts the mock (CPU 0) and one sidecar under ``valgrind --tool=callgrind --instr-atstart=no`` (CPU
1; with ``rate_limit``: the ``auth`` + Redis ``rate_limit`` of bench/ratelimit.py, against the Redis
it finds, deadline raised to 5 s as valgrind is slow), sends 400 warm-up requests, switches counting
on (``callgrind_control -i on``), sends ``--requests`` non-streaming chat completions over
``--conns`` keep-alive connections (a small asyncio client), switches it off and divides. Kernel
time (system calls) is not in the count, and valgrind's slowness changes how calls batch (fewer
requests share a Redis round trip than at full speed): compare figures of this tool with each other.
Seen on the final code of issue 5's work (8 conns): 133k without middleware, 288k with auth + Redis
rate_limit (407k before it). Needs valgrind (apt-get install valgrind).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from bench.common import HOST, SHORT, BenchError, request_bytes, say
from bench.procs import Children
from bench.ratelimit import API_KEY, MIDDLEWARE, find_redis
from bench.servers import SIDECAR_CONFIG, listening_url, start_mock

_LENGTH = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
_TOTALS = re.compile(r"^totals: (\d+)", re.M)


async def _client(port: int, count: int, raw: bytes) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        for _ in range(count):
            writer.write(raw)
            head = await reader.readuntil(b"\r\n\r\n")
            length = _LENGTH.search(head)
            if not head.startswith(b"HTTP/1.1 200") or length is None:
                raise BenchError(f"the sidecar answered {head[:200]!r}")
            await reader.readexactly(int(length.group(1)))
    finally:
        writer.close()


async def _load(port: int, requests: int, conns: int) -> None:
    raw = request_bytes(port, SHORT, f"Authorization: Bearer {API_KEY}\r\n")
    await asyncio.gather(*(_client(port, requests // conns, raw) for _ in range(conns)))


def count(middleware: str, conns: int, requests: int, keep: Path | None = None, extra: str = "") -> float:
    """Instructions per request of one sidecar (see the module docstring)."""
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise BenchError("valgrind is needed: apt-get install -y valgrind")
    with tempfile.TemporaryDirectory(prefix="llm-sidecar-cg-") as tmp, Children(Path(tmp)) as children:
        workdir = Path(tmp)
        os.sched_setaffinity(0, {0})
        mock = start_mock(children, 0)
        config = SIDECAR_CONFIG.format(host=HOST, upstream=mock.url)
        if middleware == "rate_limit":
            redis_url, _ = find_redis(children, workdir, 0)
            prefix = f"llm-sidecar-cg:{uuid.uuid4().hex[:8]}:"
            config += MIDDLEWARE.format(key=API_KEY, url=redis_url, prefix=prefix).replace(
                "key_prefix:", "timeout_ms: 5000, key_prefix:"
            )
        (workdir / "sidecar.yaml").write_text(config + extra + "\n")
        out = workdir / "callgrind.out"
        argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        argv += [sys.executable, "-m", "proxy", "--config", str(workdir / "sidecar.yaml")]
        proc = children.start("sidecar", argv, 1)
        deadline = time.monotonic() + 120  # valgrind starts Python slowly
        while (listening := listening_url(children.log("sidecar"))) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BenchError(f"the sidecar under valgrind did not start:\n{children.log('sidecar')}")
            time.sleep(0.2)
        port = int(listening.rsplit(":", 1)[1])
        asyncio.run(_load(port, 400, conns))
        subprocess.run(["callgrind_control", "-i", "on", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_load(port, requests, conns))
        subprocess.run(["callgrind_control", "-i", "off", str(proc.pid)], check=True, capture_output=True)
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        if keep is not None:
            shutil.copyfile(out, keep)
        found = _TOTALS.search(out.read_text(errors="replace"))
        if found is None:
            raise BenchError("callgrind wrote no totals")
        return int(found.group(1)) / (requests // conns * conns)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__.splitlines()[0])
    p.add_argument("--middleware", choices=("off", "rate_limit"), default="rate_limit")
    p.add_argument("--conns", type=int, default=8)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--out", type=Path, help="keep callgrind's output here (for callgrind_annotate)")
    p.add_argument("--extra", default="", help="YAML appended to the sidecar's config (top-level keys)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        per_request = count(args.middleware, args.conns, args.requests, args.out, args.extra)
    except (BenchError, OSError, subprocess.SubprocessError) as e:
        say(f"failed: {e}")
        return 1
    print(f"{args.middleware}, {args.conns} conns: {per_request:,.0f} instructions/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
