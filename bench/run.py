"""Load runner: the mock backend direct, nginx in front of it and the sidecar in front of it, in one run.

``make bench`` = ``python -m bench.run [--duration 5] [--quick]``. It installs ``wrk`` and ``nginx`` with
apt-get when they are missing, starts ``bench.mock_backend``, nginx proxying it and the sidecar
proxying it, and loads the three in turn with ``wrk`` (HTTP/1.1, one thread, a generated Lua script
that POSTs the bodies, counts non-2xx answers and prints one JSON line) for throughput, latency, CPU
and memory; then a small asyncio client times the first byte of streams, the servers taking turns.
wrk, the mock and this runner are pinned to one CPU, the proxy under test to the other, so the proxy's
CPU time per request (utime+stime from /proc over the requests wrk completed) is its own.

Prints a markdown table and writes it, with the machine and every wrk run, to
``bench/results/<date>.md``, and a latency plot to ``bench/results/<date>-latency.png``.
Exit status: 0 when the run completed, whatever the bars say (it is a report); 1 when a tool is
missing or a server does not start or dies; 130 on Ctrl-C. Every child process is stopped on the way out.

The parts: ``bench.procs`` (tools, child processes, /proc), ``bench.servers`` (the three servers),
``bench.wrk`` (the runs and wrk), ``bench.cpu_rounds`` (nginx and the sidecar taking turns for the
barred CPU rows), ``bench.ttfb`` (the stream client), ``bench.report`` (the table,
the markdown page, the plot) and ``bench.nginx`` (nginx's config); this module is the command line
and the order of one run.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import uvloop

from bench import h2, observability, resilience
from bench.common import REPO_ROOT, BenchError, Settings, say
from bench.cpu_rounds import measure_cpu_rounds
from bench.procs import (
    Children,
    CpuSnapshot,
    Tools,
    cpu_not_ours,
    cpu_seconds,
    ensure_tools,
    peak_rss_mib,
    raise_fd_limit,
)
from bench.ratelimit import measure_rate_limit, section
from bench.report import Run, TargetResult, machine_info, write_results
from bench.resilience import measure_resilience
from bench.servers import Target, check_target, start_mock, start_nginx, start_sidecar
from bench.ttfb import first_byte_times
from bench.wrk import AFTER_64, AT_64, NS64, Scenario, run_wrk

# ---- settings ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> Settings:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, help="seconds per measured wrk run (default 5; quick 2)")
    p.add_argument("--warmup", type=int, help="seconds of warm-up per server (default 2; quick 1)")
    p.add_argument("--ttfb-requests", type=int, help="streams timed per server (default 300; quick 100)")
    p.add_argument("--quick", action="store_true", help="a ~1 minute smoke run with the quick defaults")
    p.add_argument("--load-cpu", type=int, default=0, help="CPU of wrk, the mock and this runner")
    p.add_argument("--proxy-cpu", type=int, default=1, help="CPU of the proxy under test")
    p.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bench" / "results")
    args = p.parse_args(argv)
    defaults = (2, 1, 100) if args.quick else (5, 2, 300)
    given = (args.duration, args.warmup, args.ttfb_requests)
    duration, warmup, ttfb = (d if g is None else g for g, d in zip(given, defaults, strict=True))
    if min(duration, warmup, ttfb) < 1:
        p.error("--duration, --warmup and --ttfb-requests must be at least 1")
    return Settings(
        duration_s=duration,
        warmup_s=warmup,
        ttfb_requests=ttfb,
        load_cpu=args.load_cpu,
        proxy_cpu=args.proxy_cpu,
        out_dir=args.out_dir,
        command=shlex.join(["python", "-m", "bench.run", *argv]),
    )


# ---- measuring -----------------------------------------------------------------------------------


def measured_run(
    target: Target, scenario: Scenario, tools: Tools, settings: Settings, workdir: Path, seconds: int = 0
) -> Run:
    before = cpu_seconds(target.proxy_pids)
    result = run_wrk(tools.wrk, target, scenario, seconds or settings.duration_s, workdir, settings.load_cpu)
    used = cpu_seconds(target.proxy_pids) - before
    if target.proc.poll() is not None:
        raise BenchError(f"{target.name} exited with {target.proc.returncode} during the {scenario.key} run")
    cpu_us = used * 1e6 / result.requests if target.proxy_pids and result.requests else None
    shown_cpu = "" if cpu_us is None else f", proxy CPU {cpu_us:.1f} µs/req"
    say(
        f"  {target.name:8} {scenario.key:10} {result.rps:9.0f} req/s  p50 {result.latency_ms['p50']:7.2f} ms"
        f"  p99 {result.latency_ms['p99']:7.2f} ms  errors {result.total_errors}{shown_cpu}"
    )
    return Run(scenario, result, cpu_us)


def measure_with_wrk(target: Target, tools: Tools, settings: Settings, workdir: Path) -> TargetResult:
    say(f"{target.name}: {target.url} (warm-up {settings.warmup_s} s)")
    run_wrk(tools.wrk, target, NS64, settings.warmup_s, workdir, settings.load_cpu)
    out = TargetResult(target.name)
    for scenario in AT_64:
        out.runs[scenario.key] = measured_run(target, scenario, tools, settings, workdir)
    if target.proxy_pids:
        out.rss_at_64_mib = peak_rss_mib(target.proxy_pids)
    for scenario in AFTER_64:
        out.runs[scenario.key] = measured_run(target, scenario, tools, settings, workdir)
    if target.proxy_pids:
        out.rss_peak_mib = peak_rss_mib(target.proxy_pids)
    return out


def measure_all(settings: Settings, tools: Tools, sections: list[str]) -> list[TargetResult]:
    """Start the mock, nginx and the sidecar, check each, load each in turn, then time streams;
    then the extra comparisons, each a markdown section appended to ``sections``."""
    with tempfile.TemporaryDirectory(prefix="llm-sidecar-bench-") as tmp, Children(Path(tmp)) as children:
        workdir = Path(tmp)
        mock = start_mock(children, settings.load_cpu)
        targets = [
            mock,
            start_nginx(children, tools.nginx, workdir, mock, settings.proxy_cpu),
            start_sidecar(children, workdir, mock, settings.proxy_cpu),
        ]
        for target in targets:
            check_target(target)
        os.sched_setaffinity(0, {settings.load_cpu})  # the stream client is load generator too
        results = [measure_with_wrk(target, tools, settings, workdir) for target in targets]
        say("proxy CPU per request: nginx and the sidecar taking turns (bench.cpu_rounds)")
        rounds = measure_cpu_rounds(
            targets[1:],
            lambda t, s, seconds: measured_run(t, s, tools, settings, workdir, seconds).cpu_us,
            settings.duration_s,
        )
        for result in results:
            result.cpu_rounds = rounds.values.get(result.name, {})
        say(f"stream time to first byte: {settings.ttfb_requests} per server, taking turns")
        ports = [target.port for target in targets]
        times: list[list[float]] = uvloop.run(first_byte_times(ports, settings.ttfb_requests))
        for result, ttfb_ms in zip(results, times, strict=True):
            result.ttfb_ms = ttfb_ms
            say(f"  {result.name:8} ttfb p50 {statistics.median(ttfb_ms):.3f} ms")
        sections.append(section(measure_rate_limit(children, workdir, mock, tools, settings)))
        sections.append(resilience.section(measure_resilience(children, workdir, mock, tools, settings)))
        sections.append(
            observability.section(
                observability.measure_observability(children, workdir, mock, tools, settings)
            )
        )
        sections.append(
            h2.section(h2.measure_h2(children, workdir, settings, tools.nginx, mock, targets[2]), settings)
        )
        return results


# ---- main ----------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def check_cpus(settings: Settings) -> None:
    available = os.sched_getaffinity(0)
    for cpu in (settings.load_cpu, settings.proxy_cpu):
        if cpu not in available:
            raise BenchError(f"CPU {cpu} is not available to this process (it may use {sorted(available)})")
    if settings.load_cpu == settings.proxy_cpu:
        say("warning: the load generator and the proxy share one CPU; CPU per request still holds")


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(sys.argv[1:] if argv is None else argv)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # SIGINT too: it may come in ignored
        signal.signal(sig, _interrupt)
    started = time.monotonic()
    try:
        check_cpus(settings)
        raise_fd_limit()
        tools = ensure_tools()
        machine, warnings = machine_info(tools), []
        before = CpuSnapshot.take()
        sections: list[str] = []
        results = measure_all(settings, tools, sections)
        other_s, share = cpu_not_ours(before, CpuSnapshot.take())
        what = "CPU time outside the bench during the run (other processes, kernel threads)"
        machine.append((what, f"{other_s:.1f} s ({share:.1%} of all CPUs)"))
        if share > 0.1:
            warnings.append(f"{share:.0%} of the CPUs went to other work during the run: figures skewed")
        write_results(settings, machine, results, warnings, sections)
    except KeyboardInterrupt:
        say("interrupted")
        return 130
    except (BenchError, OSError, subprocess.SubprocessError) as e:  # OSError: TimeoutError too
        say(f"bench failed: {e}")
        return 1
    say(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
