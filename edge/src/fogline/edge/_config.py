"""Agent configuration: a TOML file plus ``FOGLINE_*`` environment overrides, loaded by
:func:`fogline.protocol.load_settings` (its docstring has the rules).

Environment variables name a field path with ``__`` between levels, e.g.
``FOGLINE_DEVICE_ID=cam-7`` or ``FOGLINE_CAPACITY__MAX_IN_FLIGHT=4``; lists and tables
are JSON (``FOGLINE_GROUPS='["west"]'``). ``FOGLINE_BROKER_URL`` is a short alias of
``FOGLINE_MQTT__URL``. Variables whose first level is not an agent field are ignored
(other Fogline tools share the prefix). Any bad value raises one :class:`ConfigError`
naming the field and where it came from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fogline.protocol import (
    DEFAULT_PREFIX,
    Identifier,
    MqttSettings,
    PublicKey,
    SignatureError,
    TopicPrefix,
    Topics,
    load_settings,
)

from ._routing import RoutingSettings

__all__ = [
    "AgentConfig",
    "CapacityConfig",
    "DeliveryConfig",
    "HttpConfig",
    "RoutingConfig",
    "load_config",
]

_ENV_ALIASES = {"FOGLINE_BROKER_URL": ("mqtt", "url")}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CapacityConfig(_Section):
    """The device's compute budget for inference."""

    intra_op_threads: int = Field(default=1, ge=1, le=256)
    max_in_flight: int = Field(default=2, ge=1, le=4096)
    max_queue: int = Field(default=64, ge=0, le=1_000_000)
    # A request without a budget waits at most this long for a slot, never forever.
    default_max_wait_ms: float = Field(default=1000.0, gt=0, le=600_000)


class HttpConfig(_Section):
    """The local Open Inference Protocol (v2) API. ``port = 0`` binds an ephemeral port
    chosen by the OS (read it back from ``Agent.http_url``); ``enabled = false`` runs no
    server at all (fleets of simulated agents in one process)."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=16 << 20, ge=1024, le=1 << 30)


class DeliveryConfig(_Section):
    """How artifacts are fetched: a window of chunk requests, each with a timeout."""

    window: int = Field(default=4, ge=1, le=64)
    chunk_timeout_s: float = Field(default=5.0, gt=0, le=600)
    chunk_retries: int = Field(default=5, ge=0, le=1000)
    # A failed download is tried again after this, doubling per failure (max 10 min),
    # and at once after every reconnect.
    retry_after_s: float = Field(default=30.0, gt=0, le=86_400)


# Where requests run: the ``[routing]`` section validates as the router's own settings
# (one model, so the config and the router can never disagree).
RoutingConfig = RoutingSettings


class AgentConfig(BaseModel):
    """Everything an edge agent needs; see the module docstring for overrides."""

    model_config = ConfigDict(extra="forbid")

    device_id: Identifier
    device_class: Identifier = "generic"
    groups: Annotated[list[Identifier], Field(max_length=32)] = []
    mqtt: MqttSettings = MqttSettings()
    topic_prefix: TopicPrefix = DEFAULT_PREFIX
    trusted_keys: list[str] = []
    data_dir: Path = Path("fogline-edge-data")
    capacity: CapacityConfig = CapacityConfig()
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=86_400)
    http: HttpConfig = HttpConfig()
    telemetry_buffer_max: int = Field(default=10_000, ge=0, le=10_000_000)
    # Serve only these models; None serves every model the desired state names.
    models: list[Identifier] | None = None
    delivery: DeliveryConfig = DeliveryConfig()
    routing: RoutingSettings = RoutingSettings()

    @field_validator("trusted_keys")
    @classmethod
    def _check_keys(cls, value: list[str]) -> list[str]:
        for text in value:
            try:
                PublicKey.from_text(text)
            except SignatureError as exc:
                raise ValueError(exc.message) from None
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)


def load_config(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AgentConfig:
    """Load the agent config: TOML file (optional), then ``FOGLINE_*`` variables from
    ``env`` (default ``os.environ``), then ``overrides``. Raises :class:`ConfigError`."""
    return load_settings(AgentConfig, path, env=env, aliases=_ENV_ALIASES, overrides=overrides)
