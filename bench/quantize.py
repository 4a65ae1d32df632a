"""Benchmark: the quantization pipeline's variants of the reference CNN, side by side.

Trains ``digits-cnn`` on a local Ray, builds every variant, measures them (one run, same
machine, same inputs) and prints per variant: holdout accuracy, size and median latency
at batch 1 and 32 as ratios to fp32, per thread budget; then the gate's choice per
device class and whether the targets hold for the 1-thread class (chosen int8 variant
>= 1.8x fp32 at batch 32, >= 1.15x at batch 1, accuracy drop <= 0.5 point).

    .venv/bin/python bench/quantize.py [--epochs 5] [--repeats 300]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fogline.cloud import load_settings, run_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=300, help="timed runs at batch 1")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="fogline-bench-") as tmp:
        settings = load_settings(data_dir=Path(tmp))
        result = run_pipeline(
            "digits-cnn",
            epochs=args.epochs,
            settings=settings,
            progress=not args.json,
            repeats=args.repeats,
        )
    base = next(m for m in result.measurements if m.quantization == "fp32")
    threads = sorted(base.latency_ms)
    rows: list[dict[str, Any]] = []
    for m in result.measurements:
        row: dict[str, Any] = {
            "variant": m.quantization,
            "accuracy": m.accuracy,
            "drop": round(base.accuracy - m.accuracy, 3),
            "size": m.size,
            "size_ratio": round(m.size / base.size, 3),
        }
        for t in threads:
            for b in (1, 32):
                row[f"{t}t_b{b}_ms"] = round(m.latency_ms[t][b], 4)
                row[f"{t}t_b{b}_speedup"] = round(base.latency_ms[t][b] / m.latency_ms[t][b], 3)
        rows.append(row)
    chosen = {k: d.chosen for k, d in result.decisions.items()}
    one_thread = next(
        c for c in settings.device_classes if c.threads == 1 and c.max_model_bytes is None
    )
    pick = chosen.get(one_thread.name)
    verdict: dict[str, object] = {"class": one_thread.name, "chosen": pick}
    if pick is not None:
        row = next(r for r in rows if r["variant"] == pick)
        t = one_thread.threads
        verdict.update(
            b32_speedup=row[f"{t}t_b32_speedup"],
            b1_speedup=row[f"{t}t_b1_speedup"],
            drop=row["drop"],
            meets_target=pick.startswith("int8")
            and row[f"{t}t_b32_speedup"] >= 1.8
            and row[f"{t}t_b1_speedup"] >= 1.15
            and row["drop"] <= 0.5,
        )
    if args.json:
        print(json.dumps({"variants": rows, "gate": chosen, "target": verdict}, indent=2))
        return
    table = Table(title="digits-cnn variants (speed-up = fp32 latency / variant latency)")
    for col in ("variant", "accuracy", "drop", "size vs fp32"):
        table.add_column(col, justify="right")
    for t in threads:
        for b in (1, 32):
            table.add_column(f"{t}t b{b}", justify="right")
    for r in rows:
        cells = [
            str(r["variant"]),
            f"{r['accuracy']:.2f}%",
            f"{r['drop']:+.2f}",
            f"{r['size_ratio']:.2f}x",
        ]
        for t in threads:
            for b in (1, 32):
                cells.append(f"{r[f'{t}t_b{b}_ms']:.3f} ms ({r[f'{t}t_b{b}_speedup']:.2f}x)")
        table.add_row(*cells)
    console.print(table)
    gate = Table(title="gate choice per device class")
    gate.add_column("device class")
    gate.add_column("chosen")
    for name, variant in chosen.items():
        gate.add_row(name, variant or "none (served from the cloud)")
    console.print(gate)
    console.print(f"target ({one_thread.name}): {verdict}")


if __name__ == "__main__":
    main()
