"""Rich tables for the CLI: profiles, devices and the fleet report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.table import Table

from ._ledger import FleetReport
from ._profiles import HardwareProfile

__all__ = ["devices_table", "fleet_tables", "profiles_table"]


def profiles_table(profiles: Mapping[str, HardwareProfile]) -> Table:
    table = Table(title="Hardware profiles")
    for column in (
        "profile",
        "class",
        "threads",
        "in flight",
        "speed",
        "rtt ms",
        "jitter ms",
        "loss",
        "kbit/s",
        "flaps/h",
        "description",
    ):
        table.add_column(column)
    for name, p in profiles.items():
        table.add_row(
            name,
            p.device_class,
            str(p.threads),
            str(p.max_in_flight),
            f"{p.speed_factor:g}x",
            f"{p.link.rtt_ms:g}",
            f"{p.link.jitter_ms:g}",
            f"{p.link.loss:.1%}",
            f"{p.link.bandwidth_kbps:g}" if p.link.bandwidth_kbps else "-",
            f"{p.flaps.per_hour:g}",
            p.description,
        )
    return table


def devices_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Simulated devices")
    for column in ("device", "profile", "class", "running", "connected", "link", "versions"):
        table.add_column(column)
    for row in rows:
        versions = ", ".join(f"{m} v{v}" for m, v in row.get("versions", {}).items()) or "-"
        table.add_row(
            str(row["device_id"]),
            str(row["profile"]),
            str(row["device_class"]),
            "yes" if row["running"] else "[red]killed[/red]",
            "yes" if row["connected"] else "[yellow]no[/yellow]",
            "[red]down[/red]" if row.get("link_down") else "up",
            versions,
        )
    return table


def fleet_tables(report: FleetReport) -> list[Table]:
    summary = Table(title=f"Fleet ground truth ({report.duration_s:.1f}s)", show_header=False)
    summary.add_column("figure")
    summary.add_column("value", justify="right")
    rows = [
        ("devices", f"{report.devices} ({_mix(report.devices_by_profile)})"),
        ("running / connected at the end", f"{report.running} / {report.connected}"),
        ("versions", "; ".join(f"{m}: {_mix(v, 'v')}" for m, v in report.versions.items()) or "-"),
        ("requests sent", str(report.sent)),
        ("answered / errors", f"{report.answered} / {report.errors}"),
        ("errors by code", _mix(report.error_codes) or "-"),
        ("edge / cloud", f"{report.edge} / {report.cloud}"),
        ("offload ratio", f"{report.offload_ratio:.1%}"),
        ("met budget", f"{report.met_budget}/{report.budgeted} ({report.met_budget_share:.1%})"),
        ("accuracy (answered)", f"{report.accuracy:.1%}"),
        (
            "edge latency p50 / p99",
            f"{report.edge_latency_p50_ms:.1f} / {report.edge_latency_p99_ms:.1f} ms",
        ),
        (
            "cloud latency p50 / p99",
            f"{report.cloud_latency_p50_ms:.1f} / {report.cloud_latency_p99_ms:.1f} ms",
        ),
        ("request rate", f"{report.request_rate_per_s:.1f}/s"),
        (
            "driver dropped / skipped while down",
            f"{report.driver_dropped} / {report.skipped_while_down}",
        ),
        ("faults", str(len(report.faults))),
    ]
    for name, value in rows:
        summary.add_row(name, value)
    devices = Table(title="Per device")
    for column in (
        "device",
        "profile",
        "sent",
        "answered",
        "errors",
        "edge",
        "cloud",
        "correct",
        "met budget",
        "p50 ms",
        "p99 ms",
        "versions",
        "state",
    ):
        devices.add_column(column)
    for d in report.per_device:
        devices.add_row(
            d.device_id,
            d.profile,
            str(d.sent),
            str(d.answered),
            str(d.errors),
            str(d.edge),
            str(d.cloud),
            str(d.correct),
            f"{d.met_budget}/{d.budgeted}",
            f"{d.latency_p50_ms:.1f}",
            f"{d.latency_p99_ms:.1f}",
            ", ".join(f"{m} v{v}" for m, v in d.versions.items()) or "-",
            ("running" if d.running else "stopped")
            + (f", {d.restarts} restarts" if d.restarts else ""),
        )
    tables = [summary, devices]
    if report.faults:
        faults = Table(title="Faults")
        for column in ("at s", "device", "fault", "source", "ok", "detail"):
            faults.add_column(column)
        for f in report.faults:
            faults.add_row(
                f"{f.at_s:.1f}",
                f.device_id,
                f.kind,
                f.source,
                "yes" if f.ok else "[red]no[/red]",
                f.detail,
            )
        tables.append(faults)
    return tables


def _mix(counts: Mapping[str, int], prefix: str = "") -> str:
    return ", ".join(f"{prefix}{k}: {v}" for k, v in counts.items())
