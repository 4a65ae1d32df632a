"""Hardware profiles: what a simulated device is made of, loaded from ``profiles.toml``."""

from __future__ import annotations

import tomllib
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fogline.protocol import ConfigError, Identifier

from ._validation import load_toml, validate_model

__all__ = [
    "FlapProfile",
    "HardwareProfile",
    "LinkProfile",
    "ProfileSet",
    "builtin_profiles",
    "load_profiles",
    "parse_profiles",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LinkProfile(_Model):
    """The device's link to the broker. Loss is modelled as TCP does it: a lost segment
    costs a retransmission timeout, it is never silently gone (MQTT runs over TCP)."""

    rtt_ms: float = Field(default=0.0, ge=0, le=60_000)
    jitter_ms: float = Field(default=0.0, ge=0, le=60_000)
    loss: float = Field(default=0.0, ge=0, lt=1)
    bandwidth_kbps: float | None = Field(default=None, gt=0)


class FlapProfile(_Model):
    """Connectivity flaps: a Poisson process of link outages."""

    per_hour: float = Field(default=0.0, ge=0, le=1_000_000)
    mean_down_s: float = Field(default=2.0, gt=0, le=3600)


class HardwareProfile(_Model):
    name: Identifier = "custom"
    description: str = ""
    device_class: Identifier
    threads: int = Field(ge=1, le=64)
    max_in_flight: int = Field(ge=1, le=10_000)
    max_queue: int = Field(default=16, ge=0, le=100_000)
    speed_factor: float = Field(default=1.0, ge=1.0, le=1000.0)
    link: LinkProfile = LinkProfile()
    flaps: FlapProfile = FlapProfile()


class ProfileSet(_Model):
    profiles: dict[Identifier, HardwareProfile] = Field(min_length=1)


def parse_profiles(data: dict[str, Any], source: str) -> dict[str, HardwareProfile]:
    """Validate the parsed TOML of a profiles file; the table key names each profile."""
    raw = data.get("profiles")
    if isinstance(raw, dict):
        # The table key is the name; copy it in so each profile knows it.
        data = {
            **data,
            "profiles": {
                key: {"name": key, **value} if isinstance(value, dict) else value
                for key, value in raw.items()
            },
        }
    parsed = validate_model(ProfileSet, data, source)
    for key, profile in parsed.profiles.items():
        if profile.name != key:
            raise ConfigError(f"{source}: field 'profiles.{key}.name': must be {key!r} or absent")
    return dict(parsed.profiles)


def builtin_profiles() -> dict[str, HardwareProfile]:
    """The profiles shipped with the simulator (``mcu-gateway``, ``rpi4``, ``jetson-like``)."""
    text = resources.files("fogline.firmware_sim").joinpath("profiles.toml").read_text("utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"built-in profiles.toml: not valid TOML: {exc}") from None
    return parse_profiles(data, "built-in profiles.toml")


def load_profiles(path: Path | None = None) -> dict[str, HardwareProfile]:
    """The built-in profiles, overridden and extended by those in ``path`` if given."""
    profiles = builtin_profiles()
    if path is not None:
        profiles.update(parse_profiles(load_toml(path), str(path)))
    return profiles
