"""The load runner's report: what a run measured, the summary with its bars, the markdown page, the plot.

``write_results`` prints the summary table and writes ``<out-dir>/<date>.md`` (the machine, the
method, the summary and every wrk run) and ``<out-dir>/<date>-latency.png``.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import nginx
from bench.common import TARGETS, Settings, say
from bench.cpu_rounds import SCENARIOS as CPU_ROUND_SCENARIOS
from bench.cpu_rounds import rounds_for
from bench.procs import Tools
from bench.wrk import (
    AFTER_64,
    AT_64,
    BURST1000,
    LONG64,
    MIX64,
    NS8,
    NS64,
    NS256,
    PACED64,
    PERCENTILES,
    STREAM64,
    WRK_TIMEOUT,
    Scenario,
    WrkResult,
    wrk_version,
)

# ---- what a run measured -------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    scenario: Scenario
    wrk: WrkResult
    cpu_us: float | None  # the proxy's CPU time per completed request; None for the mock direct


@dataclass
class TargetResult:
    name: str
    runs: dict[str, Run] = field(default_factory=dict)
    ttfb_ms: list[float] = field(default_factory=list)
    rss_at_64_mib: float | None = None
    rss_peak_mib: float | None = None
    # CPU µs per request of the interleaved rounds (bench.cpu_rounds): scenario key → one per round
    cpu_rounds: dict[str, list[float]] = field(default_factory=dict)

    def cpu_us(self, scenario: Scenario) -> float | None:
        """The proxy's CPU per request in ``scenario``: the median of its rounds when it ran in
        rounds (the non-streaming scenarios), else its one wrk run's."""
        rounds = self.cpu_rounds.get(scenario.key)
        if rounds:
            return statistics.median(rounds)
        run = self.runs.get(scenario.key)
        return None if run is None else run.cpu_us


# ---- the report ----------------------------------------------------------------------------------

Values = Sequence[float | None]  # direct, nginx, sidecar
Check = Callable[[Values], bool | None]  # a bar: PASS, FAIL or not measurable


@dataclass(frozen=True)
class Row:
    metric: str
    values: Values
    digits: int
    bar: str = ""
    check: Check | None = None
    ratio: bool = True  # show sidecar / nginx
    paired: float | None = None  # the median of per-round sidecar/nginx ratios: shown and checked

    def sidecar_over_nginx(self) -> float | None:
        _, on_nginx, on_sidecar = self.values
        if self.paired is not None:
            return self.paired
        return on_sidecar / on_nginx if on_nginx and on_sidecar is not None else None

    def cells(self) -> tuple[str, ...]:
        quotient = self.sidecar_over_nginx() if self.ratio else None
        ratio = "—" if quotient is None else f"{quotient:.2f}"
        ok = None if self.check is None else self.check(self.values)
        verdict = "" if ok is None else ("PASS" if ok else "**FAIL**")
        shown = (fmt(v, self.digits) for v in self.values)
        return (self.metric, *shown, ratio, self.bar, verdict)


def fmt(value: float | None, digits: int) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def sidecar_at_most(limit: float, *, strict: bool = False) -> Check:
    def check(values: Values) -> bool | None:
        s = values[2]
        return None if s is None else (s < limit if strict else s <= limit)

    return check


def ratio_at_most(limit: float, paired: float | None = None) -> Check:
    """sidecar/nginx ≤ ``limit``: the ``paired`` ratio when the row has one, else of the values."""

    def check(values: Values) -> bool | None:
        if paired is not None:
            return paired <= limit
        n, s = values[1], values[2]
        return None if not n or s is None else s / n <= limit

    return check


def paired_ratio(results: Sequence[TargetResult], scenario: Scenario) -> float | None:
    """The median over the interleaved rounds of sidecar/nginx CPU per request, each round's two
    runs side by side in time (None when ``scenario`` did not run in rounds)."""
    by_name = {r.name: r for r in results}
    nginx_result, sidecar_result = by_name.get("nginx"), by_name.get("sidecar")
    if nginx_result is None or sidecar_result is None:
        return None
    a, b = nginx_result.cpu_rounds.get(scenario.key, []), sidecar_result.cpu_rounds.get(scenario.key, [])
    ratios = [y / x for x, y in zip(a, b, strict=False) if x]
    return statistics.median(ratios) if ratios else None


def flatness(result: TargetResult) -> float | None:
    """Largest deviation of CPU µs/request at 8, 64 and 256 connections from their mean, in %."""
    values = [result.cpu_us(s) for s in (NS8, NS64, NS256)]
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        return None
    mean = statistics.fmean(known)
    return max(abs(v - mean) for v in known) / mean * 100


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary_rows(results: Sequence[TargetResult]) -> list[Row]:
    def per(get: Callable[[TargetResult], float | None]) -> list[float | None]:
        return [get(r) for r in results]

    def rps(s: Scenario) -> Values:
        return per(lambda r: r.runs[s.key].wrk.rps)

    def latency(s: Scenario, p: str) -> Values:
        return per(lambda r: r.runs[s.key].wrk.latency_ms[p])

    def cpu(s: Scenario) -> Values:
        return per(lambda r: r.cpu_us(s))

    def errors(*scenarios: Scenario) -> Values:
        return per(lambda r: float(sum(r.runs[s.key].wrk.total_errors for s in scenarios)))

    ttfb50 = per(lambda r: statistics.median(r.ttfb_ms))
    direct50 = ttfb50[0]
    added = [None, *(None if v is None or direct50 is None else v - direct50 for v in ttfb50[1:])]
    zero = sidecar_at_most(0)
    return [
        Row("Non-stream RPS, 64 conns", rps(NS64), 0),
        Row("Non-stream p50 latency, 8 conns (ms)", latency(NS8, "p50"), 3),
        Row("Non-stream p99 latency, 8 conns (ms)", latency(NS8, "p99"), 3),
        Row("Stream RPS, 64 conns, 20 chunks", rps(STREAM64), 0),
        Row(f"Stream TTFB p50, {len(results[0].ttfb_ms)} sequential (ms)", ttfb50, 3),
        Row("Stream TTFB p99 (ms)", per(lambda r: percentile(r.ttfb_ms, 99)), 3),
        Row("Added TTFB p50 vs direct (ms)", added, 3, "sidecar ≤ 0.5 ms", sidecar_at_most(0.5)),
        Row(
            "Proxy CPU µs/req, non-stream, 64 conns",
            cpu(NS64),
            1,
            "sidecar/nginx ≤ 1.5",
            ratio_at_most(1.5, paired_ratio(results, NS64)),
            paired=paired_ratio(results, NS64),
        ),
        Row(
            "Proxy CPU µs/req, stream, 64 conns",
            cpu(STREAM64),
            1,
            "sidecar/nginx ≤ 1.3",
            ratio_at_most(1.3, paired_ratio(results, STREAM64)),
            paired=paired_ratio(results, STREAM64),
        ),
        Row("Proxy CPU µs/req, stream 1 ms apart, 64 conns", cpu(PACED64), 1, "info"),
        Row(
            "Proxy peak RSS at 64 conns (MiB)",
            per(lambda r: r.rss_at_64_mib),
            1,
            "sidecar < 40 MiB",
            sidecar_at_most(40, strict=True),
        ),
        Row("Proxy CPU µs/req, non-stream, 8 conns", cpu(NS8), 1, paired=paired_ratio(results, NS8)),
        Row("Proxy CPU µs/req, non-stream, 256 conns", cpu(NS256), 1, paired=paired_ratio(results, NS256)),
        Row(
            "CPU µs/req at 8/64/256 conns: max dev. from mean (%)",
            per(flatness),
            1,
            "sidecar ≤ 20 %",
            sidecar_at_most(20),
        ),
        Row("Burst, 1000 conns: RPS", rps(BURST1000), 0),
        Row("Burst, 1000 conns: p99 (ms)", latency(BURST1000, "p99"), 1),
        Row("Burst, 1000 conns: errors", errors(BURST1000), 0, "sidecar 0", zero, ratio=False),
        Row("2000-char prompt, 64 conns: RPS", rps(LONG64), 0),
        Row("2000-char prompt, 64 conns: p99 (ms)", latency(LONG64, "p99"), 2),
        Row("2000-char prompt: errors", errors(LONG64), 0, "sidecar 0", zero, ratio=False),
        Row("70/30 short/long mix, 64 conns: RPS", rps(MIX64), 0),
        Row("70/30 short/long mix: errors", errors(MIX64), 0, "sidecar 0", zero, ratio=False),
        Row("Proxy peak RSS after the burst (MiB)", per(lambda r: r.rss_peak_mib), 1),
        Row("Errors, all measured wrk runs", errors(*AT_64, *AFTER_64), 0, "sidecar 0", zero, ratio=False),
    ]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], right: int = 1) -> str:
    """A padded markdown table; columns from ``right`` on are right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "| " + " | ".join(c.rjust(w) if i >= right else c.ljust(w) for i, (c, w) in pairs) + " |"

    rule = "|".join("-" * (w + 1) + ":" if i >= right else "-" * (w + 2) for i, w in enumerate(widths))
    return "\n".join([line(header), f"|{rule}|", *(line(r) for r in rows)])


def summary_table(rows: Sequence[Row]) -> str:
    header = ("metric", *TARGETS, "sidecar/nginx", "bar", "pass/fail")
    return markdown_table(header, [row.cells() for row in rows])


def runs_table(results: Sequence[TargetResult]) -> str:
    header = ("server", "run", "conns", "requests", "req/s", "p50", "p99", "max", "errors", "CPU µs/req")
    rows = [
        (
            r.name,
            run.scenario.title,
            str(run.scenario.connections),
            f"{run.wrk.requests:,}",
            fmt(run.wrk.rps, 0),
            fmt(run.wrk.latency_ms["p50"], 2),
            fmt(run.wrk.latency_ms["p99"], 2),
            fmt(run.wrk.latency_ms["max"], 1),
            error_breakdown(run.wrk),
            fmt(run.cpu_us, 1),
        )
        for r in results
        for run in r.runs.values()
    ]
    return markdown_table(header, rows, right=2)


def cpu_rounds_text(settings: Settings) -> str:
    rounds, seconds = rounds_for(settings.duration_s)
    return f"{rounds} rounds of {seconds} s wrk runs"


def cpu_rounds_table(results: Sequence[TargetResult]) -> str:
    """Every round of the interleaved CPU runs, nginx vs the sidecar, then the medians."""
    by_name = {r.name: r for r in results}
    nginx_result, sidecar_result = by_name.get("nginx"), by_name.get("sidecar")
    if nginx_result is None or sidecar_result is None or not sidecar_result.cpu_rounds:
        return "(not measured)"
    rows = []
    for scenario in CPU_ROUND_SCENARIOS:
        a, b = nginx_result.cpu_rounds.get(scenario.key, []), sidecar_result.cpu_rounds.get(scenario.key, [])
        title = f"{scenario.title}, {scenario.connections} conns"
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            rows.append((title, str(i + 1), fmt(x, 1), fmt(y, 1), f"{y / x:.2f}"))
        x_med, y_med = nginx_result.cpu_us(scenario), sidecar_result.cpu_us(scenario)
        paired = paired_ratio(results, scenario)
        rows.append((title, "median", fmt(x_med, 1), fmt(y_med, 1), fmt(paired, 2)))
    header = ("run", "round", "nginx CPU µs/req", "sidecar CPU µs/req", "sidecar/nginx")
    return markdown_table(header, rows, right=2)


def error_breakdown(result: WrkResult) -> str:
    parts = [f"{k} {v}" for k, v in result.errors.items() if v]
    return f"{result.total_errors} ({', '.join(parts)})" if parts else "0"


def notes(results: Sequence[TargetResult], rows: Sequence[Row]) -> list[str]:
    """Failed bars and every wrk run with errors, in any column."""
    out = [f"FAIL: {row.metric} (bar: {row.bar})" for row in rows if row.cells()[-1] == "**FAIL**"]
    for r in results:
        for run in r.runs.values():
            if run.wrk.total_errors:
                out.append(f"errors: {r.name}, {run.scenario.title}: {error_breakdown(run.wrk)}")
    return out


Machine = list[tuple[str, str]]


def machine_info(tools: Tools) -> Machine:
    """What the figures were taken on (before the run)."""
    cpu_model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu_model = line.split(":", 1)[1].strip()
            break
    return [
        ("nproc", str(os.cpu_count())),
        ("CPU", cpu_model),
        ("kernel", platform.release()),
        ("Python", platform.python_version()),
        ("nginx", nginx.version(tools.nginx)),
        ("wrk", wrk_version(tools.wrk)),
        ("load average before the run", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ]


def report(
    settings: Settings,
    machine: Machine,
    results: Sequence[TargetResult],
    warnings: Sequence[str],
    image: str,
    sections: Sequence[str] = (),
) -> str:
    rows = summary_rows(results)
    shown_machine = "\n".join(f"- {k}: {v}" for k, v in machine)
    lines = [*(f"warning: {w}" for w in warnings), *notes(results, rows)]
    remarks = "\n".join(f"- {line}" for line in lines) or "- every bar passed, no errors"
    extra = "".join(f"{section.rstrip()}\n\n" for section in sections)
    return f"""# Benchmark {datetime.datetime.now().strftime("%Y-%m-%d %H:%M")}

Command: `{settings.command}`

{shown_machine}

Method:

- Servers: the mock (`bench.mock_backend`) direct; nginx in front of it (bench/nginx.py: one worker,
  upstream keepalive 128, no buffering); the sidecar in front of it (`python -m proxy`, no middleware).
- CPUs: wrk (1 thread, `--timeout {WRK_TIMEOUT}`), the mock and the stream client on CPU {settings.load_cpu};
  the proxy on CPU {settings.proxy_cpu}.
- Runs: per server a {settings.warmup_s} s warm-up, then {settings.duration_s} s per wrk run. Latencies in ms.
- Proxy CPU = utime+stime from /proc (nginx: master + worker) over a run / requests wrk completed.
  The non-streaming CPU rows (8, 64, 256 conns; the 1.5× bar and flatness) and the 20-chunk
  stream's (the 1.3× bar) are medians over
  {cpu_rounds_text(settings)}, nginx and the sidecar taking turns (nginx first, then the sidecar
  first, …) after each server's own runs, so that drift on the machine hits both alike; their
  sidecar/nginx (and the bar) is the median of the rounds' own ratios, each of two runs side by
  side in time. Every round is under "CPU rounds". The paced stream's CPU comes from one run.
- Peak RSS = VmHWM (nginx: master + worker).
- Streams: 20 chunks back to back (`x-mock-chunks: 20`, the bar) and 20 chunks 1 ms apart
  (`x-mock-delay-ms: 1`, as tokens come from a model): back-to-back events coalesce into fewer reads
  and writes by chance, so that CPU per request swings between runs (seen: nginx 129–192 µs); paced
  events are one read and one write each (seen: nginx 223–248 µs, the sidecar 263–315 µs).
- TTFB = request written → first byte of the SSE body; {settings.ttfb_requests} sequential streams
  per server on one keep-alive connection each (`x-mock-chunks: 2`, `x-mock-delay-ms: 2`), the three
  servers taking turns in 10 rounds, after the wrk runs.
- Flatness = the largest deviation of CPU µs/request at 8, 64 and 256 connections from their mean.
- Errors = wrk socket errors (connect, read, write, timeout) + non-2xx answers.

## Summary

{summary_table(rows)}

{remarks}

{extra}## CPU rounds

{cpu_rounds_table(results)}

## Every wrk run

{runs_table(results)}

![latency]({image})
"""


def plot(results: Sequence[TargetResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in results:
        latency = r.runs[NS8.key].wrk.latency_ms
        left.plot(PERCENTILES, [latency[p] for p in PERCENTILES], marker="o", label=r.name)
        xs = sorted(r.ttfb_ms)
        right.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post", label=r.name)
    left.set(title="Non-stream latency, 8 connections (wrk)", xlabel="percentile", ylabel="ms (log)")
    left.set_yscale("log")
    right.set(title="Stream: time to first body byte", xlabel="ms (log)", ylabel="fraction of requests")
    right.set_xscale("log")
    for axis in (left.yaxis, right.xaxis):  # ticks at 1, 2, 5 × 10^n, written plainly
        axis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
        axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(
    settings: Settings,
    machine: Machine,
    results: Sequence[TargetResult],
    warnings: Sequence[str],
    sections: Sequence[str] = (),  # more markdown (bench.ratelimit.section, …): printed, and on the page
) -> None:
    rows = summary_rows(results)
    print(
        summary_table(rows), *(f"warning: {w}" for w in warnings), *notes(results, rows), *sections, sep="\n"
    )
    day = datetime.date.today().isoformat()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    image = settings.out_dir / f"{day}-latency.png"
    plot(results, image)
    page = settings.out_dir / f"{day}.md"
    page.write_text(report(settings, machine, results, warnings, image.name, sections))
    say(f"wrote {page} and {image}")
