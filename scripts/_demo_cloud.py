"""The demo's cloud services, built from the public pieces of ``fogline.cloud``:

- the artifact service (agents pull release chunks from it);
- cloud inference: the newest published version on Ray Serve, behind the MQTT bridge
  (devices offload to it; redeployed when a new version is published);
- the fleet monitor with its SQLite registry (what the live view and report read).

They share the demo's one cloud MQTT connection. ``close()`` stops them in reverse
order and is safe to call after a failed ``start()``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fogline.cloud import BASELINE, ArtifactService, ModelRecord, Registry
from fogline.cloud.fleet import FLEET_DB_NAME, FleetMonitor, FleetSummary, SqliteFleetStore
from fogline.cloud.fleet import summarize as summarize_fleet
from fogline.cloud.serving import (
    DeployedModel,
    InferenceBridge,
    ServedModel,
    ServingSettings,
    deploy_model,
    undeploy,
)
from fogline.protocol import MqttTransport, Topics

__all__ = ["DemoCloud"]

log = logging.getLogger("fogline.demo.cloud")


class DemoCloud:
    def __init__(
        self,
        transport: MqttTransport,
        registry: Registry,
        data_dir: Path,
        topics: Topics,
        *,
        heartbeat_interval_s: float,
        missed_heartbeats: int = 3,
    ) -> None:
        self.transport = transport
        self.registry = registry
        self.topics = topics
        self.store = SqliteFleetStore(data_dir / FLEET_DB_NAME)
        self.artifacts = ArtifactService(transport, registry.store, topics=topics)
        self.monitor = FleetMonitor(
            transport,
            self.store,
            topics,
            heartbeat_interval_s=heartbeat_interval_s,
            missed_heartbeats=missed_heartbeats,
        )
        self.bridge: InferenceBridge | None = None
        self.deployed: DeployedModel | None = None
        self._closers: list[Callable[[], None]] = [self.store.close]

    def start(self) -> None:
        self.artifacts.start()
        self._closers.append(self.artifacts.close)
        self.monitor.start()
        self._closers.append(self.monitor.close)

    def serve(self, record: ModelRecord) -> None:
        """Serve ``record`` (its fp32 variant: the cloud has the CPU for it) on Ray Serve
        and point the bridge at it. A redeploy replaces the previous version."""
        settings = ServingSettings(
            model=record.name,
            version=record.version,
            num_replicas=1,
            num_cpus=0.25,  # leave the 2 cores to the fleet and training
            max_batch_size=16,
            batch_wait_timeout_ms=2.0,
        )
        deployed = deploy_model(settings, self.registry.artifact_path(record, BASELINE))
        if self.deployed is None:
            # Remove our Serve app, not Serve itself: on a shared cluster (RAY_ADDRESS)
            # others may use it; a local Ray goes away whole at ray.shutdown().
            self._closers.append(self._undeploy)
        self.deployed = deployed
        if self.bridge is None:
            self.bridge = InferenceBridge(
                self.transport,
                {record.name: ServedModel(deployed.version, deployed.handle)},
                self.topics,
            )
            self.bridge.start()
            self._closers.append(self.bridge.close)
        else:
            # The bridge looks its handles up per request: swapping the entry is atomic.
            self.bridge.handles[record.name] = ServedModel(deployed.version, deployed.handle)
        log.info("cloud inference serves %s", record.ref)

    def _undeploy(self) -> None:
        if self.deployed is not None:
            undeploy(self.deployed)

    def summary(self) -> FleetSummary:
        return summarize_fleet(self.store.devices())

    def close(self) -> None:
        while self._closers:
            closer = self._closers.pop()
            try:
                closer()
            except Exception:  # keep closing the rest
                log.exception("stopping %s failed", getattr(closer, "__qualname__", closer))
