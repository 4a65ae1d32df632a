"""What the demo shows: the gate table, the live fleet panel and the final report.

Everything the live panel says comes from the fleet monitor's summary (what the cloud
knows from heartbeats, states and last wills); the device strip beneath it adds the
monitor's per-device records. The simulator's ground truth appears only in the final
report, next to the monitor's figures, so the two can be compared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from fogline.cloud import GateDecision, VariantMeasurement
from fogline.cloud.fleet import DeviceRecord, FleetSummary
from fogline.firmware_sim import FleetReport

__all__ = [
    "Check",
    "checks_table",
    "gate_table",
    "live_view",
    "report_table",
]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def gate_table(
    measurements: Sequence[VariantMeasurement], decisions: Mapping[str, GateDecision], ref: str
) -> Table:
    """Variants (accuracy, size, batch-1 latency per thread budget) and the gate's pick
    for each device class."""
    base = next((m for m in measurements if m.quantization == "fp32"), None)
    threads = sorted({t for m in measurements for t in m.latency_ms})
    table = Table(title=f"{ref}: variants and the quantization gate", title_justify="left")
    table.add_column("variant")
    table.add_column("accuracy", justify="right")
    table.add_column("size", justify="right")
    for t in threads:
        table.add_column(f"{t} thr, batch 1", justify="right")
    table.add_column("chosen for")
    for m in measurements:
        cells = [m.quantization, f"{m.accuracy:.2f}%", f"{m.size / 1024:.0f} KiB"]
        for t in threads:
            ms = m.latency_ms.get(t, {}).get(1)
            ref_ms = base.latency_ms.get(t, {}).get(1) if base else None
            speed = f" ({ref_ms / ms:.2f}x)" if ms and ref_ms else ""
            cells.append("-" if ms is None else f"{ms:.3f} ms{speed}")
        chosen = [c for c, d in decisions.items() if d.chosen == m.quantization]
        cells.append(", ".join(chosen) or "[dim]-[/dim]")
        table.add_row(*cells)
    for cls, d in decisions.items():
        if d.chosen is None:
            table.add_row(
                "[yellow]none[/yellow]", "", "", *[""] * len(threads), f"{cls} (served from cloud)"
            )
    return table


def _figures(s: FleetSummary) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold")
    t.add_column()
    offline = f"[red]{s.devices_offline} offline[/red]" if s.devices_offline else "0 offline"
    t.add_row("devices", f"{s.devices_total}: [green]{s.devices_online} online[/green], {offline}")
    t.add_row("requests", f"{s.requests_total} ({s.request_rate_per_s:.1f}/s)")
    t.add_row("latency p50 / p99", f"{_ms(s.latency_p50_ms)} / {_ms(s.latency_p99_ms)}")
    t.add_row("offload ratio", _pct(s.offload_ratio))
    t.add_row("met budget", _pct(s.met_budget_share))
    t.add_row("error rate", _pct(s.error_rate))
    return t


def _versions(s: FleetSummary, no_model: int) -> Table:
    t = Table(title="model versions", title_justify="left", box=None)
    t.add_column("model")
    t.add_column("version")
    t.add_column("devices", justify="right")
    for m in s.models:
        for version, count in m.versions.items():
            newest = " (newest)" if version == m.latest_version else ""
            t.add_row(m.model, f"v{version}{newest}", str(count))
    if no_model:
        t.add_row("[dim]no local model[/dim]", "[dim]cloud only[/dim]", str(no_model))
    return t


def _strip(devices: Sequence[DeviceRecord], columns: int = 5) -> Table:
    t = Table(show_header=False, box=None, pad_edge=False)
    for _ in range(columns):
        t.add_column()
    cells = []
    for d in devices:
        models = d.heartbeat.models if d.heartbeat is not None else {}
        version = ",".join(f"v{v}" for v in models.values()) or "cloud"
        color = "green" if d.online else "red"
        cells.append(Text.assemble(("● ", color), f"{d.device_id} {version}"))
    for i in range(0, len(cells), columns):
        row = cells[i : i + columns]
        t.add_row(*row, *[""] * (columns - len(row)))
    return t


def live_view(
    phase: str, elapsed_s: float, summary: FleetSummary, devices: Sequence[DeviceRecord]
) -> RenderableType:
    with_model = sum(m.devices for m in summary.models)
    top = Table.grid(padding=(0, 4))
    top.add_row(_figures(summary), _versions(summary, summary.devices_total - with_model))
    parts: list[RenderableType] = [top, Text(""), _strip(devices)]
    attention = [a for a in summary.attention if a.reasons != ["version_behind"]][:4]
    for a in attention:
        parts.append(Text(f"! {a.device_id}: {a.detail}", style="yellow"))
    return Panel(
        Group(*parts),
        title=f"[bold]Fleet health[/bold] (fleet monitor) · {phase}",
        subtitle=f"{elapsed_s:.0f}s",
    )


@dataclass(frozen=True)
class Check:
    """One figure as the fleet monitor reports it and as the simulator counted it."""

    figure: str
    monitor: Any
    truth: Any
    tolerance: float = 0

    @property
    def ok(self) -> bool:
        if isinstance(self.monitor, int | float) and isinstance(self.truth, int | float):
            return abs(self.monitor - self.truth) <= self.tolerance
        return bool(self.monitor == self.truth)

    def to_dict(self) -> dict[str, Any]:
        return {
            "figure": self.figure,
            "monitor": self.monitor,
            "simulator": self.truth,
            "tolerance": self.tolerance,
            "ok": self.ok,
        }


def checks_table(checks: Sequence[Check]) -> Table:
    t = Table(title="Cross-check: fleet monitor vs simulator ground truth", title_justify="left")
    for col in ("figure", "fleet monitor", "simulator", "tolerance", ""):
        t.add_column(col)
    for c in checks:
        mark = "[green]ok[/green]" if c.ok else "[red]MISMATCH[/red]"
        t.add_row(c.figure, str(c.monitor), str(c.truth), f"±{c.tolerance:g}", mark)
    return t


def report_table(report: Mapping[str, Any], truth: FleetReport) -> Table:
    t = Table(title="Fogline demo: final report", title_justify="left", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    fleet = report["fleet"]
    t.add_row("devices", f"{fleet['devices']} ({_profiles(truth.devices_by_profile)})")
    t.add_row("online at the end", f"{fleet['online']} ({fleet['offline']} offline: killed)")
    t.add_row("versions (monitor)", _versions_text(fleet["versions"]))
    lat = report["latency_ms"]
    t.add_row("edge latency p50 / p99", f"{_ms(lat['edge_p50'])} / {_ms(lat['edge_p99'])}")
    t.add_row("cloud latency p50 / p99", f"{_ms(lat['cloud_p50'])} / {_ms(lat['cloud_p99'])}")
    t.add_row(
        "fleet latency p50 / p99 (monitor)",
        f"{_ms(lat['monitor_p50'])} / {_ms(lat['monitor_p99'])}",
    )
    req = report["requests"]
    t.add_row(
        "requests",
        f"{req['sent']} sent, {req['answered']} answered "
        f"({req['edge']} edge, {req['cloud']} cloud), {req['errors']} errors"
        + (f" {req['error_codes']}" if req["error_codes"] else ""),
    )
    t.add_row("offload ratio", _pct(report["offload_ratio"]))
    t.add_row("met budget", _pct(report["met_budget_share"]))
    t.add_row("accuracy (vs digit labels)", _pct(report["accuracy"]))
    upd = report["update"]
    t.add_row(
        f"update v{upd['from_version']} → v{upd['to_version']}",
        f"served by all {upd['devices']} devices with a local model in "
        f"{upd['fleet_converged_s']:.2f}s (monitor saw it in {upd['monitor_converged_s']:.2f}s; "
        f"cloud inference in {_secs(upd.get('cloud_serving_s'))})"
        if upd["fleet_converged_s"] is not None
        else "[red]did not reach the whole fleet[/red]",
    )
    kill = report["kill"]
    if kill is not None:
        seen = kill["monitor_offline_after_s"]
        t.add_row(
            "killed device",
            f"{kill['device_id']}: marked offline by the monitor after {seen:.2f}s"
            if seen is not None
            else f"{kill['device_id']}: [red]not marked offline[/red]",
        )
    times = report["timings_s"]
    t.add_row("time", ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return t


def _secs(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _profiles(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {p}" for p, n in counts.items())


def _versions_text(versions: Mapping[str, Mapping[str, int]]) -> str:
    parts = [
        f"{model} v{v}: {n} devices" for model, per in versions.items() for v, n in per.items()
    ]
    return "; ".join(parts) or "-"
