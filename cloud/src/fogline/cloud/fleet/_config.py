"""Fleet monitor configuration: a pydantic model, loaded from TOML, with ``FOGLINE_*``
environment overrides.

Precedence, lowest first: defaults, the TOML file (its ``[fleet]`` table if it has one,
else the whole file), the environment, explicit overrides (CLI flags). Environment
variables: ``FOGLINE_DATA_DIR``, ``FOGLINE_BROKER_URL``, ``FOGLINE_TOPIC_PREFIX`` and
``FOGLINE_FLEET_<FIELD>`` for the monitor's own fields (e.g.
``FOGLINE_FLEET_MISSED_HEARTBEATS=5``).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fogline.protocol import (
    DEFAULT_PREFIX,
    ConfigError,
    MqttSettings,
    TopicError,
    Topics,
    validate_id,
)

from ._sqlite import FLEET_DB_NAME
from ._summary import AttentionThresholds

__all__ = ["FleetSettings", "default_data_dir", "load_fleet_settings"]

_ENV_FIELDS = (
    "heartbeat_interval_s",
    "missed_heartbeats",
    "shared_group",
    "metrics_host",
    "metrics_port",
)


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("FOGLINE_DATA_DIR") or "./var/fogline")


class FleetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Field(default_factory=default_data_dir)
    mqtt: MqttSettings = MqttSettings()
    topic_prefix: str = DEFAULT_PREFIX
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=3600)
    missed_heartbeats: int = Field(default=3, ge=1, le=100)
    shared_group: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    thresholds: AttentionThresholds = AttentionThresholds()

    @field_validator("shared_group")
    @classmethod
    def _check_group(cls, value: str | None) -> str | None:
        return None if value is None else validate_id(value, "shared group")

    @field_validator("topic_prefix")
    @classmethod
    def _check_prefix(cls, value: str) -> str:
        try:
            Topics(value)
        except TopicError as exc:
            raise ValueError(exc.message) from None
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def store_path(self) -> Path:
        return self.data_dir / FLEET_DB_NAME


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def load_fleet_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FleetSettings:
    """Load settings; any problem is one :class:`ConfigError` naming the field."""
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data = raw["fleet"] if isinstance(raw.get("fleet"), dict) else raw
    from_env: dict[str, Any] = {}
    if env.get("FOGLINE_DATA_DIR"):
        from_env["data_dir"] = env["FOGLINE_DATA_DIR"]
    if env.get("FOGLINE_BROKER_URL"):
        from_env["mqtt"] = {"url": env["FOGLINE_BROKER_URL"]}
    if env.get("FOGLINE_TOPIC_PREFIX"):
        from_env["topic_prefix"] = env["FOGLINE_TOPIC_PREFIX"]
    for name in _ENV_FIELDS:
        value = env.get(f"FOGLINE_FLEET_{name.upper()}")
        if value:
            from_env[name] = value
    data = _merge(_merge(data, from_env), overrides or {})
    try:
        # Environment values are strings: lax mode converts "5" to 5 and says which
        # field was wrong when it cannot.
        return FleetSettings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "(settings)"
        raise ConfigError(f"fleet config: {where}: {err['msg']}") from None
