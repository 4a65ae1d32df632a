"""Every long-running cloud service in one process: what ``fogline cloud serve`` runs,
and what a script (``make demo``) runs in-process.

Started in this order, closed in reverse: the artifact service; when models are to be
served, Ray (local, or ``RAY_ADDRESS``), their Serve deployments, the inference bridge
and the release follower; the fleet monitor with its SQLite store under the data
directory, and its metrics and web server. All share the caller's MQTT transport, which
the caller closes after :meth:`CloudServices.close`.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from fogline.protocol import MqttTransport, TrustStore, validate_id

from .._artifacts import ArtifactService
from .._config import CloudSettings
from .._keyring import KeyRing
from .._registry import ModelRecord, Registry
from ..fleet import (
    FleetMonitor,
    FleetSettings,
    FleetStore,
    FleetWebServer,
    open_fleet_store,
)
from ._bridge import InferenceBridge, ServedModel
from ._deployment import DeployedModel, undeploy
from ._follow import ReleaseFollower
from ._from_registry import parse_served_refs, resolve_served, serving_settings_for
from ._from_registry import serve_models as deploy_models
from ._ray_session import RaySession

__all__ = ["CloudServices", "Service", "check_serve_models", "start_cloud_services"]

log = logging.getLogger("fogline.cloud.services")


class Service(Protocol):
    def start(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class CloudServices:
    """The running services. :meth:`close` stops them in reverse order (idempotent)."""

    registry: Registry
    artifacts: ArtifactService
    deployed: dict[str, DeployedModel] = field(default_factory=dict)
    bridge: InferenceBridge | None = None
    follower: ReleaseFollower | None = None
    monitor: FleetMonitor | None = None
    fleet_store: FleetStore | None = None
    web: FleetWebServer | None = None
    _closers: list[tuple[str, Callable[[], None]]] = field(default_factory=list, repr=False)

    @property
    def names(self) -> list[str]:
        """What runs, in start order (for the CLI's banner)."""
        return [name for name, _ in self._closers]

    @property
    def metrics_url(self) -> str | None:
        return None if self.web is None else f"{self.web.url}/metrics"

    def served_versions(self) -> dict[str, int]:
        return {name: d.version for name, d in self.deployed.items()}

    def _started(self, name: str, closer: Callable[[], None]) -> None:
        self._closers.append((name, closer))

    def close(self) -> None:
        """Stop everything; one failing closer does not keep the others running."""
        while self._closers:
            name, closer = self._closers.pop()
            try:
                closer()
            except Exception:
                log.exception("closing %s failed", name)

    def __enter__(self) -> CloudServices:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_serve_models(
    settings: CloudSettings, serve_models: Sequence[str] | None = None
) -> list[ModelRecord]:
    """What would be served (``serve_models``, else ``[cloud.serve] models``), checked
    without starting anything: unknown models, missing fp32 variants and bad
    deployment options raise here."""
    refs = list(settings.serve.models if serve_models is None else serve_models)
    registry = Registry(settings.data_dir)
    records = []
    for name, version in parse_served_refs(refs):
        record = resolve_served(registry, name, version)
        serving_settings_for(record, settings.serve.deployment)
        records.append(record)
    return records


def start_cloud_services(
    settings: CloudSettings,
    transport: MqttTransport,
    *,
    serve_models: Sequence[str] | None = None,
    fleet: bool | None = None,
    metrics_port: int | None = None,
    share_group: str | None = None,
    follow_releases: bool | None = None,
    fleet_settings: FleetSettings | None = None,
) -> CloudServices:
    """Start the cloud services on a connected ``transport``.

    Keyword arguments left as ``None`` come from ``settings.serve`` (``[cloud.serve]``):
    ``serve_models`` are ``NAME`` (newest published, followed on new releases unless
    ``follow_releases`` is false) or ``NAME:VERSION`` (pinned); ``metrics_port`` 0 turns
    the fleet web server off; ``share_group`` makes this process one replica of a group
    (artifacts, bridge and fleet ingest are shared; the artifact service's own
    ``artifact_share_group`` still applies when this is unset). ``fleet_settings`` tunes
    the monitor (heartbeat interval, thresholds); its data dir and prefix are ignored in
    favour of ``settings``'. Raises before anything starts when a model is unknown; if a
    later step fails, whatever started is closed again."""
    cfg = settings.serve
    refs = list(cfg.models if serve_models is None else serve_models)
    run_fleet = cfg.fleet if fleet is None else fleet
    port = cfg.metrics_port if metrics_port is None else metrics_port
    group = share_group or cfg.share_group
    if group is not None:
        validate_id(group, "share group")
    follow = cfg.follow_releases if follow_releases is None else follow_releases

    check_serve_models(settings, refs)  # unknown models, bad options: before Ray starts
    registry = Registry(settings.data_dir)
    pinned = {name: version is not None for name, version in parse_served_refs(refs)}
    services = CloudServices(
        registry=registry,
        artifacts=ArtifactService(
            transport,
            registry.store,
            topics=settings.topics,
            share_group=group or settings.artifact_share_group,
            workers=settings.artifact_workers,
        ),
    )
    try:
        services.artifacts.start()
        services._started("ArtifactService", services.artifacts.close)
        if refs:
            _start_serving(services, settings, transport, refs, pinned, group, follow)
        if run_fleet:
            _start_fleet(services, settings, transport, fleet_settings, port, group)
    except BaseException:
        services.close()
        raise
    return services


def _start_serving(
    services: CloudServices,
    settings: CloudSettings,
    transport: MqttTransport,
    refs: list[str],
    pinned: dict[str, bool],
    group: str | None,
    follow: bool,
) -> None:
    ray_session = RaySession.acquire()
    services._started("Ray", ray_session.release)
    options: dict[str, Any] = dict(settings.serve.deployment)
    # Replicas share a cluster: each owns its own Serve apps (see _from_registry).
    instance = uuid.uuid4().hex[:8] if group else None
    services.deployed.update(deploy_models(services.registry, refs, options, instance))

    def undeploy_all() -> None:
        # Our own local Ray takes its apps down with it; a cluster's GCS may be gone.
        if not ray_session.owns_serve and ray_session.alive():
            for model in list(services.deployed.values()):
                undeploy(model)
        services.deployed.clear()

    services._started("Serve", undeploy_all)
    bridge = InferenceBridge(
        transport,
        {name: ServedModel(d.version, d.handle) for name, d in services.deployed.items()},
        settings.topics,
        group,
    )
    bridge.start()
    services.bridge = bridge
    services._started("InferenceBridge", bridge.close)
    followed = [name for name, is_pinned in pinned.items() if not is_pinned]
    if follow and followed:
        keyring = KeyRing(settings.data_dir)

        def trust() -> TrustStore:
            return keyring.trust()

        follower = ReleaseFollower(
            transport,
            services.registry,
            bridge,
            services.deployed,
            followed,
            trust,
            topics=settings.topics,
            options=options,
            instance=instance,
        )
        follower.start()
        services.follower = follower
        services._started("ReleaseFollower", follower.close)


def _start_fleet(
    services: CloudServices,
    settings: CloudSettings,
    transport: MqttTransport,
    fleet_settings: FleetSettings | None,
    port: int,
    group: str | None,
) -> None:
    tuning = fleet_settings or FleetSettings(data_dir=settings.data_dir)
    store = open_fleet_store(tuning)
    try:
        monitor = FleetMonitor(
            transport,
            store,
            settings.topics,
            tuning.heartbeat_interval_s,
            tuning.missed_heartbeats,
            group or tuning.shared_group,
        )
        monitor.start()
    except BaseException:
        store.close()
        raise

    def close_fleet() -> None:
        try:
            monitor.close()
        finally:
            store.close()  # after the monitor: its writer drains into the store

    services.monitor, services.fleet_store = monitor, store
    services._started("FleetMonitor", close_fleet)
    if port:
        web = FleetWebServer(
            store,
            settings.serve.metrics_host,
            port,
            thresholds=tuning.thresholds,
            stats=monitor.stats,
        )
        web.start()
        services.web = web
        services._started("FleetWebServer", web.close)
