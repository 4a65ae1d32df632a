"""Sensor generators: digit images as a camera on a device would deliver them.

The images are sklearn's bundled 8x8 digits (no download), shaped ``(1, 1, 8, 8)``
float32 and scaled to [0, 1] (pixel / 16), the input the reference digits model takes.
On top of the clean image a sensor adds:

- noise: Gaussian, per pixel;
- drift: a slow gain and offset drift (a sinusoid with a per-device phase), as a
  camera's calibration wanders;
- corruption: now and then a reading is damaged (dead pixels, a stuck row, salt noise).

Each reading carries its ground-truth label and a latency budget drawn from a
configurable distribution.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ._validation import validate_model

__all__ = [
    "BudgetDistribution",
    "CorruptionKind",
    "DigitSensor",
    "FixedBudget",
    "LognormalBudget",
    "NoBudget",
    "SensorConfig",
    "SensorReading",
    "UniformBudget",
    "digits_dataset",
    "parse_sensor_config",
]

FloatArray = npt.NDArray[np.float32]
CorruptionKind = Literal["dead_pixels", "stuck_row", "salt"]
INPUT_SHAPE = (1, 1, 8, 8)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoBudget(_Model):
    kind: Literal["none"] = "none"


class FixedBudget(_Model):
    kind: Literal["fixed"] = "fixed"
    ms: float = Field(gt=0)


class UniformBudget(_Model):
    kind: Literal["uniform"] = "uniform"
    low_ms: float = Field(gt=0)
    high_ms: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> UniformBudget:
        if self.high_ms < self.low_ms:
            raise ValueError("high_ms must be at least low_ms")
        return self


class LognormalBudget(_Model):
    """Budgets around ``median_ms`` with a long tail; ``sigma`` is the log-space spread."""

    kind: Literal["lognormal"] = "lognormal"
    median_ms: float = Field(gt=0)
    sigma: float = Field(default=0.5, ge=0, le=5)
    min_ms: float = Field(default=1.0, gt=0)


BudgetDistribution = Annotated[
    NoBudget | FixedBudget | UniformBudget | LognormalBudget, Field(discriminator="kind")
]


class SensorConfig(_Model):
    noise_std: float = Field(default=0.05, ge=0, le=1)
    drift_amplitude: float = Field(default=0.05, ge=0, le=1)
    drift_period_s: float = Field(default=120.0, gt=0)
    corruption_rate: float = Field(default=0.02, ge=0, le=1)
    #: Share of requests sent without any budget (the agent's default applies).
    unbudgeted_share: float = Field(default=0.0, ge=0, le=1)
    budget: BudgetDistribution = LognormalBudget(median_ms=50.0, sigma=0.6)


def parse_sensor_config(data: Any, source: str = "sensor config") -> SensorConfig:
    """Validate sensor settings (e.g. a ``[sensor]`` table); raises :class:`ConfigError`."""
    return validate_model(SensorConfig, data, source)


@dataclass(frozen=True)
class SensorReading:
    inputs: FloatArray
    label: int
    budget_ms: float | None
    corruption: CorruptionKind | None


@functools.cache
def digits_dataset() -> tuple[FloatArray, npt.NDArray[np.int64]]:
    """All 1797 digits as ``(n, 1, 1, 8, 8)`` float32 in [0, 1], and their labels."""
    from sklearn.datasets import load_digits  # slow import; only when first needed

    digits = load_digits()
    images = (np.asarray(digits.images, dtype=np.float32) / 16.0).reshape(-1, *INPUT_SHAPE)
    images.setflags(write=False)
    labels = np.asarray(digits.target, dtype=np.int64)
    labels.setflags(write=False)
    return images, labels


class DigitSensor:
    """One device's camera. Not thread-safe: give each device its own sensor."""

    def __init__(
        self,
        config: SensorConfig | None = None,
        *,
        seed: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or SensorConfig()
        self._rng = np.random.default_rng(seed)
        self._clock = clock
        self._t0 = clock()
        self._phase = float(self._rng.uniform(0, 2 * math.pi))
        self.readings = 0
        self.corrupted = 0

    def drift(self) -> tuple[float, float]:
        """The current (gain, offset) of the slow calibration drift."""
        cfg = self.config
        angle = 2 * math.pi * (self._clock() - self._t0) / cfg.drift_period_s + self._phase
        return 1.0 + cfg.drift_amplitude * math.sin(angle), cfg.drift_amplitude * math.cos(angle)

    def read(self) -> SensorReading:
        images, labels = digits_dataset()
        index = int(self._rng.integers(len(labels)))
        gain, offset = self.drift()
        image = images[index] * gain + offset
        if self.config.noise_std > 0:
            image = image + self._rng.normal(0.0, self.config.noise_std, INPUT_SHAPE)
        corruption: CorruptionKind | None = None
        if self._rng.random() < self.config.corruption_rate:
            corruption = self._corrupt_kind()
            image = self._corrupt(image, corruption)
        # A real sensor saturates rather than reporting out-of-range values.
        image = np.clip(image, 0.0, 1.0).astype(np.float32)
        self.readings += 1
        self.corrupted += corruption is not None
        return SensorReading(image, int(labels[index]), self._budget(), corruption)

    def _corrupt_kind(self) -> CorruptionKind:
        kinds: tuple[CorruptionKind, ...] = ("dead_pixels", "stuck_row", "salt")
        return kinds[int(self._rng.integers(len(kinds)))]

    def _corrupt(self, image: npt.NDArray[np.floating], kind: CorruptionKind) -> FloatArray:
        out = np.array(image, dtype=np.float32)
        plane = out[0, 0]
        if kind == "dead_pixels":
            plane[self._rng.random((8, 8)) < 0.3] = 0.0
        elif kind == "stuck_row":
            plane[int(self._rng.integers(8)), :] = 1.0
        else:
            mask = self._rng.random((8, 8)) < 0.2
            plane[mask] = self._rng.choice(np.array([0.0, 1.0], dtype=np.float32), int(mask.sum()))
        return out

    def _budget(self) -> float | None:
        cfg = self.config
        if cfg.unbudgeted_share and self._rng.random() < cfg.unbudgeted_share:
            return None
        dist = cfg.budget
        if isinstance(dist, FixedBudget):
            return dist.ms
        if isinstance(dist, UniformBudget):
            return float(self._rng.uniform(dist.low_ms, dist.high_ms))
        if isinstance(dist, LognormalBudget):
            value = dist.median_ms * math.exp(dist.sigma * float(self._rng.standard_normal()))
            return max(dist.min_ms, value)
        return None
