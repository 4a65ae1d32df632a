"""Prometheus metrics for the fleet: a custom collector that reads the summary at scrape
time, so the figures are never older than the store.

Names follow the Prometheus conventions: a ``fogline_`` prefix, base units (seconds),
``_total`` only on counters, ``_ratio`` for 0..1 shares, labels for dimensions
(``state``, ``model``, ``version``, ``reason``, ``path``) rather than names.
Per-device series are left out on purpose: a fleet of thousands would explode
cardinality; ``fogline fleet devices`` answers per-device questions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ._monitor import MonitorStats
from ._summary import AttentionReason, FleetSummary

__all__ = ["FleetCollector", "fleet_registry"]

_REASONS: tuple[AttentionReason, ...] = (
    "offline",
    "errors_rising",
    "p99_high",
    "breaker_open",
    "telemetry_dropped",
    "version_behind",
)


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:  # unknown (no requests yet) is absent, not zero
        family.add_metric([], value)
    return family


class FleetCollector(Collector):
    """Collect the fleet summary (and, if given, this monitor replica's own stats)."""

    def __init__(
        self,
        summary: Callable[[], FleetSummary],
        stats: Callable[[], MonitorStats] | None = None,
    ) -> None:
        self._summary = summary
        self._stats = stats

    def describe(self) -> list[Metric]:
        return []  # families depend on the data; skip the collect-at-register call

    def collect(self) -> Iterator[Metric]:
        s = self._summary()
        devices = GaugeMetricFamily("fogline_devices", "Devices in the registry", labels=["state"])
        devices.add_metric(["online"], s.devices_online)
        devices.add_metric(["offline"], s.devices_offline)
        yield devices
        attention = GaugeMetricFamily(
            "fogline_devices_attention", "Devices needing attention, by reason", labels=["reason"]
        )
        counts = s.attention_counts()
        for reason in _REASONS:
            attention.add_metric([reason], counts.get(reason, 0))
        yield attention
        yield from self._models(s)
        yield from self._requests(s)
        if self._stats is not None:
            yield from self._monitor(self._stats())

    def _models(self, s: FleetSummary) -> Iterator[Metric]:
        per_version = GaugeMetricFamily(
            "fogline_model_devices",
            "Devices running each model version",
            labels=["model", "version"],
        )
        latest = GaugeMetricFamily(
            "fogline_model_latest_version",
            "Newest version of each model in the fleet",
            labels=["model"],
        )
        behind = GaugeMetricFamily(
            "fogline_model_devices_behind",
            "Devices running an older version than the newest",
            labels=["model"],
        )
        for m in s.models:
            for version, count in m.versions.items():
                per_version.add_metric([m.model, str(version)], count)
            latest.add_metric([m.model], m.latest_version)
            behind.add_metric([m.model], m.devices_behind)
        yield from (per_version, latest, behind)

    def _requests(self, s: FleetSummary) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "fogline_requests", "Inference requests served by the fleet", value=s.requests_total
        )
        by_path = CounterMetricFamily(
            "fogline_requests_by_path", "Requests by where they ran", labels=["path"]
        )
        by_path.add_metric(["edge"], s.edge_requests_total)
        by_path.add_metric(["cloud"], s.cloud_requests_total)
        yield by_path
        yield CounterMetricFamily(
            "fogline_request_errors", "Requests that failed", value=s.errors_total
        )
        yield CounterMetricFamily(
            "fogline_budgeted_requests",
            "Requests that carried a latency budget",
            value=s.budgeted_requests_total,
        )
        yield CounterMetricFamily(
            "fogline_budget_met_requests",
            "Budgeted requests that met their budget",
            value=s.met_budget_total,
        )
        yield CounterMetricFamily(
            "fogline_telemetry_dropped",
            "Telemetry records devices dropped",
            value=s.telemetry_dropped_total,
        )
        yield _gauge(
            "fogline_request_rate_per_second",
            "Fleet request rate over each online device's last heartbeat interval",
            s.request_rate_per_s,
        )
        p50 = None if s.latency_p50_ms is None else s.latency_p50_ms / 1000
        p99 = None if s.latency_p99_ms is None else s.latency_p99_ms / 1000
        yield _gauge("fogline_request_latency_p50_seconds", "Median of online devices' p50", p50)
        yield _gauge("fogline_request_latency_p99_seconds", "Maximum of online devices' p99", p99)
        yield _gauge("fogline_offload_ratio", "Share of requests run in the cloud", s.offload_ratio)
        yield _gauge(
            "fogline_met_budget_ratio",
            "Share of budgeted requests that met their budget",
            s.met_budget_share,
        )
        yield _gauge("fogline_error_ratio", "Share of requests that failed", s.error_rate)

    def _monitor(self, st: MonitorStats) -> Iterator[Metric]:
        received = CounterMetricFamily(
            "fogline_fleet_messages_received", "Messages this monitor received", labels=["kind"]
        )
        for kind, n in sorted(st.received.items()):
            received.add_metric([kind], n)
        yield received
        rejected = CounterMetricFamily(
            "fogline_fleet_messages_rejected", "Malformed messages ignored", labels=["reason"]
        )
        for reason, n in sorted(st.rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected
        yield CounterMetricFamily(
            "fogline_fleet_messages_applied", "Messages written to the store", value=st.applied
        )
        yield CounterMetricFamily(
            "fogline_fleet_write_retries",
            "Store writes that failed and were tried again",
            value=st.write_retries,
        )
        yield CounterMetricFamily(
            "fogline_fleet_write_failures",
            "Messages lost to failed store writes",
            value=st.write_failures,
        )
        yield _gauge("fogline_fleet_queue_depth", "Messages waiting for the writer", st.queue_depth)


def fleet_registry(collector: FleetCollector) -> CollectorRegistry:
    """A registry holding only the fleet collector (not the process-global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry
