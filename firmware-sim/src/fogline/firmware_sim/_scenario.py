"""Scenario files: faults scheduled at times into a simulated fleet's run.

A scenario is TOML::

    name = "flaky-rpis"
    description = "two Pis lose their link, one device dies and comes back"

    [[faults]]
    at = 5.0                 # seconds after the fleet started
    kind = "disconnect"      # disconnect | reconnect | kill | restart | slow_link | restore_link
    random = 2               # target: device = "sim-0003" | devices = [...] | random = N | all
    profile = "rpi4"         # optional filter for random / all
    duration_s = 4.0         # undo after this long (reconnect / restart / restore the link)

    [[faults]]
    at = 8.0
    kind = "slow_link"
    device = "sim-0001"
    extra_latency_ms = 300.0
    bandwidth_kbps = 64.0
    duration_s = 10.0
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fogline.protocol import ConfigError, Identifier

from ._validation import load_toml, validate_model

__all__ = [
    "FaultKind",
    "FaultSpec",
    "Scenario",
    "load_scenario",
    "parse_scenario",
    "resolve_targets",
]

FaultKind = Literal["disconnect", "reconnect", "kill", "restart", "slow_link", "restore_link"]
_UNDOABLE = {"disconnect", "kill", "slow_link"}


class FaultSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float = Field(ge=0)
    kind: FaultKind
    device: Identifier | None = None
    devices: list[Identifier] | None = Field(default=None, min_length=1)
    random: int | None = Field(default=None, ge=1)
    all: bool = False
    profile: Identifier | None = None
    duration_s: float | None = Field(default=None, gt=0)
    extra_latency_ms: float = Field(default=0.0, ge=0, le=600_000)
    bandwidth_kbps: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> FaultSpec:
        chosen = [
            name
            for name, given in (
                ("device", self.device is not None),
                ("devices", self.devices is not None),
                ("random", self.random is not None),
                ("all", self.all),
            )
            if given
        ]
        if len(chosen) != 1:
            raise ValueError(
                "give exactly one target: device, devices, random or all"
                + (f" (got {', '.join(chosen)})" if chosen else "")
            )
        if self.profile is not None and chosen[0] in ("device", "devices"):
            raise ValueError("profile filters only random or all targets")
        if self.duration_s is not None and self.kind not in _UNDOABLE:
            raise ValueError(f"duration_s applies to disconnect, kill, slow_link; not {self.kind}")
        slow = self.extra_latency_ms > 0 or self.bandwidth_kbps is not None
        if self.kind == "slow_link" and not slow:
            raise ValueError("slow_link needs extra_latency_ms > 0 or bandwidth_kbps")
        if self.kind != "slow_link" and slow:
            raise ValueError("extra_latency_ms and bandwidth_kbps apply to slow_link only")
        return self


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(default="scenario", max_length=128)
    description: str = Field(default="", max_length=2048)
    faults: list[FaultSpec] = Field(default_factory=list, max_length=10_000)

    def timeline(self) -> list[FaultSpec]:
        """Faults in the order they fire (stable for equal times)."""
        return sorted(self.faults, key=lambda f: f.at)


def parse_scenario(data: Mapping[str, Any], source: str = "scenario") -> Scenario:
    return validate_model(Scenario, dict(data), source)


def load_scenario(path: Path) -> Scenario:
    """Load and validate a scenario file; any problem is one :class:`ConfigError`."""
    return parse_scenario(load_toml(path), str(path))


def resolve_targets(
    spec: FaultSpec, device_profiles: Mapping[str, str], rng: random.Random
) -> list[str]:
    """The device ids a fault hits, given each device's profile name.

    Unknown devices or profiles, and asking for more random devices than exist, are
    :class:`ConfigError`.
    """
    where = f"fault at {spec.at}s ({spec.kind})"
    if spec.device is not None or spec.devices is not None:
        wanted = [spec.device] if spec.device is not None else list(spec.devices or [])
        unknown = [d for d in wanted if d not in device_profiles]
        if unknown:
            raise ConfigError(f"{where}: field 'device': unknown device(s) {', '.join(unknown)}")
        return wanted
    pool = sorted(device_profiles)
    if spec.profile is not None:
        if spec.profile not in set(device_profiles.values()):
            raise ConfigError(f"{where}: field 'profile': no device has profile {spec.profile!r}")
        pool = [d for d in pool if device_profiles[d] == spec.profile]
    if spec.all:
        return pool
    count = spec.random or 0
    if count > len(pool):
        raise ConfigError(f"{where}: field 'random': asks for {count} devices, {len(pool)} match")
    return sorted(rng.sample(pool, count))
