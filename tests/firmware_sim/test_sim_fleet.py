"""A short real run: simulated devices running real agents on a real Mosquitto, a signed
release of a small ONNX model, traffic, faults and the ground-truth report."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _sim_kit import SimCloud

from fogline.firmware_sim import SimulatedFleet, allocate_profiles, parse_scenario, send_control
from fogline.protocol import (
    ConfigError,
    DeviceState,
    MqttMessage,
    MqttSettings,
    MqttTransport,
    Topics,
    decode,
)


def _fleet(cloud: SimCloud, url: str, data_root: Path, **overrides: object) -> SimulatedFleet:
    settings: dict[str, object] = {
        "devices": 4,
        "profile_mix": {"rpi4": 0.5, "jetson-like": 0.25, "mcu-gateway": 0.25},
        "broker_url": url,
        "trusted_keys": [cloud.public_key],
        "data_root": data_root,
        "models": ["digits"],
        "topic_prefix": cloud.topics.prefix,
        "rate_per_device": 20.0,
        "heartbeat_interval_s": 0.5,
        "flaps": False,
        "seed": 1,
    }
    settings.update(overrides)
    return SimulatedFleet(**settings)


def test_profile_allocation_is_exact_and_interleaved() -> None:
    mix = {"rpi4": 0.6, "jetson-like": 0.3, "mcu-gateway": 0.1}
    names = allocate_profiles(10, mix)
    assert sorted(names) == sorted(["rpi4"] * 6 + ["jetson-like"] * 3 + ["mcu-gateway"])
    assert "mcu-gateway" in allocate_profiles(20, mix)
    assert set(names[:5]) == {"rpi4", "jetson-like"}
    assert allocate_profiles(3, {"rpi4": 1.0}) == ["rpi4"] * 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"devices": 0}, "devices"),
        ({"profile_mix": {"pentium": 1.0}}, "unknown profile(s) pentium"),
        ({"profile_mix": {"rpi4": -1.0}}, "profile_mix"),
        ({"models": []}, "models"),
        ({"broker_url": "http://x"}, "broker_url"),
        ({"trusted_keys": ["nope"]}, "trusted_keys"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_bad_fleet_settings_are_config_errors(
    sim_cloud: SimCloud, broker_url: str, tmp_path: Path, overrides: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _fleet(sim_cloud, broker_url, tmp_path, **overrides)
    assert field in info.value.message


@pytest.mark.slow
def test_a_short_run_reports_its_ground_truth(
    sim_cloud: SimCloud,
    broker_url: str,
    tmp_path: Path,
    model_bytes: Callable[[int], bytes],
    no_thread_left: None,
) -> None:
    sim_cloud.release("digits", 1, model_bytes(1))
    sim_cloud.desire("digits", 1, sequence=1)
    fleet = _fleet(sim_cloud, broker_url, tmp_path)
    with fleet:
        assert fleet.settle(60), fleet.report().per_device
        deadline = time.monotonic() + 30
        while fleet.ledger.totals()[0] < 40 and time.monotonic() < deadline:
            time.sleep(0.1)
        fleet.stop_traffic()
        during = fleet.report()
    report = fleet.report()
    assert report.devices == 4
    assert report.devices_by_profile == {"jetson-like": 1, "mcu-gateway": 1, "rpi4": 2}
    assert during.versions == {"digits": {"1": 3}}  # the mcu gateway has no variant
    assert report.running == 0  # all stopped
    assert report.sent > 20
    assert report.sent == report.answered + report.errors
    assert report.edge > 0
    assert report.edge + report.cloud == report.answered
    for dev in report.per_device:
        assert dev.sent == dev.answered + dev.errors
        if dev.profile == "mcu-gateway":
            assert dev.edge == 0  # nothing to run locally
        else:
            assert dev.sent > 0
            assert dev.answered > 0
    assert 0 <= report.accuracy <= 1
    assert report.edge_latency_p50_ms > 0
    assert fleet.sessions is not None


@pytest.mark.slow
def test_faults_from_a_scenario_and_from_the_control_channel(
    sim_cloud: SimCloud,
    broker_url: str,
    mqtt_settings: MqttSettings,
    sim_topics: Topics,
    tmp_path: Path,
    model_bytes: Callable[[int], bytes],
    no_thread_left: None,
) -> None:
    sim_cloud.release("digits", 1, model_bytes(1))
    sim_cloud.desire("digits", 1, sequence=1)
    states: dict[str, list[str]] = {}
    changed = threading.Condition()

    def on_state(msg: MqttMessage) -> None:
        if not msg.payload:
            return
        state = decode(msg.payload, DeviceState)
        with changed:
            states.setdefault(state.device_id, []).append(state.status)
            changed.notify_all()

    def saw(device_id: str, status: str, count: int = 1) -> bool:
        with changed:
            return changed.wait_for(
                lambda: states.get(device_id, []).count(status) >= count, timeout=20
            )

    watcher = MqttTransport(mqtt_settings)
    watcher.subscribe(sim_topics.all_device("state"), on_state)
    watcher.connect()
    scenario = parse_scenario(
        {"faults": [{"at": 0.5, "kind": "disconnect", "device": "sim-0001", "duration_s": 1.0}]}
    )
    fleet = _fleet(
        sim_cloud, broker_url, tmp_path, devices=3, profile_mix={"rpi4": 1.0}, rate_per_device=5.0
    )
    fleet.scenario = scenario
    try:
        fleet.start()
        assert fleet.settle(60)
        # The scenario's link cut makes the broker publish sim-0001's last will.
        assert saw("sim-0001", "offline")
        assert saw("sim-0001", "online", 2)
        # Kill from the control channel: the last will, then a restart brings it back.
        reply = send_control(tmp_path, {"op": "fault", "kind": "kill", "device": "sim-0002"})
        assert reply["ok"], reply
        assert saw("sim-0002", "offline")
        assert fleet.devices["sim-0002"].agent is None
        bad = send_control(tmp_path, {"op": "fault", "kind": "kill", "device": "sim-0002"})
        assert not bad["ok"]
        assert "not running" in bad["fault"]["detail"]
        unknown = send_control(tmp_path, {"op": "fault", "kind": "kill", "device": "sim-9"})
        assert unknown["error"]["message"] == "unknown simulated device 'sim-9'"
        assert (
            send_control(tmp_path, {"op": "fault", "kind": "melt", "device": "sim-0"})["error"][
                "code"
            ]
            == "bad_request"
        )
        reply = send_control(tmp_path, {"op": "fault", "kind": "restart", "device": "sim-0002"})
        assert reply["ok"], reply
        assert saw("sim-0002", "online", 2)
        assert fleet.wait_for_version("digits", 1, 30, ["sim-0002"]) == []
        rows = send_control(tmp_path, {"op": "devices"})["devices"]
        assert {r["device_id"] for r in rows} == {"sim-0000", "sim-0001", "sim-0002"}
    finally:
        fleet.stop()
        watcher.close()
    report = fleet.report()
    kinds = [(f.kind, f.device_id, f.source, f.ok) for f in report.faults]
    assert ("disconnect", "sim-0001", "scenario", True) in kinds
    assert ("reconnect", "sim-0001", "scenario", True) in kinds
    assert ("kill", "sim-0002", "cli", True) in kinds
    assert ("kill", "sim-0002", "cli", False) in kinds
    assert ("restart", "sim-0002", "cli", True) in kinds
    restarted = next(d for d in report.per_device if d.device_id == "sim-0002")
    assert restarted.restarts == 1
