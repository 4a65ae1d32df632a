"""The simulator's ground truth: what each device sent, what it got back, where it ran.

The ledger is written by the traffic driver, never by the agents, so it is an
independent account that the fleet monitor's summary can be checked against.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

__all__ = ["DeviceReport", "DeviceSnapshot", "FaultReport", "FleetReport", "Ledger", "percentile"]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else 0.0


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DeviceReport(_Report):
    device_id: str
    profile: str
    device_class: str
    running: bool
    connected: bool
    restarts: int
    #: Model name -> version the agent served when the report was taken.
    versions: dict[str, int]
    sent: int
    answered: int
    errors: int
    error_codes: dict[str, int]
    edge: int
    cloud: int
    correct: int
    budgeted: int
    met_budget: int
    late: int
    latency_p50_ms: float
    latency_p99_ms: float
    #: Requests the device's sensor produced while its agent was killed (never sent).
    skipped_while_down: int


class FaultReport(_Report):
    at_s: float
    device_id: str
    kind: str
    source: str
    ok: bool
    detail: str = ""


class FleetReport(_Report):
    """The whole run. Ratios are over answered requests unless named otherwise."""

    duration_s: float
    devices: int
    running: int
    connected: int
    devices_by_profile: dict[str, int]
    #: Model name -> version -> number of devices serving it at the end.
    versions: dict[str, dict[str, int]]
    sent: int
    answered: int
    errors: int
    error_codes: dict[str, int]
    edge: int
    cloud: int
    offload_ratio: float
    budgeted: int
    met_budget: int
    met_budget_share: float
    correct: int
    accuracy: float
    edge_latency_p50_ms: float
    edge_latency_p99_ms: float
    cloud_latency_p50_ms: float
    cloud_latency_p99_ms: float
    request_rate_per_s: float
    #: Arrivals the driver could not even hand to an agent (its own backlog was full).
    driver_dropped: int
    skipped_while_down: int
    faults: list[FaultReport]
    per_device: list[DeviceReport]


@dataclass
class _Account:
    profile: str
    device_class: str
    sent: int = 0
    answered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    edge: int = 0
    cloud: int = 0
    correct: int = 0
    budgeted: int = 0
    met_budget: int = 0
    late: int = 0
    skipped_while_down: int = 0
    edge_ms: list[float] = field(default_factory=list)
    cloud_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class DeviceSnapshot:
    """What the fleet knows of a device beyond the ledger, when a report is taken."""

    running: bool
    connected: bool
    restarts: int
    versions: dict[str, int]


class Ledger:
    """Thread-safe per-device counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, _Account] = {}
        self.driver_dropped = 0

    def add_device(self, device_id: str, profile: str, device_class: str) -> None:
        with self._lock:
            self._accounts.setdefault(device_id, _Account(profile, device_class))

    def sent(self, device_id: str) -> None:
        with self._lock:
            self._accounts[device_id].sent += 1

    def skipped(self, device_id: str) -> None:
        with self._lock:
            self._accounts[device_id].skipped_while_down += 1

    def dropped_by_driver(self) -> None:
        with self._lock:
            self.driver_dropped += 1

    def answered(
        self,
        device_id: str,
        *,
        where: Literal["edge", "cloud"],
        latency_ms: float,
        met_budget: bool | None,
        late: bool,
        correct: bool,
    ) -> None:
        with self._lock:
            acc = self._accounts[device_id]
            acc.answered += 1
            if where == "edge":
                acc.edge += 1
                acc.edge_ms.append(latency_ms)
            else:
                acc.cloud += 1
                acc.cloud_ms.append(latency_ms)
            if met_budget is not None:
                acc.budgeted += 1
                acc.met_budget += met_budget
            acc.late += late
            acc.correct += correct

    def failed(self, device_id: str, code: str) -> None:
        with self._lock:
            self._accounts[device_id].errors[code] += 1

    def totals(self) -> tuple[int, int, int]:
        """(sent, answered, errors) over the fleet, for progress displays."""
        with self._lock:
            accs = list(self._accounts.values())
            return (
                sum(a.sent for a in accs),
                sum(a.answered for a in accs),
                sum(sum(a.errors.values()) for a in accs),
            )

    def report(
        self,
        *,
        duration_s: float,
        snapshots: dict[str, DeviceSnapshot],
        faults: list[FaultReport],
    ) -> FleetReport:
        with self._lock:
            accounts = {
                k: _Account(
                    v.profile,
                    v.device_class,
                    v.sent,
                    v.answered,
                    Counter(v.errors),
                    v.edge,
                    v.cloud,
                    v.correct,
                    v.budgeted,
                    v.met_budget,
                    v.late,
                    v.skipped_while_down,
                    list(v.edge_ms),
                    list(v.cloud_ms),
                )
                for k, v in self._accounts.items()
            }
            driver_dropped = self.driver_dropped
        per_device = []
        for device_id, acc in sorted(accounts.items()):
            snap = snapshots.get(device_id, DeviceSnapshot(False, False, 0, {}))
            both = acc.edge_ms + acc.cloud_ms
            per_device.append(
                DeviceReport(
                    device_id=device_id,
                    profile=acc.profile,
                    device_class=acc.device_class,
                    running=snap.running,
                    connected=snap.connected,
                    restarts=snap.restarts,
                    versions=dict(snap.versions),
                    sent=acc.sent,
                    answered=acc.answered,
                    errors=sum(acc.errors.values()),
                    error_codes=dict(acc.errors),
                    edge=acc.edge,
                    cloud=acc.cloud,
                    correct=acc.correct,
                    budgeted=acc.budgeted,
                    met_budget=acc.met_budget,
                    late=acc.late,
                    latency_p50_ms=percentile(both, 50),
                    latency_p99_ms=percentile(both, 99),
                    skipped_while_down=acc.skipped_while_down,
                )
            )
        return _summarise(per_device, accounts, duration_s, driver_dropped, faults)


def _summarise(
    per_device: list[DeviceReport],
    accounts: dict[str, _Account],
    duration_s: float,
    driver_dropped: int,
    faults: list[FaultReport],
) -> FleetReport:
    codes: Counter[str] = Counter()
    versions: dict[str, Counter[str]] = {}
    by_profile: Counter[str] = Counter()
    for dev in per_device:
        codes.update(dev.error_codes)
        by_profile[dev.profile] += 1
        for model, version in dev.versions.items():
            versions.setdefault(model, Counter())[str(version)] += 1
    edge_ms = [ms for acc in accounts.values() for ms in acc.edge_ms]
    cloud_ms = [ms for acc in accounts.values() for ms in acc.cloud_ms]
    answered = sum(d.answered for d in per_device)
    sent = sum(d.sent for d in per_device)
    budgeted = sum(d.budgeted for d in per_device)
    met = sum(d.met_budget for d in per_device)
    correct = sum(d.correct for d in per_device)
    cloud = sum(d.cloud for d in per_device)
    return FleetReport(
        duration_s=duration_s,
        devices=len(per_device),
        running=sum(d.running for d in per_device),
        connected=sum(d.connected for d in per_device),
        devices_by_profile=dict(sorted(by_profile.items())),
        versions={m: dict(sorted(c.items())) for m, c in sorted(versions.items())},
        sent=sent,
        answered=answered,
        errors=sum(d.errors for d in per_device),
        error_codes=dict(sorted(codes.items())),
        edge=sum(d.edge for d in per_device),
        cloud=cloud,
        offload_ratio=cloud / answered if answered else 0.0,
        budgeted=budgeted,
        met_budget=met,
        met_budget_share=met / budgeted if budgeted else 1.0,
        correct=correct,
        accuracy=correct / answered if answered else 0.0,
        edge_latency_p50_ms=percentile(edge_ms, 50),
        edge_latency_p99_ms=percentile(edge_ms, 99),
        cloud_latency_p50_ms=percentile(cloud_ms, 50),
        cloud_latency_p99_ms=percentile(cloud_ms, 99),
        request_rate_per_s=sent / duration_s if duration_s > 0 else 0.0,
        driver_dropped=driver_dropped,
        skipped_while_down=sum(d.skipped_while_down for d in per_device),
        faults=faults,
        per_device=per_device,
    )
