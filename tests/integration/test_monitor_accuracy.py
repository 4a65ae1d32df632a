"""Monitor accuracy: the fleet monitor's summary matches the simulator's ground truth.

A short in-process run of real parts on a real Mosquitto: a release registered in the
cloud registry and published with the cloud's publisher (signed), the cloud's artifact
service, the fleet monitor on SQLite, and a simulated fleet of real edge agents (with
one ``mcu-gateway`` that has no local variant). One device is killed mid-run, so the
comparison covers a device whose last heartbeat interval is never reported.
"""

from __future__ import annotations

import math
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "edge"))  # for _release_kit

from _release_kit import INPUT_SPECS, OUTPUT_SPECS, build_model, sample_input

from fogline.cloud import ArtifactService, Registry, load_signing_key, publish_release
from fogline.cloud.fleet import FLEET_DB_NAME, FleetMonitor, SqliteFleetStore, summarize
from fogline.firmware_sim import SimulatedFleet
from fogline.protocol import MqttSettings, MqttTransport, Topics

MODEL = "digits"
HEARTBEAT_S = 0.5
RATE = 10.0  # requests/s per device
CLASSES = ("cpu-1t", "cpu-4t")  # rpi4 and jetson-like; mcu-gateway gets no variant


@pytest.fixture
def cloud(
    mqtt_settings: MqttSettings, tmp_path: Path
) -> Iterator[tuple[Registry, MqttTransport, Topics]]:
    topics = Topics(f"fogline-accuracy/{uuid.uuid4().hex[:10]}")
    registry = Registry(tmp_path / "cloud")
    transport = MqttTransport(mqtt_settings, client_id=f"accuracy-cloud-{uuid.uuid4().hex[:6]}")
    service = ArtifactService(transport, registry.store, topics=topics)
    service.start()
    transport.connect()
    try:
        yield registry, transport, topics
    finally:
        service.close()
        transport.close()


def _register(registry: Registry, tmp_path: Path, seed: int) -> int:
    path = tmp_path / f"model-{seed}.onnx"
    path.write_bytes(build_model(seed=seed))
    record = registry.register(
        MODEL,
        artifacts={"fp32": path},
        assignments={c: "fp32" for c in CLASSES},
        inputs=INPUT_SPECS,
        outputs=OUTPUT_SPECS,
        source="imported",
        lineage={"test": "monitor accuracy"},
        card={},
        example_input={"input": sample_input()},
    )
    return record.version


@pytest.mark.slow
def test_monitor_summary_matches_the_simulators_ground_truth(
    cloud: tuple[Registry, MqttTransport, Topics], mqtt_settings: MqttSettings, tmp_path: Path
) -> None:
    registry, transport, topics = cloud
    key = load_signing_key(tmp_path / "cloud")
    version = _register(registry, tmp_path, seed=3)
    publish_release(registry, MODEL, version, transport, key, scope="fleet", topics=topics)

    store = SqliteFleetStore(tmp_path / "fleet" / FLEET_DB_NAME)
    monitor = FleetMonitor(mqtt_settings, store, topics, heartbeat_interval_s=HEARTBEAT_S)
    fleet = SimulatedFleet(
        devices=4,
        profile_mix={"rpi4": 2.0, "jetson-like": 1.0, "mcu-gateway": 1.0},
        broker_url=mqtt_settings.url,
        trusted_keys=[key.public_key.to_text()],
        data_root=tmp_path / "devices",
        models=[MODEL],
        topic_prefix=topics.prefix,
        rate_per_device=RATE,
        heartbeat_interval_s=HEARTBEAT_S,
        flaps=False,
        control=False,
        seed=7,
    )
    try:
        monitor.start()
        fleet.start(traffic=False)
        assert fleet.settle(60), fleet.report().per_device
        fleet.start_traffic()
        deadline = time.monotonic() + 30
        while fleet.ledger.totals()[1] < 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        victim = next(d for d, p in fleet.device_profiles().items() if p == "rpi4")
        assert fleet.inject("kill", victim).ok
        time.sleep(1.0)  # traffic goes on without the victim
        fleet.stop_traffic()
        truth = fleet.report()  # before stopping: running devices and their versions
        # Running agents heartbeat again after the last request; then flush the monitor.
        time.sleep(3 * HEARTBEAT_S)
        assert monitor.flush(10)
        records = {r.device_id: r for r in store.devices()}
        summary = summarize(list(records.values()))
    finally:
        fleet.stop()
        monitor.close()
        store.close()

    # Device counts: every device known, the killed one offline by its last will.
    assert summary.devices_total == truth.devices == 4
    assert summary.devices_online == truth.connected == 3
    assert summary.devices_offline == 1
    assert not records[victim].online
    assert records[victim].status_reason == "last_will"

    # Versions: the monitor's view of the running devices is the agents' own.
    monitor_versions = Counter(
        str(r.heartbeat.models[MODEL])
        for r in records.values()
        if r.online and r.heartbeat is not None and MODEL in r.heartbeat.models
    )
    assert {MODEL: dict(monitor_versions)} == truth.versions == {MODEL: {str(version): 2}}
    mcu = next(d for d in truth.per_device if d.profile == "mcu-gateway")
    assert records[mcu.device_id].heartbeat is not None
    assert records[mcu.device_id].heartbeat.models == {}  # no variant for its class

    # Request counts: exact for running devices (their last heartbeat came after the
    # traffic stopped); for the killed one, at most its last heartbeat interval is lost.
    granularity = math.ceil(RATE * HEARTBEAT_S * 3) + 2
    assert truth.answered > 50
    for dev in truth.per_device:
        totals = records[dev.device_id].totals
        if dev.running:
            assert (totals.edge_requests, totals.cloud_requests) == (dev.edge, dev.cloud), dev
        else:
            missing = dev.edge - totals.edge_requests
            assert 0 <= missing <= granularity, (dev.edge, totals.edge_requests)
            assert totals.edge_requests > 0
    answered_seen = summary.edge_requests_total + summary.cloud_requests_total
    assert 0 <= truth.edge + truth.cloud - answered_seen <= granularity
    assert summary.edge_requests_total > 0
