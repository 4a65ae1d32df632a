"""The fleet summary: a pure function over the registry's device records.

How the fleet-wide figures are made, and why:

- **Counts and ratios** (offload ratio, met-budget share, error rate) are exact: they
  divide the monotonic per-device totals (see :class:`~._records.Totals`), summed over
  every device the registry knows, online or not.
- **Request rate** sums each *online* device's rate over its last heartbeat interval
  (counter delta / uptime delta). An offline device contributes nothing: its last rate
  is stale.
- **Latency.** Percentiles cannot be merged exactly from per-device percentiles. We
  report the *median of the devices' p50* (the typical device's typical request) and the
  *maximum of the devices' p99* (an upper bound on the fleet's p99: if every device's
  p99 is at most x, at most 1% of all requests took longer than x). Only online
  devices that have served requests count.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ._records import DeviceRecord

__all__ = [
    "AttentionItem",
    "AttentionReason",
    "AttentionThresholds",
    "FleetSummary",
    "ModelSummary",
    "summarize",
]

AttentionReason = Literal[
    "offline",
    "errors_rising",
    "p99_high",
    "breaker_open",
    "telemetry_dropped",
    "version_behind",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AttentionThresholds(_Model):
    """When a device needs attention (besides being offline or behind)."""

    p99_high_ms: float = Field(default=250.0, gt=0)
    # Errors in the last heartbeat interval, as a share of its requests, above which
    # errors count as rising (any error at all when the interval had no requests).
    error_share: float = Field(default=0.0, ge=0, le=1)


class ModelSummary(_Model):
    model: str
    latest_version: int
    devices: int
    devices_behind: int
    versions: dict[int, int]  # version -> devices running it


class AttentionItem(_Model):
    device_id: str
    reasons: list[AttentionReason]
    detail: str


class FleetSummary(_Model):
    generated_at: float
    devices_total: int
    devices_online: int
    devices_offline: int
    models: list[ModelSummary]
    requests_total: int
    errors_total: int
    edge_requests_total: int
    cloud_requests_total: int
    budgeted_requests_total: int
    met_budget_total: int
    telemetry_dropped_total: int
    request_rate_per_s: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    offload_ratio: float | None
    met_budget_share: float | None
    error_rate: float | None
    attention: list[AttentionItem]

    def attention_counts(self) -> dict[str, int]:
        counts: Counter[str] = Counter()
        for item in self.attention:
            counts.update(item.reasons)
        return dict(counts)


def _ratio(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def _models(devices: Sequence[DeviceRecord]) -> list[ModelSummary]:
    per_model: dict[str, Counter[int]] = defaultdict(Counter)
    for d in devices:
        if d.heartbeat is not None:
            for model, version in d.heartbeat.models.items():
                per_model[model][version] += 1
    out = []
    for model in sorted(per_model):
        versions = per_model[model]
        latest = max(versions)
        total = sum(versions.values())
        out.append(
            ModelSummary(
                model=model,
                latest_version=latest,
                devices=total,
                devices_behind=total - versions[latest],
                versions=dict(sorted(versions.items())),
            )
        )
    return out


def _attention(
    d: DeviceRecord, latest: dict[str, int], limits: AttentionThresholds
) -> AttentionItem | None:
    reasons: list[AttentionReason] = []
    details: list[str] = []
    if not d.online:
        reasons.append("offline")
        details.append(f"offline ({d.status_reason})")
    hb, recent = d.heartbeat, d.recent
    if not d.online:
        # An offline device's last figures are stale: "offline" says it all, except
        # the versions it will come back with.
        recent = None
    if recent is not None and recent.errors > 0:
        share = recent.errors / recent.requests if recent.requests else 1.0
        if share > limits.error_share:
            reasons.append("errors_rising")
            details.append(f"{recent.errors} errors in the last {recent.seconds:.0f}s")
    if hb is not None:
        if d.online and hb.latency_p99_ms > limits.p99_high_ms:
            reasons.append("p99_high")
            details.append(f"p99 {hb.latency_p99_ms:.0f} ms > {limits.p99_high_ms:.0f} ms")
        if d.online and hb.breaker_state == "open":
            reasons.append("breaker_open")
            details.append("cloud circuit breaker open")
        behind = [f"{m} v{v}<v{latest[m]}" for m, v in sorted(hb.models.items()) if v < latest[m]]
        if behind:
            reasons.append("version_behind")
            details.append("behind: " + ", ".join(behind))
    if recent is not None and recent.telemetry_dropped > 0:
        reasons.append("telemetry_dropped")
        details.append(f"{recent.telemetry_dropped} telemetry records dropped")
    if not reasons:
        return None
    return AttentionItem(device_id=d.device_id, reasons=reasons, detail="; ".join(details))


def summarize(
    devices: Sequence[DeviceRecord],
    *,
    thresholds: AttentionThresholds | None = None,
    now: float | None = None,
) -> FleetSummary:
    """Compute the fleet summary from device records (see the module doc for how)."""
    limits = thresholds or AttentionThresholds()
    online = [d for d in devices if d.online]
    models = _models(devices)
    latest = {m.model: m.latest_version for m in models}

    def total(field: str) -> int:
        return sum(getattr(d.totals, field) for d in devices)

    serving = [d.heartbeat for d in online if d.heartbeat is not None and d.heartbeat.requests]
    p50s = [hb.latency_p50_ms for hb in serving]
    p99s = [hb.latency_p99_ms for hb in serving]
    requests, edge, cloud = total("requests"), total("edge_requests"), total("cloud_requests")
    attention = [a for d in devices if (a := _attention(d, latest, limits)) is not None]
    return FleetSummary(
        generated_at=time.time() if now is None else now,
        devices_total=len(devices),
        devices_online=len(online),
        devices_offline=len(devices) - len(online),
        models=models,
        requests_total=requests,
        errors_total=total("errors"),
        edge_requests_total=edge,
        cloud_requests_total=cloud,
        budgeted_requests_total=total("budgeted_requests"),
        met_budget_total=total("met_budget"),
        telemetry_dropped_total=total("telemetry_dropped"),
        request_rate_per_s=sum(d.recent.request_rate for d in online if d.recent is not None),
        latency_p50_ms=statistics.median(p50s) if p50s else None,
        latency_p99_ms=max(p99s) if p99s else None,
        offload_ratio=_ratio(cloud, edge + cloud),
        met_budget_share=_ratio(total("met_budget"), total("budgeted_requests")),
        error_rate=_ratio(total("errors"), requests),
        attention=attention,
    )
