"""Fault injection: scenario timelines, random connectivity flaps and faults on demand.

The injector does not know how a fault is done; it asks a :class:`FaultTarget` (the
simulated fleet) to apply one, and schedules its undo (reconnect, restart, restore the
link) when the fault has a duration. Faults run on a small worker pool so a slow kill
of one agent does not hold up the rest of the timeline.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal, Protocol

from fogline.protocol import FoglineError

from ._profiles import FlapProfile
from ._scenario import FaultKind, Scenario, resolve_targets

__all__ = ["FaultInjector", "FaultRecord", "FaultSource", "FaultTarget"]

log = logging.getLogger("fogline.firmware_sim.faults")

FaultSource = Literal["scenario", "flap", "cli", "api"]
_UNDO: dict[FaultKind, FaultKind] = {
    "disconnect": "reconnect",
    "kill": "restart",
    "slow_link": "restore_link",
}


class FaultTarget(Protocol):
    def device_profiles(self) -> Mapping[str, str]:
        """Device id -> profile name, for every simulated device."""
        ...

    def apply_fault(
        self,
        kind: FaultKind,
        device_id: str,
        *,
        extra_latency_ms: float = 0.0,
        bandwidth_kbps: float | None = None,
    ) -> None:
        """Do one fault to one device now; raise a :class:`FoglineError` if it cannot."""
        ...


@dataclass(frozen=True)
class FaultRecord:
    """One fault as it happened: ``at`` is seconds since the injector started."""

    at: float
    device_id: str
    kind: FaultKind
    source: FaultSource
    ok: bool
    detail: str = ""


class FaultInjector:
    def __init__(
        self,
        target: FaultTarget,
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._target = target
        self._rng = random.Random(seed)
        self._clock = clock
        self._t0 = clock()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._history: list[FaultRecord] = []
        self._history_lock = threading.Lock()

    @property
    def history(self) -> list[FaultRecord]:
        with self._history_lock:
            return list(self._history)

    def elapsed(self) -> float:
        return self._clock() - self._t0

    # -- lifecycle ----------------------------------------------------------------------------
    def start(
        self,
        scenario: Scenario | None = None,
        flaps: Mapping[str, FlapProfile] | None = None,
    ) -> None:
        """Schedule ``scenario`` (times relative to now) and each device's flaps.

        Scenario targets are resolved first, so a scenario naming unknown devices fails
        here with a :class:`ConfigError`, before anything runs.
        """
        profiles = self._target.device_profiles()
        planned = [
            (spec, resolve_targets(spec, profiles, self._rng))
            for spec in (scenario.timeline() if scenario else [])
        ]
        self._t0 = self._clock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fogline-sim-fault")
        for spec, devices in planned:
            for device_id in devices:
                self._schedule_at(
                    spec.at,
                    self._fault_job(
                        spec.kind,
                        device_id,
                        "scenario",
                        spec.duration_s,
                        spec.extra_latency_ms,
                        spec.bandwidth_kbps,
                    ),
                )
        for device_id, flap in (flaps or {}).items():
            if flap.per_hour > 0:
                self._schedule_next_flap(device_id, flap, 0.0)
        self._thread = threading.Thread(target=self._run, name="fogline-sim-faults", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._heap.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    # -- faults now ---------------------------------------------------------------------------
    def inject(
        self,
        kind: FaultKind,
        device_id: str,
        *,
        duration_s: float | None = None,
        extra_latency_ms: float = 0.0,
        bandwidth_kbps: float | None = None,
        source: FaultSource = "api",
    ) -> FaultRecord:
        """Apply a fault now (in the caller's thread) and schedule its undo, if timed."""
        if device_id not in self._target.device_profiles():
            raise FoglineError(f"unknown simulated device {device_id!r}")
        if duration_s is not None and kind not in _UNDO:
            raise FoglineError(f"{kind} takes no duration")
        record = self._apply(kind, device_id, source, extra_latency_ms, bandwidth_kbps)
        if record.ok and duration_s is not None:
            self._schedule_at(
                self.elapsed() + duration_s, self._fault_job(_UNDO[kind], device_id, source)
            )
        return record

    # -- internals ----------------------------------------------------------------------------
    def _fault_job(
        self,
        kind: FaultKind,
        device_id: str,
        source: FaultSource,
        duration_s: float | None = None,
        extra_latency_ms: float = 0.0,
        bandwidth_kbps: float | None = None,
    ) -> Callable[[], None]:
        def job() -> None:
            record = self._apply(kind, device_id, source, extra_latency_ms, bandwidth_kbps)
            if record.ok and duration_s is not None:
                self._schedule_at(
                    self.elapsed() + duration_s, self._fault_job(_UNDO[kind], device_id, source)
                )

        return job

    def _apply(
        self,
        kind: FaultKind,
        device_id: str,
        source: FaultSource,
        extra_latency_ms: float,
        bandwidth_kbps: float | None,
    ) -> FaultRecord:
        at = self.elapsed()
        try:
            self._target.apply_fault(
                kind, device_id, extra_latency_ms=extra_latency_ms, bandwidth_kbps=bandwidth_kbps
            )
            record = FaultRecord(at, device_id, kind, source, True)
            log.info("fault %s on %s (%s) at %.2fs", kind, device_id, source, at)
        except FoglineError as exc:
            record = FaultRecord(at, device_id, kind, source, False, exc.message)
            log.warning("fault %s on %s failed: %s", kind, device_id, exc.message)
        with self._history_lock:
            self._history.append(record)
        return record

    def _schedule_next_flap(self, device_id: str, flap: FlapProfile, after: float) -> None:
        start = after + self._rng.expovariate(flap.per_hour / 3600.0)
        down = self._rng.expovariate(1.0 / flap.mean_down_s)

        def flap_down() -> None:
            record = self._apply("disconnect", device_id, "flap", 0.0, None)
            if record.ok:
                self._schedule_at(self.elapsed() + down, flap_up)

        def flap_up() -> None:
            self._apply("reconnect", device_id, "flap", 0.0, None)
            self._schedule_next_flap(device_id, flap, self.elapsed())

        self._schedule_at(start, flap_down)

    def _schedule_at(self, at: float, job: Callable[[], None]) -> None:
        with self._cond:
            if self._stopping:
                return
            heapq.heappush(self._heap, (at, next(self._seq), job))
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopping:
                    if self._heap and self._heap[0][0] <= self.elapsed():
                        break
                    timeout = self._heap[0][0] - self.elapsed() if self._heap else None
                    self._cond.wait(timeout)
                if self._stopping:
                    return
                _at, _seq, job = heapq.heappop(self._heap)
            pool = self._pool
            if pool is None:
                return
            try:
                pool.submit(job)
            except RuntimeError:  # the pool shut down under us: we are stopping
                return
