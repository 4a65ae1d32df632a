"""Cloud tier settings: pydantic, loaded from TOML, overridden by ``FOGLINE_*`` variables.

Precedence, lowest first: defaults, ``<data_dir>/cloud.toml`` (or an explicit file; its
``[cloud]`` table if it has one), environment variables, explicit keyword overrides (CLI
options). Every field is a variable: ``FOGLINE_DATA_DIR``, ``FOGLINE_BROKER_URL``,
``FOGLINE_ACCURACY_BUDGET``, ``FOGLINE_SERVE__METRICS_PORT``, lists and tables as JSON
(``FOGLINE_DEVICE_CLASSES='[{"name": "cpu-1t"}]'``).

A production broker (``deploy/mosquitto``) wants a login and TLS: ``broker_username``,
``broker_password``, ``broker_tls_ca`` (and ``broker_tls_cert``/``broker_tls_key`` for
client certificates), e.g. ``FOGLINE_BROKER_PASSWORD``. Every cloud service shares the
one connection :meth:`CloudSettings.mqtt_settings` describes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from fogline.protocol import (
    DEFAULT_PREFIX,
    MAX_CHUNK_SIZE,
    Identifier,
    MqttSettings,
    TopicPrefix,
    Topics,
)
from fogline.protocol import load_settings as load_config_model

__all__ = [
    "DEFAULT_DEVICE_CLASSES",
    "CloudSettings",
    "DeviceClass",
    "ServeConfig",
    "load_settings",
]

DEFAULT_DATA_DIR = Path("./var/fogline")
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"


class DeviceClass(BaseModel):
    """A kind of device the gate picks a variant for.

    ``threads`` is the ONNX Runtime ``intra_op_num_threads`` budget latency is measured
    under; ``max_model_bytes`` excludes variants too big to fit (a class that fits none
    gets no variant and is served from the cloud)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Identifier
    threads: Annotated[int, Field(ge=1, le=256)] = 1
    max_model_bytes: Annotated[int, Field(gt=0)] | None = None


DEFAULT_DEVICE_CLASSES: tuple[DeviceClass, ...] = (
    DeviceClass(name="cpu-1t", threads=1),
    DeviceClass(name="cpu-4t", threads=4),
    # A microcontroller-sized class: nothing we build fits, so it is served from the cloud.
    DeviceClass(name="mcu", threads=1, max_model_bytes=256 * 1024),
)


class ServeConfig(BaseModel):
    """What ``fogline cloud serve`` runs besides the artifact service (``[cloud.serve]``).

    ``models`` are ``NAME`` (newest published version, followed as new ones are
    published) or ``NAME:VERSION`` (pinned). ``deployment`` holds Ray Serve options for
    every served model (``num_replicas``, ``autoscaling``, ``num_cpus``...), checked when
    the models are deployed. ``metrics_port`` 0 turns the fleet web server off."""

    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(default_factory=list)
    share_group: Identifier | None = None
    fleet: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: Annotated[int, Field(ge=0, le=65535)] = 9464
    follow_releases: bool = True
    deployment: dict[str, Any] = Field(default_factory=dict)


class CloudSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = DEFAULT_DATA_DIR
    broker_url: str = DEFAULT_BROKER_URL
    broker_username: str | None = None
    broker_password: SecretStr | None = None
    broker_tls_ca: Path | None = None
    broker_tls_cert: Path | None = None
    broker_tls_key: Path | None = None
    topic_prefix: TopicPrefix = DEFAULT_PREFIX
    accuracy_budget: Annotated[float, Field(ge=0, le=100)] = 1.0
    device_classes: Annotated[list[DeviceClass], Field(min_length=1)] = Field(
        default_factory=lambda: list(DEFAULT_DEVICE_CLASSES)
    )
    chunk_size: Annotated[int, Field(gt=0, le=MAX_CHUNK_SIZE)] = 256 * 1024
    release_ttl_days: Annotated[float, Field(gt=0, le=3650)] = 90.0
    artifact_workers: Annotated[int, Field(ge=1, le=64)] = 4
    artifact_share_group: Identifier | None = None
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @field_validator("broker_url")
    @classmethod
    def _check_broker_url(cls, value: str) -> str:
        try:  # the transport's own rules, checked when the settings load
            MqttSettings(url=value)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
        return value

    @field_validator("device_classes")
    @classmethod
    def _unique_classes(cls, value: list[DeviceClass]) -> list[DeviceClass]:
        names = [c.name for c in value]
        if len(set(names)) != len(names):
            raise ValueError("device class names must be unique")
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    def mqtt_settings(self, **tuning: Any) -> MqttSettings:
        """The broker connection: ``broker_url`` with its login and TLS files;
        ``tuning`` sets the other :class:`MqttSettings` fields (reconnect backoff...)."""
        return MqttSettings(
            url=self.broker_url,
            username=self.broker_username,
            password=self.broker_password,
            tls_ca=self.broker_tls_ca,
            tls_cert=self.broker_tls_cert,
            tls_key=self.broker_tls_key,
            **tuning,
        )

    @property
    def key_path(self) -> Path:
        return self.data_dir / "keys" / "cloud-signing.pem"


def load_settings(
    config_file: Path | None = None, *, env: Mapping[str, str] | None = None, **overrides: Any
) -> CloudSettings:
    """Build settings from defaults, a TOML file, ``FOGLINE_*`` (``env``, default
    ``os.environ``) and ``overrides``, via :func:`fogline.protocol.load_settings`.

    Without ``config_file``, ``<data_dir>/cloud.toml`` is read if it exists. ``None``
    overrides are ignored (handy for optional CLI options). Any error is a
    :class:`ConfigError` naming the field and where the value came from."""
    environ = os.environ if env is None else env
    path = config_file
    if path is None:
        given = overrides.get("data_dir") or environ.get("FOGLINE_DATA_DIR") or DEFAULT_DATA_DIR
        default_file = Path(given) / "cloud.toml"
        path = default_file if default_file.exists() else None
    # A [cloud] table is accepted so one file can configure several parts.
    return load_config_model(CloudSettings, path, section="cloud", env=environ, overrides=overrides)
