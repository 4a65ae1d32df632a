"""The edge agent: ties the store, runtime, admission, delivery, telemetry and HTTP API.

Lifecycle: :meth:`Agent.start` serves the installed models at once (no broker needed),
then starts the HTTP API and connects to the broker in the background.
:meth:`Agent.stop` publishes the offline state, joins every thread and stops the API.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from fogline.protocol import (
    BreakerState,
    FoglineError,
    Heartbeat,
    MqttTransport,
    TensorSpec,
    TrustStore,
    UnknownModelError,
)

from ._capacity import Admission
from ._config import AgentConfig
from ._download import ArtifactFetcher
from ._release import ReleaseManager
from ._runtime import LoadedModel, ModelSlot, SessionCache, load_model, run_model, self_test
from ._store import ModelStore, atomic_write
from ._telemetry import Outbox, Telemetry, offline_will

if TYPE_CHECKING:
    from ._http import HttpServer

__all__ = ["Agent", "AgentStatus", "InferenceResult", "ModelStatus"]

log = logging.getLogger("fogline.edge.agent")

STATUS_FILE = "status.json"
_now = time.perf_counter


@dataclass(frozen=True)
class InferenceResult:
    """What one inference returned, where it ran, with which version, how fast."""

    outputs: dict[str, np.ndarray]
    model: str
    version: int
    where: Literal["edge", "cloud"]
    latency_ms: float
    met_budget: bool | None
    late: bool

    @classmethod
    def _make(
        cls,
        outputs: dict[str, np.ndarray],
        model: str,
        version: int,
        where: Literal["edge", "cloud"],
        latency_ms: float,
        met_budget: bool | None,
        late: bool,
    ) -> InferenceResult:
        """Hot-path constructor: a frozen dataclass's ``__init__`` pays one
        ``object.__setattr__`` per field; filling ``__dict__`` directly is 3x cheaper."""
        self = object.__new__(cls)
        d = self.__dict__
        d["outputs"] = outputs
        d["model"] = model
        d["version"] = version
        d["where"] = where
        d["latency_ms"] = latency_ms
        d["met_budget"] = met_budget
        d["late"] = late
        return self


class ModelStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int
    sha256: str
    previous_version: int | None = None
    service_ms: float | None = None


class AgentStatus(BaseModel):
    """A snapshot of the agent, also written to ``<data_dir>/status.json``."""

    model_config = ConfigDict(extra="forbid")

    device_id: str
    device_class: str
    groups: list[str]
    connected: bool
    uptime_s: float
    models: dict[str, ModelStatus]
    requests: int
    errors: int
    refused: int
    edge_requests: int
    cloud_requests: int
    in_flight: int
    queue_depth: int
    max_in_flight: int
    latency_p50_ms: float
    latency_p99_ms: float
    breaker_state: BreakerState
    telemetry_dropped: int
    telemetry_queued: int
    http_url: str | None
    load_hints: dict[str, float]
    at: float


class Agent:
    """One edge agent. Several may share a process (pass one ``session_cache``)."""

    def __init__(
        self,
        config: AgentConfig,
        *,
        transport: MqttTransport | None = None,
        clock: Callable[[], float] = time.time,
        session_cache: SessionCache | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._cache = session_cache
        self._store = ModelStore(config.data_dir)
        self._slots: dict[str, ModelSlot] = {}
        cap = config.capacity
        self._admission = Admission(cap.max_in_flight, cap.max_queue, cap.default_max_wait_ms)
        self._default_budget_ms = config.routing.default_budget_ms
        self._trust = TrustStore.from_texts(config.trusted_keys)
        self._transport = transport
        self._own_transport = transport is None
        self._telemetry: Telemetry | None = None
        self._delivery: ReleaseManager | None = None
        self._http: HttpServer | None = None
        self._hints: dict[str, float] = {}
        self._versions = threading.Condition()
        self._started_at = time.monotonic()
        self._started = False
        self._stopped = False
        self._process: Any = None  # psutil.Process, created lazily off the hot path

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Serve installed models at once, then start the API and connect in the background."""
        if self._started:
            return
        self._started = True
        self._started_at = time.monotonic()
        self._load_installed()
        if self.config.http.enabled:
            from ._http import HttpServer  # starlette/uvicorn only when the API is on

            self._http = HttpServer(self, self.config.http)
            self._http.start()
        cfg = self.config
        if self._transport is None:
            will = offline_will(
                cfg.topics, cfg.device_id, cfg.device_class, cfg.groups, self._clock()
            )
            self._transport = MqttTransport(
                cfg.mqtt, client_id=f"fogline-edge-{cfg.device_id}", will=will
            )
        outbox = Outbox(cfg.data_dir / "telemetry.db", cfg.telemetry_buffer_max)
        self._telemetry = Telemetry(
            transport=self._transport,
            topics=cfg.topics,
            device_id=cfg.device_id,
            device_class=cfg.device_class,
            groups=cfg.groups,
            interval_s=cfg.heartbeat_interval_s,
            outbox=outbox,
            heartbeat=self._heartbeat,
            clock=self._clock,
            on_tick=self._write_status,
        )
        fetcher = ArtifactFetcher(self._transport, cfg.topics, cfg.device_id, cfg.delivery)
        fetcher.subscribe()
        self._delivery = ReleaseManager(
            config=cfg,
            transport=self._transport,
            store=self._store,
            fetcher=fetcher,
            telemetry=self._telemetry,
            trust=self._trust,
            clock=self._clock,
            installed_version=self.installed_version,
            load=self._load,
            activate=self._activate,
        )
        self._delivery.start()
        self._telemetry.event("agent_started", detail=f"serving {sorted(self.models())}")
        self._telemetry.start()
        if self._own_transport:
            self._transport.start()

    def stop(self) -> None:
        """Stop cleanly: offline state published, threads joined, HTTP server stopped."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        if self._delivery is not None:
            self._delivery.stop()
        if self._telemetry is not None:
            self._telemetry.event("agent_stopping")
            self._telemetry.stop(publish_offline=True)
        if self._own_transport and self._transport is not None:
            self._transport.close()
        if self._http is not None:
            self._http.stop()
        self._write_status()
        if self._telemetry is not None:
            self._telemetry.outbox.close()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- inference (hot path) -------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        budget_ms: float | None = None,
        policy: str | None = None,
    ) -> InferenceResult:
        """Run ``model`` on ``inputs``. Raises :class:`UnknownModelError`,
        :class:`InferenceInputError`, :class:`CapacityError` (all ``FoglineError``)."""
        slot = self._slots.get(model)
        loaded = slot.current if slot is not None else None
        if budget_ms is None:
            budget_ms = self._default_budget_ms
        # -- routing seam: the hybrid router decides edge / cloud / refuse here. ---------
        if loaded is None:
            raise UnknownModelError(
                f"model {model!r} is not served by device {self.config.device_id}"
            )
        return self._infer_local(loaded, inputs, budget_ms)

    def _infer_local(
        self, loaded: LoadedModel, inputs: Mapping[str, np.ndarray], budget_ms: float | None
    ) -> InferenceResult:
        admission = self._admission
        start = _now()
        began = _now() if admission.acquire(budget_ms) else start
        try:
            outputs = run_model(loaded, inputs)
        except BaseException:
            admission.release(loaded.name, 0.0, 0.0, False)
            raise
        end = _now()
        latency_ms = (end - start) * 1000.0
        if budget_ms is None:
            admission.release(loaded.name, (end - began) * 1000.0, latency_ms, True)
            return InferenceResult._make(
                outputs, loaded.name, loaded.version, "edge", latency_ms, None, False
            )
        met = latency_ms <= budget_ms
        admission.release(loaded.name, (end - began) * 1000.0, latency_ms, True, met)
        return InferenceResult._make(
            outputs, loaded.name, loaded.version, "edge", latency_ms, met, not met
        )

    # -- models ------------------------------------------------------------------------------
    def models(self) -> dict[str, LoadedModel]:
        """The models served now, by name."""
        return {
            name: slot.current for name, slot in self._slots.items() if slot.current is not None
        }

    def model(self, name: str) -> LoadedModel:
        slot = self._slots.get(name)
        if slot is None or slot.current is None:
            raise UnknownModelError(
                f"model {name!r} is not served by device {self.config.device_id}"
            )
        return slot.current

    def installed_version(self, model: str) -> int | None:
        slot = self._slots.get(model)
        return slot.current.version if slot is not None and slot.current is not None else None

    def wait_for_version(self, model: str, version: int, timeout: float) -> bool:
        """Block until ``model`` serves ``version`` (True) or ``timeout`` seconds pass."""
        with self._versions:
            return self._versions.wait_for(
                lambda: self.installed_version(model) == version, timeout
            )

    def _load(
        self,
        name: str,
        version: int,
        sha256: str,
        path: Path,
        inputs: Sequence[TensorSpec] | None,
        outputs: Sequence[TensorSpec] | None,
    ) -> LoadedModel:
        return load_model(
            name,
            version,
            sha256,
            path,
            threads=self.config.capacity.intra_op_threads,
            inputs=inputs,
            outputs=outputs,
            cache=self._cache,
        )

    def _activate(self, loaded: LoadedModel) -> None:
        slot = self._slots.get(loaded.name)
        if slot is None:
            # A new dict, swapped in whole: readers never see one being resized.
            self._slots = {**self._slots, loaded.name: ModelSlot(loaded)}
        else:
            slot.swap(loaded)
        log.info("serving %s v%d (%s)", loaded.name, loaded.version, loaded.sha256[:12])
        with self._versions:
            self._versions.notify_all()

    def _load_installed(self) -> None:
        """Serve what the store holds, before any network: current, else last good."""
        allowed = self.config.models
        for name in self._store.installed_models():
            if allowed is not None and name not in allowed:
                continue
            state = self._store.state(name)
            for which in ("current", "previous"):
                rec = state.get(which)
                if rec is None:
                    continue
                try:
                    loaded = self._load(
                        name,
                        rec.version,
                        rec.sha256,
                        self._store.path_of(rec),
                        rec.input_specs(),
                        rec.output_specs(),
                    )
                    self_test(loaded, None)
                except FoglineError as exc:
                    log.error(
                        "installed %s %s v%d does not load: %s", name, which, rec.version, exc
                    )
                    continue
                self._activate(loaded)
                if which == "previous":
                    self._store.commit(rec)
                break

    # -- load hints, status, telemetry ------------------------------------------------------
    def set_load_hints(self, **hints: float) -> None:
        """Device load signals (``cpu_load``, ``battery``, ``thermal``...) for the router."""
        self._hints = {**self._hints, **{k: float(v) for k, v in hints.items()}}

    @property
    def load_hints(self) -> dict[str, float]:
        return dict(self._hints)

    @property
    def admission(self) -> Admission:
        """Queue depth, in-flight count and service-time estimates (for the router)."""
        return self._admission

    @property
    def transport(self) -> MqttTransport | None:
        return self._transport

    @property
    def telemetry(self) -> Telemetry | None:
        return self._telemetry

    @property
    def http_url(self) -> str | None:
        return self._http.url if self._http is not None else None

    @property
    def connected(self) -> bool:
        return self._transport is not None and self._transport.connected

    def status(self) -> AgentStatus:
        snap = self._admission.snapshot()
        models = {}
        for name, loaded in self.models().items():
            prev = self._store.previous(name)
            models[name] = ModelStatus(
                version=loaded.version,
                sha256=loaded.sha256,
                previous_version=prev.version if prev else None,
                service_ms=self._admission.service_estimate_ms(name),
            )
        tel = self._telemetry
        return AgentStatus(
            device_id=self.config.device_id,
            device_class=self.config.device_class,
            groups=list(self.config.groups),
            connected=self.connected,
            uptime_s=time.monotonic() - self._started_at,
            models=models,
            requests=snap.requests,
            errors=snap.errors,
            refused=snap.refused,
            edge_requests=snap.requests,
            cloud_requests=0,
            in_flight=snap.in_flight,
            queue_depth=snap.queue_depth,
            max_in_flight=snap.max_in_flight,
            latency_p50_ms=snap.latency_p50_ms,
            latency_p99_ms=snap.latency_p99_ms,
            breaker_state="closed",
            telemetry_dropped=tel.dropped if tel else 0,
            telemetry_queued=len(tel.outbox) if tel and not self._stopped else 0,
            http_url=self.http_url,
            load_hints=self.load_hints,
            at=self._clock(),
        )

    def _heartbeat(self, seq: int) -> Heartbeat:
        st = self.status()
        snap = self._admission.snapshot()
        cpu, mem = self._process_usage()
        total = st.requests + st.refused
        return Heartbeat(
            device_id=st.device_id,
            device_class=st.device_class,
            groups=st.groups,
            seq=seq,
            at=self._clock(),
            uptime_s=st.uptime_s,
            interval_s=self.config.heartbeat_interval_s,
            models={name: m.version for name, m in st.models.items()},
            requests=total,
            errors=st.errors + st.refused,
            edge_requests=st.edge_requests,
            cloud_requests=st.cloud_requests,
            budgeted_requests=snap.budgeted,
            met_budget=snap.met_budget,
            latency_p50_ms=st.latency_p50_ms,
            latency_p99_ms=st.latency_p99_ms,
            queue_depth=st.queue_depth,
            in_flight=st.in_flight,
            offload_ratio=st.cloud_requests / total if total else 0.0,
            met_budget_ratio=snap.met_budget / snap.budgeted if snap.budgeted else 1.0,
            breaker_state=st.breaker_state,
            cpu_percent=cpu,
            memory_mb=mem,
            telemetry_dropped=st.telemetry_dropped,
        )

    def _process_usage(self) -> tuple[float, float]:
        import psutil

        if self._process is None:
            self._process = psutil.Process()
            self._process.cpu_percent(None)  # the first call only primes the counter
        with self._process.oneshot():
            return float(self._process.cpu_percent(None)), self._process.memory_info().rss / 1e6

    def _write_status(self) -> None:
        try:
            data = self.status().model_dump(mode="json")
            # Informational and rewritten every heartbeat: no fsync (fleets of agents
            # share one disk).
            path = self.config.data_dir / STATUS_FILE
            atomic_write(path, json.dumps(data, indent=1).encode(), durable=False)
        except (OSError, FoglineError) as exc:
            log.warning("could not write the status file: %s", exc)
