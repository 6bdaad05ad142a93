"""Bench rows of issue 6: the sidecar with ``retry`` + ``circuit_breaker`` on vs off.

``measure_resilience`` (called by ``bench.run`` after the main runs) starts two fresh sidecars in
front of the mock on the proxy CPU — "off" without middleware, "on" with ``retry`` and
``circuit_breaker`` — and loads them with wrk in interleaved rounds (off/on, then on/off, …), so
machine drift hits both: non-streaming chat and 20-chunk streams at 64 connections. Nothing fails,
so the rows are the cost of the happy path: a budget count, a target pick, a breaker verdict, the
``x-retry-attempts`` header, and for streams the tap that gives the breaker its verdict at the end.
Bar: CPU on/off ≤ 1.15 (non-stream). Every round is in the section, with the medians.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.alone import run_alone
from bench.common import HOST, Settings, say
from bench.procs import Children, Tools
from bench.ratelimit import Sample, off_on_rounds
from bench.report import fmt, markdown_table
from bench.servers import SIDECAR_CONFIG, Target, run_sidecar
from bench.wrk import NS64, STREAM64, Scenario

CPU_BAR = 1.15  # CPU µs/request on ÷ off, non-stream at 64 connections
SCENARIOS = (NS64, STREAM64)
MIDDLEWARE = """\
middleware:
  - {type: retry}
  - {type: circuit_breaker}
"""


@dataclass
class ResilienceResult:
    rounds: int
    samples: dict[tuple[str, str], list[Sample]] = field(default_factory=dict)  # (off|on, scenario key)

    def median(self, side: str, scenario: Scenario) -> float | None:
        values = [s.cpu_us for s in self.samples.get((side, scenario.key), [])]
        return statistics.median(values) if values else None

    def errors(self, side: str) -> int:
        return sum(s.errors for (who, _), runs in self.samples.items() if who == side for s in runs)


def measure_resilience(
    children: Children, workdir: Path, mock: Target, tools: Tools, settings: Settings
) -> ResilienceResult:
    base = SIDECAR_CONFIG.format(host=HOST, upstream=mock.url)
    off = run_sidecar(children, workdir, "sidecar-plain", base, settings.proxy_cpu)
    on = run_sidecar(children, workdir, "sidecar-resilient", base + MIDDLEWARE, settings.proxy_cpu)
    rounds = 2 if settings.duration_s <= 2 else 4
    out = ResilienceResult(rounds)
    say(f"retry + circuit_breaker off vs on: {rounds} interleaved rounds")
    out.samples = off_on_rounds(off, on, SCENARIOS, rounds, tools, settings, workdir)
    for target in (on, off):
        children.stop(target.proc)
    return out


def section(result: ResilienceResult) -> str:
    rows = []
    for scenario in SCENARIOS:
        off, on = result.median("off", scenario), result.median("on", scenario)
        ratio = None if not off or on is None else on / off
        gated = scenario is NS64
        verdict = "" if not gated or ratio is None else ("PASS" if ratio <= CPU_BAR else "**FAIL**")
        bar = f"on/off ≤ {CPU_BAR}" if gated else "info"
        title = f"Proxy CPU µs/req, {scenario.title}, {scenario.connections} conns"
        rows.append((title, fmt(off, 1), fmt(on, 1), fmt(ratio, 2), bar, verdict))
    errors = result.errors("on")
    rows.append(("Errors, all rounds", str(result.errors("off")), str(errors), "—", "0", _zero(errors)))
    summary = markdown_table(("metric", "off", "on", "on/off", "bar", "pass/fail"), rows)
    rounds = []
    for scenario in SCENARIOS:
        offs, ons = (result.samples.get((side, scenario.key), []) for side in ("off", "on"))
        for i, (a, b) in enumerate(zip(offs, ons, strict=True)):
            rounds.append((scenario.title, str(i + 1), fmt(a.cpu_us, 1), fmt(b.cpu_us, 1)))
    every = markdown_table(("run", "round", "off CPU µs/req", "on CPU µs/req"), rounds, right=2)
    return f"""## retry + circuit_breaker on vs off

{summary}

- Two fresh sidecars in front of the same mock, on the proxy CPU: "off" without middleware, "on" with
  `retry` and `circuit_breaker` (defaults). Nothing fails: the cost of the happy path.
- wrk as above; {result.rounds} interleaved rounds (off/on, then on/off), medians shown.

{every}
"""


def _zero(value: int) -> str:
    return "PASS" if value == 0 else "**FAIL**"


if __name__ == "__main__":  # python -m bench.resilience [bench.run's options]: printed, nothing written
    sys.exit(run_alone(measure_resilience, section))
