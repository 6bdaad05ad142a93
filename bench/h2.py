"""The HTTP/2 part of the load runner (issue 4): h2load against the sidecar's h2c and nginx's h2c.

``measure_h2`` is called by ``bench.run`` once the HTTP/1.1 runs are done, with the mock, the
sidecar and their processes already started. It installs ``h2load`` (apt package
``nghttp2-client``, bench/h2load.py) when missing and starts two more servers of its own:

- nginx with an h2c (prior knowledge) listener proxying the same mock over HTTP/1.1 (bench/nginx.py
  with ``http2=True``), pinned to the proxy CPU like the sidecar; the sidecar serves h2c on its one
  port already;
- for the upstream fan-out: a mock with ``--h2c`` and a sidecar whose upstream is ``protocol: h2c``.

Runs (h2load, one thread, pinned to the load CPU, ``-d`` POSTs the small non-stream chat body):
per server a warm-up, then 8 connections × 8 streams and 1 connection × 100 streams of
``settings.duration_s`` each, nginx and the sidecar taking turns (nginx, sidecar, sidecar, nginx);
CPU per request = the proxy's utime+stime over the run ÷ requests done. Then 1000 streaming requests
at once (``h2load -c10 -m100 -n1000``, 8 chunks 150 ms apart: each lasts ~1.2 s, so all are in
flight together) through the h2c-upstream sidecar; the mock's ``/_mock/stats`` tell how many HTTP/2
connections carried them (and, polled during the run, how many streams it had in flight at once).
``h2_rows`` gives the summary rows (bench/report.py ``Row``) with their bars, ``section`` the
markdown section of the results page (``bench.run`` appends it).
``python -m bench.h2 [bench.run's options]`` runs this part alone and prints the section.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import SHORT, STREAM, BenchError, Settings, say
from bench.h2load import H2loadResult, ensure_h2load, h2load_version, run_h2load
from bench.procs import (
    Children,
    cpu_seconds,
)
from bench.report import Check, Row, Values, markdown_table, ratio_at_most, sidecar_at_most
from bench.servers import Target, start_mock, start_nginx, start_sidecar

FANOUT_STREAMS = 1000
FANOUT_CLIENTS = 10
FANOUT_MAX_UPSTREAM = 10  # the bar: upstream connections that may carry the 1000 streams
FANOUT_KNOBS = (("x-mock-chunks", "8"), ("x-mock-delay-ms", "150"))
RPS_BAR = 0.7  # sidecar RPS / nginx RPS at least
CPU_BAR = 3.0  # sidecar CPU per request / nginx's at most


@dataclass(frozen=True)
class H2Scenario:
    key: str
    title: str
    clients: int
    streams: int  # concurrent streams per connection (h2load -m)


H2_8X8 = H2Scenario("h2_8x8", "h2c, 8 conns × 8 streams", 8, 8)
H2_1X100 = H2Scenario("h2_1x100", "h2c, 1 conn × 100 streams", 1, 100)
H2_SCENARIOS = (H2_8X8, H2_1X100)


@dataclass(frozen=True)
class H2Run:
    scenario: H2Scenario
    h2load: H2loadResult
    cpu_us: float | None


@dataclass(frozen=True)
class Fanout:
    """The 1000 concurrent streams through the h2c-upstream sidecar, and the mock's connection counts."""

    h2load: H2loadResult
    completed: int  # streams the mock finished
    upstream_connections: int  # HTTP/2 connections the mock accepted during the run
    upstream_max_open: int  # the most open at once
    cpu_us: float
    max_in_flight: int  # the most streams in flight at the mock, polled every 50 ms


@dataclass
class H2Results:
    runs: dict[tuple[str, str], list[H2Run]] = field(default_factory=dict)  # (server, scenario key)
    fanout: Fanout | None = None
    h2load_version: str = ""


# ---- servers -------------------------------------------------------------------------------------


def mock_control(mock: Target, method: str, path: str) -> dict[str, object]:
    with urllib.request.urlopen(urllib.request.Request(mock.url + path, method=method), timeout=10) as r:
        answer: dict[str, object] = json.loads(r.read() or b"{}")
        return answer


def measured(binary: str, target: Target, scenario: H2Scenario, body: Path, settings: Settings) -> H2Run:
    before = cpu_seconds(target.proxy_pids)
    result = run_h2load(
        binary,
        target,
        scenario.clients,
        scenario.streams,
        body,
        settings.load_cpu,
        seconds=settings.duration_s,
    )
    used = cpu_seconds(target.proxy_pids) - before
    if target.proc.poll() is not None:
        raise BenchError(f"{target.name} exited with {target.proc.returncode} during the {scenario.key} run")
    cpu_us = used * 1e6 / result.done if result.done else None
    shown = "" if cpu_us is None else f", proxy CPU {cpu_us:.1f} µs/req"
    say(f"  {target.name:8} {scenario.key:10} {result.rps:9.0f} req/s  errors {result.errors}{shown}")
    return H2Run(scenario, result, cpu_us)


def fanout_run(binary: str, children: Children, workdir: Path, settings: Settings, body: Path) -> Fanout:
    mock = start_mock(children, settings.load_cpu, h2c=True)
    sidecar = start_sidecar(children, workdir, mock, settings.proxy_cpu, h2c=True)
    say(f"{FANOUT_STREAMS} concurrent streams through the sidecar to an h2c upstream ({mock.url})")
    mock_control(mock, "POST", "/_mock/reset")
    before = cpu_seconds(sidecar.proxy_pids)
    done = threading.Event()
    in_flight: list[int] = [0]

    def poll() -> None:  # the most requests in flight at the mock: were the 1000 there at once?
        while not done.wait(0.05):
            value = mock_control(mock, "GET", "/_mock/stats").get("in_flight")
            if isinstance(value, int):
                in_flight[0] = max(in_flight[0], value)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        result = run_h2load(
            binary,
            sidecar,
            FANOUT_CLIENTS,
            FANOUT_STREAMS // FANOUT_CLIENTS,
            body,
            settings.load_cpu,
            requests=FANOUT_STREAMS,
            headers=FANOUT_KNOBS,
        )
    finally:
        done.set()
        poller.join()
    used = cpu_seconds(sidecar.proxy_pids) - before
    stats = mock_control(mock, "GET", "/_mock/stats")
    children.stop(sidecar.proc)
    children.stop(mock.proc)

    def count(key: str) -> int:
        value = stats.get(key)
        return value if isinstance(value, int) else -1

    out = Fanout(
        result,
        count("completed"),
        count("h2_connections"),
        count("h2_max_open_connections"),
        used * 1e6 / max(1, result.done),
        in_flight[0],
    )
    say(
        f"  {result.succeeded}/{FANOUT_STREAMS} streams in {result.seconds:.2f} s, errors {result.errors}, "
        f"mock completed {out.completed} on {out.upstream_connections} h2 connections "
        f"(max {out.upstream_max_open} open, {out.max_in_flight} streams in flight at once), "
        f"sidecar CPU {out.cpu_us:.0f} µs/stream"
    )
    return out


def measure_h2(
    children: Children, workdir: Path, settings: Settings, nginx_bin: str, mock: Target, sidecar: Target
) -> H2Results:
    """h2load against nginx's and the sidecar's h2c (same mock), then the upstream fan-out.

    The two take turns (nginx, sidecar, sidecar, nginx per run), so drift on a shared machine hits
    both alike; each figure is the mean of its two runs."""
    binary = ensure_h2load()
    out = H2Results(h2load_version=h2load_version(binary))
    short, stream = workdir / "h2-short.json", workdir / "h2-stream.json"
    short.write_text(SHORT)
    stream.write_text(STREAM)
    nginx_h2c = start_nginx(children, nginx_bin, workdir, mock, settings.proxy_cpu, http2=True)
    for target in (nginx_h2c, sidecar):
        say(f"{target.name} over h2c: {target.url} (warm-up {settings.warmup_s} s)")
        check = run_h2load(binary, target, 1, 1, short, settings.load_cpu, requests=1)
        if check.succeeded != 1:
            raise BenchError(f"{target.name} did not answer one request over h2c")
        run_h2load(binary, target, 8, 8, short, settings.load_cpu, seconds=settings.warmup_s)
    for scenario in H2_SCENARIOS:
        for target in (nginx_h2c, sidecar, sidecar, nginx_h2c):
            run = measured(binary, target, scenario, short, settings)
            out.runs.setdefault((target.name, scenario.key), []).append(run)
    children.stop(nginx_h2c.proc)
    out.fanout = fanout_run(binary, children, workdir, settings, stream)
    return out


# ---- the report ----------------------------------------------------------------------------------


def ratio_at_least(limit: float) -> Check:
    def check(values: Values) -> bool | None:
        n, s = values[1], values[2]
        return None if not n or s is None else s / n >= limit

    return check


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def h2_rows(h2: H2Results) -> list[Row]:
    """Summary rows (direct, nginx, sidecar: direct is not measured here) with their bars."""

    def per(key: str, rps: bool) -> Values:
        values: list[float | None] = [None]
        for server in ("nginx", "sidecar"):
            runs = h2.runs.get((server, key), [])
            values.append(_mean([r.h2load.rps if rps else r.cpu_us for r in runs]))
        return values

    rows: list[Row] = []
    for s in H2_SCENARIOS:
        rows.append(Row(f"HTTP/2 RPS, {s.title}", per(s.key, True), 0, f"sidecar/nginx ≥ {RPS_BAR}",
                        ratio_at_least(RPS_BAR)))  # fmt: skip
        rows.append(Row(f"HTTP/2 proxy CPU µs/req, {s.title}", per(s.key, False), 1,
                        f"sidecar/nginx ≤ {CPU_BAR:g}", ratio_at_most(CPU_BAR)))  # fmt: skip
    errors = float(
        sum(r.h2load.errors for (server, _), runs in h2.runs.items() if server == "sidecar" for r in runs)
    )
    zero = sidecar_at_most(0)
    rows.append(Row("HTTP/2 errors, h2load runs", [None, None, errors], 0, "sidecar 0", zero, ratio=False))
    f = h2.fanout
    if f is not None:
        title = f"{FANOUT_STREAMS} concurrent streams to an h2c upstream"
        connections = [None, None, float(f.upstream_connections)]
        bar = f"sidecar ≤ {FANOUT_MAX_UPSTREAM}"
        rows.append(Row(f"{title}: upstream connections", connections, 0, bar,
                        sidecar_at_most(FANOUT_MAX_UPSTREAM), ratio=False))  # fmt: skip
        bad = float(f.h2load.errors + FANOUT_STREAMS - f.h2load.succeeded + FANOUT_STREAMS - f.completed)
        rows.append(Row(f"{title}: errors", [None, None, bad], 0, "sidecar 0", zero, ratio=False))
        rows.append(Row(f"{title}: most in flight at the mock", [None, None, float(f.max_in_flight)], 0,
                        "info", ratio=False))  # fmt: skip
    return rows


def summary(h2: H2Results) -> str:
    header = ("metric", "nginx", "sidecar", "sidecar/nginx", "bar", "pass/fail")
    return markdown_table(header, [(c[0], *c[2:]) for c in (row.cells() for row in h2_rows(h2))])


def runs_table(h2: H2Results) -> str:
    header = ("server", "run", "round", "requests", "req/s", "errors", "CPU µs/req")
    rows = [
        (server, run.scenario.title, str(i + 1), f"{run.h2load.done:,}", f"{run.h2load.rps:,.0f}",
         str(run.h2load.errors), "—" if run.cpu_us is None else f"{run.cpu_us:.1f}")
        for (server, _), runs in h2.runs.items()
        for i, run in enumerate(runs)
    ]  # fmt: skip
    return markdown_table(header, rows, right=2)


def section(h2: H2Results, settings: Settings) -> str:
    """The markdown section of the results page: the summary with its bars, the method, every run."""
    f = h2.fanout
    fanout = ""
    if f is not None:
        fanout = (
            f"- Upstream fan-out: {f.h2load.succeeded}/{FANOUT_STREAMS} streams succeeded in "
            f"{f.h2load.seconds:.2f} s ({f.h2load.errors} h2load errors); the mock completed "
            f"{f.completed} on "
            f"{f.upstream_connections} HTTP/2 connections (at most {f.upstream_max_open} open at once; at "
            f"most {f.max_in_flight} streams in flight at the mock, polled every 50 ms); "
            f"sidecar CPU {f.cpu_us:.0f} µs per stream.\n"
        )
    per_client = FANOUT_STREAMS // FANOUT_CLIENTS
    return f"""## HTTP/2: h2c front, sidecar vs nginx (h2load)

{summary(h2)}

- {h2.h2load_version}, one thread on CPU {settings.load_cpu}, POSTing the non-stream chat body over
  prior-knowledge h2c. nginx (bench/nginx.py with an `http2` listener; HTTP/1.1 upstream keepalive, as
  above) and the sidecar (its one port) on CPU {settings.proxy_cpu}, both in front of the same mock.
- Per server a {settings.warmup_s} s warm-up (8 × 8); then per run nginx, sidecar, sidecar, nginx,
  {settings.duration_s} s each; the figures are the means of each server's two runs. CPU per request as
  above (utime+stime over the run ÷ requests done).
- Fan-out: {FANOUT_STREAMS} streaming requests at once (`h2load -c{FANOUT_CLIENTS} -m{per_client}`,
  `x-mock-chunks: 8`, `x-mock-delay-ms: 150`: all in flight together) through a second sidecar whose
  upstream is `protocol: h2c`, to a mock started with `--h2c`; connections counted by its `/_mock/stats`.
{fanout}
{runs_table(h2)}
"""


# ---- alone: python -m bench.h2 -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Only the HTTP/2 runs (``python -m bench.h2 [--duration N] [--quick]``): prints their table."""
    import tempfile

    from bench.procs import ensure_tools, raise_fd_limit
    from bench.run import parse_args
    from bench.servers import check_target, start_mock, start_sidecar

    settings = parse_args(sys.argv[1:] if argv is None else argv)
    raise_fd_limit()
    tools = ensure_tools()
    with tempfile.TemporaryDirectory(prefix="llm-sidecar-h2-") as tmp, Children(Path(tmp)) as children:
        workdir = Path(tmp)
        mock = start_mock(children, settings.load_cpu)
        sidecar = start_sidecar(children, workdir, mock, settings.proxy_cpu)
        check_target(sidecar)
        os.sched_setaffinity(0, {settings.load_cpu})
        h2 = measure_h2(children, workdir, settings, tools.nginx, mock, sidecar)
    print(section(h2, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
