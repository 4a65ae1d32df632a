"""Fixtures shared by every test folder: real brokers, one local Ray instance and a
real PostgreSQL.

Brokers are real: Mosquitto started on a free port (or the embedded amqtt broker where
a test asks for it). A missing ``mosquitto`` is an error, never a skip: CI installs it.
PostgreSQL is the machine's (``$FOGLINE_TEST_POSTGRES_URL``, default the local server's
``test`` database); each test gets a schema of its own, dropped afterwards. No server is
an error too.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fogline.protocol import (
    EmbeddedBroker,
    MosquittoBroker,
    MqttSettings,
    MqttTransport,
    free_port,
)

POSTGRES_URL = os.environ.get(
    "FOGLINE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(autouse=True)
def _restore_root_logging() -> Iterator[None]:
    """CLI commands run in-process (typer's CliRunner) install log handlers bound to a
    captured stream that closes with the test; later log lines would hit it."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for handler in root.handlers[:]:
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(level)


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[MosquittoBroker]:
    """One Mosquitto child process for the whole session (plain config, port is free)."""
    broker = MosquittoBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def broker_url(mosquitto: MosquittoBroker) -> str:
    return mosquitto.url


@pytest.fixture
def mqtt_settings(broker_url: str) -> MqttSettings:
    return MqttSettings(url=broker_url, reconnect_min_s=0.2, reconnect_max_s=2.0)


@pytest.fixture
def transports(mqtt_settings: MqttSettings) -> Iterator[Callable[[], MqttTransport]]:
    """Factory of transports connected to the test broker, all closed at teardown."""
    made: list[MqttTransport] = []

    def make() -> MqttTransport:
        transport = MqttTransport(mqtt_settings)
        made.append(transport)
        transport.connect()
        return transport

    try:
        yield make
    finally:
        for transport in reversed(made):
            transport.close()


@pytest.fixture
def private_mosquitto(tmp_path: Path) -> Iterator[Callable[..., MosquittoBroker]]:
    """Factory for a Mosquitto of this test's own (special config, restarts, kills)."""
    started: list[MosquittoBroker] = []

    def start(extra_config: Sequence[str] = (), port: int | None = None) -> MosquittoBroker:
        workdir = tmp_path / f"mosquitto-{len(started)}"
        workdir.mkdir()
        broker = MosquittoBroker(port=port, extra_config=extra_config, workdir=workdir)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.close()


@pytest.fixture(scope="session")
def embedded_broker() -> Iterator[EmbeddedBroker]:
    broker = EmbeddedBroker()
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture(scope="session")
def ray_session() -> Iterator[Any]:
    """The one local Ray instance shared by every test that needs Ray."""
    import ray

    from fogline.cloud._ray_backend import LOCAL_RAY_SYSTEM_CONFIG

    ray.init(
        _system_config=LOCAL_RAY_SYSTEM_CONFIG,
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        ignore_reinit_error=True,
    )
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL whose ``search_path`` is a fresh schema in the test database."""
    import psycopg

    schema = f"fogtest_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"CREATE SCHEMA {schema}")
    except psycopg.OperationalError as exc:
        pytest.fail(f"no PostgreSQL at {POSTGRES_URL} (set FOGLINE_TEST_POSTGRES_URL): {exc}")
    separator = "&" if "?" in POSTGRES_URL else "?"
    try:
        yield f"{POSTGRES_URL}{separator}options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(POSTGRES_URL, autocommit=True, connect_timeout=5) as admin:
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


@dataclass(frozen=True)
class ProductionBroker:
    """deploy/mosquitto's config running: its TLS listener, CA and logins."""

    tls_url: str
    ca: Path
    passwords: dict[str, str]


@pytest.fixture
def production_broker(
    private_mosquitto: Callable[..., MosquittoBroker], tmp_path: Path
) -> ProductionBroker:
    """deploy/mosquitto's production config (TLS, logins, the ACL) on free ports."""
    helpers = Path(__file__).parent / "protocol"

    def load(name: str) -> Any:
        spec = importlib.util.spec_from_file_location(name, helpers / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    production = load("_production_broker")
    certs = tmp_path / "production-certs"
    certs.mkdir()
    ca, _cert, _key = load("_tls").write_tls_material(certs)
    plain, tls = free_port(), free_port()
    config = production.production_config(tmp_path, plain, tls, certs)
    private_mosquitto(config, port=plain)
    return ProductionBroker(f"mqtts://127.0.0.1:{tls}", ca, dict(production.PASSWORDS))
