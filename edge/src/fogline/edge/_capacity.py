"""Admission control: at most ``max_in_flight`` requests run, at most ``max_queue`` wait.

A request waits for a slot at most its budget (or the default maximum wait), then is
refused with :class:`CapacityError`; it never waits forever. The fast path (a free slot)
takes one uncontended lock. Counters and the per-model service-time estimate (EWMA) are
updated under that same lock when a request finishes; the router reads them.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

from fogline.protocol import CapacityError

__all__ = ["Admission", "CapacitySnapshot"]

_EWMA_ALPHA = 0.1
_LATENCY_WINDOW = 2048


@dataclass(frozen=True)
class CapacitySnapshot:
    in_flight: int
    queue_depth: int
    max_in_flight: int
    max_queue: int
    requests: int
    errors: int
    refused: int
    latency_p50_ms: float
    latency_p99_ms: float


class Admission:
    """Slots for concurrent requests, a bounded wait queue, and service-time stats."""

    def __init__(self, max_in_flight: int, max_queue: int, default_max_wait_ms: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.default_max_wait_s = default_max_wait_ms / 1000.0
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self.in_flight = 0
        self.waiting = 0
        self.requests = 0
        self.errors = 0
        self.refused = 0
        self._service_ms: dict[str, float] = {}
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)

    # -- hot path -------------------------------------------------------------------------
    def acquire(self, budget_ms: float | None) -> None:
        """Take a slot, waiting at most ``budget_ms`` (or the default maximum wait)."""
        with self._lock:
            if self.in_flight < self.max_in_flight and not self.waiting:
                self.in_flight += 1
                return
            self._wait(budget_ms)

    def release(self, model: str, service_ms: float, latency_ms: float, ok: bool) -> None:
        """Give the slot back and record how the request went."""
        with self._lock:
            self.in_flight -= 1
            self.requests += 1
            if ok:
                est = self._service_ms.get(model)
                self._service_ms[model] = (
                    service_ms if est is None else est + _EWMA_ALPHA * (service_ms - est)
                )
                self._latencies.append(latency_ms)
            else:
                self.errors += 1
            if self.waiting:
                self._freed.notify()

    # -- slow path (lock held) --------------------------------------------------------------
    def _wait(self, budget_ms: float | None) -> None:
        if self.waiting >= self.max_queue:
            self.refused += 1
            raise CapacityError(
                f"over capacity: {self.in_flight} requests in flight and {self.waiting} queued "
                f"(max {self.max_in_flight} + {self.max_queue})"
            )
        wait_s = self.default_max_wait_s if budget_ms is None else max(budget_ms, 0.0) / 1000.0
        deadline = time.monotonic() + wait_s
        self.waiting += 1
        try:
            while self.in_flight >= self.max_in_flight:
                left = deadline - time.monotonic()
                if left <= 0 or not self._freed.wait(left):
                    if self.in_flight < self.max_in_flight:
                        break
                    self.refused += 1
                    raise CapacityError(
                        f"over capacity: no inference slot freed within {wait_s * 1000:.0f} ms "
                        f"({self.in_flight} in flight, {self.waiting} queued)"
                    )
            self.in_flight += 1
        finally:
            self.waiting -= 1

    # -- readers (router, telemetry) ---------------------------------------------------------
    @property
    def queue_depth(self) -> int:
        return self.waiting

    def service_estimate_ms(self, model: str) -> float | None:
        """Running estimate (EWMA) of the local service time of ``model``."""
        return self._service_ms.get(model)

    def expected_wait_ms(self, model: str) -> float:
        """Rough local queueing delay: queued requests ahead times the service time."""
        est = self._service_ms.get(model) or 0.0
        if self.in_flight < self.max_in_flight:
            return 0.0
        return (self.waiting + 1) * est / self.max_in_flight

    def snapshot(self) -> CapacitySnapshot:
        with self._lock:
            lat = np.fromiter(self._latencies, dtype=np.float64, count=len(self._latencies))
            snap = (self.in_flight, self.waiting, self.requests, self.errors, self.refused)
        p50, p99 = (float(v) for v in np.percentile(lat, [50, 99])) if lat.size else (0.0, 0.0)
        return CapacitySnapshot(
            in_flight=snap[0],
            queue_depth=snap[1],
            max_in_flight=self.max_in_flight,
            max_queue=self.max_queue,
            requests=snap[2],
            errors=snap[3],
            refused=snap[4],
            latency_p50_ms=p50,
            latency_p99_ms=p99,
        )
