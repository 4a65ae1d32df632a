"""Admission control: at most ``max_in_flight`` requests run, at most ``max_queue`` wait.

A request waits for a slot at most its budget (or the default maximum wait), then is
refused with :class:`CapacityError`; it never waits forever.

The hot path must cost well under a microsecond, so it takes no Python lock: slots are
tokens in a C-implemented ``queue.SimpleQueue`` (``get_nowait``/``put`` are atomic), and
each finished request appends one tuple to a deque (atomic too). Readers (telemetry,
router, status) drain that log under a lock into the counters, the latency window and
the per-model service-time estimate (EWMA). Only a request that finds no free slot takes
the lock, to count itself against the queue bound, and so does a finished request that
hands its slot to a waiter.

Waiting requests are served first come, first served: each waits on a lock of its own
in a FIFO, a finished request hands its slot straight to the oldest waiter, and a
newcomer does not take a free slot while others wait. Waiting on one shared token queue,
whichever thread the OS woke first took the slot, and newcomers overtook the queue: at
90% load 7% of requests waited over 20 ms longer than the queue ahead of them (p99: 77
ms longer, for a 9 ms service), which no estimate from the queue depth can foresee, and
which the router needs to foresee.

The router reads :meth:`Admission.routing_estimate`: the median and median absolute
deviation of the last service times, robust to one slow run (a pause that an average
would carry for dozens of requests). It goes stale when no run has finished for
``stale_s`` while nothing runs: a router that refuses everything because of an old
estimate would otherwise never run again to learn better. It also reads
:meth:`Admission.running_ms`, how long each run in flight has been going: a run half
done frees its slot in half a service time, and counting it as a whole one made the
router send requests away from a device that would have served them in time.
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from threading import get_ident

from fogline.protocol import CapacityError

__all__ = ["Admission", "CapacitySnapshot", "percentile"]

_EWMA_ALPHA = 0.1
_SERVICE_WINDOW = 32  # service times the routing estimate looks at, per model
_LATENCY_WINDOW = 2048
_DRAIN_AT = 4096  # drain the log on the hot path only if nobody has read it for long


@dataclass(frozen=True)
class CapacitySnapshot:
    in_flight: int
    queue_depth: int
    max_in_flight: int
    max_queue: int
    requests: int
    errors: int
    refused: int
    budgeted: int
    met_budget: int
    latency_p50_ms: float
    latency_p99_ms: float


class Admission:
    """Slots for concurrent requests, a bounded wait queue, and service-time stats."""

    def __init__(self, max_in_flight: int, max_queue: int, default_max_wait_ms: float) -> None:
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.default_max_wait_s = default_max_wait_ms / 1000.0
        self._tokens: queue.SimpleQueue[None] = queue.SimpleQueue()
        for _ in range(max_in_flight):
            self._tokens.put(None)
        self._log: deque[tuple[str, float, float, bool, bool | None]] = deque()
        self._lock = threading.Lock()
        self._waiters: deque[threading.Lock] = deque()  # one held lock per waiter, oldest first
        self.waiting = 0
        self._requests = 0
        self._errors = 0
        self.refused = 0
        self._budgeted = 0
        self._met = 0
        self._service_ms: dict[str, float] = {}
        self._recent_service: dict[str, deque[float]] = {}
        self._last_service_at: dict[str, float] = {}
        self.stale_s = 1.0
        self._latencies: deque[float] = deque(maxlen=_LATENCY_WINDOW)
        # When each run in flight took its slot, by thread (dict writes are atomic).
        self._running: dict[int, float] = {}

    # -- hot path -------------------------------------------------------------------------
    def acquire(self, budget_ms: float | None) -> bool:
        """Take a slot, waiting at most ``budget_ms`` (or the default maximum wait).
        Returns whether it had to wait."""
        waited = False
        try:
            if self._waiters:  # others are queued: do not overtake them
                raise queue.Empty
            self._tokens.get_nowait()
        except queue.Empty:
            waited = self._wait(budget_ms)
        self._running[get_ident()] = time.monotonic()
        return waited

    def release(
        self, model: str, service_ms: float, latency_ms: float, ok: bool, met: bool | None = None
    ) -> None:
        """Give the slot back and record how the request went (``met``: whether it met
        its latency budget; None without a budget)."""
        self._running.pop(get_ident(), None)
        if not (self._waiters and self._hand_over()):
            self._tokens.put(None)
            if self._waiters:  # one queued itself as the slot came back: wake it
                self._hand_over(from_tokens=True)
        log = self._log
        log.append((model, service_ms, latency_ms, ok, met))
        if len(log) > _DRAIN_AT:
            self._drain()

    # -- slow path ------------------------------------------------------------------------
    def _wait(self, budget_ms: float | None) -> bool:
        """Queue behind the waiters (FIFO) until a slot is handed over; returns whether
        it waited (False: a slot came free before it queued)."""
        with self._lock:
            if not self._waiters:
                try:
                    self._tokens.get_nowait()
                    return False
                except queue.Empty:
                    pass
            if self.waiting >= self.max_queue:
                self.refused += 1
                raise CapacityError(
                    f"over capacity: {self.in_flight} requests in flight and {self.waiting} "
                    f"queued (max {self.max_in_flight} + {self.max_queue})"
                )
            turn = threading.Lock()
            turn.acquire()
            self._waiters.append(turn)
            self.waiting += 1
            try:  # a slot that came back while this one queued goes to the oldest waiter
                self._tokens.get_nowait()
                self._waiters.popleft().release()
            except queue.Empty:
                pass
        wait_s = self.default_max_wait_s if budget_ms is None else max(budget_ms, 0.0) / 1000.0
        granted = turn.acquire(timeout=wait_s) if wait_s > 0 else False
        with self._lock:
            if not granted:
                try:
                    self._waiters.remove(turn)
                except ValueError:
                    granted = True  # handed over as the wait ran out: the slot is ours
            self.waiting -= 1
            if not granted:
                self.refused += 1
        if not granted:
            raise CapacityError(
                f"over capacity: no inference slot freed within {wait_s * 1000:.0f} ms "
                f"({self.in_flight} in flight, {self.waiting} queued)"
            )
        return True

    def _hand_over(self, *, from_tokens: bool = False) -> bool:
        """Give a slot to the oldest waiter: the caller's (it keeps it out of the token
        queue), or with ``from_tokens`` a free one from the queue. Returns whether a
        waiter got it."""
        with self._lock:
            if not self._waiters:
                return False
            if from_tokens:
                try:
                    self._tokens.get_nowait()
                except queue.Empty:
                    return False  # someone took it already
            self._waiters.popleft().release()
            return True

    def _drain(self) -> None:
        with self._lock:
            log = self._log
            while log:
                try:
                    model, service_ms, latency_ms, ok, met = log.popleft()
                except IndexError:
                    break
                self._requests += 1
                if met is not None:
                    self._budgeted += 1
                    self._met += met
                if ok:
                    est = self._service_ms.get(model)
                    self._service_ms[model] = (
                        service_ms if est is None else est + _EWMA_ALPHA * (service_ms - est)
                    )
                    recent = self._recent_service.get(model)
                    if recent is None:
                        recent = self._recent_service[model] = deque(maxlen=_SERVICE_WINDOW)
                    recent.append(service_ms)
                    self._last_service_at[model] = time.monotonic()
                    self._latencies.append(latency_ms)
                else:
                    self._errors += 1

    # -- readers (router, telemetry) ---------------------------------------------------------
    @property
    def in_flight(self) -> int:
        return max(0, self.max_in_flight - self._tokens.qsize())

    @property
    def queue_depth(self) -> int:
        return self.waiting

    @property
    def requests(self) -> int:
        self._drain()
        return self._requests

    @property
    def errors(self) -> int:
        self._drain()
        return self._errors

    def service_estimate_ms(self, model: str) -> float | None:
        """Running estimate (EWMA) of the local service time of ``model``."""
        self._drain()
        return self._service_ms.get(model)

    def routing_estimate(self, model: str) -> tuple[float | None, float]:
        """Median and median absolute deviation (ms) of ``model``'s last service times,
        or ``(None, 0.0)`` when unknown or stale (see the module docstring)."""
        self._drain()
        with self._lock:
            recent = list(self._recent_service.get(model, ()))
            last = self._last_service_at.get(model, 0.0)
        idle = self.in_flight == 0 and self.waiting == 0
        if not recent or (idle and time.monotonic() - last > self.stale_s):
            return None, 0.0
        median = statistics.median(recent)
        return median, statistics.median(abs(x - median) for x in recent)

    def running_ms(self) -> tuple[float, ...]:
        """How long (ms) each run in flight has held its slot, oldest first."""
        now = time.monotonic()
        starts = sorted(self._running.values())  # one C-level copy: atomic under the GIL
        return tuple((now - t) * 1000.0 for t in starts)

    def expected_wait_ms(self, model: str) -> float:
        """Rough local queueing delay: requests ahead times the service time per slot."""
        if self.in_flight < self.max_in_flight:
            return 0.0
        est = self.service_estimate_ms(model) or 0.0
        return (self.waiting + 1) * est / self.max_in_flight

    def snapshot(self) -> CapacitySnapshot:
        self._drain()
        with self._lock:
            lat = sorted(self._latencies)
            counts = (self._requests, self._errors, self.refused, self._budgeted, self._met)
        return CapacitySnapshot(
            in_flight=self.in_flight,
            queue_depth=self.waiting,
            max_in_flight=self.max_in_flight,
            max_queue=self.max_queue,
            requests=counts[0],
            errors=counts[1],
            refused=counts[2],
            budgeted=counts[3],
            met_budget=counts[4],
            latency_p50_ms=percentile(lat, 50.0),
            latency_p99_ms=percentile(lat, 99.0),
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of ``ordered`` (sorted ascending; 0.0 when empty), with
    numpy's default ("linear") definition: interpolate between the two nearest ranks at
    position ``q / 100 * (n - 1)``. Written out because ``np.percentile`` imports
    ``numpy.ma``, ~1 MB resident on the device for two numbers per heartbeat."""
    n = len(ordered)
    if n == 0:
        return 0.0
    pos = (n - 1) * q / 100.0
    lo = int(pos)
    if lo >= n - 1:
        return float(ordered[-1])
    a, b = ordered[lo], ordered[lo + 1]
    return float(a + (b - a) * (pos - lo))
