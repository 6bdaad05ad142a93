"""Counts over a sliding window of whole seconds: a ring of 1-second buckets, no I/O, no clock of
its own (the caller passes ``now``). The circuit breaker counts (calls, failures) in one, the retry
budget (requests, retries)."""

from __future__ import annotations


class WindowCounts:
    """Two counts per second over the last ``window_s`` seconds. Adding is O(1); totals O(window_s)."""

    __slots__ = ("_firsts", "_seconds", "_stamps")

    def __init__(self, window_s: int) -> None:
        if window_s < 1:
            raise ValueError(f"a window needs window_s ≥ 1, got {window_s}")
        self._stamps = [-1] * window_s  # the whole second each bucket counts, or -1
        self._firsts = [0] * window_s
        self._seconds = [0] * window_s

    def add(self, now: float, first: int = 0, second: int = 0) -> None:
        whole = int(now)
        i = whole % len(self._stamps)
        if self._stamps[i] != whole:  # the bucket held an older second: start it again
            self._stamps[i] = whole
            self._firsts[i] = 0
            self._seconds[i] = 0
        self._firsts[i] += first
        self._seconds[i] += second

    def totals(self, now: float) -> tuple[int, int]:
        """Both counts over the seconds still in the window at ``now``."""
        oldest = int(now) - len(self._stamps)
        firsts = seconds = 0
        for i, stamp in enumerate(self._stamps):
            if stamp > oldest:
                firsts += self._firsts[i]
                seconds += self._seconds[i]
        return firsts, seconds

    def clear(self) -> None:
        self._stamps = [-1] * len(self._stamps)
