"""Sensor generators: shapes, dtype, labels, budgets, corruption and drift."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from fogline.firmware_sim import (
    DigitSensor,
    FixedBudget,
    LognormalBudget,
    NoBudget,
    SensorConfig,
    UniformBudget,
    digits_dataset,
)
from fogline.protocol import ConfigError


def test_readings_are_digit_images_the_reference_model_takes() -> None:
    sensor = DigitSensor(SensorConfig(corruption_rate=0.0), seed=1)
    images, labels = digits_dataset()
    seen = set()
    for _ in range(200):
        reading = sensor.read()
        assert reading.inputs.shape == (1, 1, 8, 8)
        assert reading.inputs.dtype == np.float32
        assert float(reading.inputs.min()) >= 0.0
        assert float(reading.inputs.max()) <= 1.0
        assert 0 <= reading.label <= 9
        assert reading.corruption is None
        seen.add(reading.label)
    assert seen == set(range(10))
    assert images.shape[1:] == (1, 1, 8, 8)
    assert len(images) == len(labels) == 1797


def test_without_noise_or_drift_a_reading_is_the_dataset_image() -> None:
    config = SensorConfig(noise_std=0.0, drift_amplitude=0.0, corruption_rate=0.0)
    reading = DigitSensor(config, seed=3).read()
    images, labels = digits_dataset()
    matches = [i for i in range(len(images)) if np.array_equal(images[i], reading.inputs)]
    assert matches
    assert reading.label in {int(labels[i]) for i in matches}


def test_corruption_happens_at_the_configured_rate() -> None:
    sensor = DigitSensor(SensorConfig(corruption_rate=0.25), seed=7)
    readings = [sensor.read() for _ in range(2000)]
    share = sum(r.corruption is not None for r in readings) / len(readings)
    assert 0.21 < share < 0.29
    assert sensor.corrupted == sum(r.corruption is not None for r in readings)
    assert {r.corruption for r in readings} == {None, "dead_pixels", "stuck_row", "salt"}


def test_drift_moves_slowly_with_time() -> None:
    now = [0.0]
    sensor = DigitSensor(
        SensorConfig(drift_amplitude=0.1, drift_period_s=100.0), seed=0, clock=lambda: now[0]
    )
    gains = []
    for t in range(0, 100, 5):
        now[0] = float(t)
        gains.append(sensor.drift()[0])
    assert max(gains) - min(gains) > 0.15
    assert all(abs(a - b) < 0.05 for a, b in itertools.pairwise(gains))


def test_budgets_follow_their_distribution() -> None:
    fixed = DigitSensor(SensorConfig(budget=FixedBudget(ms=20.0)), seed=0)
    assert {fixed.read().budget_ms for _ in range(20)} == {20.0}
    uniform = DigitSensor(SensorConfig(budget=UniformBudget(low_ms=10, high_ms=30)), seed=0)
    values = [uniform.read().budget_ms for _ in range(500)]
    assert all(v is not None and 10 <= v <= 30 for v in values)
    lognormal = DigitSensor(SensorConfig(budget=LognormalBudget(median_ms=50, sigma=0.5)), seed=0)
    logs = sorted(v for v in (lognormal.read().budget_ms for _ in range(1001)) if v is not None)
    assert 40 < logs[500] < 60
    none = DigitSensor(SensorConfig(budget=NoBudget()), seed=0)
    assert none.read().budget_ms is None
    half = DigitSensor(SensorConfig(unbudgeted_share=0.5), seed=0)
    missing = sum(half.read().budget_ms is None for _ in range(1000))
    assert 400 < missing < 600


def test_same_seed_same_readings() -> None:
    a = DigitSensor(seed=11, clock=lambda: 0.0)
    b = DigitSensor(seed=11, clock=lambda: 0.0)
    for _ in range(20):
        ra, rb = a.read(), b.read()
        assert ra.label == rb.label
        assert ra.budget_ms == rb.budget_ms
        assert np.array_equal(ra.inputs, rb.inputs)


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"noise_std": -1}, "noise_std"),
        ({"corruption_rate": 2}, "corruption_rate"),
        ({"budget": {"kind": "uniform", "low_ms": 30, "high_ms": 10}}, "budget.uniform"),
        ({"budget": {"kind": "gamma"}}, "budget"),
        ({"colour": True}, "colour"),
    ],
)
def test_bad_sensor_config_is_a_config_error(data: dict[str, object], field: str) -> None:
    from fogline.firmware_sim import parse_sensor_config

    with pytest.raises(ConfigError) as info:
        parse_sensor_config(data)
    assert field in info.value.message
