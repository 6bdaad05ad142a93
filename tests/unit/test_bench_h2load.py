"""bench/h2load.py reads h2load's summary (no h2load needed: its printed text, as nghttp2 1.52 prints it)."""

from __future__ import annotations

import pytest

from bench.common import BenchError
from bench.h2load import H2loadResult

OUTPUT = """\
starting benchmark...
finished in 5.00s, 8300.20 req/s, 3.50MB/s
requests: 41501 total, 41565 started, 41501 done, 41437 succeeded, 64 failed, 4 errored, 0 timeout
status codes: 41437 2xx, 0 3xx, 50 4xx, 10 5xx
traffic: 17.50MB (18350000) total, 200.00KB (204800) headers (space savings 95.00%), 15.00MB data
"""


def test_the_summary_is_read() -> None:
    result = H2loadResult.parse(OUTPUT)
    assert (result.seconds, result.rps, result.done, result.succeeded) == (5.0, 8300.2, 41501, 41437)
    assert result.errors == 41501 - 41437  # 50 4xx, 10 5xx, 4 errored


def test_milliseconds_are_seconds_too() -> None:
    assert H2loadResult.parse(OUTPUT.replace("5.00s", "250.5ms")).seconds == pytest.approx(0.2505)


def test_no_summary_is_an_error() -> None:
    with pytest.raises(BenchError):
        H2loadResult.parse("connect to 127.0.0.1 port 1 failed: Connection refused\n")
