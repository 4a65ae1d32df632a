"""The edge agent: ties the store, runtime, admission, delivery, telemetry and HTTP API.

Lifecycle: :meth:`Agent.start` serves the installed models at once (no broker needed),
then starts the HTTP API and connects to the broker in the background.
:meth:`Agent.stop` publishes the offline state, joins every thread and stops the API.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from fogline.protocol import (
    DeviceEvent,
    FoglineError,
    Heartbeat,
    InferenceInputError,
    MqttMessage,
    MqttTransport,
    TensorSpec,
    UnknownModelError,
)

from ._breaker import CircuitBreaker
from ._capacity import Admission
from ._cloud_client import CloudClient
from ._config import AgentConfig
from ._download import ArtifactFetcher
from ._release import ReleaseManager
from ._routing import LoadHints, LocalResult, LocalState, OnNoPath, Router, RoutingPolicy
from ._runtime import LoadedModel, ModelSlot, SessionCache, load_model, run_model, self_test
from ._status import (
    STATUS_FILE,
    AgentStatus,
    ModelStatus,
    ProcessUsage,
    build_heartbeat,
    build_status,
    write_status_file,
)
from ._store import ModelStore
from ._telemetry import Outbox, Telemetry, offline_will
from ._trust import TrustKeeper

if TYPE_CHECKING:
    from ._http import HttpServer

__all__ = ["STATUS_FILE", "Agent", "AgentStatus", "InferenceResult", "ModelStatus"]

log = logging.getLogger("fogline.edge.agent")

_now = time.perf_counter
_POLICIES = frozenset(p.value for p in RoutingPolicy)
# Policies that, without a budget and on an unstressed device, always run locally: such
# requests skip the router entirely (the local hot path stays as lean as raw ORT).
_LOCAL_WITHOUT_BUDGET = frozenset({RoutingPolicy.LOCAL_FIRST, RoutingPolicy.LOCAL_ONLY})


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
        routing = config.routing
        self._default_budget_ms = routing.default_budget_ms
        self._router = Router(routing)
        self._cloud: CloudClient | None = None
        self._cloud_models: frozenset[str] = frozenset()
        self._cloud_errors = 0
        self._errors_lock = threading.Lock()
        self._load_hints = LoadHints()
        self._max_queue = cap.max_queue
        self._fast = routing.policy in _LOCAL_WITHOUT_BUDGET
        self._keys = TrustKeeper(config.data_dir, config.trusted_keys)
        self._trust = self._keys.trust
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
        self._usage = ProcessUsage()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        """Serve installed models at once, then start the API and connect in the background."""
        if self._started:
            return
        self._started = True
        self._started_at = time.monotonic()
        self._load_installed()
        if self.config.http.enabled:
            from ._http import HttpServer  # the HTTP stack loads only when the API is on

            self._http = HttpServer(self, self.config.http)
            self._http.start()
        cfg = self.config
        if self._transport is None:
            will = offline_will(
                cfg.topics,
                cfg.device_id,
                cfg.device_class,
                cfg.groups,
                self._clock(),
                key_set_version=self._keys.version,
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
        self._telemetry.event_filter = self._filter_event
        self._telemetry.key_set_version = self._keys.version
        self._start_cloud()
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
        self._transport.subscribe(cfg.topics.fleet_keys(), self._on_trust_chain, qos=1)
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
        if self._cloud is not None:
            self._cloud.close()  # fails pending cloud calls at once, before the link goes
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

    def _start_cloud(self) -> None:
        routing = self.config.routing
        if not routing.cloud_enabled or self._transport is None:
            return
        breaker = CircuitBreaker(
            failure_threshold=routing.breaker_failures, cooldown_s=routing.breaker_cooldown_s
        )
        watch = set(self.config.models or ()) | set(self._slots)
        self._cloud = CloudClient(
            self._transport,
            self.config.topics,
            self.config.device_id,
            breaker=breaker,
            timeout_s=routing.cloud_timeout_ms / 1000.0,
            probe_interval_s=routing.probe_interval_s,
            probe_timeout_s=routing.probe_timeout_s,
            watch=watch,
        )
        self._cloud.start()
        self._router.cloud = self._cloud

    # -- inference (hot path) -------------------------------------------------------------
    def infer(
        self,
        model: str,
        inputs: Mapping[str, np.ndarray],
        budget_ms: float | None = None,
        policy: str | None = None,
        on_no_path: OnNoPath | None = None,
    ) -> InferenceResult:
        """Run ``model`` on ``inputs``, on the edge or in the cloud as the routing
        ``policy`` (default: the config's) decides for the latency ``budget_ms``.
        ``on_no_path``: ``"run-late"`` (run anyway, marked late) or ``"refuse"``
        (:class:`BudgetExceededError` at once) when no path meets the budget.
        Raises :class:`UnknownModelError`, :class:`InferenceInputError`,
        :class:`CapacityError`, :class:`BudgetExceededError`,
        :class:`CloudUnavailableError` (all ``FoglineError``)."""
        slot = self._slots.get(model)
        if budget_ms is None:
            budget_ms = self._default_budget_ms
        # No budget, default policy, unstressed, queue not full: always local, so skip
        # the router (no allocation, no lock).
        if (
            budget_ms is None
            and policy is None
            and self._fast
            and slot is not None
            and self._admission.waiting < self._max_queue
        ):
            loaded = slot.current
            if loaded is not None:
                return self._infer_local(loaded, inputs, None)
        return self._infer_routed(model, slot, inputs, budget_ms, policy, on_no_path)

    def _infer_routed(
        self,
        model: str,
        slot: ModelSlot | None,
        inputs: Mapping[str, np.ndarray],
        budget_ms: float | None,
        policy: str | None,
        on_no_path: OnNoPath | None,
    ) -> InferenceResult:
        if policy is not None and policy not in _POLICIES:
            raise InferenceInputError(
                f"unknown routing policy {policy!r}; expected one of {sorted(_POLICIES)}"
            )
        if on_no_path is not None and on_no_path not in ("run-late", "refuse"):
            raise InferenceInputError(
                f"on_no_path must be 'run-late' or 'refuse', not {on_no_path!r}"
            )
        if budget_ms is not None and not budget_ms > 0:
            raise InferenceInputError(f"budget_ms must be positive, not {budget_ms!r}")
        loaded = slot.current if slot is not None else None
        ran_local = False
        if loaded is None:
            if not self._cloud_serves(model):
                raise UnknownModelError(
                    f"model {model!r} is not served by device {self.config.device_id}"
                )
            local = LocalState(has_model=False)
        else:
            a = self._admission
            service_ms, service_dev_ms = a.routing_estimate(model)
            local = LocalState(
                has_model=True,
                queue_depth=a.waiting,
                in_flight=a.in_flight,
                concurrency=a.max_in_flight,
                max_queue=a.max_queue,
                service_ms=service_ms,
                service_dev_ms=service_dev_ms,
                running_ms=a.running_ms(),
            )

        started = _now()

        def run_local() -> LocalResult:
            nonlocal ran_local
            if loaded is None:  # the router never runs locally without a local model
                raise UnknownModelError(f"model {model!r} has no local variant here")
            ran_local = True
            # Wait for a slot only as long as the budget lasts: after a failed cloud
            # call, what is left of it; with nothing left (run-late), the configured
            # longest wait of an unbudgeted request.
            wait_ms = budget_ms
            if budget_ms is not None:
                left = budget_ms - (_now() - started) * 1000.0
                wait_ms = left if left > 0 else None
            result = self._infer_local(loaded, inputs, wait_ms)
            return LocalResult(result.outputs, result.version)

        try:
            routed = self._router.route(
                model,
                inputs,
                run_local,
                local=local,
                budget_ms=budget_ms,
                policy=policy,
                on_no_path=on_no_path,
                hints=self._load_hints,
            )
        except FoglineError:
            if not ran_local:  # local failures are counted by admission control
                with self._errors_lock:
                    self._cloud_errors += 1
            raise
        return InferenceResult._make(
            routed.outputs,
            model,
            routed.version,
            routed.target,
            routed.latency_ms,
            routed.met_budget,
            routed.late,
        )

    def _cloud_serves(self, model: str) -> bool:
        """A model with no local install is served through the cloud when this agent
        serves it (config ``models``, the desired state, or a release without a variant
        for this class) and the cloud has answered at least once."""
        cloud = self._cloud
        if cloud is None or cloud.rtt_ms is None:
            return False
        allowed = self.config.models
        if allowed is not None and model not in allowed:
            return False
        known = (
            model in self._cloud_models
            or allowed is not None
            or (self._delivery is not None and model in self._delivery.desired())
        )
        if known:
            cloud.watch(model)
        return known

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
        if self._cloud is not None:
            self._cloud.watch(loaded.name)  # keep the cloud estimate fresh for offloading
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

    def _filter_event(self, event: DeviceEvent) -> bool:
        """A release without a variant for this class makes the model cloud-served; it is
        reported once per model, not once per retained version at every restart."""
        if (
            event.kind != "release_rejected"
            or event.reason != "wrong_device_class"
            or event.model is None
        ):
            return True
        first = event.model not in self._cloud_models
        if first:
            self._cloud_models = self._cloud_models | {event.model}
            if self._cloud is not None:
                self._cloud.watch(event.model)
            log.info(
                "%s has no variant for %s: served through the cloud",
                event.model,
                self.config.device_class,
            )
        return first

    # -- signing keys -----------------------------------------------------------------------
    def _on_trust_chain(self, msg: MqttMessage) -> None:
        """A new trust chain (network thread): adopt what it allows, then retry what
        was refused only because its key was unknown."""
        if not msg.payload or self._telemetry is None:
            return
        try:
            outcome = self._keys.apply(msg.payload)
        except OSError as exc:  # trust.json could not be written: nothing was adopted
            self._telemetry.event("keys_rejected", reason="not_saved", detail=str(exc))
            return
        if outcome.adopted:
            ids = ", ".join(self._keys.key_ids)
            detail = f"key set {outcome.version}: {ids}"
            self._telemetry.event("keys_updated", reason="adopted", detail=detail)
            self._telemetry.key_set_version = outcome.version
            self._telemetry.announce()
            if self._delivery is not None:
                self._delivery.trust_changed()
        if outcome.reason:
            self._telemetry.event("keys_rejected", reason=outcome.reason, detail=outcome.detail)

    @property
    def key_set_version(self) -> int:
        """The key set this agent trusts: 0 for its configured keys."""
        return self._keys.version

    @property
    def trusted_key_ids(self) -> list[str]:
        return self._keys.key_ids

    # -- load hints, status, telemetry ------------------------------------------------------
    def set_load_hints(self, **hints: float) -> None:
        """Device load signals (``cpu_load``, ``battery``, ``thermal``...) for the router."""
        self._hints = {**self._hints, **{k: float(v) for k, v in hints.items()}}
        self._load_hints = LoadHints.from_mapping(self._hints)
        routing = self.config.routing
        # A stressed device offloads even unbudgeted requests: they take the router then.
        self._fast = (
            routing.policy in _LOCAL_WITHOUT_BUDGET and self._load_hints.stressed(routing) is None
        )

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
    def router(self) -> Router:
        """The hybrid router (its ``stats``: offload and met-budget counts)."""
        return self._router

    @property
    def cloud(self) -> CloudClient | None:
        """The cloud inference client (``None`` until started, or with the cloud off)."""
        return self._cloud

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
        return build_status(
            config=self.config,
            admission=self._admission,
            store=self._store,
            served=self.models(),
            router_stats=self._router.stats,
            cloud=self._cloud,
            cloud_models=self._cloud_models,
            cloud_errors=self._cloud_errors,
            telemetry=self._telemetry,
            telemetry_open=not self._stopped,
            connected=self.connected,
            uptime_s=time.monotonic() - self._started_at,
            http_url=self.http_url,
            load_hints=self.load_hints,
            key_set_version=self._keys.version,
            trusted_keys=self._keys.key_ids,
            at=self._clock(),
        )

    def _heartbeat(self, seq: int) -> Heartbeat:
        cpu, mem = self._usage.sample()
        return build_heartbeat(
            self.status(),
            seq=seq,
            at=self._clock(),
            interval_s=self.config.heartbeat_interval_s,
            cpu_percent=cpu,
            memory_mb=mem,
        )

    def _write_status(self) -> None:
        try:
            status = self.status()
        except FoglineError as exc:
            log.warning("could not write the status file: %s", exc)
            return
        write_status_file(self.config.data_dir, status)
