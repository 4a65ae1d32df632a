"""What the agent reports about itself: the :class:`AgentStatus` snapshot (also written
to ``<data_dir>/status.json`` for ``fogline-edge status``), the :class:`Heartbeat` built
from it, and the process's CPU and memory use.

Process usage comes from ``os.times()`` and ``/proc/self/statm`` rather than psutil:
psutil (and the ``subprocess`` it imports) costs the device 1-2 MB resident for two
numbers the kernel hands out directly.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

from fogline.protocol import BreakerState, Heartbeat

from ._capacity import Admission
from ._config import AgentConfig
from ._routing import RoutingPolicy, RoutingStats
from ._store import ModelStore, atomic_write

if TYPE_CHECKING:
    from ._cloud_client import CloudClient
    from ._runtime import LoadedModel
    from ._telemetry import Telemetry

__all__ = [
    "STATUS_FILE",
    "AgentStatus",
    "ModelStatus",
    "ProcessUsage",
    "build_heartbeat",
    "build_status",
    "write_status_file",
]

log = logging.getLogger("fogline.edge.agent")

STATUS_FILE = "status.json"


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
    # Where requests ran: offload ratio = cloud / (edge + cloud) answers; the met-budget
    # ratio counts requests that carried a budget.
    policy: str = RoutingPolicy.LOCAL_FIRST.value
    offload_ratio: float = 0.0
    budgeted_requests: int = 0
    met_budget: int = 0
    met_budget_ratio: float = 1.0
    cloud_fallbacks: int = 0  # the cloud failed; the request ran locally
    cascade_escalations: int = 0  # cascade asked the cloud (low local confidence)
    cloud_errors: int = 0  # failed with no local run (cloud-only, refused, no path)
    cloud_rtt_ms: float | None = None
    cloud_service_ms: dict[str, float] = {}
    cloud_models: list[str] = []  # no local variant for this class: served by the cloud
    telemetry_dropped: int
    telemetry_queued: int
    http_url: str | None
    load_hints: dict[str, float]
    key_set_version: int = 0  # 0: the configured keys; above: adopted from the cloud
    trusted_keys: list[str] = []  # key ids
    at: float


def build_status(
    *,
    config: AgentConfig,
    admission: Admission,
    store: ModelStore,
    served: Mapping[str, LoadedModel],
    router_stats: RoutingStats,
    cloud: CloudClient | None,
    cloud_models: Collection[str],
    cloud_errors: int,
    telemetry: Telemetry | None,
    telemetry_open: bool,
    connected: bool,
    uptime_s: float,
    http_url: str | None,
    load_hints: dict[str, float],
    at: float,
    key_set_version: int = 0,
    trusted_keys: Collection[str] = (),
) -> AgentStatus:
    """Assemble one snapshot. ``telemetry_open``: the outbox may still be read (it is
    closed once the agent has stopped)."""
    snap = admission.snapshot()
    models = {}
    for name, loaded in served.items():
        prev = store.previous(name)
        models[name] = ModelStatus(
            version=loaded.version,
            sha256=loaded.sha256,
            previous_version=prev.version if prev else None,
            service_ms=admission.service_estimate_ms(name),
        )
    stats = router_stats
    escalations = stats.escalations
    cloud_answers = stats.cloud_requests
    edge_answers = max(0, snap.requests - escalations)  # escalated: answered by cloud
    answered = edge_answers + cloud_answers
    cloud_service: dict[str, float] = {}
    if cloud is not None:
        for name in sorted(set(models) | set(cloud_models)):
            ms = cloud.service_ms(name)
            if ms is not None:
                cloud_service[name] = ms
    return AgentStatus(
        device_id=config.device_id,
        device_class=config.device_class,
        groups=list(config.groups),
        connected=connected,
        uptime_s=uptime_s,
        models=models,
        requests=snap.requests + cloud_answers - escalations + cloud_errors,
        errors=snap.errors + cloud_errors,
        refused=snap.refused,
        edge_requests=edge_answers,
        cloud_requests=cloud_answers,
        in_flight=snap.in_flight,
        queue_depth=snap.queue_depth,
        max_in_flight=snap.max_in_flight,
        latency_p50_ms=snap.latency_p50_ms,
        latency_p99_ms=snap.latency_p99_ms,
        breaker_state=cloud.breaker.state if cloud is not None else "closed",
        policy=config.routing.policy.value,
        offload_ratio=cloud_answers / answered if answered else 0.0,
        budgeted_requests=stats.budgeted,
        met_budget=stats.met_budget,
        met_budget_ratio=stats.met_budget_ratio,
        cloud_fallbacks=stats.fallbacks,
        cascade_escalations=escalations,
        cloud_errors=cloud_errors,
        cloud_rtt_ms=cloud.rtt_ms if cloud is not None else None,
        cloud_service_ms=cloud_service,
        cloud_models=sorted(cloud_models),
        telemetry_dropped=telemetry.dropped if telemetry else 0,
        telemetry_queued=len(telemetry.outbox) if telemetry and telemetry_open else 0,
        http_url=http_url,
        load_hints=load_hints,
        key_set_version=key_set_version,
        trusted_keys=list(trusted_keys),
        at=at,
    )


def build_heartbeat(
    status: AgentStatus,
    *,
    seq: int,
    at: float,
    interval_s: float,
    cpu_percent: float,
    memory_mb: float,
) -> Heartbeat:
    """The heartbeat for ``status``: refusals count as requests and as errors there."""
    st = status
    return Heartbeat(
        device_id=st.device_id,
        device_class=st.device_class,
        groups=st.groups,
        seq=seq,
        at=at,
        uptime_s=st.uptime_s,
        interval_s=interval_s,
        models={name: m.version for name, m in st.models.items()},
        requests=st.requests + st.refused,
        errors=st.errors + st.refused,
        edge_requests=st.edge_requests,
        cloud_requests=st.cloud_requests,
        budgeted_requests=st.budgeted_requests,
        met_budget=st.met_budget,
        latency_p50_ms=st.latency_p50_ms,
        latency_p99_ms=st.latency_p99_ms,
        queue_depth=st.queue_depth,
        in_flight=st.in_flight,
        offload_ratio=st.offload_ratio,
        met_budget_ratio=st.met_budget_ratio,
        breaker_state=st.breaker_state,
        cpu_percent=cpu_percent,
        memory_mb=memory_mb,
        telemetry_dropped=st.telemetry_dropped,
    )


def write_status_file(data_dir: Path, status: AgentStatus) -> None:
    """Rewrite ``status.json``; a failure is logged, never raised (it is informational)."""
    try:
        data = json.dumps(status.model_dump(mode="json"), indent=1).encode()
        # Rewritten every heartbeat: no fsync (fleets of agents share one disk).
        atomic_write(data_dir / STATUS_FILE, data, durable=False)
    except OSError as exc:
        log.warning("could not write the status file: %s", exc)


def _resident_bytes() -> int:
    """Current resident set size: ``/proc/self/statm`` (pages), else the peak from
    ``getrusage`` where there is no /proc (the closest figure the platform gives)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource
    except ImportError:  # not a Unix: nothing to report
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux and the BSDs report KiB, macOS bytes.
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


class ProcessUsage:
    """This process's CPU use since the previous sample (percent of one core, like
    ``top``; above 100 with several busy threads) and its resident memory (MB)."""

    def __init__(self) -> None:
        self._last = self._cpu_and_wall()

    @staticmethod
    def _cpu_and_wall() -> tuple[float, float]:
        t = os.times()
        return t.user + t.system, time.monotonic()

    def sample(self) -> tuple[float, float]:
        """``(cpu_percent, memory_mb)``; the first sample covers the time since creation."""
        cpu, wall = self._cpu_and_wall()
        last_cpu, last_wall = self._last
        self._last = (cpu, wall)
        elapsed = wall - last_wall
        percent = 100.0 * (cpu - last_cpu) / elapsed if elapsed > 0 else 0.0
        return max(0.0, percent), _resident_bytes() / 1e6
