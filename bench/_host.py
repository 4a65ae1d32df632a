"""How fast this (shared) host runs plain Python right now, for comparing benchmark
figures across runs: absolute times drift with the host's load and speed, and the
ratios drift with them (docs/benchmarks.md)."""

from __future__ import annotations

import statistics
import time

__all__ = ["python_speed_ms"]


def python_speed_ms(repeat: int = 7) -> float:
    """Median milliseconds of ``sum(range(10**6))``: 12 ms on a fast day, 17-30 on a slow."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sum(range(10**6))
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
