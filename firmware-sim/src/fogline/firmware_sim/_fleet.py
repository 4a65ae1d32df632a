"""A fleet of simulated devices, each running a real edge agent, in one process.

Per device (its own): identity, data directory, :class:`~fogline.edge.AgentConfig`,
:class:`~fogline.edge.Agent` with its MQTT connection, heartbeats, last will and
delivery threads, its link relay and its sensor.

Shared across the process (and why that is honest):

- ONNX Runtime sessions: one per (artifact, thread budget), i.e. per device class and
  model version, through one :class:`~fogline.edge.SessionCache`. A real device would
  load its own copy of the same bytes; sharing it only saves memory and load time.
  Each agent still verifies, installs and self-tests its own copy of the artifact.
- The sessions' thread pools (``intra_op_threads`` from the profile), so the host runs
  one thread pool per class, not one per device; its threads sleep between runs
  instead of spinning (:class:`FleetSessionCache`). Slower profiles add sleep time per
  run (see :class:`SlowSessionCache`); no agent runs an HTTP server.
- One event loop thread for every device's link relay, one traffic scheduler with a
  small worker pool, one fault scheduler.
- With ``agents_per_network_thread`` above 1 (default 1: a thread each, as on a
  device), the MQTT network threads: each serves that many devices' connections
  (``fogline.protocol._mqtt_loop.LoopGroup``). Every device still has its own
  connection, session, subscriptions and packets, read and acknowledged as before;
  only the thread is shared, which saves the host hundreds of threads handing the
  GIL to each other for every packet. Handlers of one device then hold up the
  others' reading: meant for rollouts, not for inference load.
"""

from __future__ import annotations

import gc
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, cast, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fogline.edge import AgentConfig, CapacityConfig, HttpConfig, SessionCache
from fogline.protocol import (
    DEFAULT_PREFIX,
    ConfigError,
    FoglineError,
    Identifier,
    LoopGroup,
    MqttSettings,
)

from ._control import ControlServer
from ._device import FleetSessionCache, SimDevice, SlowSessionCache
from ._faults import FaultInjector
from ._ledger import FaultReport, FleetReport, Ledger
from ._link import LinkEmulator
from ._profiles import HardwareProfile, builtin_profiles
from ._scenario import FaultKind, Scenario
from ._sensors import DigitSensor, SensorConfig, digits_dataset
from ._traffic import TrafficDriver
from ._validation import validate_model

__all__ = ["FleetConfig", "SimulatedFleet", "allocate_profiles"]

log = logging.getLogger("fogline.firmware_sim.fleet")

ProgressFn = Callable[[int, int], None]

# Each agent holds three sockets (its MQTT connection and its network loop's wake-up
# pair) and three SQLite files (the telemetry outbox, its WAL and shared memory), plus
# a download or a status file now and then. The transport's loop has no FD_SETSIZE
# limit, but RLIMIT_NOFILE still counts.
_FDS_PER_AGENT = 8
_FD_MARGIN = 64  # the link relay, the broker probe, logs, the control channel


def ensure_descriptor_limit(devices: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE (up to the hard limit) so that ``devices``
    more agents can open their files; :class:`ConfigError` if even the hard limit is
    too low."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return
    try:
        used = sum(1 for _ in Path("/proc/self/fd").iterdir())
    except OSError:  # no /proc: count from the bottom, generously
        used = 256
    need = used + _FD_MARGIN + devices * _FDS_PER_AGENT
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise ConfigError(
            f"fleet: field 'devices': {devices} agents need about {need} open files and "
            f"RLIMIT_NOFILE allows at most {hard} (hard limit; {used} already open): "
            "raise it (ulimit -Hn) or run more fleet processes"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    log.info("raised RLIMIT_NOFILE from %d to %d for %d agents", soft, need, devices)


class FleetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: int = Field(ge=1, le=10_000)
    profile_mix: dict[Identifier, float] = Field(min_length=1)
    broker_url: str = "mqtt://127.0.0.1:1883"
    trusted_keys: list[str] = Field(default_factory=list)
    data_root: Path
    models: list[Identifier] = Field(min_length=1)
    seed: int = 0
    #: Requests per second per device (Poisson arrivals); 0 sends none.
    rate_per_device: float = Field(default=1.0, ge=0, le=10_000)
    sensor: SensorConfig = SensorConfig()
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=3600)
    #: Relay each device's MQTT connection through a simulated link (needed for
    #: link faults, flaps and abrupt kills). Off connects agents straight to the broker.
    link_emulation: bool = True
    flaps: bool = True
    topic_prefix: str = DEFAULT_PREFIX
    device_prefix: Identifier = "sim"
    groups: list[Identifier] = Field(default_factory=list, max_length=16)
    routing_policy: str | None = None
    driver_threads: int = Field(default=8, ge=1, le=512)
    #: Devices whose MQTT connections one network thread serves (see the module text).
    agents_per_network_thread: int = Field(default=1, ge=1, le=1000)
    control: bool = True
    #: Model -> input tensor name, where it cannot be learned from a served model.
    input_names: dict[Identifier, str] = Field(default_factory=dict)

    @field_validator("broker_url")
    @classmethod
    def _url(cls, value: str) -> str:
        MqttSettings(url=value)  # its validator explains what is wrong
        return value

    @field_validator("profile_mix")
    @classmethod
    def _weights(cls, value: dict[str, float]) -> dict[str, float]:
        if any(not math.isfinite(w) or w < 0 for w in value.values()) or sum(value.values()) <= 0:
            raise ValueError("weights must be finite, non-negative and not all zero")
        return value


def allocate_profiles(devices: int, mix: Mapping[str, float]) -> list[str]:
    """Profile of each device: counts proportional to ``mix`` (largest remainder, so
    ``{"rpi4": 0.6, "jetson-like": 0.3, "mcu-gateway": 0.1}`` of 10 is exactly 6/3/1),
    interleaved so that any prefix of the fleet has a similar mix."""
    total = sum(mix.values())
    quotas = {name: devices * w / total for name, w in mix.items()}
    counts = {name: math.floor(q) for name, q in quotas.items()}
    by_remainder = sorted(quotas, key=lambda n: (-(quotas[n] - counts[n]), n))
    for name in by_remainder[: devices - sum(counts.values())]:
        counts[name] += 1
    # Interleave: the i-th device of a profile sits at its fraction of the way through.
    slots = sorted(
        ((i + 0.5) / count, name) for name, count in counts.items() for i in range(count)
    )
    return [name for _, name in slots]


class SimulatedFleet:
    """N real agents with their links, sensors, traffic, faults and ground truth.

    Use as a context manager, or call :meth:`start` and :meth:`stop`; both clean up every
    agent and thread, also when starting fails half-way or on Ctrl-C.
    """

    def __init__(
        self,
        *,
        profiles: Mapping[str, HardwareProfile] | None = None,
        scenario: Scenario | None = None,
        **settings: Any,
    ) -> None:
        self.config = validate_model(FleetConfig, settings, "fleet")
        self.profiles = dict(profiles) if profiles is not None else builtin_profiles()
        unknown = sorted(set(self.config.profile_mix) - set(self.profiles))
        if unknown:
            raise ConfigError(
                f"fleet: field 'profile_mix': unknown profile(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(self.profiles))})"
            )
        self.scenario = scenario
        self.ledger = Ledger()
        self.devices: dict[str, SimDevice] = {}
        self.sessions: SessionCache = FleetSessionCache()
        self._link: LinkEmulator | None = None
        self._injector: FaultInjector | None = None
        self._control: ControlServer | None = None
        self._driver: TrafficDriver | None = None
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._lock = threading.Lock()
        self._loops = (
            LoopGroup(self.config.agents_per_network_thread, name="fogline-sim")
            if self.config.agents_per_network_thread > 1
            else None
        )
        self._agent_configs = self._build_configs()

    # -- set-up ---------------------------------------------------------------------------------
    def _build_configs(self) -> list[tuple[HardwareProfile, AgentConfig]]:
        cfg = self.config
        out = []
        for index, name in enumerate(allocate_profiles(cfg.devices, cfg.profile_mix)):
            profile = self.profiles[name]
            device_id = f"{cfg.device_prefix}-{index:04d}"
            data = {
                "device_id": device_id,
                "device_class": profile.device_class,
                "groups": list(dict.fromkeys([name, *cfg.groups])),
                "mqtt": {"url": cfg.broker_url, "reconnect_min_s": 0.5, "reconnect_max_s": 5.0},
                "topic_prefix": cfg.topic_prefix,
                "trusted_keys": cfg.trusted_keys,
                "data_dir": cfg.data_root / device_id,
                "capacity": CapacityConfig(
                    intra_op_threads=profile.threads,
                    max_in_flight=profile.max_in_flight,
                    max_queue=profile.max_queue,
                ),
                "heartbeat_interval_s": cfg.heartbeat_interval_s,
                "http": HttpConfig(enabled=False),
                "models": cfg.models,
            }
            if cfg.routing_policy is not None:
                data["routing"] = {"policy": cfg.routing_policy}
            config = validate_model(AgentConfig, data, f"fleet device {device_id}")
            out.append((profile, config))
        return out

    def start(self, progress: ProgressFn | None = None, *, traffic: bool = True) -> None:
        """Start every agent (``progress(done, total)`` after each), the fault schedule,
        the control channel and, with ``traffic``, the traffic driver."""
        try:
            self._start(progress)
            if traffic:
                self.start_traffic()
        except BaseException:
            self.stop()
            raise

    def _start(self, progress: ProgressFn | None) -> None:
        cfg = self.config
        ensure_descriptor_limit(len(self._agent_configs))
        cfg.data_root.mkdir(parents=True, exist_ok=True)
        digits_dataset()  # load it now, not in the traffic scheduler's first arrival
        self._started_at = time.monotonic()
        if cfg.link_emulation:
            settings = MqttSettings(url=cfg.broker_url)
            self._link = LinkEmulator(settings.host, settings.port, seed=cfg.seed)
            self._link.start()
        caches = {
            name: SlowSessionCache(self.sessions, p.speed_factor)
            for name, p in self.profiles.items()
        }
        total = len(self._agent_configs)
        for index, (profile, config) in enumerate(self._agent_configs):
            if self._link is not None:
                port = self._link.add_device(config.device_id, profile.link)
                mqtt = config.mqtt.model_copy(update={"url": f"mqtt://127.0.0.1:{port}"})
                config = config.model_copy(update={"mqtt": mqtt})
            sensor = DigitSensor(cfg.sensor, seed=cfg.seed * 100_003 + index)
            device = SimDevice(
                profile, config, sensor, caches[profile.name], self._link, self._loops
            )
            self.ledger.add_device(config.device_id, profile.name, profile.device_class)
            self.devices[config.device_id] = device
            device.start()
            if progress is not None:
                progress(index + 1, total)
        self._injector = FaultInjector(self, seed=cfg.seed)
        flaps = (
            {d.device_id: d.profile.flaps for d in self.devices.values()}
            if cfg.flaps and self._link is not None
            else None
        )
        self._injector.start(self.scenario, flaps)
        if cfg.control:
            self._control = ControlServer(cfg.data_root, self._handle_control)
            self._control.start()
        # N agents' long-lived objects share this heap, and every full collection would
        # walk all of them (~5 % of a 200-agent rollout's CPU); a device's collector
        # walks one agent's. Frozen until the fleet stops.
        gc.freeze()

    def start_traffic(self) -> None:
        cfg = self.config
        if self._driver is not None or cfg.rate_per_device <= 0:
            return
        self._driver = TrafficDriver(
            list(self.devices.values()),
            self.ledger,
            models=cfg.models,
            rate_per_device=cfg.rate_per_device,
            seed=cfg.seed,
            threads=cfg.driver_threads,
            input_names=cfg.input_names,
        )
        self._driver.start()

    def stop_traffic(self) -> None:
        if self._driver is not None:
            self._driver.stop()

    def stop(self) -> None:
        """Stop traffic, faults, control and every agent, then the links. Idempotent."""
        steps: list[Callable[[], None]] = [self.stop_traffic]
        if self._injector is not None:
            steps.append(self._injector.stop)
        if self._control is not None:
            steps.append(self._control.stop)
        steps.append(self._stop_agents)
        if self._link is not None:
            steps.append(self._link.stop)
        for step in steps:
            try:
                step()
            except Exception:
                log.exception("stopping the fleet: %s failed", getattr(step, "__name__", step))
        if self._started_at is not None and self._stopped_at is None:
            self._stopped_at = time.monotonic()
        gc.unfreeze()

    def _stop_agents(self) -> None:
        running = [d for d in self.devices.values() if d.agent is not None]
        if not running:
            return
        # Agents stop in parallel: each waits up to a couple of seconds for its broker
        # acknowledgement, and a hundred of those in a row would be minutes.
        with ThreadPoolExecutor(8, thread_name_prefix="fogline-sim-stop") as pool:
            for future in [pool.submit(d.stop) for d in running]:
                try:
                    future.result()
                except Exception:
                    log.exception("an agent did not stop cleanly")

    def __enter__(self) -> SimulatedFleet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- waiting ----------------------------------------------------------------------------------
    def wait_connected(self, timeout: float, devices: Iterable[str] | None = None) -> list[str]:
        """Wait until the running agents are connected; returns those that are not."""
        deadline = time.monotonic() + timeout
        pending = self._running(devices)
        while True:
            pending = [d for d in pending if d.agent is not None and not d.agent.connected]
            if not pending or time.monotonic() >= deadline:
                return [d.device_id for d in pending]
            time.sleep(0.05)

    def wait_for_version(
        self, model: str, version: int, timeout: float, devices: Iterable[str] | None = None
    ) -> list[str]:
        """Wait until the running agents (or ``devices``) serve ``version`` of ``model``;
        returns the ids of those that do not by the deadline."""
        deadline = time.monotonic() + timeout
        late = []
        for device in self._running(devices):
            agent = device.agent
            remaining = max(0.0, deadline - time.monotonic())
            if agent is None or not agent.wait_for_version(model, version, remaining):
                late.append(device.device_id)
        return late

    def settle(self, timeout: float, poll_s: float = 0.2) -> bool:
        """Wait until every agent is connected and serves every model that any device of
        its class serves (a class with no variant, like ``mcu``, serves nothing).
        True if the fleet settled within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.wait_connected(0.0) and self._served_uniformly():
                return True
            time.sleep(poll_s)
        return False

    def _served_uniformly(self) -> bool:
        served: dict[str, set[str]] = {}
        for device in self._running(None):
            if device.agent is not None:
                served.setdefault(device.profile.device_class, set()).update(device.agent.models())
        if not any(set(self.config.models) <= models for models in served.values()):
            return False
        return all(
            set(d.agent.models()) >= served.get(d.profile.device_class, set())
            for d in self._running(None)
            if d.agent is not None
        )

    def _running(self, devices: Iterable[str] | None) -> list[SimDevice]:
        chosen = self.devices.values() if devices is None else [self.device(d) for d in devices]
        return [d for d in chosen if d.agent is not None]

    def device(self, device_id: str) -> SimDevice:
        try:
            return self.devices[device_id]
        except KeyError:
            raise FoglineError(f"unknown simulated device {device_id!r}") from None

    # -- faults (FaultTarget) -----------------------------------------------------------------
    def device_profiles(self) -> Mapping[str, str]:
        return {d.device_id: d.profile.name for d in self.devices.values()}

    def apply_fault(
        self,
        kind: FaultKind,
        device_id: str,
        *,
        extra_latency_ms: float = 0.0,
        bandwidth_kbps: float | None = None,
    ) -> None:
        device = self.device(device_id)
        if kind == "disconnect":
            device.disconnect()
        elif kind == "reconnect":
            device.reconnect()
        elif kind == "kill":
            device.kill()
        elif kind == "restart":
            device.restart()
        elif kind == "slow_link":
            device.slow_link(extra_latency_ms, bandwidth_kbps)
        else:
            device.restore_link()

    def inject(self, kind: FaultKind, device_id: str, **kwargs: Any) -> FaultReport:
        """Apply a fault now (see :meth:`FaultInjector.inject`)."""
        if self._injector is None:
            raise FoglineError("the fleet is not running")
        record = self._injector.inject(kind, device_id, **kwargs)
        return FaultReport(
            at_s=record.at,
            device_id=record.device_id,
            kind=record.kind,
            source=record.source,
            ok=record.ok,
            detail=record.detail,
        )

    def _handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "devices":
            return {"ok": True, "devices": self._device_rows()}
        if op == "report":
            return {"ok": True, "report": self.report().model_dump(mode="json")}
        if op != "fault":
            raise ValueError(f"unknown op {op!r} (fault, devices, report)")
        kind = request.get("kind")
        if kind not in get_args(FaultKind):
            raise ValueError(f"unknown fault kind {kind!r} ({', '.join(get_args(FaultKind))})")
        device = request.get("device")
        if not isinstance(device, str):
            raise ValueError("'device' must be a device id")
        kwargs: dict[str, Any] = {"source": "cli"}
        for key in ("duration_s", "extra_latency_ms", "bandwidth_kbps"):
            value = request.get(key)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{key!r} must be a non-negative number")
                kwargs[key] = float(value)
        record = self.inject(cast(FaultKind, kind), device, **kwargs)
        return {"ok": record.ok, "fault": record.model_dump(mode="json")}

    def _device_rows(self) -> list[dict[str, Any]]:
        rows = []
        for device in self.devices.values():
            snap = device.snapshot()
            rows.append(
                {
                    "device_id": device.device_id,
                    "profile": device.profile.name,
                    "device_class": device.profile.device_class,
                    "running": snap.running,
                    "connected": snap.connected,
                    "link_down": device.link_down,
                    "versions": snap.versions,
                }
            )
        return rows

    # -- reporting --------------------------------------------------------------------------------
    def report(self) -> FleetReport:
        """The ground truth so far (or of the finished run)."""
        start = self._started_at or time.monotonic()
        end = self._stopped_at or time.monotonic()
        history = self._injector.history if self._injector is not None else []
        faults = [
            FaultReport(
                at_s=r.at,
                device_id=r.device_id,
                kind=r.kind,
                source=r.source,
                ok=r.ok,
                detail=r.detail,
            )
            for r in history
        ]
        snapshots = {d.device_id: d.snapshot() for d in self.devices.values()}
        return self.ledger.report(duration_s=end - start, snapshots=snapshots, faults=faults)
