"""The monitor when its store fails: a PostgreSQL that goes away (through a TCP proxy the
test cuts) or a SQLite file locked by someone else loses nothing, and a corrupt record of
one device costs only that device's message. Real Mosquitto, real databases."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from fogline.cloud.fleet import FleetMonitor, FleetStore, PostgresFleetStore, SqliteFleetStore
from fogline.protocol import FleetError, FleetStoreUnavailableError

from ._tcp_proxy import TcpProxy

StartMonitor = Callable[..., FleetMonitor]
Wait = Callable[..., None]


@pytest.fixture
def proxied_postgres(postgres_url: str) -> Any:
    """(proxy, url): ``postgres_url`` reached through a proxy the test can cut."""
    parts = urlsplit(postgres_url)
    proxy = TcpProxy(parts.hostname or "127.0.0.1", parts.port or 5432)
    user = f"{parts.username}@" if parts.username else ""
    netloc = f"{user}127.0.0.1:{proxy.port}"
    try:
        yield proxy, urlunsplit(parts._replace(netloc=netloc))
    finally:
        proxy.close()


def _send_while_down(devices: Any, name: str, count: int) -> None:
    for i in range(count):
        devices.heartbeat(name, requests=i + 1, edge_requests=i + 1, uptime_s=float(i + 2))
    devices.event(name, "install_failed", reason="hash_mismatch")


def test_postgres_outage_holds_the_writes_until_it_is_back(
    proxied_postgres: Any, start_monitor: StartMonitor, devices: Any, wait: Wait
) -> None:
    proxy, url = proxied_postgres
    store = PostgresFleetStore(url, connect_timeout_s=1.0)
    monitor = start_monitor(store, heartbeat_interval_s=30.0)
    try:
        devices.heartbeat("pg-dev", requests=0, edge_requests=0, uptime_s=1.0)
        wait(lambda: monitor.stats().applied == 1, timeout=30, what="first heartbeat stored")

        proxy.down()
        with pytest.raises(FleetStoreUnavailableError):
            store.devices()
        _send_while_down(devices, "pg-dev", 5)
        # Long past the three tries (1.2 s) after which the monitor used to drop a batch.
        wait(lambda: monitor.stats().write_retries >= 3, timeout=30, what="writes retried")
        assert monitor.stats().applied == 1

        proxy.up()
        wait(lambda: monitor.stats().applied == 7, timeout=30, what="held writes applied")
        record = store.device("pg-dev")
        assert record.heartbeats == 6 and record.totals.requests == 5
        assert [e.reason for e in store.events("pg-dev")] == ["hash_mismatch"]
        assert monitor.stats().write_failures == 0
    finally:
        monitor.close()  # before its store
        store.close()


def test_sqlite_locked_by_another_writer_loses_nothing(
    store_path: Path, start_monitor: StartMonitor, devices: Any, wait: Wait
) -> None:
    store = SqliteFleetStore(store_path, timeout_s=0.1)
    other = sqlite3.connect(store_path, isolation_level=None)
    monitor = start_monitor(store, heartbeat_interval_s=30.0)
    try:
        other.execute("BEGIN IMMEDIATE")  # e.g. a backup holding the write lock
        _send_while_down(devices, "lite-dev", 3)
        wait(lambda: monitor.stats().write_retries >= 3, timeout=30, what="writes retried")
        assert monitor.stats().applied == 0
        other.execute("COMMIT")
        wait(lambda: monitor.stats().applied == 4, timeout=30, what="held writes applied")
        assert store.device("lite-dev").heartbeats == 3
        assert monitor.stats().write_failures == 0
    finally:
        other.close()
        monitor.close()
        store.close()


def _corrupt(store: FleetStore, device_id: str, postgres_url: str | None) -> None:
    sql = "UPDATE {} SET record = '{{\"device_id\": 5}}' WHERE device_id = %s"
    if isinstance(store, SqliteFleetStore):
        with sqlite3.connect(store.path) as db:
            db.execute(sql.format("devices").replace("%s", "?"), (device_id,))
    else:
        assert postgres_url is not None
        with psycopg.connect(postgres_url, autocommit=True) as db:
            db.execute(sql.format("fleet_devices"), (device_id,))


def test_a_corrupt_record_costs_only_its_own_message(
    request: pytest.FixtureRequest,
    fleet_store: FleetStore,
    start_monitor: StartMonitor,
    devices: Any,
    wait: Wait,
) -> None:
    postgres = isinstance(fleet_store, PostgresFleetStore)
    url = request.getfixturevalue("postgres_url") if postgres else None
    monitor = start_monitor(fleet_store, heartbeat_interval_s=30.0, linger_s=0.5)
    for name in ("broken", "fine"):
        devices.heartbeat(name, uptime_s=1.0)
    wait(lambda: monitor.stats().applied == 2, what="first heartbeats")
    _corrupt(fleet_store, "broken", url)
    # One batch (the writer lingers 0.5 s): the broken device's heartbeat between two of
    # the fine one's.
    devices.heartbeat("fine", uptime_s=2.0)
    devices.heartbeat("broken", uptime_s=2.0)
    devices.heartbeat("fine", uptime_s=3.0)
    wait(lambda: monitor.stats().write_failures == 1, what="the broken one dropped")
    assert monitor.flush()
    assert monitor.stats().applied == 4
    assert fleet_store.device("fine").heartbeats == 3
    with pytest.raises(FleetError, match="corrupt"):
        fleet_store.device("broken")
    devices.heartbeat("fine", uptime_s=4.0)  # and the monitor goes on
    wait(lambda: fleet_store.device("fine").heartbeats == 4, what="later heartbeat")
