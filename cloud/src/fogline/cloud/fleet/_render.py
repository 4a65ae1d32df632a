"""Rich tables for the fleet CLI (kept apart from the commands so they stay short)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.console import Group
from rich.table import Table

from ._records import DeviceRecord, EventRecord
from ._summary import FleetSummary

__all__ = ["device_detail", "devices_table", "summary_view"]


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value * 100:.{digits}f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _ago(at: float, now: float) -> str:
    seconds = max(0.0, now - at)
    if seconds < 120:
        return f"{seconds:.0f}s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m ago"
    return f"{seconds / 3600:.1f}h ago"


def summary_view(s: FleetSummary) -> Group:
    figures = Table(title="Fleet", show_header=False, title_justify="left")
    figures.add_column("figure", style="bold")
    figures.add_column("value")
    offline = f"[red]{s.devices_offline}[/red]" if s.devices_offline else "0"
    figures.add_row("devices", f"{s.devices_total} ({s.devices_online} online, {offline} offline)")
    figures.add_row("requests", f"{s.requests_total} ({s.request_rate_per_s:.1f}/s)")
    figures.add_row("latency p50 (median of devices)", _ms(s.latency_p50_ms))
    figures.add_row("latency p99 (max of devices)", _ms(s.latency_p99_ms))
    figures.add_row("offload ratio", _pct(s.offload_ratio))
    figures.add_row("met budget", _pct(s.met_budget_share))
    figures.add_row("error rate", _pct(s.error_rate, 2))

    versions = Table(title="Model versions", title_justify="left")
    for col in ("model", "version", "devices"):
        versions.add_column(col)
    for m in s.models:
        for version, count in m.versions.items():
            mark = " (newest)" if version == m.latest_version else ""
            versions.add_row(m.model, f"v{version}{mark}", str(count))

    attention = Table(title="Needs attention", title_justify="left")
    for col in ("device", "reasons", "detail"):
        attention.add_column(col)
    for a in s.attention:
        attention.add_row(a.device_id, ", ".join(a.reasons), a.detail)
    if not s.attention:
        attention.add_row("-", "[green]none[/green]", "")
    return Group(figures, versions, attention)


def devices_table(devices: Sequence[DeviceRecord], now: float | None = None) -> Table:
    now = time.time() if now is None else now
    table = Table(title=f"Devices ({len(devices)})", title_justify="left")
    for col in (
        "device",
        "status",
        "class",
        "models",
        "last seen",
        "requests",
        "p50",
        "p99",
        "offload",
        "cpu",
        "mem",
    ):
        table.add_column(col)
    for d in devices:
        hb = d.heartbeat
        status = "[green]online[/green]" if d.online else f"[red]offline[/red] ({d.status_reason})"
        models = ", ".join(f"{m} v{v}" for m, v in sorted(hb.models.items())) if hb else "-"
        table.add_row(
            d.device_id,
            status,
            d.device_class or "-",
            models or "-",
            _ago(d.last_seen, now),
            str(d.totals.requests),
            _ms(hb.latency_p50_ms) if hb else "-",
            _ms(hb.latency_p99_ms) if hb else "-",
            _pct(hb.offload_ratio) if hb else "-",
            f"{hb.cpu_percent:.0f}%" if hb else "-",
            f"{hb.memory_mb:.0f} MB" if hb else "-",
        )
    return table


def device_detail(d: DeviceRecord, events: Sequence[EventRecord]) -> Group:
    info = Table(title=f"Device {d.device_id}", show_header=False, title_justify="left")
    info.add_column("field", style="bold")
    info.add_column("value")
    info.add_row("status", f"{d.status} ({d.status_reason})")
    info.add_row("class", d.device_class or "-")
    info.add_row("groups", ", ".join(d.groups) or "-")
    info.add_row("agent", d.agent_version or "-")
    info.add_row("first seen", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(d.first_seen)))
    info.add_row("last seen", _ago(d.last_seen, time.time()))
    info.add_row("heartbeats", str(d.heartbeats))
    for name, value in d.totals.model_dump().items():
        info.add_row(f"total {name}", str(value))
    if d.heartbeat is not None:
        hb = d.heartbeat
        info.add_row("models", ", ".join(f"{m} v{v}" for m, v in sorted(hb.models.items())) or "-")
        info.add_row("latency p50 / p99", f"{_ms(hb.latency_p50_ms)} / {_ms(hb.latency_p99_ms)}")
        info.add_row("breaker", hb.breaker_state)
        info.add_row("cpu / memory", f"{hb.cpu_percent:.0f}% / {hb.memory_mb:.0f} MB")
    table = Table(title="Recent events", title_justify="left")
    for col in ("when", "kind", "model", "version", "reason", "detail"):
        table.add_column(col)
    for e in events:
        table.add_row(
            _ago(e.received_at, time.time()),
            e.kind,
            e.model or "-",
            str(e.version) if e.version else "-",
            e.reason or "-",
            e.detail or "-",
        )
    return Group(info, table)
