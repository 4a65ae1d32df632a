"""Fixtures for the fleet monitor tests: a topic prefix of each test's own (retained
messages on the shared broker never leak between tests), fake devices that publish real
protocol messages with a real MqttTransport, monitors that are always closed, and fleet
stores on both backends: tests that take ``fleet_store`` or ``open_store`` run on a real
SQLite file and on a real PostgreSQL schema."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from fogline.cloud.fleet import FleetMonitor, FleetStore, PostgresFleetStore, SqliteFleetStore
from fogline.protocol import (
    DeviceEvent,
    DeviceState,
    Heartbeat,
    Message,
    MqttSettings,
    MqttTransport,
    Topics,
    encode,
)


def make_heartbeat(device_id: str, seq: int = 1, **fields: Any) -> Heartbeat:
    base: dict[str, Any] = {
        "device_id": device_id,
        "device_class": "rpi4",
        "seq": seq,
        "at": 1_700_000_000.0 + seq,
        "uptime_s": float(seq),
        "interval_s": 1.0,
        "models": {"digits": 1},
    }
    base.update(fields)
    return Heartbeat(**base)


@dataclass
class FakeDevices:
    """Publishes device messages the way an agent does (state retained, QoS 1)."""

    transport: MqttTransport
    topics: Topics
    seqs: dict[str, int] = field(default_factory=dict)

    def publish(self, topic: str, message: Message | bytes, retain: bool = False) -> None:
        payload = message if isinstance(message, bytes) else encode(message)
        self.transport.publish(topic, payload, qos=1, retain=retain, wait=True)

    def state(self, device_id: str, status: str = "online", **fields: Any) -> None:
        msg = DeviceState(device_id=device_id, status=status, at=time.time(), **fields)  # type: ignore[arg-type]
        self.publish(self.topics.device_state(device_id), msg, retain=True)

    def heartbeat(self, device_id: str, **fields: Any) -> Heartbeat:
        seq = fields.pop("seq", self.seqs.get(device_id, 0) + 1)
        self.seqs[device_id] = seq
        hb = make_heartbeat(device_id, seq, **fields)
        self.publish(self.topics.heartbeat(device_id), hb)
        return hb

    def event(self, device_id: str, kind: str = "install_succeeded", **fields: Any) -> None:
        msg = DeviceEvent(device_id=device_id, kind=kind, at=time.time(), **fields)  # type: ignore[arg-type]
        self.publish(self.topics.events(device_id), msg)


@pytest.fixture
def topics() -> Topics:
    return Topics(f"fogtest/{uuid.uuid4().hex[:10]}")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "fleet.sqlite3"


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(
    request: pytest.FixtureRequest, store_path: Path
) -> Iterator[Callable[..., FleetStore]]:
    """Factory: ``open_store(readonly=False)`` opens another store object on this test's
    one database (a SQLite file, or a PostgreSQL schema); all are closed at the end."""
    opened: list[FleetStore] = []
    url = request.getfixturevalue("postgres_url") if request.param == "postgres" else None

    def open_(readonly: bool = False) -> FleetStore:
        store: FleetStore = (
            PostgresFleetStore(url, readonly=readonly)
            if url is not None
            else SqliteFleetStore(store_path, readonly=readonly)
        )
        opened.append(store)
        return store

    try:
        yield open_
    finally:
        for store in reversed(opened):
            store.close()


@pytest.fixture
def fleet_store(open_store: Callable[..., FleetStore]) -> FleetStore:
    return open_store()


@pytest.fixture
def sqlite_store(store_path: Path) -> Iterator[SqliteFleetStore]:
    store = SqliteFleetStore(store_path)
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def devices(mqtt_settings: MqttSettings, topics: Topics) -> Iterator[FakeDevices]:
    transport = MqttTransport(mqtt_settings, client_id=f"fake-devices-{uuid.uuid4().hex[:8]}")
    transport.connect()
    try:
        yield FakeDevices(transport, topics)
    finally:
        transport.close()


@pytest.fixture
def start_monitor(
    mqtt_settings: MqttSettings, topics: Topics
) -> Iterator[Callable[..., FleetMonitor]]:
    """Factory: start a monitor on the test's prefix; every one is closed at the end."""
    started: list[FleetMonitor] = []

    def start(store: FleetStore, **kwargs: Any) -> FleetMonitor:
        kwargs.setdefault("heartbeat_interval_s", 1.0)
        monitor = FleetMonitor(mqtt_settings, store, topics, **kwargs)
        started.append(monitor)
        monitor.start()
        return monitor

    try:
        yield start
    finally:
        for monitor in started:
            monitor.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


@pytest.fixture
def wait() -> Callable[..., None]:
    return wait_until


@pytest.fixture
def heartbeat_factory() -> Callable[..., Heartbeat]:
    return make_heartbeat
