"""Bench rows of issue 13: what metrics and the access log cost the request path.

``measure_observability`` (called by ``bench.run`` after the main runs; alone: ``python -m
bench.observability``) starts three fresh sidecars in front of the mock on the proxy CPU:
- "off": ``admin.enabled: false`` (no metrics counted) and no access log;
- "metrics": the admin listener on (its own free port), so every request is counted;
- "on": metrics and ``log: {access_log: true, format: json}`` (one JSON line per request, written
  by the log thread to the sidecar's stderr, a file here: that thread's CPU is the process's too).

They are loaded in interleaved rounds, the order rotating each round so drift hits all alike:
wrk at saturation (non-streaming and the 20-chunk stream, 64 connections), then an open-loop steady
rate (:mod:`bench.steady`: 500 non-streaming requests a second on 16 connections; 100 streams a
second of 20 chunks 20 ms apart on 64), where each request is its own wake-up. CPU µs per request
is utime+stime of the whole process over the requests completed. Bar: "on"/"off" ≤ 1.10 for
non-streaming requests, at saturation and at the steady rate.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.alone import run_alone
from bench.common import HOST, BenchError, Settings, say
from bench.procs import Children, Tools, cpu_seconds, free_port
from bench.ratelimit import sample
from bench.report import fmt, markdown_table
from bench.servers import SIDECAR_CONFIG, Target, run_sidecar
from bench.steady import run_steady
from bench.wrk import NS64, STREAM64, Scenario, run_wrk

CPU_BAR = 1.10  # CPU µs/request, metrics + access log on ÷ off
SIDES = ("off", "metrics", "on")
OFF = "admin: {enabled: false}\n"
METRICS = 'admin: {{address: "{host}:{port}"}}\n'
ACCESS = "log: {access_log: true, format: json}\n"


@dataclass(frozen=True)
class Steady:
    key: str
    title: str
    rate: float
    conns: int
    stream: bool


STEADY_NS = Steady("steady_ns", "non-stream, 500 req/s steady", 500, 16, False)
STEADY_STREAM = Steady("steady_stream", "stream 20 × 20 ms, 100 req/s steady", 100, 64, True)
WRK_RUNS: tuple[Scenario, ...] = (NS64, STREAM64)
STEADY_RUNS = (STEADY_NS, STEADY_STREAM)
BARRED = (NS64.key, STEADY_NS.key)


@dataclass
class ObservabilityResult:
    rounds: int
    cpu: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # (side, run key) → µs/req
    errors: dict[str, int] = field(default_factory=dict)  # side → errors over all runs
    late: dict[str, int] = field(default_factory=dict)  # side → steady requests sent late

    def median(self, side: str, key: str) -> float | None:
        values = self.cpu.get((side, key))
        return statistics.median(values) if values else None


def steady_sample(target: Target, run: Steady, seconds: int) -> tuple[float, int, int]:
    """(CPU µs per request, late, errors) of ``target`` under ``run``'s fixed rate."""
    before = cpu_seconds(target.proxy_pids)
    result = run_steady(target.port, run.rate, seconds, run.conns, run.stream)
    used = cpu_seconds(target.proxy_pids) - before
    if target.proc.poll() is not None:
        raise BenchError(f"{target.name} exited with {target.proc.returncode} during the {run.key} run")
    cpu_us = used * 1e6 / result.requests
    say(
        f"  {target.name:20} {run.title:38} CPU {cpu_us:6.1f} µs/req  late {result.late}"
        f"  errors {result.errors}"
    )
    return cpu_us, result.late, result.errors


def measure_observability(
    children: Children, workdir: Path, mock: Target, tools: Tools, settings: Settings
) -> ObservabilityResult:
    base = SIDECAR_CONFIG.format(host=HOST, upstream=mock.url)
    configs = {
        "off": base + OFF,
        "metrics": base + METRICS.format(host=HOST, port=free_port()),
        "on": base + METRICS.format(host=HOST, port=free_port()) + ACCESS,
    }
    targets = {
        side: run_sidecar(children, workdir, f"sidecar-obs-{side}", configs[side], settings.proxy_cpu)
        for side in SIDES
    }
    rounds = 2 if settings.duration_s <= 2 else 4
    out = ObservabilityResult(rounds)
    say(f"metrics and access log off / metrics / both: {rounds} rounds, the order rotating")
    for target in targets.values():
        run_wrk(tools.wrk, target, NS64, settings.warmup_s, workdir, settings.load_cpu)
    for turn in range(rounds):
        order = SIDES[turn % 3 :] + SIDES[: turn % 3]
        for scenario in WRK_RUNS:
            for side in order:
                s = sample(targets[side], scenario, tools, settings, workdir)
                out.cpu.setdefault((side, scenario.key), []).append(s.cpu_us)
                out.errors[side] = out.errors.get(side, 0) + s.errors
        for run in STEADY_RUNS:
            for side in order:
                cpu_us, late, errors = steady_sample(targets[side], run, settings.duration_s)
                out.cpu.setdefault((side, run.key), []).append(cpu_us)
                out.errors[side] = out.errors.get(side, 0) + errors
                out.late[side] = out.late.get(side, 0) + late
    for target in targets.values():
        children.stop(target.proc)
    return out


def section(result: ObservabilityResult) -> str:
    titles = {s.key: f"{s.title}, {s.connections} conns" for s in WRK_RUNS}
    titles.update({s.key: s.title for s in STEADY_RUNS})
    rows: list[tuple[str, ...]] = []
    for key, title in titles.items():
        off, metrics, on = (result.median(side, key) for side in SIDES)
        ratio = None if not off or on is None else on / off
        only = None if not off or metrics is None else metrics / off
        gated = key in BARRED
        verdict = "" if not gated or ratio is None else ("PASS" if ratio <= CPU_BAR else "**FAIL**")
        bar = f"on/off ≤ {CPU_BAR}" if gated else "info"
        row = (f"Proxy CPU µs/req, {title}", fmt(off, 1), fmt(metrics, 1), fmt(on, 1))
        rows.append((*row, fmt(only, 2), fmt(ratio, 2), bar, verdict))
    errors = sum(result.errors.values())
    late = ", ".join(f"{side} {result.late.get(side, 0)}" for side in SIDES)
    counts = (str(result.errors.get(side, 0)) for side in SIDES)
    rows.append(("Errors, all runs", *counts, "—", "—", "0", _zero(errors)))
    header = ("metric", "off", "metrics", "metrics + access log", "metrics/off", "on/off", "bar", "pass/fail")
    every = []
    for key, title in titles.items():
        for i in range(result.rounds):
            cells = [result.cpu.get((side, key), [])[i : i + 1] for side in SIDES]
            every.append((title, str(i + 1), *(fmt(c[0], 1) if c else "—" for c in cells)))
    return f"""## Metrics and access log: on vs off

{markdown_table(header, rows)}

- Three fresh sidecars in front of the same mock, on the proxy CPU: "off" with `admin.enabled: false`
  and no access log; "metrics" with the admin listener (requests counted, nobody scraping); "metrics
  + access log" with `log: {{access_log: true, format: json}}` too (lines written by the log thread
  to a file; its CPU is counted, it is the same process).
- Saturation: wrk as above. Steady: an open-loop client (bench/steady.py) at a fixed rate; requests
  sent late because their connection was still busy: {late}.
- {result.rounds} rounds, the order of the three rotating each round; medians shown. Bar: CPU
  (metrics + access log)/off ≤ {CPU_BAR}, non-streaming, saturated and steady.

{markdown_table(("run", "round", *SIDES), every, right=2)}
"""


def _zero(value: int) -> str:
    return "PASS" if value == 0 else "**FAIL**"


if __name__ == "__main__":  # python -m bench.observability [bench.run's options]: printed, nothing written
    sys.exit(run_alone(measure_observability, section))
