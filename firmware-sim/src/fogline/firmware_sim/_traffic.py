"""The traffic driver: open-loop sensor requests through each device's ``Agent.infer``.

Arrivals are a Poisson process per device, independent of how fast answers come back
(open loop), so an overloaded fleet shows up as queueing, refusals and missed budgets
rather than as a driver that politely slows down. One scheduler thread reads the
sensors and hands each request to a worker pool; if the pool's backlog is full, the
arrival is counted as ``driver_dropped`` (the simulator, not the device, fell behind).
"""

from __future__ import annotations

import heapq
import logging
import random
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fogline.edge import Agent, InferenceResult
from fogline.protocol import FoglineError

from ._device import SimDevice
from ._ledger import Ledger
from ._sensors import SensorReading

__all__ = ["TrafficDriver"]

log = logging.getLogger("fogline.firmware_sim.traffic")


def predicted_label(result: InferenceResult) -> int | None:
    """The class the model chose: argmax of its first output."""
    if not result.outputs:
        return None
    first = next(iter(result.outputs.values()))
    if first.size < 2:
        return None
    return int(np.argmax(first.reshape(-1)))


class TrafficDriver:
    def __init__(
        self,
        devices: Sequence[SimDevice],
        ledger: Ledger,
        *,
        models: Sequence[str],
        rate_per_device: float,
        seed: int = 0,
        threads: int = 8,
        max_backlog: int | None = None,
        input_names: Mapping[str, str] | None = None,
    ) -> None:
        self._devices = list(devices)
        self._ledger = ledger
        self._models = list(models)
        self._rate = rate_per_device
        self._rng = random.Random(seed)
        self._threads = threads
        self._max_backlog = max_backlog if max_backlog is not None else threads * 8
        self._input_names = dict(input_names or {})
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None

    def start(self) -> None:
        if self._thread is not None or self._rate <= 0 or not self._devices:
            return
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="fogline-sim-traffic")
        self._thread = threading.Thread(target=self._run, name="fogline-sim-driver", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop new arrivals, then wait for the requests already sent to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
            self._thread = None
        if self._pool is not None:
            # No cancelling: every request handed over is sent and accounted for.
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- scheduler thread ---------------------------------------------------------------------
    def _run(self) -> None:
        now = time.monotonic()
        heap = [(now + self._rng.expovariate(self._rate), i) for i in range(len(self._devices))]
        heapq.heapify(heap)
        while not self._stop.is_set():
            due, index = heap[0]
            wait = due - time.monotonic()
            if wait > 0 and self._stop.wait(wait):
                return
            heapq.heapreplace(heap, (due + self._rng.expovariate(self._rate), index))
            self._arrive(self._devices[index])

    def _arrive(self, device: SimDevice) -> None:
        reading = device.sensor.read()  # sensors are only touched by this thread
        agent = device.agent
        if agent is None:
            self._ledger.skipped(device.device_id)
            return
        with self._pending_lock:
            if self._pending >= self._max_backlog:
                self._ledger.dropped_by_driver()
                return
            self._pending += 1
        model = self._models[self._rng.randrange(len(self._models))]
        pool = self._pool
        try:
            if pool is None:
                raise RuntimeError("stopped")
            pool.submit(self._request, device.device_id, agent, model, reading)
        except RuntimeError:  # the pool is shutting down: we are stopping
            with self._pending_lock:
                self._pending -= 1

    # -- worker threads -----------------------------------------------------------------------
    def _input_name(self, agent: Agent, model: str) -> str:
        name = self._input_names.get(model)
        if name is None:
            try:
                name = agent.model(model).inputs[0].name
            except FoglineError:
                # Not served locally (e.g. an mcu-class device): any device's model tells.
                for other in self._devices:
                    served = other.agent.models().get(model) if other.agent else None
                    if served is not None:
                        name = served.inputs[0].name
                        break
            if name is None:
                return "input"
            self._input_names[model] = name
        return name

    def _request(self, device_id: str, agent: Agent, model: str, reading: SensorReading) -> None:
        try:
            self._ledger.sent(device_id)
            feed = {self._input_name(agent, model): reading.inputs}
            try:
                result = agent.infer(model, feed, budget_ms=reading.budget_ms)
            except FoglineError as exc:
                self._ledger.failed(device_id, exc.code)
                return
            except Exception:
                log.exception("inference on %s raised", device_id)
                self._ledger.failed(device_id, "internal_error")
                return
            self._ledger.answered(
                device_id,
                where=result.where,
                latency_ms=result.latency_ms,
                met_budget=result.met_budget,
                late=result.late,
                correct=predicted_label(result) == reading.label,
            )
        finally:
            with self._pending_lock:
                self._pending -= 1
