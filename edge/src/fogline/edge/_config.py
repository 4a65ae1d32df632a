"""Agent configuration: a TOML file plus ``FOGLINE_*`` environment overrides.

Environment variables name a field path with ``__`` between levels, e.g.
``FOGLINE_DEVICE_ID=cam-7`` or ``FOGLINE_CAPACITY__MAX_IN_FLIGHT=4``. Values are parsed
as JSON when they start with ``[`` or ``{`` (lists, tables), otherwise handed to
pydantic as text, which converts numbers and booleans. ``FOGLINE_BROKER_URL`` is a
short alias of ``FOGLINE_MQTT__URL``. Variables whose first level is not an agent field
are ignored (other Fogline tools share the prefix). Any bad value raises one
:class:`ConfigError` naming the field and where it came from.
"""

from __future__ import annotations

import json
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from fogline.protocol import (
    DEFAULT_PREFIX,
    ConfigError,
    Identifier,
    MqttSettings,
    PublicKey,
    SignatureError,
    TopicError,
    Topics,
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

ENV_PREFIX = "FOGLINE_"
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
    topic_prefix: str = DEFAULT_PREFIX
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


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    fields = set(AgentConfig.model_fields)
    tree: dict[str, Any] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        path = _ENV_ALIASES.get(name) or tuple(
            p.lower() for p in name[len(ENV_PREFIX) :].split("__")
        )
        if not path or path[0] not in fields:
            continue
        raw = env[name]
        value: Any = raw
        if raw.lstrip()[:1] in ("[", "{"):
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(
                    f"config field {'.'.join(path)!r} (from ${name}): {exc}"
                ) from None
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"config field {part!r} (from ${name}) is not a table")
            node = child
        node[path[-1]] = value
    return tree


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _first_error(exc: ValidationError, source: str) -> ConfigError:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "(config)"
    more = exc.error_count() - 1
    suffix = f" (+{more} more)" if more > 0 else ""
    return ConfigError(f"config field {where!r} ({source}): {err['msg']}{suffix}")


def load_config(
    path: Path | str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AgentConfig:
    """Load the agent config: TOML file (optional), then ``overrides``, then ``FOGLINE_*``
    variables from ``env`` (default ``os.environ``). Raises :class:`ConfigError`."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            with Path(path).open("rb") as fh:
                data = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    data = _merge(data, overrides)
    env_tree = _env_overrides(os.environ if env is None else env)
    data = _merge(data, env_tree)
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        loc = [str(p) for p in exc.errors()[0]["loc"]]
        if _in_tree(env_tree, loc):
            source = "environment FOGLINE_" + "__".join(p.upper() for p in loc)
        raise _first_error(exc, source) from None


def _in_tree(tree: Mapping[str, Any], loc: list[str]) -> bool:
    node: Any = tree
    for part in loc:
        if not isinstance(node, Mapping) or part not in node:
            return False
        node = node[part]
    return bool(loc)
