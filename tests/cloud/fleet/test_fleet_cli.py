"""``fogline fleet`` through typer's CliRunner, and the monitor command as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from fogline.cloud.fleet import FleetMonitor, Observed, SqliteFleetStore
from fogline.cloud.fleet.cli import app
from fogline.protocol import DeviceEvent, DeviceState, Heartbeat, Topics, free_port

HB = Callable[..., Heartbeat]
runner = CliRunner()


@pytest.fixture
def data_dir(tmp_path: Path, heartbeat_factory: HB) -> Path:
    data = tmp_path / "data"
    with SqliteFleetStore(data / "fleet.sqlite3") as store:
        store.apply(
            [
                Observed(
                    heartbeat_factory("up-1", requests=10, edge_requests=10, models={"digits": 2}),
                    1.0,
                ),
                Observed(heartbeat_factory("up-2", models={"digits": 1}), 1.0),
                Observed(DeviceState(device_id="down-1", status="offline", at=1.0), 1.0),
                Observed(
                    DeviceEvent(
                        device_id="up-1",
                        kind="install_succeeded",
                        at=1.0,
                        model="digits",
                        version=2,
                    ),
                    1.0,
                ),
            ]
        )
    return data


def _json(args: list[str]) -> Any:
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_status_json(data_dir: Path) -> None:
    s = _json(["status", "--data-dir", str(data_dir), "--json"])
    assert (s["devices_total"], s["devices_online"], s["devices_offline"]) == (3, 2, 1)
    assert s["models"][0]["versions"] == {"1": 1, "2": 1}
    assert {a["device_id"] for a in s["attention"]} == {"down-1", "up-2"}


def test_devices_json_and_offline_filter(data_dir: Path) -> None:
    rows = _json(["devices", "--data-dir", str(data_dir), "--json"])
    assert [r["device_id"] for r in rows] == ["down-1", "up-1", "up-2"]
    rows = _json(["devices", "--offline", "--data-dir", str(data_dir), "--json"])
    assert [(r["device_id"], r["status_reason"]) for r in rows] == [("down-1", "last_will")]


def test_show_json(data_dir: Path) -> None:
    d = _json(["show", "up-1", "--data-dir", str(data_dir), "--json"])
    assert d["device"]["totals"]["requests"] == 10
    assert [e["kind"] for e in d["events"]] == ["install_succeeded"]


def test_tables(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOGLINE_DATA_DIR", str(data_dir))
    monkeypatch.setenv("COLUMNS", "200")
    status = runner.invoke(app, ["status"])
    assert status.exit_code == 0 and "Needs attention" in status.stdout
    assert "v2 (newest)" in status.stdout
    listing = runner.invoke(app, ["devices"])
    assert listing.exit_code == 0 and "down-1" in listing.stdout and "last_will" in listing.stdout
    one = runner.invoke(app, ["show", "up-1"])
    assert one.exit_code == 0 and "install_succeeded" in one.stdout


def test_watch_refreshes(data_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "devices",
            "--data-dir",
            str(data_dir),
            "--json",
            "--watch",
            "--interval",
            "0.1",
            "--watch-count",
            "3",
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 3 and all(len(json.loads(line)) == 3 for line in lines)
    live = runner.invoke(
        app,
        [
            "status",
            "--data-dir",
            str(data_dir),
            "--watch",
            "--interval",
            "0.1",
            "--watch-count",
            "2",
        ],
    )
    assert live.exit_code == 0 and "Fleet" in live.stdout


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["show", "ghost"], "unknown_device"),
        (["status", "--data-dir", "{tmp}/nowhere"], "fleet_error"),
        (["devices", "--config", "{tmp}/absent.toml"], "config_error"),
    ],
)
def test_errors_are_clear(data_dir: Path, tmp_path: Path, args: list[str], code: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--data-dir" not in args:
        args += ["--data-dir", str(data_dir)]
    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 1
    assert json.loads(as_json.stdout)["error"]["code"] == code
    plain = runner.invoke(app, args)
    assert plain.exit_code == 1 and code in plain.output


def test_monitor_command_runs_until_sigterm(tmp_path: Path, broker_url: str) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fogline.cloud.fleet.cli import app; app()",
            "monitor",
            "--broker",
            broker_url,
            "--metrics-port",
            str(port),
            "--data-dir",
            str(tmp_path),
            "--prefix",
            "fogtest/cli",
            "--json",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        started = json.loads(proc.stdout.readline())
        assert started["event"] == "started" and started["metrics_url"].endswith(f":{port}/metrics")
        with urllib.request.urlopen(started["metrics_url"], timeout=10) as resp:
            assert b"fogline_devices" in resp.read()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert json.loads(out.strip().splitlines()[-1])["event"] == "stopped"
        assert (tmp_path / "fleet.sqlite3").is_file()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=10)


def test_monitor_command_without_broker(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "monitor",
            "--broker",
            f"mqtt://127.0.0.1:{free_port()}",
            "--metrics-port",
            "0",
            "--data-dir",
            str(tmp_path),
            "--connect-timeout",
            "1",
            "--json",
        ],
    )
    assert result.exit_code == 1
    assert (
        json.loads(result.stdout.strip().splitlines()[-1])["error"]["code"] == "broker_unavailable"
    )


def test_forget_clears_the_retained_state_so_no_monitor_brings_it_back(
    sqlite_store: SqliteFleetStore,  # before start_monitor: closed after the monitors
    start_monitor: Callable[..., FleetMonitor],
    broker_url: str,
    topics: Topics,
    devices: Any,
    wait: Callable[..., None],
) -> None:
    store = sqlite_store
    devices.state("retired", status="offline")  # retained, as a last will leaves it
    devices.state("active")
    monitor = start_monitor(store, heartbeat_interval_s=30.0)
    wait(lambda: len(store.devices()) == 2, what="both registered")
    data = ["--data-dir", str(store.path.parent)]
    common = [*data, "--broker", broker_url, "--prefix", topics.prefix]
    result = runner.invoke(app, ["forget", "retired", *common, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["forgotten"] == "retired"
    assert [d.device_id for d in store.devices()] == ["active"]
    assert monitor.flush() and monitor.stats().rejected == {}  # the cleared state is no error
    monitor.close()
    again = start_monitor(store, heartbeat_interval_s=30.0)  # reads the retained states
    wait(lambda: again.stats().received.get("state") == 1, what="retained state")
    assert again.flush() and [d.device_id for d in store.devices()] == ["active"]

    for bad, code in (("retired", "unknown_device"), ("a/b", "invalid_id")):
        result = runner.invoke(app, ["forget", bad, *common, "--json"])
        assert result.exit_code == 1
        assert json.loads(result.stdout)["error"]["code"] == code
    no_broker = ["--broker", f"mqtt://127.0.0.1:{free_port()}", "--connect-timeout", "1"]
    result = runner.invoke(app, ["forget", "active", *data, *no_broker, "--json"])
    assert json.loads(result.stdout)["error"]["code"] == "broker_unavailable"
    assert [d.device_id for d in store.devices()] == ["active"]  # nothing half done


def test_devices_filters_combine(tmp_path: Path, heartbeat_factory: HB) -> None:
    data = tmp_path / "filters"

    def hb(name: str, **fields: Any) -> Heartbeat:
        return heartbeat_factory(name, device_class="jetson-like", **fields)

    with SqliteFleetStore(data / "fleet.sqlite3") as store:
        store.apply(
            [
                Observed(hb("a", groups=["lab"], models={"digits": 1}), 1.0),
                Observed(heartbeat_factory("b", device_class="rpi4", models={"digits": 2}), 1.0),
                Observed(hb("c", groups=["lab"], models={"other": 1}), 1.0),
            ]
        )

    def ids(*filters: str) -> list[str]:
        return [
            r["device_id"] for r in _json(["devices", "--data-dir", str(data), *filters, "--json"])
        ]

    assert ids("--group", "lab") == ["a", "c"]
    assert ids("--model", "digits") == ["a", "b"]
    assert ids("--model", "digits:1") == ["a"]  # which devices still run v1
    assert ids("--group", "lab", "--model", "digits") == ["a"]
    assert ids("--class", "rpi4") == ["b"]
    assert ids("--group", "nobody") == []
    for bad in ("x:y", "digits:", ":1"):
        result = runner.invoke(app, ["devices", "--data-dir", str(data), "--model", bad, "--json"])
        assert result.exit_code == 1
        assert json.loads(result.stdout)["error"]["code"] == "config_error"
