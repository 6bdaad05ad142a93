"""Run one of the load runner's extra comparisons by itself (``python -m bench.ratelimit``, …):
the mock started pinned, the comparison measured, its section printed; nothing written."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from bench.common import BenchError, Settings, say
from bench.procs import Children, Tools, ensure_tools, raise_fd_limit
from bench.servers import Target, start_mock

T = TypeVar("T")
Measure = Callable[[Children, Path, Target, Tools, Settings], T]


def run_alone(measure: Measure[T], render: Callable[[T], str]) -> int:
    """``measure`` against a fresh mock with ``bench.run``'s options from the command line; the
    exit status: 0, or 1 when a tool is missing or a server does not start."""
    from bench.run import parse_args  # (bench.run imports the comparisons that import this)

    settings = parse_args(sys.argv[1:])
    raise_fd_limit()
    tools = ensure_tools()
    try:
        with tempfile.TemporaryDirectory(prefix="llm-sidecar-bench-") as tmp, Children(Path(tmp)) as children:
            os.sched_setaffinity(0, {settings.load_cpu})
            mock = start_mock(children, settings.load_cpu)
            result = measure(children, Path(tmp), mock, tools, settings)
    except BenchError as e:
        say(f"bench failed: {e}")
        return 1
    print(render(result))
    return 0
