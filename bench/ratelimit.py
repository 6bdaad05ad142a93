"""Bench rows of issue 5: the sidecar with ``auth`` + ``rate_limit`` (Redis backend) on vs off.

``measure_rate_limit`` (called by ``bench.run`` after the main runs) finds a Redis (``REDIS_URL``, else
127.0.0.1:6379, else a private ``redis-server`` on a free port, installed with apt-get when missing),
starts two fresh sidecars in front of the mock on the proxy CPU, one without middleware ("off") and
one with ``auth`` and a Redis ``rate_limit`` ("on", limits on requests, tokens and in-flight requests,
``lease_ms`` at its default: the sidecar takes requests and tokens ahead and asks Redis about once per
lease, not per request), checks them, then loads them with wrk in
interleaved rounds (off/on, then on/off, …) so machine drift hits both: non-streaming chat at 8
connections (p50 latency and CPU µs/request, the bars) and at 64 (CPU, for information). Both get the
same requests, ``Authorization: Bearer`` included. The limits are far above what wrk can send: the
rows measure the cost of checking, never a refusal (a 429 would count as a wrk error).

``section`` renders the medians, the bars (CPU on/off ≤ 1.3, added p50 ≤ 0.3 ms) and every round as
markdown for ``bench.report``. A round trip to Redis that failed (over ``timeout_ms``) lets its
requests through unchecked, which would flatter "on": the section counts them from the sidecar's log.
"""

from __future__ import annotations

import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from bench.alone import run_alone
from bench.common import HOST, SHORT, BenchError, Settings, request_bytes, say
from bench.procs import (
    Children,
    Tools,
    apt_install,
    cpu_seconds,
    find_tool,
    free_port,
    wait_ready,
)
from bench.report import fmt, markdown_table
from bench.servers import SIDECAR_CONFIG, Target, run_sidecar
from bench.wrk import Scenario, run_wrk

LOCAL_REDIS = "redis://127.0.0.1:6379/0"
API_KEY = "sk-bench-rate-limit"
AUTH_HEADER = ("Authorization", f"Bearer {API_KEY}")
RL8 = Scenario("rl8", "non-stream, API key", 8, headers=(AUTH_HEADER,))
RL64 = Scenario("rl64", "non-stream, API key", 64, headers=(AUTH_HEADER,))
SCENARIOS = (RL8, RL64)
CPU_BAR = 1.3  # CPU µs/request on ÷ off, at 8 connections
P50_BAR_MS = 0.3  # p50 on − off, at 8 connections
# Far above what one wrk can send, so nothing is ever refused: the rows are the cost of the checks.
MIDDLEWARE = """\
middleware:
  - type: auth
    keys:
      - {{id: bench, key: "{key}", tenant: bench}}
  - type: rate_limit
    backend: redis
    redis: {{url: "{url}", key_prefix: "{prefix}"}}
    requests_per_minute: 1000000000
    tokens_per_minute: 1000000000000
    max_in_flight: 100000
"""


@dataclass(frozen=True)
class Sample:
    cpu_us: float
    p50_ms: float
    requests: int
    errors: int


@dataclass
class RateLimitResult:
    redis: str  # where, and whose
    rounds: int
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)  # (off|on, scenario key)
    redis_failures: int = 0  # failed round trips the "on" sidecar logged

    def median(self, side: str, scenario: Scenario, what: str) -> float | None:
        values = [getattr(s, what) for s in self.samples.get((side, scenario.key), [])]
        return statistics.median(values) if values else None


# ---- Redis ---------------------------------------------------------------------------------------


def reachable(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError, ValueError):
        return False


def find_redis(children: Children, workdir: Path, cpu: int) -> tuple[str, str]:
    """The URL of a Redis to use, and how it was found (a private one is stopped with ``children``)."""
    env = os.environ.get("REDIS_URL")
    if env and reachable(env):
        return env, "REDIS_URL"
    if reachable(LOCAL_REDIS):
        return LOCAL_REDIS, "the local Redis"
    binary = find_tool("redis-server")
    if binary is None:
        apt_install(["redis-server"])
        binary = find_tool("redis-server")
    if binary is None:
        raise BenchError("no Redis reachable and no redis-server: apt-get install -y redis-server")
    port = free_port()
    data = workdir / "redis"
    data.mkdir()
    argv = [binary, "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no"]
    proc = children.start("redis", [*argv, "--dir", str(data), "--protected-mode", "no"], cpu)
    url = f"redis://{HOST}:{port}/0"
    wait_ready(lambda: reachable(url) or None, proc, "redis-server", lambda: children.log("redis"))
    return url, "a private redis-server"


# ---- the two sidecars ----------------------------------------------------------------------------


def answer(target: Target, headers: str) -> bytes:
    with socket.create_connection((HOST, target.port), timeout=5) as conn:
        conn.sendall(request_bytes(target.port, SHORT, "Connection: close\r\n" + headers))
        return b"".join(iter(lambda: conn.recv(65536), b""))


def check_limited(target: Target) -> None:
    """The "on" sidecar refuses a request without the key and answers one with it, with the
    x-ratelimit-* headers only Redis' answer gives (so Redis is reached, not skipped)."""
    refused = answer(target, "")
    if not refused.startswith(b"HTTP/1.1 401"):
        raise BenchError(f"{target.name} answered a request without an API key with:\n{refused[:500]!r}")
    ok = answer(target, f"{AUTH_HEADER[0]}: {AUTH_HEADER[1]}\r\n")
    if not ok.startswith(b"HTTP/1.1 200") or b"x-ratelimit-remaining-requests" not in ok.lower():
        raise BenchError(f"{target.name} answered a request with its API key with:\n{ok[:1000]!r}")


# ---- the runs ------------------------------------------------------------------------------------


def sample(target: Target, scenario: Scenario, tools: Tools, settings: Settings, workdir: Path) -> Sample:
    before = cpu_seconds(target.proxy_pids)
    result = run_wrk(tools.wrk, target, scenario, settings.duration_s, workdir, settings.load_cpu)
    used = cpu_seconds(target.proxy_pids) - before
    if target.proc.poll() is not None:
        raise BenchError(f"{target.name} exited with {target.proc.returncode} during the {scenario.key} run")
    if not result.requests:
        raise BenchError(f"{target.name} completed no request in the {scenario.key} run")
    out = Sample(used * 1e6 / result.requests, result.latency_ms["p50"], result.requests, result.total_errors)
    say(
        f"  {target.name:13} {scenario.connections:3} conns {result.rps:8.0f} req/s  p50 {out.p50_ms:6.3f} ms"
        f"  CPU {out.cpu_us:6.1f} µs/req  errors {out.errors}"
    )
    return out


def off_on_rounds(
    off: Target,
    on: Target,
    scenarios: Sequence[Scenario],
    rounds: int,
    tools: Tools,
    settings: Settings,
    workdir: Path,
) -> dict[tuple[str, str], list[Sample]]:
    """Both sidecars warmed up with ``scenarios[0]``, then loaded in ``rounds`` interleaved rounds
    (off/on, then on/off: a drift linear in time hits both alike): their samples by (side, scenario)."""
    for target in (off, on):
        run_wrk(tools.wrk, target, scenarios[0], settings.warmup_s, workdir, settings.load_cpu)
    samples: dict[tuple[str, str], list[Sample]] = {}
    for turn in range(rounds):
        pair = (off, on) if turn % 2 == 0 else (on, off)
        for scenario in scenarios:
            for target in pair:
                side = "on" if target is on else "off"
                samples.setdefault((side, scenario.key), []).append(
                    sample(target, scenario, tools, settings, workdir)
                )
    return samples


def measure_rate_limit(
    children: Children, workdir: Path, mock: Target, tools: Tools, settings: Settings
) -> RateLimitResult:
    url, whose = find_redis(children, workdir, settings.load_cpu)
    base = SIDECAR_CONFIG.format(host=HOST, upstream=mock.url)
    prefix = f"llm-sidecar-bench:{uuid.uuid4().hex[:8]}:"  # this run's own keys (they expire)
    limited = base + MIDDLEWARE.format(key=API_KEY, url=url, prefix=prefix)
    off = run_sidecar(children, workdir, "sidecar-off", base, settings.proxy_cpu)
    on = run_sidecar(children, workdir, "sidecar-on", limited, settings.proxy_cpu)
    check_limited(on)
    rounds = 2 if settings.duration_s <= 2 else 4
    out = RateLimitResult(f"{url} ({whose})", rounds)
    say(f"auth + rate_limit (Redis at {url}, {whose}) off vs on: {rounds} interleaved rounds")
    out.samples = off_on_rounds(off, on, SCENARIOS, rounds, tools, settings, workdir)
    time.sleep(0.1)  # let the last log lines land
    out.redis_failures = children.log_path(on.name).read_text(errors="replace").count("failed (")
    for target in (on, off):
        children.stop(target.proc)
    return out


# ---- the report ----------------------------------------------------------------------------------


def rows(result: RateLimitResult) -> list[tuple[str, ...]]:
    def line(metric: str, scenario: Scenario, what: str, digits: int, bar: str = "") -> tuple[str, ...]:
        off, on = result.median("off", scenario, what), result.median("on", scenario, what)
        ratio = "—" if not off or on is None else f"{on / off:.2f}"
        added = "—" if off is None or on is None else f"{on - off:+.{digits}f}"
        verdict = ""
        if bar != "info" and off and on is not None:
            ok = on / off <= CPU_BAR if what == "cpu_us" else on - off <= P50_BAR_MS
            verdict = "PASS" if ok else "**FAIL**"
        return (metric, fmt(off, digits), fmt(on, digits), ratio, added, bar, verdict)

    def errors(side: str) -> int:
        return sum(s.errors for (who, _), runs in result.samples.items() if who == side for s in runs)

    def zero(value: int) -> str:
        return "PASS" if value == 0 else "**FAIL**"

    off_errors, on_errors, failed = errors("off"), errors("on"), result.redis_failures

    return [
        line("Proxy CPU µs/req, 8 conns", RL8, "cpu_us", 1, f"on/off ≤ {CPU_BAR}"),
        line("p50 latency, 8 conns (ms)", RL8, "p50_ms", 3, f"on − off ≤ {P50_BAR_MS} ms"),
        line("Proxy CPU µs/req, 64 conns", RL64, "cpu_us", 1, "info"),
        line("p50 latency, 64 conns (ms)", RL64, "p50_ms", 3, "info"),
        ("Errors, all rounds", str(off_errors), str(on_errors), "—", "—", "0", zero(on_errors)),
        ("Redis round trips failed (let through unchecked)", "—", str(failed), "—", "—", "0", zero(failed)),
    ]


def summary(result: RateLimitResult) -> str:
    header = ("metric", "off", "on", "on/off", "on − off", "bar", "pass/fail")
    return markdown_table(header, rows(result))


def rounds_table(result: RateLimitResult) -> str:
    header = ("run", "round", "off CPU µs/req", "on CPU µs/req", "off p50 ms", "on p50 ms", "requests off/on")
    lines = []
    for scenario in SCENARIOS:
        offs, ons = (result.samples.get((side, scenario.key), []) for side in ("off", "on"))
        for i, (a, b) in enumerate(zip(offs, ons, strict=True)):
            lines.append(
                (
                    f"{scenario.connections} conns",
                    str(i + 1),
                    fmt(a.cpu_us, 1),
                    fmt(b.cpu_us, 1),
                    fmt(a.p50_ms, 3),
                    fmt(b.p50_ms, 3),
                    f"{a.requests:,}/{b.requests:,}",
                )
            )
    return markdown_table(header, lines, right=2)


def section(result: RateLimitResult) -> str:
    """The markdown section of the results page: the summary with its bars, the method, every round."""
    return f"""## auth + rate_limit (Redis) on vs off

{summary(result)}

- Two fresh sidecars in front of the same mock, on the proxy CPU: "off" without middleware, "on" with
  `auth` (one key) and `rate_limit` (`backend: redis`, requests, tokens and in-flight limits far above
  the load, nothing refused; `lease_ms` at its default, 100: admissions from what the sidecar took
  ahead, Redis asked about once per 100 ms, not per request). Redis: {result.redis};
  one the bench does not start is not pinned, so it may run on the proxy's CPU (p50 shows it more
  than CPU per request does).
- wrk as above, `Authorization: Bearer …` on every request to both; {result.rounds} interleaved rounds
  (off/on, then on/off), medians shown. Bars: CPU on/off ≤ {CPU_BAR}, added p50 ≤ {P50_BAR_MS} ms at 8 conns.

{rounds_table(result)}
"""


if __name__ == "__main__":
    sys.exit(run_alone(measure_rate_limit, section))
