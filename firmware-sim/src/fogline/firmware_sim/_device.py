"""One simulated device: a real :class:`~fogline.edge.Agent` plus what surrounds it.

What is the device's own: its identity, data directory, configuration, agent (with its
MQTT connection and threads), link and sensor. What is shared with other devices in
the process: the ONNX Runtime sessions of one device class (see
:class:`SlowSessionCache`).
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from fogline.edge import Agent, AgentConfig, SessionCache
from fogline.protocol import FoglineError, LoopGroup, sharing

from ._ledger import DeviceSnapshot
from ._link import LinkEmulator
from ._profiles import HardwareProfile
from ._sensors import DigitSensor

__all__ = ["FleetSessionCache", "SimDevice", "SlowSessionCache"]

log = logging.getLogger("fogline.firmware_sim.device")


class FleetSessionCache(SessionCache):
    """The sessions every device of a simulated fleet shares (keyed by artifact hash and
    intra-op thread count, like the edge's :class:`SessionCache`), created with their
    intra-op threads not spinning.

    onnxruntime's intra-op workers spin-wait for more work after every run by default:
    right on a device whose cores are its own, wasteful where a hundred simulated
    devices share the host's two. Each install's warm-up and self-test left the
    shared pool's workers spinning, and a 200-agent rollout spent a fifth of its CPU
    there (perf: the pool's 3 threads of a ``jetson-like`` session). Without spinning
    the workers sleep between runs; results are the same."""

    def __init__(self) -> None:
        super().__init__(allow_spinning=False)


class _SlowSession:
    """An ONNX Runtime session on a slower CPU: each run is followed by a sleep of
    ``speed_factor - 1`` times the typical duration of such a run on the host (the
    median of the last runs with inputs of the same shapes). Sleeping, not spinning, so
    a hundred slow devices do not burn the host's two cores; the request still holds
    its in-flight slot for the whole time, so the agent's queueing, service-time
    estimate and routing see the slow device exactly as they would see a slow CPU.

    The typical run, not this run: a host run slowed by a busy host (other devices, or
    a cloud tier on the same cores) would otherwise be slowed again ``speed_factor``
    times over, a jitter no device of its own has; so host delays pass through once."""

    _WINDOW = 64  # host runs per input shape the typical duration is taken from

    def __init__(self, session: Any, speed_factor: float) -> None:
        self._session = session
        self._extra = speed_factor - 1.0
        self._recent: dict[tuple[tuple[int, ...], ...], deque[float]] = {}

    def run(self, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        start = time.perf_counter()
        out = self._session.run(output_names, input_feed, run_options)
        took = time.perf_counter() - start
        key = tuple(tuple(getattr(v, "shape", ())) for v in input_feed.values())
        recent = self._recent.get(key)
        if recent is None:
            recent = self._recent.setdefault(key, deque(maxlen=self._WINDOW))
        recent.append(took)
        time.sleep(statistics.median(recent) * self._extra)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


class SlowSessionCache(SessionCache):
    """The session cache one hardware profile's agents use.

    Sessions come from one ``shared`` cache, keyed by artifact hash and intra-op thread
    count, so every agent of a device class runs on the same ONNX Runtime session (and
    its thread pool); profiles slower than the host wrap it in a :class:`_SlowSession`.
    """

    def __init__(self, shared: SessionCache, speed_factor: float) -> None:
        super().__init__()
        self.shared = shared
        self.speed_factor = speed_factor

    def get_or_load(self, sha256: str, threads: int, path: Path) -> Any:
        session = self.shared.get_or_load(sha256, threads, path)
        if self.speed_factor <= 1.0:
            return session
        return _SlowSession(session, self.speed_factor)

    def __len__(self) -> int:
        return len(self.shared)


class SimDevice:
    """A device's agent and the faults that can happen to it. Faults on one device are
    serialised by its lock; different devices never wait for each other."""

    def __init__(
        self,
        profile: HardwareProfile,
        config: AgentConfig,
        sensor: DigitSensor,
        cache: SessionCache,
        link: LinkEmulator | None,
        loops: LoopGroup | None = None,
    ) -> None:
        self.device_id = config.device_id
        self.profile = profile
        self.config = config
        self.sensor = sensor
        self._cache = cache
        self._link = link
        self._loops = loops  # network threads shared with other devices, if any
        self._lock = threading.RLock()
        self.agent: Agent | None = None
        self.restarts = 0
        self.link_down = False

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        with self._lock:
            if self.agent is not None:
                return
            agent = Agent(self.config, session_cache=self._cache)
            with sharing(self._loops):  # its transport is made and started here
                agent.start()
            self.agent = agent

    def stop(self) -> None:
        """Stop the agent cleanly (it publishes its offline state)."""
        with self._lock:
            agent, self.agent = self.agent, None
            if agent is not None:
                agent.stop()

    # -- faults -------------------------------------------------------------------------------
    def kill(self) -> None:
        """Die without a goodbye: with a simulated link, the connection is cut first so
        the broker publishes the last will, then the agent's threads are stopped.
        Without one, the agent can only be stopped cleanly."""
        with self._lock:
            if self.agent is None:
                raise FoglineError(f"device {self.device_id} is not running")
            if self._link is not None:
                self._link.set_down(self.device_id)
            try:
                self.stop()
            finally:
                if self._link is not None and not self.link_down:
                    self._link.set_up(self.device_id)

    def restart(self) -> None:
        with self._lock:
            if self.agent is not None:
                raise FoglineError(f"device {self.device_id} is already running")
            self.start()
            self.restarts += 1

    def disconnect(self) -> None:
        with self._lock:
            self._need_link().set_down(self.device_id)
            self.link_down = True

    def reconnect(self) -> None:
        with self._lock:
            self._need_link().set_up(self.device_id)
            self.link_down = False

    def slow_link(self, extra_latency_ms: float, bandwidth_kbps: float | None) -> None:
        self._need_link().set_slow(
            self.device_id, extra_latency_ms=extra_latency_ms, bandwidth_kbps=bandwidth_kbps
        )

    def restore_link(self) -> None:
        self._need_link().restore(self.device_id)

    def _need_link(self) -> LinkEmulator:
        if self._link is None:
            raise FoglineError("link faults need the link emulation (link_emulation=True)")
        return self._link

    # -- reporting ----------------------------------------------------------------------------
    def snapshot(self) -> DeviceSnapshot:
        agent = self.agent
        if agent is None:
            return DeviceSnapshot(False, False, self.restarts, {})
        versions = {name: m.version for name, m in agent.models().items()}
        return DeviceSnapshot(True, agent.connected, self.restarts, versions)
