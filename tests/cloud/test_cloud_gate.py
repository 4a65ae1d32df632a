"""The quantization gate is a pure function: measurements in, one variant per class out."""

from __future__ import annotations

import pytest

from fogline.cloud import DeviceClass, VariantMeasurement, choose_variants
from fogline.protocol import TrainingError

CLASSES = [
    DeviceClass(name="cpu-1t", threads=1),
    DeviceClass(name="cpu-4t", threads=4),
    DeviceClass(name="mcu", threads=1, max_model_bytes=1000),
]


def m(
    name: str, acc: float, b1: float, b32: float, size: int = 5000, t4: float = 1.0
) -> VariantMeasurement:
    return VariantMeasurement(
        quantization=name,
        size=size,
        accuracy=acc,
        latency_ms={1: {1: b1, 32: b32}, 4: {1: b1 * t4, 32: b32 * t4}},
    )


def test_gate_picks_fastest_within_budget() -> None:
    ms = [m("fp32", 97.0, 1.0, 10.0), m("int8-static", 96.5, 0.8, 5.0), m("fp16", 97.0, 0.9, 8.0)]
    decisions = choose_variants(ms, CLASSES[:2], accuracy_budget=1.0)
    assert decisions["cpu-1t"].chosen == "int8-static"
    assert decisions["cpu-4t"].chosen == "int8-static"
    assert decisions["cpu-1t"].speedup["int8-static"] == pytest.approx(1.25)


def test_gate_rejects_variant_slower_than_fp32_at_batch_1() -> None:
    # Dynamic int8 of a small CNN: faster at batch 32 but 3.6x slower at batch 1.
    ms = [m("fp32", 97.0, 1.0, 10.0), m("int8-dynamic", 97.0, 3.6, 4.0)]
    decision = choose_variants(ms, CLASSES[:1])["cpu-1t"]
    assert decision.chosen == "fp32"
    assert "slower than fp32 at batch 1" in decision.reasons["int8-dynamic"]


def test_gate_rejects_variant_outside_accuracy_budget() -> None:
    ms = [m("fp32", 97.0, 1.0, 10.0), m("int8-static", 95.5, 0.5, 5.0)]
    decision = choose_variants(ms, CLASSES[:1], accuracy_budget=1.0)["cpu-1t"]
    assert decision.chosen == "fp32"
    assert "drop 1.50 points > budget 1.00" in decision.reasons["int8-static"]
    # A wider budget lets it through.
    assert choose_variants(ms, CLASSES[:1], accuracy_budget=2.0)["cpu-1t"].chosen == "int8-static"


def test_gate_is_per_thread_budget() -> None:
    # Faster than fp32 at 1 thread, slower at 4 threads.
    ms = [m("fp32", 97.0, 1.0, 10.0), m("int8-static", 97.0, 0.8, 6.0, t4=2.0)]
    decisions = choose_variants(ms, CLASSES[:2])
    assert decisions["cpu-1t"].chosen == "int8-static"
    assert decisions["cpu-4t"].chosen == "fp32"


def test_gate_leaves_a_class_nothing_fits_without_a_variant() -> None:
    ms = [m("fp32", 97.0, 1.0, 10.0, size=4000), m("int8-static", 97.0, 0.5, 5.0, size=1500)]
    decision = choose_variants(ms, CLASSES)["mcu"]
    assert decision.chosen is None
    assert set(decision.reasons) == {"fp32", "int8-static"}
    assert "class limit" in decision.reasons["int8-static"]


def test_gate_size_limit_admits_small_variants() -> None:
    ms = [m("fp32", 97.0, 1.0, 10.0, size=4000), m("int8-static", 97.0, 0.5, 5.0, size=900)]
    assert choose_variants(ms, CLASSES)["mcu"].chosen == "int8-static"


def test_gate_needs_the_baseline() -> None:
    with pytest.raises(TrainingError, match="fp32 baseline"):
        choose_variants([m("int8-static", 97.0, 0.5, 5.0)], CLASSES)


def test_gate_decision_and_measurement_serialize_to_json_shapes() -> None:
    ms = [m("fp32", 97.0, 1.0, 10.0), m("int8-dynamic", 97.0, 3.6, 4.0)]
    decision = choose_variants(ms, CLASSES[:1])["cpu-1t"].to_dict()
    assert decision["chosen"] == "fp32" and "int8-dynamic" in decision["rejected"]
    assert ms[0].to_dict()["latency_ms"] == {
        "1": {"1": 1.0, "32": 10.0},
        "4": {"1": 1.0, "32": 10.0},
    }
