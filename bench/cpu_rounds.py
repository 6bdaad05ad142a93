"""Proxy CPU per request, nginx and the sidecar taking turns: the summary's barred CPU rows.

The wrk runs of ``bench.run`` go server after server, so whatever else the machine does drifts
between nginx's runs and the sidecar's (±10 % seen here from one run to the next): enough to move
the CPU ratio across its bar. Here the two proxies are loaded in rounds, nginx then the sidecar,
then the sidecar then nginx (ABBA: a drift that is linear in time hits both alike), each round
every non-streaming scenario (8, 64 and 256 connections) and the 20-chunk stream at 64 (whose CPU per
request swings most from run to run); the summary takes each proxy's median over the rounds and
each bar the median of the rounds' own ratios. ``bench.report`` shows every round.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bench.servers import Target
from bench.wrk import NS8, NS64, NS256, STREAM64, Scenario

SCENARIOS = (NS64, NS8, NS256, STREAM64)


def rounds_for(duration_s: int) -> tuple[int, int]:
    """(rounds, seconds per wrk run): 3 × 2 s in a quick run, else 5 × 3 s."""
    return (3, 2) if duration_s <= 2 else (5, 3)


@dataclass
class CpuRounds:
    """CPU µs per request of each proxy in each scenario, one value per round, in round order."""

    seconds: int
    values: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # proxy → scenario key → rounds

    def add(self, proxy: str, scenario: Scenario, cpu_us: float) -> None:
        self.values.setdefault(proxy, {}).setdefault(scenario.key, []).append(cpu_us)

    def of(self, proxy: str, scenario: Scenario) -> list[float]:
        return self.values.get(proxy, {}).get(scenario.key, [])

    def median(self, proxy: str, scenario: Scenario) -> float | None:
        values = self.of(proxy, scenario)
        return statistics.median(values) if values else None

    @property
    def rounds(self) -> int:
        return max((len(v) for per in self.values.values() for v in per.values()), default=0)


# One measured wrk run of a proxy: its CPU µs per request (None when it has no CPU to read).
RunCpu = Callable[[Target, Scenario, int], float | None]


def measure_cpu_rounds(proxies: Sequence[Target], run: RunCpu, duration_s: int) -> CpuRounds:
    """Load ``proxies`` (nginx, the sidecar) in interleaved rounds; their CPU per request."""
    rounds, seconds = rounds_for(duration_s)
    out = CpuRounds(seconds)
    for turn in range(rounds):
        order = proxies if turn % 2 == 0 else list(reversed(proxies))
        for scenario in SCENARIOS:
            for proxy in order:
                cpu_us = run(proxy, scenario, seconds)
                if cpu_us is not None:
                    out.add(proxy.name, scenario, cpu_us)
    return out
