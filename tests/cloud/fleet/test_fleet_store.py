"""The fleet stores (a real SQLite file, a real PostgreSQL schema) and the fleet
settings. Tests taking ``fleet_store`` run on both backends."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from fogline.cloud.fleet import (
    MAX_EVENTS_PER_DEVICE,
    FleetStore,
    Observed,
    SqliteFleetStore,
    Sweep,
    load_fleet_settings,
)
from fogline.protocol import (
    ConfigError,
    DeviceEvent,
    DeviceState,
    FleetError,
    Heartbeat,
    UnknownDeviceError,
)

HB = Callable[..., Heartbeat]


def test_sqlite_store_is_a_fleet_store(sqlite_store: SqliteFleetStore) -> None:
    assert isinstance(sqlite_store, FleetStore)
    mode = sqlite3.connect(sqlite_store.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_apply_and_read_back(fleet_store: FleetStore, heartbeat_factory: HB) -> None:
    batch = [
        Observed(DeviceState(device_id="a", status="online", at=1.0), 10.0),
        Observed(heartbeat_factory("a", 1, requests=3), 11.0),
        Observed(heartbeat_factory("b", 1), 12.0),
        Observed(DeviceEvent(device_id="a", kind="install_failed", at=2.0, reason="x"), 13.0),
    ]
    assert fleet_store.apply(batch) == 4
    assert fleet_store.apply([]) == 0
    assert [d.device_id for d in fleet_store.devices()] == ["a", "b"]
    a = fleet_store.device("a")
    assert a.totals.requests == 3 and a.first_seen == 10.0 and a.last_seen == 13.0
    assert [(e.kind, e.reason) for e in fleet_store.events("a")] == [("install_failed", "x")]
    with pytest.raises(UnknownDeviceError, match="nope"):
        fleet_store.device("nope")
    assert fleet_store.events("nope") == []


def test_events_are_bounded_per_device(fleet_store: FleetStore) -> None:
    for chunk in range(3):
        fleet_store.apply(
            [
                Observed(
                    DeviceEvent(device_id=dev, kind="rollback", at=float(i), detail=str(i)), 1.0
                )
                for i in range(chunk * 30, chunk * 30 + 30)
                for dev in ("x", "y")
            ]
        )
    for dev in ("x", "y"):
        events = fleet_store.events(dev, limit=1000)
        assert len(events) == MAX_EVENTS_PER_DEVICE
        assert [e.detail for e in events[:2]] == ["89", "88"]  # newest first


def test_sweep_marks_silent_devices_offline(fleet_store: FleetStore, heartbeat_factory: HB) -> None:
    fleet_store.apply(
        [
            Observed(heartbeat_factory("fast", interval_s=1.0), 100.0),
            Observed(heartbeat_factory("slow", interval_s=10.0), 100.0),
            Observed(DeviceState(device_id="state-only", status="online", at=1.0), 100.0),
        ]
    )

    def sweep(now: float, since: float = 0.0) -> list[str]:
        return fleet_store.sweep(Sweep(now, since, missed_heartbeats=3, default_interval_s=5.0))

    assert sweep(102.9) == []
    assert sweep(103.1) == ["fast"]
    assert sweep(110.0) == []  # already offline; state-only uses the 5 s default: 115
    assert sweep(115.5) == ["state-only"]
    # A monitor that just started gives everyone a full grace period.
    assert sweep(131.0, since=105.0) == []
    assert sweep(135.5, since=105.0) == ["slow"]
    assert fleet_store.device("fast").status_reason == "missed_heartbeats"


def test_readonly_store(store_path: Path, heartbeat_factory: HB) -> None:
    with pytest.raises(FleetError, match="no fleet store"):
        SqliteFleetStore(store_path, readonly=True)
    with SqliteFleetStore(store_path) as writer:
        writer.apply([Observed(heartbeat_factory("a"), 1.0)])
        with SqliteFleetStore(store_path, readonly=True) as reader:
            assert [d.device_id for d in reader.devices()] == ["a"]
            with pytest.raises(FleetError, match="read-only"):
                reader.apply([Observed(heartbeat_factory("b"), 1.0)])
            writer.apply([Observed(heartbeat_factory("b"), 2.0)])
            assert len(reader.devices()) == 2  # sees the writer's commits


def test_corrupt_or_foreign_files_are_clear_errors(tmp_path: Path, heartbeat_factory: HB) -> None:
    garbage = tmp_path / "garbage.sqlite3"
    garbage.write_bytes(b"this is not a database" * 100)
    with pytest.raises(FleetError, match=r"garbage\.sqlite3"):
        SqliteFleetStore(garbage)
    newer = tmp_path / "newer.sqlite3"
    sqlite3.connect(newer).execute("PRAGMA user_version=99").connection.close()
    with pytest.raises(FleetError, match="schema version 99"):
        SqliteFleetStore(newer)
    path = tmp_path / "tampered.sqlite3"
    with SqliteFleetStore(path) as store:
        store.apply([Observed(heartbeat_factory("a"), 1.0)])
    db = sqlite3.connect(path)
    db.execute("UPDATE devices SET record = '{\"device_id\": 5}'")
    db.commit()
    db.close()
    with SqliteFleetStore(path) as store:
        with pytest.raises(FleetError, match="corrupt"):
            store.devices()
        store.forget("a")  # a corrupt device can still be removed
        assert store.devices() == []


def test_settings_from_toml_env_and_overrides(tmp_path: Path) -> None:
    config = tmp_path / "fogline.toml"
    config.write_text(
        "[fleet]\nmissed_heartbeats = 4\nheartbeat_interval_s = 2.5\n"
        '[fleet.mqtt]\nurl = "mqtt://broker:1884"\n[fleet.thresholds]\np99_high_ms = 100.0\n'
    )
    env = {"FOGLINE_DATA_DIR": str(tmp_path / "d"), "FOGLINE_FLEET__MISSED_HEARTBEATS": "5"}
    s = load_fleet_settings(config, env=env, overrides={"metrics_port": 0})
    assert s.missed_heartbeats == 5 and s.heartbeat_interval_s == 2.5
    assert s.mqtt.url == "mqtt://broker:1884" and s.thresholds.p99_high_ms == 100.0
    assert s.store_path == tmp_path / "d" / "fleet.sqlite3" and s.metrics_port == 0
    assert load_fleet_settings(env={}).data_dir == Path("var/fogline")
    nested = {
        "FOGLINE_FLEET__THRESHOLDS__P99_HIGH_MS": "80",
        "FOGLINE_BROKER_URL": "mqtt://alias:1",
        "FOGLINE_TOPIC_PREFIX": "site",
        "FOGLINE_DEVICE_ID": "an edge variable, not the fleet's",
    }
    s = load_fleet_settings(env=nested)
    assert s.thresholds.p99_high_ms == 80.0 and s.mqtt.url == "mqtt://alias:1"
    assert s.topic_prefix == "site"


@pytest.mark.parametrize(
    ("text", "env", "field"),
    [
        ("missed_heartbeats = 0", {}, "missed_heartbeats"),
        ("surprise = 1", {}, "surprise"),
        ("[mqtt]\nurl = 'http://x'", {}, "mqtt.url"),
        ("topic_prefix = 'a/+/b'", {}, "topic_prefix"),
        ("shared_group = 'a/b'", {}, "shared_group"),
        ("", {"FOGLINE_FLEET__METRICS_PORT": "eighty"}, "FOGLINE_FLEET__METRICS_PORT"),
        ("", {"FOGLINE_FLEET__MISSED_HEARTBEAT": "5"}, "missed_heartbeat': Extra inputs"),
        ("", {"FOGLINE_BROKER_URL": "ftp://x"}, "FOGLINE_BROKER_URL: field 'mqtt.url'"),
        ("this is = = not toml", {}, "not valid TOML"),
    ],
)
def test_bad_settings_name_the_field(
    tmp_path: Path, text: str, env: dict[str, str], field: str
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_fleet_settings(config, env=env)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_fleet_settings(tmp_path / "absent.toml", env={})


def test_forget_removes_a_device_and_its_events(
    fleet_store: FleetStore, heartbeat_factory: HB
) -> None:
    fleet_store.apply(
        [
            Observed(heartbeat_factory("gone"), 1.0),
            Observed(heartbeat_factory("kept"), 1.0),
            Observed(DeviceEvent(device_id="gone", kind="rollback", at=1.0), 1.0),
            Observed(DeviceEvent(device_id="kept", kind="rollback", at=1.0), 1.0),
        ]
    )
    fleet_store.forget("gone")
    assert [d.device_id for d in fleet_store.devices()] == ["kept"]
    assert fleet_store.events("gone") == [] and len(fleet_store.events("kept")) == 1
    with pytest.raises(UnknownDeviceError, match="gone"):
        fleet_store.forget("gone")
    fleet_store.apply([Observed(heartbeat_factory("gone", seq=9), 5.0)])  # it came back
    assert fleet_store.device("gone").first_seen == 5.0
