"""The quantization gate: a pure function from measurements to one variant per class.

For each device class it picks the fastest variant that fits the class, stays within
the accuracy budget of the fp32 baseline and is not slower than fp32 at any measured
batch size. A variant that fails any rule is rejected with a reason, recorded in the
model card. A class that no variant fits gets none (agents of that class use the cloud).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fogline.protocol import TrainingError

from ._config import DeviceClass

__all__ = ["BASELINE", "GateDecision", "VariantMeasurement", "choose_variants"]

BASELINE = "fp32"


@dataclass(frozen=True)
class VariantMeasurement:
    """What was measured of one variant.

    ``accuracy`` is holdout accuracy in percent, or top-1 agreement with fp32 for models
    without labels. ``latency_ms[threads][batch]`` is the median latency under that
    thread budget."""

    quantization: str
    size: int
    accuracy: float
    latency_ms: Mapping[int, Mapping[int, float]]
    metric: str = "accuracy"

    def latency(self, threads: int, batch: int) -> float:
        try:
            return self.latency_ms[threads][batch]
        except KeyError:
            raise TrainingError(
                f"variant {self.quantization} was not measured at {threads} threads, batch {batch}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantization": self.quantization,
            "size": self.size,
            "metric": self.metric,
            "accuracy": self.accuracy,
            # JSON keys are strings; the model card is JSON.
            "latency_ms": {
                str(t): {str(b): ms for b, ms in per.items()} for t, per in self.latency_ms.items()
            },
        }


@dataclass(frozen=True)
class GateDecision:
    device_class: str
    chosen: str | None
    reasons: dict[str, str] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device_class": self.device_class,
            "chosen": self.chosen,
            "rejected": dict(self.reasons),
            "speedup_vs_fp32": dict(self.speedup),
        }


def _key_batch(m: VariantMeasurement, threads: int, batches: Sequence[int]) -> float:
    # "Fastest" is judged at the largest batch, ties broken by batch 1 latency.
    return m.latency(threads, max(batches))


def choose_variants(
    measurements: Sequence[VariantMeasurement],
    device_classes: Sequence[DeviceClass],
    *,
    accuracy_budget: float = 1.0,
    batches: Sequence[int] = (1, 32),
) -> dict[str, GateDecision]:
    """One :class:`GateDecision` per device class (see the module docstring)."""
    by_name = {m.quantization: m for m in measurements}
    base = by_name.get(BASELINE)
    if base is None:
        raise TrainingError("the gate needs the fp32 baseline measurement")
    decisions: dict[str, GateDecision] = {}
    for dc in device_classes:
        reasons: dict[str, str] = {}
        speedup: dict[str, float] = {}
        eligible: list[VariantMeasurement] = []
        for m in measurements:
            ratios = {b: base.latency(dc.threads, b) / m.latency(dc.threads, b) for b in batches}
            speedup[m.quantization] = round(min(ratios.values()), 3)
            drop = base.accuracy - m.accuracy
            if dc.max_model_bytes is not None and m.size > dc.max_model_bytes:
                reasons[m.quantization] = f"size {m.size} B > class limit {dc.max_model_bytes} B"
            elif drop > accuracy_budget:
                reasons[m.quantization] = (
                    f"{m.metric} drop {drop:.2f} points > budget {accuracy_budget:.2f}"
                )
            elif m.quantization != BASELINE and any(
                m.latency(dc.threads, b) > base.latency(dc.threads, b) for b in batches
            ):
                slow = min(batches, key=lambda b: ratios[b])
                reasons[m.quantization] = f"slower than fp32 at batch {slow} ({ratios[slow]:.2f}x)"
            else:
                eligible.append(m)
        chosen = None
        if eligible:
            best = min(
                eligible,
                key=lambda m: (
                    _key_batch(m, dc.threads, batches),
                    m.latency(dc.threads, min(batches)),
                ),
            )
            chosen = best.quantization
        decisions[dc.name] = GateDecision(dc.name, chosen, reasons, speedup)
    return decisions
