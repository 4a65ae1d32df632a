"""How to reach a broker: connection settings, the last will, the TLS context and
the client id rules. The transport itself is in ``_transport``."""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from ._errors import ConfigError, InvalidIdError

__all__ = ["MqttSettings", "Will", "check_client_id", "tls_context"]


class MqttSettings(BaseModel):
    """How to reach the broker. ``url`` is ``mqtt://host:port`` or ``mqtts://host:port``."""

    model_config = ConfigDict(extra="forbid")

    url: str = "mqtt://127.0.0.1:1883"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    keepalive_s: int = Field(default=30, ge=5, le=3600)
    reconnect_min_s: float = Field(default=0.5, gt=0, le=60)
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    max_inflight: int = Field(default=100, ge=1, le=65535)

    @model_validator(mode="after")
    def _check_backoff(self) -> MqttSettings:
        if self.reconnect_min_s > self.reconnect_max_s:
            raise ValueError("reconnect_min_s must not exceed reconnect_max_s")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise ValueError("must look like mqtt://host:port or mqtts://host:port")
        try:
            _ = parts.port
        except ValueError:
            raise ValueError("has an invalid port") from None
        return value

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = urlsplit(self.url)
        return parts.port or (8883 if parts.scheme in ("mqtts", "ssl") else 1883)

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme in ("mqtts", "ssl") or self.tls_ca is not None


@dataclass(frozen=True)
class Will:
    """The last will the broker publishes if this client dies without a clean close."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class _ClosingSSLSocket(ssl.SSLSocket):
    """Closes itself when the handshake fails. paho wraps the socket and then calls
    ``do_handshake()`` without closing it on failure (an untrusted or unreachable
    server), leaving one open socket per retry for the garbage collector."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def tls_context(settings: MqttSettings) -> ssl.SSLContext:
    """What paho's ``tls_set`` builds (verified server certificate and host name, the
    given CA or the system's), plus TLS 1.2 at least and the socket class above."""
    try:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if settings.tls_ca is not None:
            context.load_verify_locations(cafile=str(settings.tls_ca))
        else:
            context.load_default_certs()
        if settings.tls_cert is not None:
            keyfile = str(settings.tls_key) if settings.tls_key else None
            context.load_cert_chain(str(settings.tls_cert), keyfile)
        elif settings.tls_key is not None:
            raise ValueError("tls_key needs tls_cert")
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ConfigError(f"mqtt TLS settings: {exc}") from None
    context.sslsocket_class = _ClosingSSLSocket
    return context


_CLIENT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def check_client_id(client_id: str) -> str:
    """Client ids end up in broker ACL patterns (``%c``) and logs: a ``+``, ``#`` or
    ``/`` in one once widened a Mosquitto pattern ACL, so allow a safe alphabet only."""
    if not isinstance(client_id, str) or not _CLIENT_ID.fullmatch(client_id):
        raise InvalidIdError(
            f"mqtt client id {client_id!r} must be 1-128 letters, digits, '.', '_', ':' "
            "or '-', starting with a letter or digit"
        )
    return client_id
