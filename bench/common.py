"""What every part of the load runner (``bench.run``) shares.

The address the servers listen on, the chat completions it sends and their raw HTTP/1.1 form, the
settings of one run, its error and its progress line.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"
TARGETS = ("direct", "nginx", "sidecar")


def chat_body(content: str, *, stream: bool = False) -> str:
    payload: dict[str, Any] = {"model": "demo-model", "messages": [{"role": "user", "content": content}]}
    if stream:
        payload["stream"] = True
    return json.dumps(payload, separators=(",", ":"))


def prompt(chars: int) -> str:
    text = "Summarise the following paragraph in one sentence, please. " * (chars // 60 + 1)
    return text[:chars]


SHORT = chat_body("hi")
LONG = chat_body(prompt(2000))
STREAM = chat_body("hi", stream=True)
TTFB_KNOBS = (("x-mock-chunks", "2"), ("x-mock-delay-ms", "2"))  # the first chunk, then a 2 ms gap


def request_bytes(port: int, body: str, extra_headers: str = "") -> bytes:
    """``body`` as a raw HTTP/1.1 POST to the chat completions path."""
    raw = body.encode()
    return (
        f"POST {CHAT_PATH} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\n{extra_headers}\r\n"
    ).encode() + raw


class BenchError(RuntimeError):
    """A tool is missing or fails, or a server does not start or dies: the run cannot go on."""


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Settings:
    """One run as the command line chose it (``bench.run.parse_args``)."""

    duration_s: int
    warmup_s: int
    ttfb_requests: int
    load_cpu: int
    proxy_cpu: int
    out_dir: Path
    command: str
