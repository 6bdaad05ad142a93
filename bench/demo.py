"""``make run``: the bundled mock backend and the sidecar in front of it, until Ctrl-C.

``python -m bench.demo [--config config.yaml] [--mock-port 8001]`` starts ``bench.mock_backend``
on the mock port (the port ``config.yaml``'s ``mock`` upstream points at), then ``llm-sidecar``
with the config, prints a curl line and an openai SDK snippet to try, and forwards Ctrl-C /
SIGTERM to both. The exit status is the sidecar's.
"""

from __future__ import annotations

import argparse
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections import deque
from pathlib import Path
from types import FrameType

READY = re.compile(r"listening on (http://\S+?)[\s|]")
TAIL_LINES = 12  # of a process that exits before it is ready: enough for a traceback's last frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--mock-port", type=int, default=8001)
    args = parser.parse_args(argv)
    if not Path(args.config).exists():
        print(f"no config file at {args.config}", file=sys.stderr)
        return 2
    mock = subprocess.Popen(
        [sys.executable, "-m", "bench.mock_backend", "--host", "127.0.0.1", "--port", str(args.mock_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    sidecar: subprocess.Popen[bytes] | None = None
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        mock_url = _wait_ready(mock, "mock backend", echo=False)
        print(f"mock backend: {mock_url}  (python -m bench.mock_backend)", flush=True)
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "proxy", "--config", args.config],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        url = _wait_ready(sidecar, "llm-sidecar", echo=True)
        _print_try(url)
        assert sidecar.stdout is not None
        for line in iter(sidecar.stdout.readline, b""):
            sys.stdout.write(line.decode(errors="replace"))
            sys.stdout.flush()
        return sidecar.wait()
    except KeyboardInterrupt:
        return 0
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        for proc in (sidecar, mock):
            _stop(proc)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _wait_ready(proc: subprocess.Popen[bytes], name: str, *, echo: bool, timeout: float = 15.0) -> str:
    """Read ``proc``'s output until it says where it listens; return that URL.

    Raises RuntimeError when it exits or times out first, with its last lines (the reason, e.g. an
    address already in use) unless they were echoed already."""
    assert proc.stdout is not None
    fd, pending = proc.stdout.fileno(), b""
    last: deque[str] = deque(maxlen=TAIL_LINES)
    deadline = time.monotonic() + timeout
    while True:
        while b"\n" in pending:
            raw, pending = pending.split(b"\n", 1)
            line = raw.decode(errors="replace")
            if echo:
                print(line, flush=True)
            last.append(line)
            match = READY.search(line + " ")
            if match:
                return match.group(1)
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise RuntimeError(f"{name} did not start within {timeout:.0f}s" + _tail(last, echo))
        chunk = os.read(fd, 65536)
        if not chunk:
            if pending:
                last.append(pending.decode(errors="replace"))
            raise RuntimeError(f"{name} exited with {proc.wait()} before it was ready" + _tail(last, echo))
        pending += chunk


def _tail(lines: deque[str], echoed: bool) -> str:
    if echoed:
        return " (its output is above)"
    if not lines:
        return " (it printed nothing)"
    return "; its last output:\n" + "\n".join("  " + line for line in lines)


def _print_try(url: str) -> None:
    body = '{"model": "demo-model", "messages": [{"role": "user", "content": "Hello!"}]}'
    print(
        f"""
Try it (Ctrl-C stops both):
  curl -s {url}/v1/chat/completions -H 'content-type: application/json' -d '{body}'
  curl -sN {url}/v1/chat/completions -d '{body[:-1]}, "stream": true}}'
  .venv/bin/python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='unused'); \\
print(c.chat.completions.create(model='demo-model', messages=[{{'role': 'user', 'content': 'Hi'}}]))"
""",
        flush=True,
    )


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(12)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


if __name__ == "__main__":
    sys.exit(main())
