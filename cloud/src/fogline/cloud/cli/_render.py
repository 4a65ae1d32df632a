"""Rich tables for measurements, gate decisions and registered models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from .._gate import BASELINE, GateDecision, VariantMeasurement
from .._registry import ModelRecord

if TYPE_CHECKING:
    from .._pipeline import PipelineResult

__all__ = [
    "decisions_from_card",
    "gate_table",
    "measurements_from_card",
    "measurements_table",
    "model_table",
    "models_table",
    "print_pipeline_result",
]


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def measurements_table(
    measurements: Sequence[VariantMeasurement], batches: Sequence[int] = (1, 32)
) -> Table:
    base = next((m for m in measurements if m.quantization == BASELINE), None)
    table = Table(title="Variants (latency: median ms, speed-up vs fp32)")
    for col in ("variant", "accuracy", "Δ pts", "size"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    threads = sorted({t for m in measurements for t in m.latency_ms})
    for t in threads:
        for b in batches:
            table.add_column(f"{t}t b{b}", justify="right")
    for m in measurements:
        drop = f"{m.accuracy - base.accuracy:+.2f}" if base else "-"
        cells = [m.quantization, f"{m.accuracy:.2f}%", drop, _size(m.size)]
        for t in threads:
            for b in batches:
                ms = m.latency_ms.get(t, {}).get(b)
                ref = base.latency_ms.get(t, {}).get(b) if base else None
                if ms is None:
                    cells.append("-")
                else:
                    ratio = f" ({ref / ms:.2f}x)" if ref else ""
                    cells.append(f"{ms:.3f}{ratio}")
        table.add_row(*cells)
    return table


def gate_table(decisions: dict[str, GateDecision]) -> Table:
    table = Table(title="Gate: variant per device class")
    table.add_column("device class")
    table.add_column("chosen")
    table.add_column("rejected")
    for name, d in decisions.items():
        rejected = "; ".join(f"{q}: {why}" for q, why in d.reasons.items()) or "-"
        table.add_row(name, d.chosen or "[yellow]none (served from the cloud)[/yellow]", rejected)
    return table


def models_table(records: Sequence[ModelRecord]) -> Table:
    table = Table(title="Models")
    for col in ("model", "version", "status", "source", "variants", "device classes"):
        table.add_column(col)
    for r in records:
        table.add_row(
            r.name,
            str(r.version),
            r.status,
            r.source,
            ", ".join(v.quantization for v in r.variants),
            ", ".join(f"{c}={q}" for c, q in r.assignments.items()) or "-",
        )
    return table


def model_table(record: ModelRecord) -> Table:
    table = Table(title=f"{record.ref}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_row("status", record.status)
    table.add_row("source", record.source)
    table.add_row("recipe", str(record.lineage.get("recipe", "-")))
    table.add_row("data hash", str(record.lineage.get("data_hash", "-"))[:16])
    table.add_row("fogline", str(record.lineage.get("fogline_version", "-")))
    for v in record.variants:
        table.add_row(f"variant {v.quantization}", f"{v.sha256[:16]}…  {_size(v.size)}")
    for c, q in record.assignments.items():
        table.add_row(f"class {c}", q)
    inputs = ", ".join(f"{s.name}:{s.dtype}{s.shape}" for s in record.inputs)
    outputs = ", ".join(f"{s.name}:{s.dtype}{s.shape}" for s in record.outputs)
    table.add_row("inputs", inputs)
    table.add_row("outputs", outputs)
    return table


def measurements_from_card(card: dict[str, object]) -> list[VariantMeasurement]:
    """The measurements a model card holds (JSON keys back to ints)."""
    out = []
    for m in card.get("measurements", []) or []:  # type: ignore[attr-defined]
        out.append(
            VariantMeasurement(
                quantization=m["quantization"],
                size=int(m["size"]),
                accuracy=float(m["accuracy"]),
                metric=m.get("metric", "accuracy"),
                latency_ms={
                    int(t): {int(b): float(ms) for b, ms in per.items()}
                    for t, per in m["latency_ms"].items()
                },
            )
        )
    return out


def decisions_from_card(card: dict[str, object]) -> dict[str, GateDecision]:
    gate = card.get("gate", {}) or {}
    return {
        name: GateDecision(name, d.get("chosen"), dict(d.get("rejected", {})))
        for name, d in gate.items()  # type: ignore[attr-defined]
    }


def print_pipeline_result(
    console: Console, result: PipelineResult, batches: Sequence[int] = (1, 32)
) -> None:
    """What ``fogline train`` and ``fogline model import`` print: the measurements, the
    gate's choices and how to publish the new version."""
    ref = result.record.ref
    console.print(measurements_table(result.measurements, batches))
    console.print(gate_table(result.decisions))
    console.print(
        f"registered [bold]{ref}[/bold]; publish it with [bold]fogline model publish {ref}[/bold]"
    )
