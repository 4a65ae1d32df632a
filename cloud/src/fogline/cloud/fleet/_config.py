"""Fleet monitor configuration: a pydantic model, loaded from TOML, with ``FOGLINE_*``
environment overrides.

Precedence, lowest first: defaults, the TOML file (its ``[fleet]`` table if it has one,
else the whole file), the environment, explicit overrides (CLI flags); the rules are
:func:`fogline.protocol.load_settings`'s. Environment variables: ``FOGLINE_FLEET__<FIELD>``
for any field, ``__`` between levels (``FOGLINE_FLEET__MISSED_HEARTBEATS=5``,
``FOGLINE_FLEET__THRESHOLDS__P99_HIGH_MS=80``), plus the names shared with the rest of the
cloud: ``FOGLINE_DATA_DIR``, ``FOGLINE_BROKER_URL`` (``mqtt.url``), the broker login
``FOGLINE_BROKER_USERNAME``/``_PASSWORD``/``_TLS_CA``/``_TLS_CERT``/``_TLS_KEY``
(``mqtt.username``...) and ``FOGLINE_TOPIC_PREFIX``.

The registry is SQLite under ``data_dir`` unless ``store_url`` names a PostgreSQL
database (``FOGLINE_FLEET__STORE_URL=postgresql://fleet@db/fogline``), which replicas on
several hosts can share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from fogline.protocol import (
    DEFAULT_PREFIX,
    MqttSettings,
    TopicPrefix,
    Topics,
    load_settings,
    validate_id,
)

from ._postgres import redact_url
from ._sqlite import FLEET_DB_NAME
from ._summary import AttentionThresholds

__all__ = ["FleetSettings", "default_data_dir", "load_fleet_settings"]

ENV_PREFIX = "FOGLINE_FLEET__"
# Names the fleet shares with the rest of the cloud (and its docs and deployments).
_ENV_ALIASES = {
    "FOGLINE_DATA_DIR": ("data_dir",),
    "FOGLINE_BROKER_URL": ("mqtt", "url"),
    "FOGLINE_BROKER_USERNAME": ("mqtt", "username"),
    "FOGLINE_BROKER_PASSWORD": ("mqtt", "password"),
    "FOGLINE_BROKER_TLS_CA": ("mqtt", "tls_ca"),
    "FOGLINE_BROKER_TLS_CERT": ("mqtt", "tls_cert"),
    "FOGLINE_BROKER_TLS_KEY": ("mqtt", "tls_key"),
    "FOGLINE_TOPIC_PREFIX": ("topic_prefix",),
}
DEFAULT_DATA_DIR = Path("./var/fogline")


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$FOGLINE_DATA_DIR`` (from ``env``, default ``os.environ``), else the default."""
    env = os.environ if env is None else env
    return Path(env.get("FOGLINE_DATA_DIR") or DEFAULT_DATA_DIR)


class FleetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # Not read from the environment here: load_fleet_settings does that, so ``env={}``
    # really means "no environment".
    data_dir: Path = DEFAULT_DATA_DIR
    mqtt: MqttSettings = MqttSettings()
    topic_prefix: TopicPrefix = DEFAULT_PREFIX
    heartbeat_interval_s: float = Field(default=10.0, gt=0, le=3600)
    missed_heartbeats: int = Field(default=3, ge=1, le=100)
    shared_group: str | None = None
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9464, ge=0, le=65535)
    thresholds: AttentionThresholds = AttentionThresholds()
    # Secret: the URL may hold a password.
    store_url: SecretStr | None = None

    @field_validator("shared_group")
    @classmethod
    def _check_group(cls, value: str | None) -> str | None:
        return None if value is None else validate_id(value, "shared group")

    @field_validator("store_url")
    @classmethod
    def _check_store_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        url = value.get_secret_value()
        if url.partition("://")[0] not in ("postgresql", "postgres"):
            raise ValueError(
                "must be a postgresql:// URL (leave it unset for SQLite under data_dir)"
            )
        try:
            _ = urlsplit(url).port  # raises on a port that is not a number
        except ValueError:
            raise ValueError(f"bad port in {redact_url(url)}") from None
        return value

    @property
    def topics(self) -> Topics:
        return Topics(self.topic_prefix)

    @property
    def store_path(self) -> Path:
        """The SQLite file, used when ``store_url`` is unset."""
        return self.data_dir / FLEET_DB_NAME

    @property
    def store_location(self) -> str:
        """Where the registry is, fit to print (no password)."""
        if self.store_url is None:
            return str(self.store_path)
        return redact_url(self.store_url.get_secret_value())


def load_fleet_settings(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> FleetSettings:
    """Load settings; any problem is one :class:`ConfigError` naming the field."""
    return load_settings(
        FleetSettings,
        path,
        section="fleet",
        env=env,
        env_prefix=ENV_PREFIX,
        aliases=_ENV_ALIASES,
        strict_env=True,
        overrides=overrides,
    )
