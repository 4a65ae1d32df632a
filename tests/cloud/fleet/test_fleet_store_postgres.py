"""What only the PostgreSQL fleet store has: replicas writing at once, a server that drops
its connections, clear errors, and the settings and CLI that select it. On the machine's
real PostgreSQL, in a schema of each test's own (the contract tests shared with SQLite
are in test_fleet_store.py and test_fleet_monitor.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from typer.testing import CliRunner

from fogline.cloud.fleet import (
    Observed,
    PostgresFleetStore,
    SqliteFleetStore,
    Sweep,
    load_fleet_settings,
    open_fleet_store,
)
from fogline.cloud.fleet._postgres import redact_url
from fogline.cloud.fleet.cli import app
from fogline.protocol import (
    ConfigError,
    DeviceState,
    FleetError,
    Heartbeat,
    MqttSettings,
    MqttTransport,
    Topics,
    encode,
)

HB = Callable[..., Heartbeat]


def test_replicas_writing_at_once_lose_no_update(postgres_url: str, heartbeat_factory: HB) -> None:
    """Four writers on two store objects fold heartbeats of the same devices, new ones
    included, at the same time: every heartbeat counts once (a read-modify-write without
    the per-device locks loses some)."""
    stores = [PostgresFleetStore(postgres_url), PostgresFleetStore(postgres_url)]
    devices = [f"dev-{i:02d}" for i in range(12)]
    rounds = 15
    errors: list[BaseException] = []

    def write(writer: int) -> None:
        store = stores[writer % 2]
        try:
            for r in range(rounds):
                # Overlapping, differently ordered batches: deadlock bait as well.
                order = devices if (writer + r) % 2 else devices[::-1]
                seq = 1 + r * 4 + writer  # a different heartbeat each, not a redelivery
                store.apply(
                    [Observed(heartbeat_factory(d, seq, uptime_s=float(seq)), 1.0) for d in order]
                )
        except BaseException as exc:  # reported below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        rows = stores[0].devices()
        assert [d.device_id for d in rows] == devices
        assert [d.heartbeats for d in rows] == [4 * rounds] * len(devices)
    finally:
        for s in stores:
            s.close()


def test_sweep_skips_a_device_being_written(postgres_url: str, heartbeat_factory: HB) -> None:
    with PostgresFleetStore(postgres_url) as store:
        store.apply(
            [Observed(heartbeat_factory(d, interval_s=1.0), 100.0) for d in ("busy", "idle")]
        )
        with psycopg.connect(postgres_url) as other, other.transaction():
            # Another replica in the middle of writing "busy".
            other.execute("SELECT 1 FROM fleet_devices WHERE device_id = 'busy' FOR UPDATE")
            started = time.monotonic()
            gone = store.sweep(Sweep(200.0, 0.0, missed_heartbeats=3, default_interval_s=5.0))
            assert gone == ["idle"] and time.monotonic() - started < 5.0  # did not wait
        assert store.sweep(Sweep(200.0, 0.0, 3, 5.0)) == ["busy"]


def test_store_reconnects_after_the_server_drops_its_connections(
    postgres_url: str, heartbeat_factory: HB
) -> None:
    name = f"fogtest-{uuid.uuid4().hex[:8]}"
    url = f"{postgres_url}&application_name={name}"
    with PostgresFleetStore(url) as store, psycopg.connect(postgres_url, autocommit=True) as admin:
        store.apply([Observed(heartbeat_factory("a"), 1.0)])
        killed = admin.execute(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = %s) AS t",
            (name,),
        ).fetchone()
        assert killed and killed[0] >= 1
        # As after a server restart: the pool replaces dead connections.
        assert store.apply([Observed(heartbeat_factory("b"), 2.0)]) == 1
        assert [d.device_id for d in store.devices()] == ["a", "b"]


def test_errors_are_clear_and_never_show_the_password(
    postgres_url: str, heartbeat_factory: HB
) -> None:
    base, _, query = postgres_url.partition("?")
    user_host = base.removeprefix("postgresql://")
    with pytest.raises(FleetError, match=r"no fleet store at .*has a monitor run"):
        PostgresFleetStore(postgres_url, readonly=True)
    secret_url = f"postgresql://nobody-{uuid.uuid4().hex[:6]}:s3cret@{user_host.split('@')[-1]}"
    with pytest.raises(FleetError, match="connect failed") as bad_login:
        PostgresFleetStore(f"{secret_url}?{query}")
    assert "s3cret" not in str(bad_login.value) and ":***@" in str(bad_login.value)
    with pytest.raises(FleetError, match=r"connect failed.*refused"):
        PostgresFleetStore("postgresql://postgres@127.0.0.1:1/test", connect_timeout_s=2)

    with PostgresFleetStore(postgres_url) as store:
        store.apply([Observed(heartbeat_factory("a"), 1.0)])
        with PostgresFleetStore(postgres_url, readonly=True) as reader:
            assert [d.device_id for d in reader.devices()] == ["a"]
            with pytest.raises(FleetError, match="read-only"):
                reader.apply([Observed(heartbeat_factory("b"), 1.0)])
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute("""UPDATE fleet_devices SET record = '{"device_id": 5}'""")
            with pytest.raises(FleetError, match="corrupt"):
                store.devices()
            with pytest.raises(FleetError, match="corrupt"):  # and nothing half-written
                store.apply([Observed(heartbeat_factory("a", seq=2), 2.0)])
            store.forget("a")  # a corrupt device can still be removed
            assert store.devices() == []
            admin.execute("UPDATE fleet_schema SET version = 99")
    with pytest.raises(FleetError, match="schema version 99"):
        PostgresFleetStore(postgres_url)
    # Nothing left behind by the stores that failed to open or were closed.
    assert [t.name for t in threading.enumerate() if t.name.startswith("fogline-fleet-")] == []


def test_redact_url() -> None:
    assert redact_url("postgresql://u:pw@db:5433/f?x=1") == "postgresql://u:***@db:5433/f?x=1"
    assert redact_url("postgresql://u:pw@[::1]/f") == "postgresql://u:***@[::1]/f"
    assert redact_url("postgresql://u@db/f") == "postgresql://u@db/f"
    assert redact_url("postgresql://u:p@w@db:x/f") == "postgresql://u:***@db:x/f"  # no parse


def test_settings_select_the_store(
    tmp_path: Path, postgres_url: str, heartbeat_factory: HB
) -> None:
    sqlite = load_fleet_settings(env={"FOGLINE_DATA_DIR": str(tmp_path)})
    assert sqlite.store_url is None and sqlite.store_location == str(tmp_path / "fleet.sqlite3")
    store = open_fleet_store(sqlite)
    assert isinstance(store, SqliteFleetStore)
    store.close()

    settings = load_fleet_settings(env={"FOGLINE_FLEET__STORE_URL": postgres_url})
    assert settings.store_url is not None and "postgres" not in repr(settings.store_url)
    store = open_fleet_store(settings)
    try:
        assert isinstance(store, PostgresFleetStore) and store.location == settings.store_location
    finally:
        store.close()
    for bad in ("mysql://db/x", "fleet.sqlite3"):
        with pytest.raises(ConfigError, match=r"store_url.*postgresql://"):
            load_fleet_settings(env={"FOGLINE_FLEET__STORE_URL": bad})
    with pytest.raises(ConfigError, match=r"store_url.*bad port") as bad_port:
        load_fleet_settings(env={"FOGLINE_FLEET__STORE_URL": "postgresql://u:pw@db:x/f"})
    assert "pw" not in str(bad_port.value)


def test_cli_reads_a_postgres_store(
    postgres_url: str, heartbeat_factory: HB, monkeypatch: pytest.MonkeyPatch
) -> None:
    with PostgresFleetStore(postgres_url) as store:
        store.apply(
            [
                Observed(heartbeat_factory("up-1", models={"digits": 2}), time.time()),
                Observed(DeviceState(device_id="down-1", status="offline", at=1.0), 1.0),
            ]
        )
    monkeypatch.setenv("FOGLINE_FLEET__STORE_URL", postgres_url)
    runner = CliRunner()
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (summary["devices_total"], summary["devices_online"]) == (2, 1)
    result = runner.invoke(app, ["devices", "--offline", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["device_id"] for r in json.loads(result.stdout)] == ["down-1"]

    monkeypatch.setenv("FOGLINE_FLEET__STORE_URL", "postgresql://postgres@127.0.0.1:1/test")
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code != 0
    assert json.loads(result.stdout)["error"]["code"] == "fleet_store_unavailable"


def test_two_monitor_processes_share_one_database(
    postgres_url: str,
    broker_url: str,
    tmp_path: Path,
    heartbeat_factory: HB,
    wait: Callable[..., None],
) -> None:
    """``fogline fleet monitor`` twice, as on two hosts: one shared subscription, one
    PostgreSQL; together they store every heartbeat once."""
    prefix = f"fogtest/{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "FOGLINE_FLEET__STORE_URL": postgres_url}
    procs = [
        subprocess.Popen(
            [
                sys.executable, "-c", "from fogline.cloud.fleet.cli import app; app()",
                "monitor", "--broker", broker_url, "--metrics-port", "0",
                "--data-dir", str(tmp_path / f"replica-{i}"), "--prefix", prefix,
                "--shared-group", "fleet", "--heartbeat-interval", "30", "--json",
            ],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for i in range(2)
    ]  # fmt: skip
    try:
        for proc in procs:
            assert proc.stdout is not None
            started = json.loads(proc.stdout.readline())
            assert started["store"] == redact_url(postgres_url)
        topics = Topics(prefix)
        names = [f"dev-{i:02d}" for i in range(8)]
        with MqttTransport(MqttSettings(url=broker_url)) as sender:
            for round_ in range(1, 6):
                for name in names:
                    beat = heartbeat_factory(name, round_, uptime_s=float(round_), requests=round_)
                    sender.publish(topics.heartbeat(name), encode(beat), qos=1, wait=True)
        with PostgresFleetStore(postgres_url, readonly=True) as reader:
            wait(
                lambda: sum(d.heartbeats for d in reader.devices()) == 40, timeout=30,
                what="every heartbeat in the database",
            )  # fmt: skip
            assert [d.totals.requests for d in reader.devices()] == [5] * 8
        stats = []
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            out, err = proc.communicate(timeout=20)
            assert proc.returncode == 0, err
            stats.append(json.loads(out.strip().splitlines()[-1]))
        assert all(s["event"] == "stopped" for s in stats)
        assert all(s["stats"]["applied"] > 0 for s in stats)  # each did a part
        assert not (tmp_path / "replica-0" / "fleet.sqlite3").exists()  # no SQLite on the side
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=10)
